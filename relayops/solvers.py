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
  first step is first order);
* ``"relay-3m"``: third-order multistep, x0_hat quadratic in ``log sigma`` through this step's and
  the two previous steps' evaluations (1 call per step; the first step is first order, the
  second second order). The step gains a second correction ``E_c (X_c - X_a)`` (section 8.2).

The last step (to level 0) returns x0_hat, as in SPEC 8. The same multistep corrections serve
EDM's base sampler (``edm_sample(..., solver="edm-2m" or "edm-3m")``: the path without blur, D = 1) and the
latent linear relay (``linear_relay_sample(..., solver="linear-2m")``: D = 1 - t/T_r), with the
factors :func:`edm_correction` (:func:`edm_corrections` for edm-3m) and :func:`linear_correction`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import schedules
from .ops import blur_response

SOLVERS = ("rdm-heun", "rdm-euler", "relay-2s", "relay-2m", "relay-3m")
SECOND_ORDER = ("relay-2s", "relay-2m")
HIGH_ORDER = (*SECOND_ORDER, "relay-3m")  # the solvers of docs/spec.md 8.1 and 8.2
# Previous evaluations a multistep solver interpolates through (its order minus one).
MULTISTEP_HISTORY = {"relay-2m": 1, "relay-3m": 2, "edm-2m": 1, "edm-3m": 2, "linear-2m": 1}
EDM_SOLVERS = ("edm-heun", "edm-2m", "edm-3m")  # edm_sample: EDM's Heun (SPEC 9), or multistep (9.1)
LINEAR_SOLVERS = ("linear-euler", "linear-2m")  # linear_relay_sample: SPEC 10's step, or multistep (10.1)

# Network calls per step of each solver (the last step, to level 0, is always one call).
CALLS_PER_STEP = {"rdm-heun": 2, "rdm-euler": 1, "relay-2s": 2, "relay-2m": 1, "relay-3m": 1, "edm-heun": 2,
                  "edm-2m": 1, "edm-3m": 1, "linear-euler": 1, "linear-2m": 1}

# The command line's step counts (``relayops sample``, ``relayops demo``): EDM steps of the base
# stage (Karras 0.002 .. 80), and levels of the relay stage's Karras grid (0.008 .. 80, the steps
# below the start level 0.9 are taken). edm-2m at 24 and relay-2m at 40 have a smaller transport
# error than the authors' edm-heun at 18 and rdm-heun at 60 with 24 calls instead of 35 and 14
# instead of 41; edm-3m at 18 (18 calls) and relay-3m at 40 (14 calls) a smaller one still
# (docs/solvers.md, "On the command line").
CLI_STEPS = {"edm-2m": 24, "edm-3m": 18, "edm-heun": 18, "relay-2m": 40, "relay-3m": 40, "relay-2s": 40,
             "rdm-heun": 60, "rdm-euler": 60}

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


def _lagrange_bases(t0: float, anchors: list[float]) -> list[np.poly1d]:
    """The Lagrange basis polynomials (in t = log r) of the nodes ``t0, *anchors`` that belong to
    the anchors: ``l_j(t_k) = [j == k]``, so ``X(t) = X_a + sum_j l_j(t) (X_j - X_a)``."""
    nodes = [t0, *anchors]
    out = []
    for j, tj in enumerate(anchors, start=1):
        others = [t for k, t in enumerate(nodes) if k != j]
        out.append(np.poly1d(others, r=True) / float(np.prod([tj - t for t in others])))
    return out


def _corrections(sigma: float, sigma_next: float, anchors, eta: float, response, nodes: int) -> list[torch.Tensor]:
    """The factors E_j for the step ``sigma -> sigma_next`` of a path whose per-frequency response
    is ``response(r)`` (float64 ``[n]`` levels -> ``[n, ...]``), x0_hat interpolated by a
    polynomial in ``log sigma`` through x0_a at sigma and x0_j at each level of ``anchors``
    (docs/spec.md sections 8.1, 8.2), so the step is ``... + sum_j E_j (X_j - X_a)``:

    with ``phi_j`` the Lagrange basis of anchor j (``phi_j(sigma) = 0``) and g = sqrt(1 - eta^2),
    ``E_j = (1 - g) phi_j(sigma') D(sigma') + g sigma' c_j``,
    ``c_j = integral_sigma^sigma' (D(r)/r)' phi_j(r) dr
          = integral_{ln sigma}^{ln sigma'} (D(sigma')/sigma' - D(e^t) e^-t) phi_j'(t) dt``
    (integrated by parts; that integrand vanishes at the step's end, so nothing cancels). One
    anchor: ``phi = ln(r/sigma) / ln(sigma_b/sigma)``, relay-2m's and relay-2s's factor.
    """
    anchors = [float(a) for a in anchors]
    levels = [sigma, *anchors]
    if not (sigma > 0 and sigma_next > 0 and all(a > 0 for a in anchors)) or len(set(levels)) != len(levels):
        raise ValueError(f"need sigma, sigma_next and the anchor levels > 0, the anchors distinct from sigma "
                         f"and from each other, got sigma {sigma}, sigma_next {sigma_next}, anchors {anchors}")
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1), got {eta}")
    t0, t1 = math.log(sigma), math.log(sigma_next)
    x, w = _gauss_legendre(nodes)
    t = (t1 - t0) / 2 * x + (t1 + t0) / 2
    r = torch.exp(torch.tensor(t, dtype=torch.float64))
    d_end = response(torch.tensor([sigma_next], dtype=torch.float64))[0]
    d = response(r)
    shape = (-1, *[1] * (d.dim() - 1))
    gap = d_end / sigma_next - d / r.reshape(shape)
    g = math.sqrt(1.0 - eta * eta)
    out = []
    for phi in _lagrange_bases(t0, [math.log(a) for a in anchors]):
        weights = torch.tensor((t1 - t0) / 2 * w * phi.deriv()(t), dtype=torch.float64).reshape(shape)
        out.append((1.0 - g) * float(phi(t1)) * d_end + g * sigma_next * (weights * gap).sum(0))
    return out


def _correction(sigma: float, sigma_next: float, sigma_b: float, eta: float, response, nodes: int) -> torch.Tensor:
    """E for the step ``sigma -> sigma_next`` with x0_hat linear in ``log sigma`` through x0_a at
    sigma and x0_b at ``sigma_b`` (docs/spec.md section 8.1): :func:`_corrections` with one anchor."""
    return _corrections(sigma, sigma_next, (sigma_b,), eta, response, nodes)[0]


def correction_factor(sigma: float, sigma_next: float, sigma_b: float, *, eta: float = 0.0, L: float = 0.93,
                      sigma_b_max: float = 3.0, s: int = 4, d_min: float = 0.001,
                      nodes: int = QUAD_NODES) -> torch.Tensor:
    """E (``[s, s]``, float64) of the relay path (SPEC 8): the patch-blur response
    ``D(r) = D(tau(u(r)))`` per DCT frequency in :func:`_correction`."""
    return _correction(sigma, sigma_next, sigma_b, eta, lambda r: _response(r, L, sigma_b_max, s, d_min), nodes)


def multistep_factors(sigma: float, sigma_next: float, anchors, *, eta: float = 0.0, L: float = 0.93,
                      sigma_b_max: float = 3.0, s: int = 4, d_min: float = 0.001,
                      nodes: int = QUAD_NODES) -> list[torch.Tensor]:
    """The factors E_j (``[s, s]``, float64) of the relay path for x0_hat a polynomial in
    ``log sigma`` through this step's evaluation and those at the levels ``anchors`` (relay-3m:
    the two previous levels), so the step adds ``sum_j E_j (X_j - X_a)`` (docs/spec.md 8.2)."""
    return _corrections(sigma, sigma_next, anchors, eta, lambda r: _response(r, L, sigma_b_max, s, d_min), nodes)


def edm_correction(sigma: float, sigma_next: float, sigma_b: float, *, eta: float = 0.0,
                   nodes: int = QUAD_NODES) -> float:
    """E of EDM's path ``x = x0 + sigma n`` (no blur: ``D = 1``), for ``edm_sample(solver="edm-2m")``;
    eta is the fraction of fresh noise (EDM's ``sde_scale``). Closed form
    ``(h + g (1 - sigma'/sigma)) / ln(sigma_b/sigma)``, ``h = ln(sigma'/sigma)``; computed here by
    the same quadrature as the relay's E (docs/spec.md section 9.1)."""
    return float(_correction(sigma, sigma_next, sigma_b, eta, torch.ones_like, nodes))


def edm_corrections(sigma: float, sigma_next: float, anchors, *, eta: float = 0.0,
                    nodes: int = QUAD_NODES) -> list[float]:
    """The factors E_j of EDM's path (D = 1) for x0_hat a polynomial in ``log sigma`` through this
    step's evaluation and those at the levels ``anchors``, for ``edm_sample(solver="edm-3m")``
    (the two previous evaluations; docs/spec.md section 9.1)."""
    return [float(e) for e in _corrections(sigma, sigma_next, anchors, eta, torch.ones_like, nodes)]


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


def relay_logsnr(sigma, *, L: float = 0.93, sigma_b_max: float = 3.0, s: int = 4, d_min: float = 0.001):
    """The log-SNR of the blurred path at noise level sigma (float or float64 tensor), averaged over
    the s x s DCT frequencies: ``mean_k ln(D_k(sigma)^2 / sigma^2)`` (frequency k of a state on the
    path is ``D_k X_k + sigma Z_k``). Decreasing in sigma: both the blur and the noise grow."""
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    d = _response(sig, L, sigma_b_max, s, d_min)
    return 2 * torch.log(d).mean((-2, -1)) - 2 * torch.log(sig)


def logsnr_sigmas(n: int, sigma_start: float, sigma_min: float = 0.008, *, L: float = 0.93,
                  sigma_b_max: float = 3.0, s: int = 4, d_min: float = 0.001) -> torch.Tensor:
    """A relay grid of n levels from ``sigma_start`` down to ``sigma_min``, evenly spaced in the
    blurred path's log-SNR (:func:`relay_logsnr`), then 0: float64 ``[n + 1]``. Without blur
    (``sigma_b_max = 0``) it is the grid uniform in ``log sigma``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (grid size) must be an int >= 2, got {n!r}")
    if not 0 < sigma_min < sigma_start:
        raise ValueError(f"need 0 < sigma_min < sigma_start, got {sigma_min}, {sigma_start}")
    # the log-SNR on a fine grid in log sigma, inverted by interpolation (it is strictly monotone)
    log_sig = torch.linspace(math.log(sigma_start), math.log(sigma_min), 65537, dtype=torch.float64)
    lam = relay_logsnr(log_sig.exp(), L=L, sigma_b_max=sigma_b_max, s=s, d_min=d_min)
    targets = torch.linspace(float(lam[0]), float(lam[-1]), n, dtype=torch.float64)
    levels = np.interp(targets.numpy(), lam.numpy(), log_sig.numpy())
    levels[0], levels[-1] = math.log(sigma_start), math.log(sigma_min)  # exact ends
    return torch.cat([torch.from_numpy(np.exp(levels)), torch.zeros(1, dtype=torch.float64)])


def step_anchors(levels, i: int, solver: str) -> tuple:
    """The levels that step i (``levels[i] -> levels[i + 1]``) of ``solver`` interpolates x0_hat
    through besides its own: relay-2s the Euler proposal's level; a multistep solver the previous
    levels, as many as it has (the first steps of a multistep solver are of lower order)."""
    if solver == "relay-2s":
        return (levels[i + 1],)
    history = min(i, MULTISTEP_HISTORY[solver])
    return tuple(levels[i - 1 - j] for j in range(history))


def correction_factors(grid, solver: str, *, eta: float, L: float, sigma_b_max: float, s: int,
                       d_min: float = 0.001) -> list[tuple[torch.Tensor, ...]]:
    """The correction factors (``[s, s]`` float64 each) of every step of ``grid`` that ends above
    0, in the order of :func:`step_anchors`: ``()`` where the step is first order (a multistep
    solver's first step), one for relay-2s and relay-2m, up to two for relay-3m. Computed once
    per grid, on the host; :func:`relayops.relay_step` takes the first as ``correction`` (SPEC 8's
    factor ``D' - gamma D`` it computes itself)."""
    if solver not in HIGH_ORDER:
        raise ValueError(f"correction_factors is for the second-order solvers and relay-3m {HIGH_ORDER}, "
                         f"got {solver!r}")
    levels = [v for v in grid if v > 0]
    out = []
    for i, (sig, sig_n) in enumerate(zip(levels, levels[1:])):
        anchors = step_anchors(levels, i, solver)
        out.append(tuple(multistep_factors(sig, sig_n, anchors, eta=eta, L=L, sigma_b_max=sigma_b_max, s=s,
                                           d_min=d_min)) if anchors else ())
    return out
