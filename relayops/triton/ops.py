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
from typing import Optional

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


def _geometry(x: torch.Tensor, s: int):
    """``(n_patches, C, H/s, W/s)`` of a ``[B, C, H, W]`` tensor."""
    b, c, h, w = x.shape
    return b * c * (h // s) * (w // s), c, h // s, w // s


def _padded(s: int) -> int:
    """s rounded up to a power of two (>= 2): the register tile's side."""
    return max(2, triton.next_power_of_2(s))


def _grid(n_patches: int, sp: int):
    return lambda meta: (triton.cdiv(n_patches, meta["TILE"] // (sp * sp)),)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _out(x: torch.Tensor) -> torch.Tensor:
    return empty(x.shape, dtype=x.dtype, device=x.device)


def patch_transform(x: torch.Tensor, s: int, inverse: bool) -> torch.Tensor:
    """patch_dct (SPEC 1) of ``x`` ``[B, C, H, W]``, or patch_idct with ``inverse``."""
    x = x.contiguous()
    out = _out(x)
    n, _, hp, wp = _geometry(x, s)
    if n:
        sp = _padded(s)
        with _launching():
            kernels.transform_kernel[_grid(n, sp)](x, out, n, hp, wp, S=s, SP=sp, INVERSE=inverse)
    return out


def patch_dct(x, s):
    return patch_transform(x, s, False)


def patch_idct(u, s):
    return patch_transform(u, s, True)


def block_noise(g, s, adjoint):
    """Wraparound s x s box sum / s (SPEC 3); ``adjoint`` sums toward +x, +y (its gradient)."""
    g = g.contiguous()
    out = _out(g)
    n, _, hp, wp = _geometry(g, s)
    if n:
        sp = _padded(s)
        with _launching():
            kernels.block_noise_kernel[_grid(n, sp)](g, out, n, hp, wp, S=s, SP=sp, ADJOINT=adjoint)
    return out


def _launch_relay(like, s, *, x=None, x0=None, x_prop=None, x0_prop=None, x0_b=None, factor=None, correction=None,
                  gamma=None, coef=None,
                  sigma=None, sigma_next=None, alpha=0.0, k=1.0, seed=0, offset=0, seeds=None, noise=0,
                  eps=None, eps2=None):
    """Launch ``kernels.relay_kernel`` writing a new contiguous tensor like ``like``; absent
    tensors are replaced by ``like``, which the kernel never reads in their place (constexpr
    flags switch terms off). noise: 0 none, 1 drawn in the kernel (SPEC 4), 2 given eps/eps2."""
    out = _out(like)
    n, c, hp, wp = _geometry(out, s)
    if not n:
        return out
    sp = _padded(s)
    tensor = lambda t: like if t is None else t  # noqa: E731
    with _launching():
        kernels.relay_kernel[_grid(n, sp)](
            tensor(_contiguous(x)), tensor(_contiguous(x0)), tensor(_contiguous(x_prop)),
            tensor(_contiguous(x0_prop)), tensor(_contiguous(x0_b)),
            tensor(_contiguous(eps)), tensor(_contiguous(eps2)), tensor(factor), tensor(correction), tensor(gamma),
            tensor(coef),
            tensor(sigma), tensor(sigma_next), tensor(seeds), out,
            n, c, hp, wp, float(alpha), float(k), seed & MASK32, (seed >> 32) & MASK32, offset & MASK32,
            (offset >> 32) & MASK32,
            S=s, SP=sp, HAS_X=x is not None, HAS_BLUR=x0 is not None, HEUN=x_prop is not None, SECOND=x0_b is not None,
            NOISE=noise, HAS_BLOCK=alpha != 0.0, PER_SAMPLE_SEEDS=seeds is not None)
    return out


def _noise_mode(eps, present: bool = True) -> int:
    """0: no noise term; 1: draw with Philox in the kernel; 2: caller-supplied eps/eps2."""
    if not present:
        return 0
    return 1 if eps is None else 2


def _blur_factor(tau: torch.Tensor, s: int, d_min: float) -> torch.Tensor:
    return reference.blur_response(tau, s, d_min).contiguous()


def patch_blur(x, tau, s, d_min):
    """``patch_idct(D(tau[b]) * patch_dct(x))`` (SPEC 2)."""
    return _launch_relay(x, s, x0=x, factor=_blur_factor(tau, s, d_min))


def relay_noise(like, s, alpha, k, seed, offset, seeds, eps, eps2):
    """``k (eps + alpha block_noise(eps2))`` (SPEC 3), drawn at (seed or seeds[b], offset) when eps is None."""
    return _launch_relay(like, s, alpha=alpha, k=k, seed=seed, offset=offset, seeds=seeds, noise=_noise_mode(eps),
                         eps=eps, eps2=eps2)


def relay_corrupt(y, sigma, tau, s, d_min, alpha, k, seed, offset, seeds, eps, eps2):
    """``patch_blur(y, tau) + sigma * relay_noise`` per sample (SPEC 6), one pass over y."""
    return _launch_relay(y, s, x0=y, factor=_blur_factor(tau, s, d_min), coef=sigma, alpha=alpha, k=k,
                         seed=seed, offset=offset, seeds=seeds, noise=_noise_mode(eps), eps=eps, eps2=eps2)


def relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta, s, d_min, alpha, k, seed, offset, seeds, eps, eps2,
               x_prop, x0_hat_prop, x0_hat_b, correction):
    """One DDIM-blur (Euler), Heun-corrected or second-order relay update (SPEC 8, 8.1), one pass
    over the images: ``gamma x + idct((D' - gamma D) dct(x0) [+ E dct(x0_b - x0)]) + eta sigma' n``,
    gamma = sqrt(1 - eta^2) sigma'/sigma."""
    gamma = (1.0 - eta * eta) ** 0.5 * sigma_next / sigma
    factor = reference.blur_response(tau_next, s, d_min) - gamma.view(-1, 1, 1) * reference.blur_response(tau, s, d_min)
    return _launch_relay(x, s, x=x, x0=x0_hat, x_prop=x_prop, x0_prop=x0_hat_prop, x0_b=x0_hat_b, factor=factor,
                         correction=correction,
                         gamma=gamma, coef=eta * sigma_next, sigma=sigma,
                         sigma_next=sigma_next, alpha=alpha, k=k, seed=seed, offset=offset, seeds=seeds,
                         noise=_noise_mode(eps, eta != 0.0), eps=eps, eps2=eps2)


def normals_from_words(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps, eps2)`` float32, ``[2 n]`` each, from the Philox words ``[4, n]`` of n pairs (int32
    holding the uint32 bits) through the kernels' Box-Muller code (SPEC 4): ``eps[2i], eps[2i + 1]``
    (cosine, sine) from words (0, 1) of pair i, ``eps2[2i], eps2[2i + 1]`` from (2, 3). For tests
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
