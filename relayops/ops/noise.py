"""Public block noise, relay noise and the relay corruption (SPEC 3, 4, 6)."""
from __future__ import annotations

import math

import torch

from .._validate import check_image, check_patch_size, check_real, check_seed, per_sample, seed_args, signed64
from ._backend import kernel


def block_noise(g: torch.Tensor, s: int = 4, *, backend: str | None = None) -> torch.Tensor:
    """Wraparound s x s box sum of ``g`` scaled by 1/s (SPEC 3); deterministic in g.

    g: ``[B, C, H, W]`` floating, H and W multiples of s. Same shape and dtype out. For
    ``g ~ N(0, I)`` the result has variance 1 and covariance
    ``max(0, s - |dx|) max(0, s - |dy|) / s^2`` at wraparound distances (dx, dy).
    """
    s = check_patch_size(s)
    check_image("g", g, s)
    return kernel("block_noise", backend, g)(g, s, False)


def noise_scale(alpha: float, normalize: bool) -> float:
    """``k = 1/sqrt(1 + alpha^2)`` with ``normalize`` (the paper), else 1 (the authors' code)."""
    return 1.0 / math.sqrt(1.0 + alpha * alpha) if normalize else 1.0


def resolve_noise_args(like: torch.Tensor, alpha, normalize, seed, offset, eps, eps2):
    """Convert the noise keywords shared by relay_noise, relay_corrupt and relay_step.

    Returns the ops' ``(alpha, k, seed, offset, seeds, eps, eps2)``: seed and offset as int64
    (two's complement), seeds an int64 ``[B]`` tensor for per-sample seeds, else None. Without
    ``eps`` a missing seed is drawn from torch's default CPU generator (no device round trip).
    """
    alpha = check_real("alpha", alpha, low=0.0)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    offset = check_seed("offset", offset)
    if eps is not None:  # given noise (checked with the other op arguments): no seed
        seed = 0
    elif seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    seed, seeds = seed_args(seed, like)
    return alpha, noise_scale(alpha, normalize), seed, signed64(offset), seeds, eps, eps2


def relay_noise(like: torch.Tensor, s: int = 4, alpha: float = 0.15, normalize: bool = True,
                seed=None, offset: int = 0, eps: torch.Tensor | None = None,
                eps2: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Relay noise ``k (eps + alpha block_noise(eps2, s))`` shaped like ``like`` (SPEC 3, 4).

    like: ``[B, C, H, W]`` floating; only its shape, dtype and device are used. ``eps``/``eps2``:
    caller-supplied standard normals of like's shape; otherwise they are drawn in the kernel from
    the Philox stream of SPEC 4 at ``offset`` (an int in [0, 2^64)). ``seed``: an int in
    [0, 2^64) (one stream for the batch; a missing seed is drawn from torch's generator), or
    per-sample seeds, a list/tuple of B ints or an int64 ``[B]`` tensor on like's device: sample
    b then gets exactly the noise ``seed=seeds[b]`` gives it alone (a batch of one).
    ``normalize=True`` gives unit variance (k = 1/sqrt(1 + alpha^2)), ``normalize=False`` the
    authors' k = 1. Differentiable in given eps and eps2.
    """
    s = check_patch_size(s)
    check_image("like", like, s)
    alpha, k, seed, offset, seeds, eps, eps2 = resolve_noise_args(like, alpha, normalize, seed, offset, eps, eps2)
    return kernel("relay_noise", backend, like)(like, s, alpha, k, seed, offset, seeds, eps, eps2)


def relay_corrupt(y: torch.Tensor, sigma, tau, s: int = 4, alpha: float = 0.15, normalize: bool = True,
                  seed=None, offset: int = 0, eps: torch.Tensor | None = None,
                  eps2: torch.Tensor | None = None, *, d_min: float = 0.001,
                  backend: str | None = None) -> torch.Tensor:
    """Training corruption of the relay stage: ``patch_blur(y, tau) + sigma * relay_noise`` (SPEC 6).

    y: ``[B, C, H, W]`` clean images. sigma, tau: floats or ``[B]`` tensors (sigma >= 0,
    tau >= 0). Noise keywords as in :func:`relay_noise`. Returns y's shape and dtype.
    Differentiable in y, given eps and eps2, and ``[B]`` sigma and tau (learnable corruption
    schedules), on every backend.
    """
    s = check_patch_size(s)
    check_image("y", y, s)
    d_min = check_real("d_min", d_min, low=0.0, high=1.0)
    sigma_b = per_sample("sigma", sigma, y)
    tau_b = per_sample("tau", tau, y)
    alpha, k, seed, offset, seeds, eps, eps2 = resolve_noise_args(y, alpha, normalize, seed, offset, eps, eps2)
    return kernel("relay_corrupt", backend, y)(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, seeds, eps, eps2)
