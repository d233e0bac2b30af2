"""Public patch DCT and patch-wise blurring (SPEC 1, 2)."""
from __future__ import annotations

import torch

from .. import reference
from .._validate import FLOAT_DTYPES, acc_dtype, check_image, check_patch_size, check_real, per_sample
from ._backend import kernel


def patch_dct(x: torch.Tensor, s: int = 4, *, backend: str | None = None) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every s x s patch, coefficients kept in image layout (SPEC 1).

    x: ``[B, C, H, W]`` floating (float16, bfloat16, float32, float64), H and W multiples of s.
    Returns a tensor of x's shape and dtype whose patch ``(p, q)`` block holds ``C X C^T``
    (entry ``[i, j]``: row frequency i, column frequency j). Half types compute in float32.
    """
    s = check_patch_size(s)
    check_image("x", x, s)
    return kernel("patch_dct", backend, x)(x, s)


def patch_idct(u: torch.Tensor, s: int = 4, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`patch_dct`: ``X = C^T U C`` per s x s patch (SPEC 1). Same shapes/dtypes."""
    s = check_patch_size(s)
    check_image("u", u, s)
    return kernel("patch_idct", backend, u)(u, s)


def blur_response(tau, s: int = 4, d_min: float = 0.001) -> torch.Tensor:
    """Blur response ``D_ij(tau) = (1 - d_min) exp(-lambda_ij tau) + d_min`` (SPEC 2).

    tau: a Python float (float64 result) or a floating tensor of any shape, values >= 0.
    Returns ``[*tau.shape, s, s]`` in tau's dtype (float32 math for half types);
    ``lambda_ij = pi^2 (i^2 + j^2) / s^2``, so ``D_00 = 1`` and ``tau = 0`` gives all ones.
    """
    s = check_patch_size(s)
    d_min = check_real("d_min", d_min, low=0.0, high=1.0)
    if not isinstance(tau, torch.Tensor):
        tau = torch.tensor(check_real("tau", tau, low=0.0), dtype=torch.float64)
    elif tau.dtype not in FLOAT_DTYPES:
        raise TypeError(f"tau must be a float or a floating tensor, got dtype {tau.dtype}")
    elif tau.device.type == "cpu" and not torch.compiler.is_compiling() and bool((tau < 0).any()):
        raise ValueError("tau must be >= 0 everywhere")
    return reference.blur_response(tau.to(acc_dtype(tau.dtype)), s, d_min).to(tau.dtype)


def patch_blur(x: torch.Tensor, tau, s: int = 4, d_min: float = 0.001, *,
               backend: str | None = None) -> torch.Tensor:
    """Patch-wise heat dissipation ``patch_idct(D(tau) * patch_dct(x))`` (SPEC 2).

    x: ``[B, C, H, W]`` floating, H and W multiples of s. tau: a float >= 0 or a ``[B]`` tensor
    (one dissipation time per sample). Returns x's shape and dtype. Every patch keeps its mean;
    ``tau = 0`` is the identity. Differentiable in x (the map is symmetric, so the gradient is
    ``patch_blur(grad, tau)``) and in a ``[B]`` tau (docs/spec.md section 13), on every backend.
    """
    s = check_patch_size(s)
    check_image("x", x, s)
    d_min = check_real("d_min", d_min, low=0.0, high=1.0)
    tau_b = per_sample("tau", tau, x)
    return kernel("patch_blur", backend, x)(x, tau_b, s, d_min)
