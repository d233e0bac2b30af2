"""Forward functions of the Triton backend: the op signatures of ``relayops/ops/_library.py``
(checked arguments in: per-sample parameters as contiguous float32 ``[B]`` tensors), launching
the kernels of ``relayops.triton.kernels``.

The kernels index contiguous NCHW storage, so non-contiguous inputs are copied to it first and
outputs come back contiguous (``_library`` gives them the fake implementation's layout). The
small ``[B, s, s]`` coefficient factors come from ``relayops.reference.blur_response`` (one
copy of the formula); everything image-sized happens in the kernels, in float32.
"""
from __future__ import annotations

import contextlib
import threading
import torch
import triton

from .. import reference
from .._alloc import empty
from . import kernels

MASK32 = 0xFFFFFFFF
# The Triton interpreter (TRITON_INTERPRET=1, no GPU) keeps the running program's grid in
# global state, so launches from several threads at once fail or mix up; serialize them there.
_INTERPRETER_LOCK = threading.Lock()


def _launching():
    return _INTERPRETER_LOCK if kernels.INTERPRET else contextlib.nullcontext()


GROUPS_PER_LAUNCH = 65535  # the grid's second axis
# Registers per thread: every kernel fits in 112 without a stack (at 96 ptxas spills in the fused
# relay_corrupt, at 104 in the one-warp Heun step with per-sample seeds); unlimited, the fused
# relay_step takes up to 167.
MAX_REGISTERS = 112


def _launch(kernel, like: torch.Tensor, s: int, halo: bool, *args, scalars=(), **constexprs):
    """Launch ``kernel`` over the patches of ``like`` ([B, C, H, W] contiguous): grid axis 0 the
    (patch-row band, patch-column block) pairs, axis 1 the groups of planes, at most 65535
    groups a launch. ``halo``: block-noise programs overlap by one patch column. ``scalars``
    follow the layout arguments."""
    b, c, h, w = like.shape
    if b * c == 0 or h == 0 or w == 0:
        return
    if h * w >= 2**31:
        raise ValueError(f"the triton backend takes planes of fewer than 2**31 elements, got H x W = {h} x {w}")
    hp, wp, n_planes = h // s, w // s, b * c
    block_q, planes, rows, warps = kernels.launch_shape(wp, hp, n_planes, halo)
    n_qblocks = triton.cdiv(wp, block_q - 1 if halo else block_q)
    n_bands = triton.cdiv(hp, rows)
    groups = triton.cdiv(n_planes, planes)
    with _launching():
        for first in range(0, groups, GROUPS_PER_LAUNCH):
            grid = (n_qblocks * n_bands, min(GROUPS_PER_LAUNCH, groups - first))
            kernel[grid](*args, n_planes, c, hp, wp, n_qblocks, first * planes, *scalars, S=s, BLOCK_Q=block_q,
                         PLANES=planes, ROWS=rows, num_warps=warps, maxnreg=MAX_REGISTERS, **constexprs)


def _out(x: torch.Tensor) -> torch.Tensor:
    return empty(x.shape, dtype=x.dtype, device=x.device)


def patch_transform(x: torch.Tensor, s: int, inverse: bool) -> torch.Tensor:
    """patch_dct (SPEC 1) of ``x`` ``[B, C, H, W]``, or patch_idct with ``inverse``."""
    x = x.contiguous()
    out = _out(x)
    _launch(kernels.patch_dct_kernel, x, s, False, x, out, INVERSE=inverse)
    return out


def patch_dct(x, s):
    return patch_transform(x, s, False)


def patch_idct(u, s):
    return patch_transform(u, s, True)


def block_noise(g, s, adjoint):
    """Wraparound s x s box sum / s (SPEC 3); ``adjoint`` sums toward +x, +y (its gradient)."""
    g = g.contiguous()
    out = _out(g)
    _launch(kernels.block_noise_kernel, g, s, True, g, out, ADJOINT=adjoint)
    return out


def _seed_words(seed: int, offset: int):
    return seed & MASK32, (seed >> 32) & MASK32, offset & MASK32, (offset >> 32) & MASK32


def _noise_args(like, eps, eps2, seeds):
    """Tensors of the noise term: eps, eps2 (the image where absent: never read then), seeds."""
    eps = like if eps is None else eps.contiguous()
    eps2 = eps if eps2 is None else eps2.contiguous()
    return eps, eps2, like if seeds is None else seeds


def _noise_mode(eps, present: bool = True) -> int:
    """0: no noise term; 1: draw with Philox in the kernel; 2: caller-supplied eps/eps2."""
    if not present:
        return 0
    return 1 if eps is None else 2


def _blur_factor(tau: torch.Tensor, s: int, d_min: float) -> torch.Tensor:
    return reference.blur_response(tau, s, d_min).contiguous()


def patch_blur(x, tau, s, d_min):
    """``patch_idct(D(tau[b]) * patch_dct(x))`` (SPEC 2)."""
    x = x.contiguous()
    out = _out(x)
    _launch(kernels.patch_blur_kernel, x, s, False, x, _blur_factor(tau, s, d_min), out)
    return out


def relay_noise(like, s, alpha, k, seed, offset, seeds, eps, eps2):
    """``k (eps + alpha block_noise(eps2))`` (SPEC 3), drawn at (seed or seeds[b], offset) when eps is None."""
    out = _out(like)
    e, e2, sd = _noise_args(out, eps, eps2, seeds)
    _launch(kernels.relay_noise_kernel, out, s, alpha != 0.0, e, e2, sd, out,
            scalars=(float(alpha), float(k), *_seed_words(seed, offset)),
            NOISE=_noise_mode(eps), HAS_BLOCK=alpha != 0.0, PER_SAMPLE_SEEDS=seeds is not None)
    return out


def relay_corrupt(y, sigma, tau, s, d_min, alpha, k, seed, offset, seeds, eps, eps2):
    """``patch_blur(y, tau) + sigma * relay_noise`` per sample (SPEC 6), one pass over y."""
    y = y.contiguous()
    out = _out(y)
    e, e2, sd = _noise_args(y, eps, eps2, seeds)
    _launch(kernels.relay_corrupt_kernel, y, s, alpha != 0.0, y, e, e2, _blur_factor(tau, s, d_min),
            sigma.contiguous(), sd, out, scalars=(float(alpha), float(k), *_seed_words(seed, offset)),
            NOISE=_noise_mode(eps), HAS_BLOCK=alpha != 0.0, PER_SAMPLE_SEEDS=seeds is not None)
    return out


def relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta, s, d_min, alpha, k, seed, offset, seeds, eps, eps2,
               x_prop, x0_hat_prop, x0_hat_b, correction):
    """One DDIM-blur (Euler), Heun-corrected or second-order relay update (SPEC 8, 8.1), one pass
    over the images: ``gamma x + idct((D' - gamma D) dct(x0) [+ E dct(x0_b - x0)]) + eta sigma' n``,
    gamma = sqrt(1 - eta^2) sigma'/sigma."""
    x = x.contiguous()
    out = _out(x)
    gamma = ((1.0 - eta * eta) ** 0.5 * sigma_next / sigma).contiguous()
    factor = reference.blur_response(tau_next, s, d_min) - gamma.view(-1, 1, 1) * reference.blur_response(tau, s, d_min)
    noise = _noise_mode(eps, eta != 0.0)
    has_block = noise != 0 and alpha != 0.0
    e, e2, sd = _noise_args(x, eps, eps2, seeds)
    heun, second = x_prop is not None, x0_hat_b is not None
    _launch(kernels.relay_step_kernel, x, s, has_block, x, x0_hat.contiguous(),
            x_prop.contiguous() if heun else x, x0_hat_prop.contiguous() if heun else x,
            x0_hat_b.contiguous() if second else x, e, e2, factor.contiguous(),
            correction.to(factor.dtype).contiguous() if second else factor, gamma, (eta * sigma_next).contiguous(),
            sigma.contiguous(), sigma_next.contiguous(), sd, out,
            scalars=(float(alpha), float(k), *_seed_words(seed, offset)),
            HEUN=heun, SECOND=second, NOISE=noise, HAS_BLOCK=has_block, PER_SAMPLE_SEEDS=seeds is not None)
    return out


def normals_from_words(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps, eps2)``, ``[2 n]`` float32 each, from the Philox words ``[4, n]`` of n pairs (int32
    holding the uint32 bits) through the kernels' Box-Muller code (SPEC 4): eps[2i], eps[2i + 1]
    (cosine, sine) from words (0, 1) of pair i, eps2[2i], eps2[2i + 1] from (2, 3). For tests
    that force the extreme uniforms."""
    if words.dim() != 2 or words.shape[0] != 4:
        raise ValueError(f"normals_from_words takes Philox words of shape [4, n], got {tuple(words.shape)}")
    words = words.contiguous()
    n = words.shape[1]
    eps, eps2 = (torch.empty(2 * n, dtype=torch.float32, device=words.device) for _ in range(2))
    if n:
        with _launching():
            kernels.words_kernel[(triton.cdiv(n, 256),)](words, eps, eps2, n, BLOCK=256)
    return eps, eps2
