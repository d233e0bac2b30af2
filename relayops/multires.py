"""Resolution-aware training pieces (SPEC 11): simple diffusion's multiscale loss and MDM's
joint multi-resolution noising, on top of the log-SNR schedules of :mod:`relayops.schedules`.

Conventions: images are square ``[B, C, d, d]``; ``avgpool_r`` averages non-overlapping
``(d/r) x (d/r)`` blocks down to ``r x r`` (d a multiple of r); "mean ||.||^2" is the mean of the
squared difference over batch, channels and pixels (per sample with ``reduction="none"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import schedules

__all__ = ["avgpool_to", "multiscale_resolutions", "multiscale_loss", "mdm_alpha_sigma", "mdm_noising",
           "mdm_loss", "MultiResNoised"]


def _square(name: str, x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be a square [B, C, d, d] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return int(x.shape[-1])


def avgpool_to(x: torch.Tensor, r: int) -> torch.Tensor:
    """``avgpool_r``: ``[B, C, d, d] -> [B, C, r, r]`` by block means (d a multiple of r)."""
    d = _square("x", x)
    if r < 1 or d % r:
        raise ValueError(f"cannot average-pool {d} x {d} down to {r} x {r}: {d} must be a multiple of {r}")
    return x if r == d else F.avg_pool2d(x, d // r)


def multiscale_resolutions(d: int, min_resolution: int = 32) -> list[int]:
    """``{min_resolution, 2 min_resolution, ..., d}`` (SPEC 11); just ``[d]`` when d <= min_resolution."""
    if d <= min_resolution:
        return [d]
    out, r = [], min_resolution
    while r < d:
        out.append(r)
        r *= 2
    if r != d:
        raise ValueError(f"resolution {d} is not min_resolution * 2^k = {min_resolution} * 2^k")
    return out + [d]


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


def multiscale_loss(eps_hat: torch.Tensor, eps: torch.Tensor, min_resolution: int = 32,
                    reduction: str = "mean") -> torch.Tensor:
    """Simple diffusion's multiscale loss at resolution d (SPEC 11):
    ``sum over r in {32, 64, ..., d} of (1/r) mean ||avgpool_r(eps) - avgpool_r(eps_hat)||^2``.

    eps_hat, eps: ``[B, C, d, d]``. ``reduction="mean"``: a scalar; ``"none"``: ``[B]`` (each
    sample's mean over channels and pixels). Differentiable in eps_hat.
    """
    d = _square("eps_hat", eps_hat)
    if eps.shape != eps_hat.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}; it must match eps_hat's {tuple(eps_hat.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    total = sum(_per_sample_mse(avgpool_to(eps, r), avgpool_to(eps_hat, r)) / r
                for r in multiscale_resolutions(d, min_resolution))
    return total.mean() if reduction == "mean" else total


def mdm_alpha_sigma(t, resolution: int, schedule: str = "shifted", reference: int = 64,
                    reference_hi: int = 256, reference_lo: int = 32):
    """``(alpha_t, sigma_t)`` of one resolution (SPEC 11): ``schedule`` is ``"cosine"`` (no shift),
    ``"shifted"`` (``logsnr(t) + 2 ln(reference / resolution)``) or ``"interpolated"``."""
    if schedule == "cosine":
        logsnr = schedules.logsnr_cosine(t)
    elif schedule == "shifted":
        logsnr = schedules.logsnr_shifted(t, resolution, reference)
    elif schedule == "interpolated":
        logsnr = schedules.logsnr_interpolated(t, resolution, reference_hi, reference_lo)
    else:
        raise ValueError(f"schedule must be 'cosine', 'shifted' or 'interpolated', got {schedule!r}")
    return schedules.alpha_sigma_from_logsnr(logsnr)


@dataclass
class MultiResNoised:
    """MDM's joint noising of one batch: per resolution (ascending), the noisy input ``z``, the
    clean target ``avgpool_r(x)``, the noise ``eps`` and the ``[B]`` ``alpha``, ``sigma``."""
    resolutions: list
    z: list
    target: list
    eps: list
    alpha: list
    sigma: list


def mdm_noising(x: torch.Tensor, t: torch.Tensor, resolutions, *, eps=None, schedule: str = "shifted",
                reference: int = 64, generator: torch.Generator | None = None) -> MultiResNoised:
    """MDM joint multi-resolution noising (SPEC 11): ``z_t^r = alpha_t^r avgpool_r(x) + sigma_t^r eps^r``.

    x: ``[B, C, d, d]``; t: ``[B]`` times in (0, 1), shared by all resolutions; resolutions: the
    r's (each dividing d). eps: optional list of ``[B, C, r, r]`` noises (default: standard
    normals from ``generator``). Schedules per resolution as in :func:`mdm_alpha_sigma`.
    """
    _square("x", x)
    res = sorted(int(r) for r in resolutions)
    if not res or len(set(res)) != len(res):
        raise ValueError(f"resolutions must be distinct ints, got {resolutions!r}")
    if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
        raise ValueError(f"t must be a [B] = [{x.shape[0]}] tensor of times in (0, 1)")
    if eps is not None and len(eps) != len(res):
        raise ValueError(f"eps must hold one noise tensor per resolution ({len(res)})")
    out = MultiResNoised(res, [], [], [], [], [])
    for k, r in enumerate(res):
        target = avgpool_to(x, r)
        if eps is None:
            e = torch.randn(target.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            e = eps[k]
            if e.shape != target.shape:
                raise ValueError(f"eps[{k}] has shape {tuple(e.shape)}; resolution {r} needs {tuple(target.shape)}")
        alpha, sigma = mdm_alpha_sigma(t.to(torch.float64), r, schedule, reference)
        a, s = alpha.to(x.dtype).view(-1, 1, 1, 1), sigma.to(x.dtype).view(-1, 1, 1, 1)
        out.z.append(a * target + s * e)
        out.target.append(target)
        out.eps.append(e)
        out.alpha.append(alpha.to(x.dtype))
        out.sigma.append(sigma.to(x.dtype))
    return out


def mdm_loss(x_hats, noised: MultiResNoised, weights=None, reduction: str = "mean",
             weighting: str = "x") -> torch.Tensor:
    """MDM's loss ``sum_r w_r lambda_r(t) mean ||x_hat^r - avgpool_r(x)||^2`` (SPEC 11).

    x_hats: one prediction per resolution of ``noised`` (ascending); weights: one float per
    resolution (default 1). ``weighting``: ``"x"``, ``lambda = 1`` (the x-prediction error);
    ``"v"``, ``lambda = 1 / sigma_t^r^2 = 1 + SNR`` (the v-prediction error, since
    ``x_hat - x = -sigma_t (v_hat - v)``). ``reduction``: ``"mean"`` (scalar) or ``"none"`` (``[B]``).
    """
    if len(x_hats) != len(noised.resolutions):
        raise ValueError(f"need one prediction per resolution {noised.resolutions}, got {len(x_hats)}")
    weights = [1.0] * len(x_hats) if weights is None else list(weights)
    if len(weights) != len(x_hats):
        raise ValueError(f"need one weight per resolution, got {len(weights)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if weighting not in ("x", "v"):
        raise ValueError(f"weighting must be 'x' or 'v', got {weighting!r}")
    total = 0
    for w, xh, tg, sigma in zip(weights, x_hats, noised.target, noised.sigma):
        err = _per_sample_mse(xh, tg)
        total = total + w * (err if weighting == "x" else err / sigma.to(err.dtype) ** 2)
    return total.mean() if reduction == "mean" else total
