"""Reference block noise, relay noise and the relay corruption (SPEC 3, 4, 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import acc_dtype
from .dct import patch_blur
from .philox import philox_normal_pair


def block_noise(g: torch.Tensor, s: int = 4, adjoint: bool = False) -> torch.Tensor:
    """``(1/s) sum_{i,j<s} g[..., (x - i) mod H, (y - j) mod W]`` (SPEC 3); with ``adjoint``
    the sum runs over ``(x + i, y + j)``, which is its adjoint (its gradient).

    Circular padding of s - 1 rows/columns on the top/left (bottom/right for the adjoint), then
    an s x s box mean (times s^2 / s = s).
    """
    dt = acc_dtype(g.dtype)
    pad = (0, s - 1, 0, s - 1) if adjoint else (s - 1, 0, s - 1, 0)
    padded = F.pad(g.to(dt), pad, mode="circular")
    return (F.avg_pool2d(padded, s, stride=1) * s).to(g.dtype)


def draw_normals(like: torch.Tensor, seed: int, offset: int, seeds: torch.Tensor | None = None):
    """``(eps, eps2)`` shaped like ``like`` from the Philox layout of SPEC 4: one stream keyed by
    ``seed``, or per-sample streams keyed by the int64 ``[B]`` tensor ``seeds``.

    Computed in float64 and cast to ``like``'s compute dtype (float32 for half types).
    """
    z0, z1 = philox_normal_pair(tuple(like.shape), seed, offset, like.device, torch.float64, seeds)
    dt = acc_dtype(like.dtype)
    return z0.to(dt), z1.to(dt)


def relay_noise(like: torch.Tensor, s: int, alpha: float, k: float, seed: int, offset: int,
                seeds: torch.Tensor | None, eps: torch.Tensor | None, eps2: torch.Tensor | None) -> torch.Tensor:
    """``k * (eps + alpha * block_noise(eps2, s))`` (SPEC 3); drawn from ``seed`` (or the
    per-sample ``seeds``) at ``offset`` when eps is None."""
    dt = acc_dtype(like.dtype)
    if eps is None:
        eps, eps2 = draw_normals(like, seed, offset, seeds)
    n = eps.to(dt)
    if alpha != 0.0:
        n = n + alpha * block_noise(eps2.to(dt), s)
    return (k * n).to(like.dtype)


def relay_corrupt(y: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor, s: int, d_min: float,
                  alpha: float, k: float, seed: int, offset: int, seeds: torch.Tensor | None,
                  eps: torch.Tensor | None, eps2: torch.Tensor | None) -> torch.Tensor:
    """``patch_blur(y, tau) + sigma * relay_noise`` with per-sample ``[B]`` sigma, tau (SPEC 6)."""
    dt = acc_dtype(y.dtype)
    yd = y.to(dt)
    n = relay_noise(yd, s, alpha, k, seed, offset, seeds, eps, eps2)
    return (patch_blur(yd, tau.to(dt), s, d_min) + sigma.to(dt).view(-1, 1, 1, 1) * n).to(y.dtype)
