"""Second-order relay solvers: per-frequency step coefficients (docs/spec.md section 8.1).

relayops' own extension, not part of the RDM paper. The relay path ``x = B(sigma) x0 + sigma z``
has the probability-flow ODE ``dx/dsigma = B'(sigma) x0_hat + (x - B(sigma) x0_hat)/sigma``.
Per patch-DCT frequency k, ``d/dsigma (x/sigma) = d/dsigma (D_k(sigma)/sigma) x0_hat``, so a step
is an integral of x0_hat against a known per-frequency weight. The solvers interpolate x0_hat
linearly in ``log sigma`` between two evaluations; the step is then

    x' = gamma x + idct(A * dct(x0_a) + E * dct(x0_b - x0_a)) + eta sigma' n,

``gamma = sqrt(1 - eta^2) sigma'/sigma``, ``A = D' - gamma D`` (SPEC 8's DDIM-blur factor) and a
correction factor E (``[s, s]``, one per step) computed here once per grid on the host.

Solver names (``relay_sample(..., solver=...)``):

* ``"rdm-heun"``: RDM's sampler (Euler step and its Heun correction, SPEC 8), 2 calls per step;
* ``"rdm-euler"``: SPEC 8's Euler (DDIM-blur) step alone, 1 call per step;
* ``"relay-2s"``: second order, x0_b at the deterministic DDIM-blur proposal at sigma'
  (2 calls per step);
* ``"relay-2m"``: second-order multistep, x0_b the previous step's x0_hat (1 call per step; the
  first step is first order).

The last step (to level 0) returns x0_hat, as in SPEC 8. The same multistep correction serves
EDM's base sampler (``edm_sample(..., solver="edm-2m")``: the path without blur, D = 1) and the
latent linear relay (``linear_relay_sample(..., solver="linear-2m")``: D = 1 - t/T_r), with the
factors :func:`edm_correction` and :func:`linear_correction`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import schedules
from .ops import blur_response

SOLVERS = ("rdm-heun", "rdm-euler", "relay-2s", "relay-2m")
SECOND_ORDER = ("relay-2s", "relay-2m")
EDM_SOLVERS = ("edm-heun", "edm-2m")  # edm_sample: EDM's Heun (SPEC 9), or multistep (section 9.1)
LINEAR_SOLVERS = ("linear-euler", "linear-2m")  # linear_relay_sample: SPEC 10's step, or multistep (10.1)

# Network calls per step of each solver (the last step, to level 0, is always one call).
CALLS_PER_STEP = {"rdm-heun": 2, "rdm-euler": 1, "relay-2s": 2, "relay-2m": 1, "edm-heun": 2, "edm-2m": 1,
                  "linear-euler": 1, "linear-2m": 1}

# The command line's step counts (``relayops sample``, ``relayops demo``): EDM steps of the base
# stage (Karras 0.002 .. 80), and levels of the relay stage's Karras grid (0.008 .. 80, the steps
# below the start level 0.9 are taken). edm-2m at 24 and relay-2m at 40 have a smaller transport
# error than the authors' edm-heun at 18 and rdm-heun at 60 with 24 calls instead of 35 and 14
# instead of 41 (docs/solvers.md, "On the command line").
CLI_STEPS = {"edm-2m": 24, "edm-heun": 18, "relay-2m": 40, "relay-2s": 40, "rdm-heun": 60, "rdm-euler": 60}

# Gauss-Legendre nodes per step: the integrand is analytic in log sigma, and a step of a useful
# grid spans at most a few units of log sigma, where 32 nodes are exact to rounding.
QUAD_NODES = 32


def check_solver(solver, valid=SOLVERS) -> str:
    """The solver name if it is one of ``valid``, or a ValueError that lists them."""
    if solver not in valid:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(valid)}")
    return solver


def resolve_solver(solver, heun) -> str:
    """The solver from ``solver`` and the older ``heun`` keyword (None = not given).

    ``heun=True`` means ``"rdm-heun"`` and ``heun=False`` ``"rdm-euler"``; both None gives
    ``"rdm-heun"`` (the authors' sampler). Both given must agree.
    """
    if heun is not None and not isinstance(heun, bool):
        raise TypeError(f"heun must be True, False or None, got {heun!r}")
    from_heun = None if heun is None else ("rdm-heun" if heun else "rdm-euler")
    if solver is None:
        return from_heun or "rdm-heun"
    check_solver(solver)
    if from_heun is not None and from_heun != solver:
        raise ValueError(f"heun={heun} selects solver {from_heun!r} but solver={solver!r} was given; "
                         f"pass only solver= (heun only chooses between 'rdm-heun' and 'rdm-euler')")
    return solver


@functools.lru_cache(maxsize=8)
def _gauss_legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)


def _response(sigma: torch.Tensor, L: float, sigma_b_max: float, s: int, d_min: float) -> torch.Tensor:
    """``D(tau(u(sigma)))`` for float64 sigmas of any shape: ``[*sigma.shape, s, s]``."""
    return blur_response(schedules.tau_from_sigma(sigma, L, sigma_b_max), s, d_min)


def _correction(sigma: float, sigma_next: float, sigma_b: float, eta: float, response, nodes: int) -> torch.Tensor:
    """E for the step ``sigma -> sigma_next`` of a path whose per-frequency response is
    ``response(r)`` (float64 ``[n]`` levels -> ``[n, ...]``), x0_hat interpolated linearly in
    ``log sigma`` through x0_a at sigma and x0_b at ``sigma_b`` (docs/spec.md section 8.1):

    ``phi(r) = ln(r/sigma) / ln(sigma_b/sigma)`` and, with g = sqrt(1 - eta^2),
    ``E = (1 - g) phi(sigma') D(sigma') + g sigma' c``,
    ``c = integral_sigma^sigma' (D(r)/r)' phi(r) dr
        = (1/ln(sigma_b/sigma)) integral_{ln sigma}^{ln sigma'} (D(sigma')/sigma' - D(e^t) e^-t) dt``
    (integrated by parts; that integrand vanishes at the step's end, so nothing cancels).
    """
    if not (sigma > 0 and sigma_next > 0 and sigma_b > 0) or sigma_b == sigma:
        raise ValueError(f"need sigma, sigma_next, sigma_b > 0 and sigma_b != sigma, got "
                         f"{sigma}, {sigma_next}, {sigma_b}")
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1), got {eta}")
    t0, t1, span = math.log(sigma), math.log(sigma_next), math.log(sigma_b / sigma)
    x, w = _gauss_legendre(nodes)
    r = torch.exp(torch.tensor((t1 - t0) / 2 * x + (t1 + t0) / 2, dtype=torch.float64))
    d_end = response(torch.tensor([sigma_next], dtype=torch.float64))[0]
    d = response(r)
    w = torch.tensor((t1 - t0) / 2 * w, dtype=torch.float64).reshape(-1, *[1] * (d.dim() - 1))
    c = (w * (d_end / sigma_next - d / r.reshape(w.shape))).sum(0) / span
    g = math.sqrt(1.0 - eta * eta)
    return (1.0 - g) * (t1 - t0) / span * d_end + g * sigma_next * c


def correction_factor(sigma: float, sigma_next: float, sigma_b: float, *, eta: float = 0.0, L: float = 0.93,
                      sigma_b_max: float = 3.0, s: int = 4, d_min: float = 0.001,
                      nodes: int = QUAD_NODES) -> torch.Tensor:
    """E (``[s, s]``, float64) of the relay path (SPEC 8): the patch-blur response
    ``D(r) = D(tau(u(r)))`` per DCT frequency in :func:`_correction`."""
    return _correction(sigma, sigma_next, sigma_b, eta, lambda r: _response(r, L, sigma_b_max, s, d_min), nodes)


def edm_correction(sigma: float, sigma_next: float, sigma_b: float, *, eta: float = 0.0,
                   nodes: int = QUAD_NODES) -> float:
    """E of EDM's path ``x = x0 + sigma n`` (no blur: ``D = 1``), for ``edm_sample(solver="edm-2m")``;
    eta is the fraction of fresh noise (EDM's ``sde_scale``). Closed form
    ``(h + g (1 - sigma'/sigma)) / ln(sigma_b/sigma)``, ``h = ln(sigma'/sigma)``; computed here by
    the same quadrature as the relay's E (docs/spec.md section 9.1)."""
    return float(_correction(sigma, sigma_next, sigma_b, eta, torch.ones_like, nodes))


def linear_correction(sigma: float, sigma_next: float, sigma_b: float, t: float, t_next: float, t_relay: float,
                      nodes: int = QUAD_NODES) -> float:
    """E of the latent linear relay path (SPEC 10) for ``linear_relay_sample(solver="linear-2m")``:
    the response is ``D(r) = 1 - t(r)/T_r`` (the weight of z0 in ``A_t``), with the relay time t
    linear in ``log r`` between the step's levels ``(sigma, t)`` and ``(sigma_next, t_next)``
    (docs/spec.md section 10.1). Deterministic (eta = 0)."""
    t0, t1 = math.log(sigma), math.log(sigma_next)

    def response(r):
        frac = (torch.log(r) - t0) / (t1 - t0)
        return 1.0 - (t + frac * (t_next - t)) / t_relay

    return float(_correction(sigma, sigma_next, sigma_b, 0.0, response, nodes))


def correction_factors(grid, solver: str, *, eta: float, L: float, sigma_b_max: float, s: int,
                       d_min: float = 0.001) -> list[torch.Tensor | None]:
    """The correction factor E (``[s, s]`` float64) of each of the steps of ``grid`` that end
    above 0, None where the step is first order (relay-2m's first step). Computed once per grid,
    on the host; :func:`relayops.relay_step` takes E as ``correction`` (SPEC 8's factor
    ``D' - gamma D`` it computes itself)."""
    if solver not in SECOND_ORDER:
        raise ValueError(f"correction_factors is for the second-order solvers {SECOND_ORDER}, got {solver!r}")
    levels = [v for v in grid if v > 0]
    out = []
    for i, (sig, sig_n) in enumerate(zip(levels, levels[1:])):
        anchor = sig_n if solver == "relay-2s" else (levels[i - 1] if i > 0 else None)
        out.append(None if anchor is None else correction_factor(sig, sig_n, anchor, eta=eta, L=L,
                                                                  sigma_b_max=sigma_b_max, s=s, d_min=d_min))
    return out
