"""Samplers: EDM base stage (SPEC 9), RDM relay stage (SPEC 8), latent linear relay (SPEC 10),
a multi-stage pipeline chaining them (base 16 -> relay 64 -> relay 256, say), and Matryoshka
diffusion's joint multi-resolution sampler (SPEC 11, ``mdm_sample``).

A *denoiser* is any callable ``denoiser(x, sigma) -> x0_hat`` with x ``[B, C, H, W]`` and sigma
a ``[B]`` tensor of x's dtype and device; when class labels are given the call is
``denoiser(x, sigma, class_labels)`` (and ``denoiser(x, sigma, None)`` for the unconditional
branch of classifier-free guidance, ``x0_hat = w cond - (w - 1) uncond``).

Random numbers. ``seed`` is an int, per-sample seeds (a list or tuple of B ints, or an int64
``[B]`` tensor) or a ``torch.Generator``. Ints and per-sample seeds go to the ops' in-kernel
Philox noise (SPEC 4) on every backend: an int seeds one stream for the batch; per-sample seeds
give sample b exactly the noise it would get as a batch of one seeded ``seed[b]``, so an image
regenerated alone (``seed=[seed[b]]``, or the int ``seed[b]``) matches its batch version. A
``torch.Generator`` draws the batch's normals with ``torch.randn`` (on the generator's device)
and passes them to the ops (not reproducible across devices). Philox noise draws use distinct
offsets: ``offset`` (the start noise), then ``offset + 2 i + 1`` and ``offset + 2 i + 2`` for
step i (Euler proposal, Heun correction; relay-2m draws at the first, relay-2s at the second).

Everything runs on the state's device; the noise-level grid is computed once on the host and
each step receives Python floats, so there is no host round trip per step. The samplers run
under ``torch.no_grad()`` (no autograd graph accumulates over the steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import schedules, solvers
from ._optional import progress_bar
from .multires import mdm_alpha_sigma
from ._validate import check_image, check_real, seed_args
from .ops import linear_relay_step, patch_dct, patch_idct, relay_noise, relay_step

__all__ = ["edm_sample", "relay_sample", "relay_sampler_step", "linear_relay_sample", "mdm_sample",
           "answer_calls", "edm_calls", "relay_calls", "denoiser_levels",
           "nearest_upsample", "BaseStage", "RelayStage", "RelayPipeline", "PipelinePreset", "PIPELINE_PRESETS",
           "get_pipeline_preset"]

Denoiser = Callable[..., torch.Tensor]

# Defaults of relay_sample when neither a keyword nor a preset gives the value.
RELAY_DEFAULTS = dict(num_steps=150, sigma_trunc=0.9, eta=0.2, alpha=0.15, L=0.93, sigma_b_max=3.0,
                      normalize=True, rho=7.0, sigma_min=0.008, sigma_max=80.0)


# --- helpers ------------------------------------------------------------------------------------

def _seeds(seed, like: torch.Tensor):
    """The samplers' noise source for a state like ``like``: a torch.Generator as it is, an int
    seed as it is, per-sample seeds as an int64 ``[B]`` tensor on like's device (made once per
    sampler call). Raises the ops' TypeError/ValueError for anything else."""
    if isinstance(seed, torch.Generator):
        return seed
    _, seeds = seed_args(seed, like)
    return seed if seeds is None else seeds


def _normals(like: torch.Tensor, generator: torch.Generator):
    """``(eps, eps2)`` shaped like ``like`` from ``torch.randn`` on the generator's device."""
    eps, eps2 = (torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
                 for _ in range(2))
    return eps.to(like.device), eps2.to(like.device)


def _noise_args(seeds, like: torch.Tensor, offset: int) -> dict:
    """The noise keywords of an op call: the seed (int or per-sample) and offset, or normals
    drawn from a torch.Generator."""
    if isinstance(seeds, torch.Generator):
        eps, eps2 = _normals(like, seeds)
        return {"eps": eps, "eps2": eps2}
    return {"seed": seeds, "offset": offset}


def _white_noise(like: torch.Tensor, seeds, offset: int, backend) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (relay noise with alpha = 0, s = 1, k = 1)."""
    return relay_noise(like, 1, alpha=0.0, backend=backend, **_noise_args(seeds, like, offset))


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma, class_labels, cfg) -> torch.Tensor:
    """x0_hat at noise level ``sigma`` (a Python float or a ``[B]`` tensor on x's device), with
    optional classifier-free guidance."""
    sig = (sigma.to(x.dtype) if isinstance(sigma, torch.Tensor)
           else torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
    if cfg is not None:
        cond = denoiser(x, sig, class_labels)
        uncond = denoiser(x, sig, None)
        out = cfg * cond - (cfg - 1) * uncond  # SPEC 8: x0_hat = w cond - (w - 1) uncond
    elif class_labels is not None:
        out = denoiser(x, sig, class_labels)
    else:
        out = denoiser(x, sig)
    if out.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {tuple(out.shape)}; expected {tuple(x.shape)}")
    return out.to(x.dtype)


def _grid(sigmas) -> list[float]:
    """A user grid as host floats: strictly decreasing, positive, a final 0 appended if missing."""
    vals = [float(v) for v in (sigmas.detach().cpu().flatten().tolist()
                               if isinstance(sigmas, torch.Tensor) else sigmas)]
    if vals and vals[-1] != 0.0:
        vals.append(0.0)
    if len(vals) < 2 or any(not a > b for a, b in zip(vals, vals[1:])) or vals[-2] <= 0:
        raise ValueError(f"sigmas must be a strictly decreasing sequence of levels > 0 (optionally ending in 0), "
                         f"got {vals}")
    return vals


def nearest_upsample(x: torch.Tensor, s: int) -> torch.Tensor:
    """``[B, C, h, w] -> [B, C, h s, w s]``: every pixel becomes an s x s constant block (SPEC 8)."""
    return x.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


# --- Solvers as generators of denoiser calls -----------------------------------------------------
#
# Each sampler's arithmetic is written once, as a generator (``edm_calls``, ``relay_calls``) that
# yields ``(x, sigma)`` where it needs the denoiser and is sent back ``(x, x0_hat)``: the state
# the denoiser saw and its output. The samplers answer the calls with the denoiser
# (``answer_calls``); relayops.diffusers' RelayScheduler answers them with the model outputs a
# diffusers-style loop passes to ``step``. Both therefore run the same solver code.

def answer_calls(calls, denoiser: Denoiser, class_labels=None, cfg: float | None = None, bar=None):
    """Run a solver generator to its end, answering every ``(x, sigma)`` it yields with the
    denoiser's x0_hat (with optional guidance ``cfg``); returns the generator's result. ``bar``:
    a progress bar advanced once per denoiser call."""
    query = next(calls)
    while True:
        x, sigma = query
        x0_hat = _denoise(denoiser, x, sigma, class_labels, cfg)
        if bar is not None:
            bar.update(1)
        try:
            query = calls.send((x, x0_hat))
        except StopIteration as done:
            return done.value


def denoiser_levels(grid: list[float], solver: str, *, S_churn: float = 0.0, S_min: float = 0.0,
                    S_max: float = float("inf")) -> list[float]:
    """The noise level of every denoiser call that ``solver`` makes on ``grid`` (host floats
    ending in 0), in order: each step's start level (raised by EDM's churn for the base-stage
    solvers), then, for a solver of two calls per step, the step's end level, except on the last
    step (to 0), which makes one call."""
    n = len(grid) - 1
    levels = []
    for i in range(n):
        levels.append(edm_churn(grid[i], n, S_churn, S_min, S_max) if solver in solvers.EDM_SOLVERS else grid[i])
        if grid[i + 1] > 0 and solvers.CALLS_PER_STEP[solver] == 2:
            levels.append(grid[i + 1])
    return levels


# --- SPEC 9: EDM stochastic Heun sampler ------------------------------------------------------

def edm_grid(sigmas=None, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
             rho: float = 7.0) -> list[float]:
    """The EDM sampler's levels as host floats: ``sigmas`` or the Karras grid of SPEC 7, with a
    final 0."""
    if sigmas is not None:
        return _grid(sigmas)
    return _grid(schedules.karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist())


def edm_churn(t_cur: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """The level t_hat >= t_cur that EDM's churn raises a step's start to (Algorithm 2, lines 4-6)."""
    gamma = min(S_churn / num_steps, 2**0.5 - 1) if S_min <= t_cur <= S_max else 0.0
    return t_cur + gamma * t_cur


def edm_calls(x: torch.Tensor, grid: list[float], solver: str, seeds, *, S_churn: float = 0.0, S_min: float = 0.0,
              S_max: float = float("inf"), S_noise: float = 1.0, sde_scale: float = 0.0, offset: int = 0,
              backend: str | None = None):
    """:func:`edm_sample`'s steps from the state ``x`` at ``grid[0]``, as a generator of denoiser
    calls (see :func:`answer_calls`); returns the final state. ``seeds``: as :func:`_seeds` gives."""
    n = len(grid) - 1
    history = []  # edm-2m / edm-3m: (noise level, x0_hat) of the previous evaluations, the latest first
    keep = solvers.MULTISTEP_HISTORY.get(solver, 0)
    for i in range(n):
        t_cur, t_next = grid[i], grid[i + 1]
        # Churn: raise the noise level to t_hat by adding fresh noise (EDM Alg. 2, lines 4-6).
        t_hat = edm_churn(t_cur, n, S_churn, S_min, S_max)
        if t_hat > t_cur:
            x = x + (t_hat**2 - t_cur**2) ** 0.5 * S_noise * _white_noise(x, seeds, offset + i + 1, backend)
        # With sde_scale, the step keeps noise sqrt(t_next^2 - g^2) and adds g of fresh noise.
        g = sde_scale * t_next
        h = ((t_next**2 - g**2) ** 0.5 if g > 0 else t_next) - t_hat

        def sde_noise(k):  # Euler k = 1, Heun k = 2: offsets after the churn's
            return g * _white_noise(x, seeds, offset + n + 2 * i + k, backend) if g > 0 else 0.0

        x, x0_hat = yield x, t_hat
        d = (x - x0_hat) / t_hat
        x_next = x + h * d + sde_noise(1)
        if t_next > 0 and solver == "edm-heun":  # second-order correction, every step but the last
            x_next, x0_hat_next = yield x_next, t_next
            d_next = (x_next - x0_hat_next) / t_next
            x_next = x + h * (d + d_next) / 2 + sde_noise(2)
        elif t_next > 0 and keep:  # edm-2m / edm-3m (section 9.1)
            anchors = [(t, x0) for t, x0 in history if t != t_hat]  # (churn can revisit a level)
            factors = solvers.edm_corrections(t_hat, t_next, [t for t, _ in anchors], eta=sde_scale) if anchors else []
            for e, (_, x0) in zip(factors, anchors):
                x_next = x_next + e * (x0 - x0_hat)
        x, history = x_next, [(t_hat, x0_hat), *history][:keep]
    return x


def edm_start(like: torch.Tensor, sigma: float, seeds, offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """The base stage's start state: ``sigma`` times white noise shaped like ``like`` (noise at ``offset``)."""
    return sigma * _white_noise(like, seeds, offset, backend)


@torch.no_grad()
def edm_sample(denoiser: Denoiser, shape, *, sigmas=None, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0, sde_scale: float = 0.0, seed=0,
               class_labels=None, dtype=torch.float32, device="cpu", progress: bool = False,
               cfg: float | None = None, offset: int = 0, backend: str | None = None,
               solver: str = "edm-heun") -> torch.Tensor:
    """EDM's stochastic Heun sampler, Karras et al. 2022 Algorithm 2 (SPEC 9).

    shape: ``(B, C, H, W)``. Grid: ``sigmas`` (decreasing; a final 0 is appended) or the Karras
    grid of SPEC 7 with ``num_steps, sigma_min, sigma_max, rho``. ``S_churn`` etc. as in EDM
    (defaults: deterministic). ``sde_scale`` (the RDM authors' CelebA-HQ base sampler, default
    0: off): each step from t_hat lands at noise ``sqrt(t_next^2 - g^2)`` and adds fresh noise
    ``g = sde_scale t_next`` (Euler and Heun alike). Starts from ``sigma_0 * N(0, I)``. Returns
    ``[B, C, H, W]`` in ``dtype`` (float32 or float64) on ``device``.

    ``solver``: ``"edm-heun"`` (Algorithm 2, two network calls per step but the last),
    ``"edm-2m"`` (docs/spec.md section 9.1: second-order multistep, one call per step; each
    Euler step gets ``E (x0_hat_prev - x0_hat)`` with x0_hat linear in log sigma through the
    previous evaluation; the first and last steps are Euler steps) or ``"edm-3m"`` (third order,
    one call per step: x0_hat quadratic in log sigma through the two previous evaluations, so
    ``E_b (x0_b - x0_hat) + E_c (x0_c - x0_hat)``; its second step is edm-2m's). Churn and
    ``sde_scale`` work with all; they are only exact to first order with the multistep solvers
    (as eta > 0 for relay-2m).
    """
    solver = solvers.check_solver(solver, solvers.EDM_SOLVERS)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {shape}")
    sde_scale = check_real("sde_scale", sde_scale, low=0.0, high=1.0, high_open=True)
    grid = edm_grid(sigmas, num_steps, sigma_min, sigma_max, rho)
    x_like = torch.empty(shape, dtype=dtype, device=device)
    seeds = _seeds(seed, x_like)
    churn = dict(S_churn=S_churn, S_min=S_min, S_max=S_max)
    calls = edm_calls(edm_start(x_like, grid[0], seeds, offset, backend), grid, solver, seeds, S_noise=S_noise,
                      sde_scale=sde_scale, offset=offset, backend=backend, **churn)
    with progress_bar(progress, total=len(denoiser_levels(grid, solver, **churn)), desc="edm", leave=False) as bar:
        return answer_calls(calls, denoiser, class_labels, cfg, bar)


# --- SPEC 8: relay (super-resolution) sampler, RDM Algorithm 1 ----------------------------------

def relay_settings(preset=None, **overrides) -> dict:
    """The relay sampler's settings: :data:`RELAY_DEFAULTS`, then the preset's, then every
    keyword that is not None."""
    out = dict(RELAY_DEFAULTS)
    if preset is not None:
        p = schedules.get_preset(preset)
        out.update(num_steps=p.num_grid, sigma_trunc=p.sigma_trunc, eta=p.eta, alpha=p.alpha, L=p.L_sample,
                   sigma_b_max=p.sigma_b_max, normalize=p.normalize, rho=p.rho, sigma_min=p.sigma_min,
                   sigma_max=p.sigma_max)
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


def relay_grid(settings: dict, sigmas=None) -> list[float]:
    """The relay sampler's levels as host floats: ``sigmas`` (a final 0 appended if missing), or
    ``schedules.relay_sigmas`` (SPEC 7) of :func:`relay_settings`' num_steps, sigma_trunc,
    sigma_min, sigma_max and rho."""
    if sigmas is not None:
        return _grid(sigmas)
    return _grid(schedules.relay_sigmas(int(settings["num_steps"]), settings["sigma_trunc"], settings["sigma_min"],
                                        settings["sigma_max"], settings["rho"]).tolist())


def relay_start(up: torch.Tensor, s: int, sigma: float, *, alpha: float, normalize: bool, seeds, offset: int = 0,
                backend: str | None = None) -> torch.Tensor:
    """SPEC 8's start state ``x_0 = up + sigma n``: ``up`` the nearest-upsampled low-resolution
    images (:func:`nearest_upsample`), n relay noise drawn at ``offset``."""
    return up + sigma * relay_noise(up, s, alpha, normalize, backend=backend, **_noise_args(seeds, up, offset))


@torch.no_grad()
def relay_sample(denoiser: Denoiser, x_lr: torch.Tensor | None = None, s: int = 4, *, num_steps: int | None = None,
                 sigma_trunc: float | None = None, eta: float | None = None, alpha: float | None = None,
                 heun: bool | None = None, L: float | None = None, sigma_b_max: float | None = None,
                 normalize: bool | None = None, cfg: float | None = None, seed=0, preset=None,
                 x_start: torch.Tensor | None = None, sigmas=None, rho: float | None = None, class_labels=None,
                 dtype=torch.float32, progress: bool = False, backend: str | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, d_min: float = 0.001,
                 offset: int = 0, solver: str | None = None) -> torch.Tensor:
    """RDM's relay sampler, Algorithm 1 (SPEC 8): low resolution ``[B, C, h, w]`` -> ``[B, C, h s, w s]``.

    Start: ``x_0 = nearest_upsample(x_lr, s) + sigma_0 n`` with relay noise n, or ``x_start``
    (``[B, C, H, W]``, already at the grid's first level). Each step is one fused
    :func:`relayops.relay_step` (Euler), plus, with ``heun=True``, the denoiser at the Euler
    proposal and a second fused call for the Heun-corrected step with fresh noise; the last step
    (sigma' = 0) returns x0_hat. ``tau = schedules.tau_from_sigma(sigma, L, sigma_b_max)``.

    Settings left as None come from ``preset`` ("imagenet256", "celebahq256" or a
    ``schedules.RelayPreset``) if given, else :data:`RELAY_DEFAULTS` (num_steps 150, sigma_trunc
    0.9, eta 0.2, alpha 0.15, L 0.93, sigma_b_max 3, normalize True, rho 7, sigma_min 0.008,
    sigma_max 80); a keyword that is not None always wins. Grid: ``sigmas`` (decreasing, a final
    0 appended if missing) or ``schedules.relay_sigmas(num_steps, sigma_trunc, ...)`` (SPEC 7).
    ``cfg``: guidance weight w. ``dtype``: state dtype (float32 default, float64 on request).

    ``solver`` (see :mod:`relayops.solvers`): ``"rdm-heun"`` (default; also ``heun=True``) and
    ``"rdm-euler"`` (``heun=False``) are Algorithm 1; ``"relay-2s"`` (two denoiser calls per step)
    and ``"relay-2m"`` (one) are second order on the blurred path (docs/spec.md section 8.1),
    ``"relay-3m"`` (one) third order (section 8.2).
    """
    solver = solvers.resolve_solver(solver, heun)
    opt = relay_settings(preset, num_steps=num_steps, sigma_trunc=sigma_trunc, eta=eta, alpha=alpha, L=L,
                         sigma_b_max=sigma_b_max, normalize=normalize, rho=rho, sigma_min=sigma_min,
                         sigma_max=sigma_max)
    eta, alpha, normalize = float(opt["eta"]), float(opt["alpha"]), bool(opt["normalize"])
    if (x_lr is None) == (x_start is None):
        raise ValueError("pass exactly one of x_lr (low-resolution images) and x_start (a start state)")
    grid = relay_grid(opt, sigmas)
    if x_start is not None:
        x = check_image("x_start", x_start, s).to(dtype)
        seeds = _seeds(seed, x)
    else:
        up = nearest_upsample(check_image("x_lr", x_lr).to(dtype), s)
        seeds = _seeds(seed, up)
        x = relay_start(up, s, grid[0], alpha=alpha, normalize=normalize, seeds=seeds, offset=offset, backend=backend)
    calls = relay_calls(x, grid, solver, seeds, s=s, eta=eta, alpha=alpha, normalize=normalize, L=opt["L"],
                        sigma_b_max=opt["sigma_b_max"], d_min=d_min, offset=offset, backend=backend)
    with progress_bar(progress, total=len(denoiser_levels(grid, solver)), desc=f"relay ({solver})",
                      leave=False) as bar:
        return answer_calls(calls, denoiser, class_labels, cfg, bar)


def relay_calls(x: torch.Tensor, grid: list[float], solver: str, seeds, *, s: int, eta: float, alpha: float,
                normalize: bool, L: float, sigma_b_max: float, d_min: float = 0.001, offset: int = 0,
                backend: str | None = None):
    """:func:`relay_sample`'s steps from the state ``x`` at ``grid[0]`` (host floats ending in 0),
    as a generator of denoiser calls (see :func:`answer_calls`); returns the final images.

    rdm-heun / rdm-euler: SPEC 8's steps (:func:`relay_sampler_step`'s arithmetic). relay-2s /
    relay-2m (docs/spec.md section 8.1): per step one fused :func:`relay_step`,
    ``x' = gamma x + idct((D' - gamma D) dct(x0_a) + E dct(x0_b - x0_a)) + eta sigma' n``, with the
    correction factors E of :func:`relayops.solvers.correction_factors` (host, once per grid).
    relay-2s: x0_b from the denoiser at the eta = 0 DDIM-blur proposal at sigma'; noise at
    offset + 2i + 2 as SPEC 8's correction. relay-2m: x0_b is the previous step's x0_hat (the
    first step is SPEC 8's Euler step); noise at offset + 2i + 1. relay-3m (section 8.2): as
    relay-2m, plus ``idct(E_c dct(x0_c - x0_a))`` with x0_c the x0_hat of two steps back (from the
    third step on). The last step returns x0_hat.
    """
    if solver not in ("rdm-heun", "rdm-euler", *solvers.HIGH_ORDER):
        raise ValueError(f"relay_calls has no steps for solver {solver!r}")
    # tau for every level on the host, once (the last level, 0, is never blurred to)
    taus = [schedules.tau_from_sigma(v, L, sigma_b_max) for v in grid[:-1]] + [0.0]
    second_order = solver in solvers.HIGH_ORDER
    factors = [tuple(e.to(x.device, x.dtype) for e in es)
               for es in solvers.correction_factors(grid, solver, eta=eta, L=L, sigma_b_max=sigma_b_max, s=s,
                                                    d_min=d_min)] if second_order else []
    history = []  # relay-2m / relay-3m: the previous steps' x0_hat, the latest first
    for i in range(len(grid) - 1):
        sig, sig_n = grid[i], grid[i + 1]
        if sig_n == 0.0:  # the last step returns x0_hat
            _, x0_hat = yield x, sig
            return x0_hat
        if not second_order:
            x = yield from _rdm_step_calls(x, sig, sig_n, taus[i], taus[i + 1], seeds=seeds, offset=offset + 2 * i + 1,
                                           heun=solver == "rdm-heun", eta=eta, s=s, alpha=alpha, normalize=normalize,
                                           d_min=d_min, backend=backend)
            continue
        x, x0_hat = yield x, sig
        if solver == "relay-2s":
            x_prop = relay_step(x, x0_hat, sig, sig_n, taus[i], taus[i + 1], eta=0.0, s=s, d_min=d_min,
                                seed=0, backend=backend)
            _, x0_b = yield x_prop, sig_n
            others, off = [x0_b], 2
        else:
            others, off = history, 1
        noise = _noise_args(seeds, x, offset + 2 * i + off) if eta > 0 else {"seed": 0}
        es = factors[i]
        second = {"x0_hat_b": others[0], "correction": es[0]} if es else {}
        x = relay_step(x, x0_hat, sig, sig_n, taus[i], taus[i + 1], eta=eta, s=s, alpha=alpha,
                       normalize=normalize, d_min=d_min, backend=backend, **noise, **second)
        if len(es) == 2:  # relay-3m's second correction, per frequency (section 8.2)
            x = x + _per_frequency(es[1], others[1] - x0_hat, s, backend)
        history = [x0_hat, *history][:solvers.MULTISTEP_HISTORY.get(solver, 0)]
    raise ValueError(f"the relay grid must end at level 0, got {grid}")


def _rdm_step_calls(x, sigma, sigma_next, tau, tau_next, *, seeds, offset, heun, eta, s, alpha, normalize, d_min,
                    backend):
    """One step of RDM's sampler (SPEC 8) as a generator of denoiser calls: x0_hat at (x, sigma),
    the fused Euler :func:`relay_step` with noise at ``offset``; with ``heun``, x0_hat at the
    proposal and the Heun-corrected step with noise at ``offset + 1``."""
    x, x0_hat = yield x, sigma
    noise = _noise_args(seeds, x, offset) if eta > 0 else {"seed": 0}
    x_prop = relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta=eta, s=s, alpha=alpha, normalize=normalize,
                        d_min=d_min, backend=backend, **noise)
    if not heun:
        return x_prop
    x_prop, x0_hat_prop = yield x_prop, sigma_next
    noise = _noise_args(seeds, x, offset + 1) if eta > 0 else {"seed": 0}
    return relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta=eta, s=s, alpha=alpha, normalize=normalize,
                      d_min=d_min, backend=backend, x_prop=x_prop, x0_hat_prop=x0_hat_prop, **noise)


def relay_sampler_step(denoiser: Denoiser, x: torch.Tensor, sigma, sigma_next, tau, tau_next, *, seeds=0,
                       offset: int = 1, heun: bool = True, eta: float = 0.2, s: int = 4, alpha: float = 0.15,
                       normalize: bool = True, d_min: float = 0.001, class_labels=None, cfg=None,
                       backend: str | None = None) -> torch.Tensor:
    """One step of :func:`relay_sample` from level ``sigma`` to ``sigma_next`` > 0 (SPEC 8):
    x0_hat from the denoiser at (x, sigma), the fused Euler :func:`relayops.relay_step` with
    noise at ``offset``; with ``heun``, the denoiser at the proposal and the Heun-corrected step
    with noise at ``offset + 1``. sigma, sigma_next, tau, tau_next: floats or ``[B]`` tensors on
    x's device. ``seeds``: an int, an int64 ``[B]`` tensor on x's device (per-sample seeds) or a
    ``torch.Generator``.

    Capturable in a CUDA graph (``torch.cuda.graph``, or ``torch.compile(mode="reduce-overhead")``
    with ``[B]`` tensor levels): with int or device-tensor seeds it makes no host round trip, no
    tensor on another device and no branch on tensor values. Floats and ints (levels, offset,
    seeds) are captured as constants: replaying one graph repeats its noise, so capture a graph
    per step (or the whole sampler) and change per-sample seeds and the start state in place.
    """
    calls = _rdm_step_calls(x, sigma, sigma_next, tau, tau_next, seeds=seeds, offset=offset, heun=heun, eta=eta, s=s,
                            alpha=alpha, normalize=normalize, d_min=d_min, backend=backend)
    return answer_calls(calls, denoiser, class_labels, cfg)


def _per_frequency(factor: torch.Tensor, x: torch.Tensor, s: int, backend) -> torch.Tensor:
    """``patch_idct(factor * patch_dct(x))`` for an ``[s, s]`` factor (one number per DCT frequency)."""
    tiled = factor.repeat(x.shape[-2] // s, x.shape[-1] // s)
    return patch_idct(tiled * patch_dct(x, s, backend=backend), s, backend=backend)


# --- SPEC 10: latent linear relay (CogView3) --------------------------------------------------

@torch.no_grad()
def linear_relay_sample(denoiser: Denoiser, z_lr: torch.Tensor, *, t_relay: float, sigmas, seed=0, ts=None,
                        class_labels=None, cfg: float | None = None, dtype=torch.float32, progress: bool = False,
                        offset: int = 0, backend: str | None = None, solver: str = "linear-euler") -> torch.Tensor:
    """CogView3's deterministic linear relay sampler (SPEC 10).

    z_lr: ``[B, C, H, W]``, the upsampled low-resolution latent z_L. ``sigmas``: the noise
    levels of the sampling grid, decreasing, at relay times ``ts`` (default: evenly spaced from
    ``t_relay`` to 0, one per level); the last level is 0 or gets appended with t = 0.
    Start: ``z = A_{t_0}(.) + sigma_0 eps = z_L + sigma_0 eps`` when ``ts[0] = t_relay``; each
    step ``z' = A_{t'}(z0_hat) + (sigma'/sigma)(z - A_t(z0_hat))``, the last one returning z0_hat.
    The denoiser is called as ``denoiser(z, sigma)`` (it knows z_L through its conditioning).

    ``solver``: ``"linear-euler"`` (the step above) or ``"linear-2m"`` (docs/spec.md section
    10.1: second-order multistep, still one call per step; each step but the first and the last
    gets ``E (z0_hat_prev - z0_hat)``, z0_hat linear in log sigma, t linear in log sigma
    between the grid's levels).
    """
    solver = solvers.check_solver(solver, solvers.LINEAR_SOLVERS)
    z_lr = check_image("z_lr", z_lr).to(dtype)
    raw = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    grid = _grid(raw)
    if ts is None:
        ts = torch.linspace(float(t_relay), 0.0, len(grid), dtype=torch.float64).tolist()
    else:
        ts = [float(v) for v in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
        if len(ts) == len(grid) - 1:  # a 0 level was appended: it sits at t = 0
            ts.append(0.0)
        if len(ts) != len(grid):
            raise ValueError(f"ts has {len(ts)} times for {len(grid)} noise levels")
    if ts[0] != float(t_relay):
        raise ValueError(f"the grid must start at t = t_relay = {t_relay} (where A_t(z0) = z_L), got {ts[0]}")
    seeds = _seeds(seed, z_lr)
    z = z_lr + grid[0] * _white_noise(z_lr, seeds, offset, backend)
    prev = None  # linear-2m: the previous step's z0_hat
    with progress_bar(progress, total=len(grid) - 1, desc="linear relay", leave=False) as bar:
        for i in range(len(grid) - 1):
            z0_hat = _denoise(denoiser, z, grid[i], class_labels, cfg)
            if grid[i + 1] == 0.0:  # the last step returns z0_hat
                z = z0_hat
            else:
                z_next = linear_relay_step(z, z0_hat, z_lr, ts[i], ts[i + 1], t_relay, grid[i], grid[i + 1])
                if solver == "linear-2m" and prev is not None:
                    e = solvers.linear_correction(grid[i], grid[i + 1], grid[i - 1], ts[i], ts[i + 1], t_relay)
                    z_next = z_next + e * (prev - z0_hat)
                z, prev = z_next, z0_hat
            bar.update(1)
    return z


# --- Multi-stage pipeline -----------------------------------------------------------------------

# --- SPEC 11: Matryoshka diffusion's joint sampler ---------------------------------------------

@torch.no_grad()
def mdm_sample(denoiser, num: int, resolutions=None, channels: int = 3, *, num_steps: int = 50, eta: float = 0.0,
               schedule: str | None = None, reference: int | None = None, seed=0, class_labels=None,
               dtype=torch.float32, device="cpu", progress: bool = False, offset: int = 0,
               backend: str | None = None) -> list:
    """Matryoshka diffusion's joint sampler (SPEC 11): every resolution denoised together.

    ``denoiser(zs, t[, class_labels]) -> [x_hat^r]`` predicts the clean image of every resolution
    from all the noisy ones (an :class:`~relayops.training.nested_unet.MDMDenoiser`, or any callable
    of that contract). Times ``t_i = 1 - i / num_steps``; resolution r has its own
    ``(alpha_t^r, sigma_t^r)`` (``schedule``, ``reference`` as in
    :func:`relayops.multires.mdm_alpha_sigma`; default: the denoiser's, else "shifted", 64).
    Start ``z^r = eps^r``; step t -> t' (DDIM with stochasticity ``eta``, 1 = DDPM's ancestral step):
    ``eps_hat = (z - alpha x_hat) / sigma``, ``c = eta (sigma'/sigma) sqrt(1 - alpha^2/alpha'^2)``,
    ``z' = alpha' x_hat + sqrt(sigma'^2 - c^2) eps_hat + c n``; the last step returns ``x_hat``.

    resolutions: ascending (default: the denoiser's ``resolutions``); a prefix of the model's
    samples only the lower ones. Returns one ``[num, channels, r, r]`` tensor per resolution.
    Noise (module docstring): resolution k's start noise at ``offset + k``, its noise in step i at
    ``offset + R (i + 1) + k`` (R resolutions).
    """
    if resolutions is None:
        resolutions = getattr(denoiser, "resolutions", None) or []
    res = list(resolutions)
    if not res or res != sorted(set(int(r) for r in res)):
        raise ValueError(f"resolutions must be distinct ints in ascending order, got {resolutions!r}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    check_real("eta", eta, low=0.0, high=1.0)
    schedule = schedule or getattr(denoiser, "schedule", "shifted")
    reference = reference or getattr(denoiser, "reference", 64)
    ts = [1 - i / num_steps for i in range(num_steps + 1)]
    t_grid = torch.tensor(ts, dtype=torch.float64)
    coeffs = [[c.tolist() for c in mdm_alpha_sigma(t_grid, r, schedule, reference)] for r in res]  # host floats
    like = [torch.empty(num, channels, r, r, dtype=dtype, device=device) for r in res]
    seeds = _seeds(seed, like[0])
    zs = [_white_noise(x, seeds, offset + k, backend) for k, x in enumerate(like)]
    with progress_bar(progress, total=num_steps, desc="mdm", leave=False) as bar:
        for i in range(num_steps):
            t = torch.full((num,), ts[i], dtype=dtype, device=device)
            x_hats = denoiser(zs, t) if class_labels is None else denoiser(zs, t, class_labels)
            x_hats = [x.to(dtype) for x in x_hats]
            if i == num_steps - 1:
                return x_hats
            for k, (z, x_hat) in enumerate(zip(zs, x_hats)):
                (alpha, alpha_next), (sigma, sigma_next) = (c[i:i + 2] for c in coeffs[k])
                eps_hat = (z - alpha * x_hat) / sigma
                c = eta * sigma_next / sigma * math.sqrt(max(0.0, 1 - alpha**2 / alpha_next**2))
                zs[k] = alpha_next * x_hat + math.sqrt(max(0.0, sigma_next**2 - c**2)) * eps_hat
                if c > 0:
                    zs[k] = zs[k] + c * _white_noise(z, seeds, offset + len(res) * (i + 1) + k, backend)
            bar.update(1)
    raise AssertionError("unreachable: the last step returns")


@dataclass
class BaseStage:
    """The low-resolution EDM stage: ``edm_sample`` at ``resolution`` with ``channels``.

    Extra keywords of :func:`edm_sample` (sigma_min, S_churn, cfg, solver, ...) go in ``options``.
    """
    denoiser: Denoiser
    resolution: int
    channels: int = 3
    num_steps: int = 18
    options: dict = field(default_factory=dict)


@dataclass
class RelayStage:
    """A relay super-resolution stage by factor ``s`` (:func:`relay_sample`).

    ``num_steps``/``preset`` and any other keyword of :func:`relay_sample` (eta, solver, sigmas,
    cfg, ...) go in ``options``.
    """
    denoiser: Denoiser
    s: int = 4
    num_steps: int | None = None
    preset: object = None
    options: dict = field(default_factory=dict)


class RelayPipeline:
    """A base stage then one or more relay stages (16 -> 64 -> 256, say).

    ``pipeline(num_images, seed=0, class_labels=None, progress=False)`` returns the list of every
    stage's output (last = final images). Seeds are per sample: an int seed means the seeds
    ``seed, seed + 1, ..., seed + num_images - 1``, so image b is regenerated alone with
    ``pipeline(1, seed=[seed + b])``. Stage k draws its noise at Philox offsets from ``k * 2**32``.
    """

    def __init__(self, stages: Sequence, *, dtype=torch.float32, device="cpu", backend: str | None = None):
        stages = list(stages)
        if not stages or not isinstance(stages[0], BaseStage):
            raise ValueError("the first stage must be a BaseStage")
        if not all(isinstance(st, RelayStage) for st in stages[1:]):
            raise ValueError("every stage after the first must be a RelayStage")
        self.stages, self.dtype, self.device, self.backend = stages, dtype, device, backend

    def __call__(self, num_images: int, seed=0, class_labels=None, progress: bool = False) -> list[torch.Tensor]:
        seeds = [seed + b for b in range(num_images)] if isinstance(seed, int) and not isinstance(seed, bool) else seed
        base = self.stages[0]
        shape = (num_images, base.channels, base.resolution, base.resolution)
        bar = progress_bar(progress, total=len(self.stages), desc="stages")
        x = edm_sample(base.denoiser, shape, num_steps=base.num_steps, seed=seeds, class_labels=class_labels,
                       dtype=self.dtype, device=self.device, progress=progress, offset=0, backend=self.backend,
                       **base.options)
        outputs = [x]
        bar.update(1)
        for k, st in enumerate(self.stages[1:], start=1):
            x = relay_sample(st.denoiser, x, st.s, num_steps=st.num_steps, preset=st.preset, seed=seeds,
                             class_labels=class_labels, dtype=self.dtype, progress=progress, offset=k << 32,
                             backend=self.backend, **st.options)
            outputs.append(x)
            bar.update(1)
        bar.close()
        return outputs


# --- The authors' settings for a whole pipeline --------------------------------------------------

@dataclass(frozen=True)
class PipelinePreset:
    """The RDM authors' sampler settings for their released two-stage models (their
    ``generate_imagenet.py`` and ``generate_celebahq.py``).

    ``base``: keywords of :func:`edm_sample` for the 64x64 stage; ``relay``: the relay preset
    (``schedules.PRESETS``) for the 64 -> 256 stage, with guidance weight ``relay_cfg`` (None:
    none) and ``base_cfg`` for the base stage; ``dtype``: the sampler state's dtype (the authors
    keep it in float64; the networks run in float32 or lower); ``enhance``: the PIL
    ``ImageEnhance`` steps (name, factor) their scripts apply to every saved PNG. Class-conditional
    models get one-hot labels: a given class, else class ``seed mod label_dim`` per image.
    """
    name: str
    base: dict
    relay: str
    relay_cfg: float | None = None
    base_cfg: float | None = None
    dtype: torch.dtype = torch.float64
    enhance: tuple = ()


PIPELINE_PRESETS = {p.name: p for p in (
    PipelinePreset("imagenet256", relay="imagenet256", relay_cfg=3.5,
                   base=dict(num_steps=256, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=40.0, S_min=0.05,
                             S_max=50.0, S_noise=1.003),
                   enhance=(("Brightness", 1.06),)),
    PipelinePreset("celebahq256", relay="celebahq256",
                   base=dict(num_steps=120, sigma_min=0.002, sigma_max=80.0, rho=7.0, sde_scale=0.05),
                   enhance=(("Contrast", 0.9), ("Brightness", 1.05), ("Color", 0.99))),
)}


def get_pipeline_preset(name) -> PipelinePreset:
    """A pipeline preset by name (``"imagenet256"``, ``"celebahq256"``), or the preset itself."""
    if isinstance(name, PipelinePreset):
        return name
    if name not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {name!r}; known: {sorted(PIPELINE_PRESETS)}")
    return PIPELINE_PRESETS[name]
