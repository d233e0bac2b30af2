"""Reference patch DCT and patch-wise blurring (SPEC 1, 2), plain PyTorch.

These are the executable spec: readable, float64-capable, and what every kernel is tested
against. float16/bfloat16 inputs are computed in float32 and cast back.
"""
from __future__ import annotations

import math

import torch

from .._validate import acc_dtype


def dct_matrix(s: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C[k, n] = c_k cos(pi (2n + 1) k / (2s))`` (SPEC 1)."""
    k = torch.arange(s, dtype=torch.float64, device=device).unsqueeze(1)
    n = torch.arange(s, dtype=torch.float64, device=device).unsqueeze(0)
    c = torch.cos(math.pi * (2 * n + 1) * k / (2 * s))
    scale = torch.full((s, 1), math.sqrt(2.0 / s), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1.0 / s)
    return (scale * c).to(dtype)


def _to_patches(x: torch.Tensor, s: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H/s, s, W/s, s] (a view)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // s, s, w // s, s)


def patch_dct(x: torch.Tensor, s: int = 4) -> torch.Tensor:
    """Per-patch orthonormal 2-D DCT-II, coefficients kept in image layout (SPEC 1)."""
    dt = acc_dtype(x.dtype)
    m = dct_matrix(s, dt, x.device)
    u = torch.einsum("ik,bcpkql,jl->bcpiqj", m, _to_patches(x.to(dt), s), m)
    return u.reshape(x.shape).to(x.dtype)


def patch_idct(u: torch.Tensor, s: int = 4) -> torch.Tensor:
    """Inverse of :func:`patch_dct`: ``X = C^T U C`` per patch (SPEC 1)."""
    dt = acc_dtype(u.dtype)
    m = dct_matrix(s, dt, u.device)
    x = torch.einsum("ki,bcpkql,lj->bcpiqj", m, _to_patches(u.to(dt), s), m)
    return x.reshape(u.shape).to(u.dtype)


def frequencies(s: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """``lambda_ij = pi^2 (i^2 + j^2) / s^2`` as an ``[s, s]`` tensor (SPEC 2)."""
    i = torch.arange(s, dtype=dtype, device=device)
    return (math.pi**2) * (i.unsqueeze(1) ** 2 + i.unsqueeze(0) ** 2) / (s * s)


def blur_response(tau: torch.Tensor, s: int = 4, d_min: float = 0.001) -> torch.Tensor:
    """``D_ij(tau) = (1 - d_min) exp(-lambda_ij tau) + d_min``, shape ``[*tau.shape, s, s]`` (SPEC 2)."""
    lam = frequencies(s, tau.dtype, tau.device)
    return (1.0 - d_min) * torch.exp(-lam * tau[..., None, None]) + d_min


def blur_response_grad(tau: torch.Tensor, s: int = 4, d_min: float = 0.001) -> torch.Tensor:
    """``dD_ij/dtau = -(1 - d_min) lambda_ij exp(-lambda_ij tau)``, shape ``[*tau.shape, s, s]``
    (the tau-gradient of patch_blur, docs/spec.md section 13)."""
    lam = frequencies(s, tau.dtype, tau.device)
    return -(1.0 - d_min) * lam * torch.exp(-lam * tau[..., None, None])


def _tile(response: torch.Tensor) -> torch.Tensor:
    """[B, s, s] responses -> [B, 1, 1, s, 1, s], broadcastable over patches."""
    b, s, _ = response.shape
    return response.reshape(b, 1, 1, s, 1, s)


def scale_coefficients(u: torch.Tensor, factor: torch.Tensor, s: int) -> torch.Tensor:
    """Multiply each patch's s x s DCT coefficients by ``factor[b]`` ([B, s, s])."""
    return (_to_patches(u, s) * _tile(factor)).reshape(u.shape)


def patch_blur(x: torch.Tensor, tau: torch.Tensor, s: int = 4, d_min: float = 0.001) -> torch.Tensor:
    """``patch_idct(D(tau) * patch_dct(x))`` with ``tau`` a ``[B]`` tensor (SPEC 2)."""
    dt = acc_dtype(x.dtype)
    xd = x.to(dt)
    d = blur_response(tau.to(dt), s, d_min)
    return patch_idct(scale_coefficients(patch_dct(xd, s), d, s), s).to(x.dtype)
