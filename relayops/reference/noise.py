"""Reference block noise, relay noise and the relay corruption (SPEC 3, 4, 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dct import compute_dtype, patch_blur
from .philox import philox_normal_pair


def block_noise(g: torch.Tensor, s: int = 4) -> torch.Tensor:
    """``(1/s) sum_{i,j<s} g[..., (x - i) mod H, (y - j) mod W]`` (SPEC 3).

    Circular padding of s - 1 rows/columns on the top/left, then an s x s box mean
    (times s^2 / s = s).
    """
    dt = compute_dtype(g.dtype)
    padded = F.pad(g.to(dt), (s - 1, 0, s - 1, 0), mode="circular")
    return (F.avg_pool2d(padded, s, stride=1) * s).to(g.dtype)


def draw_normals(like: torch.Tensor, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps`` and ``eps2`` shaped like ``like`` from the Philox layout of SPEC 4.

    Computed in float64 and cast to ``like``'s dtype (float32 for half types' math).
    """
    z0, z1 = philox_normal_pair(tuple(like.shape), seed, offset, like.device, torch.float64)
    dt = compute_dtype(like.dtype)
    return z0.to(dt), z1.to(dt)


def relay_noise(like: torch.Tensor, s: int, alpha: float, k: float, seed: int | None, offset: int,
                eps: torch.Tensor | None, eps2: torch.Tensor | None) -> torch.Tensor:
    """``k * (eps + alpha * block_noise(eps2, s))`` (SPEC 3); drawn from ``seed`` when eps is None."""
    dt = compute_dtype(like.dtype)
    if eps is None:
        eps, eps2 = draw_normals(like, seed, offset)
    n = eps.to(dt)
    if alpha != 0.0:
        n = n + alpha * block_noise(eps2.to(dt), s)
    return (k * n).to(like.dtype)


def relay_corrupt(y: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor, s: int, d_min: float,
                  alpha: float, k: float, seed: int | None, offset: int,
                  eps: torch.Tensor | None, eps2: torch.Tensor | None) -> torch.Tensor:
    """``patch_blur(y, tau) + sigma * relay_noise`` with per-sample ``[B]`` sigma, tau (SPEC 6)."""
    dt = compute_dtype(y.dtype)
    yd = y.to(dt)
    n = relay_noise(yd, s, alpha, k, seed, offset, eps, eps2)
    return (patch_blur(yd, tau.to(dt), s, d_min) + sigma.to(dt).view(-1, 1, 1, 1) * n).to(y.dtype)
