"""The Triton backend: ``torch.library.triton_op`` registrations (namespace ``relayops_triton``),
their autograd, and the kernel-level functions with the reference signatures.

Every op works on contiguous NCHW tensors: a non-contiguous or channels_last input is copied
to contiguous NCHW first (``.contiguous()``; a no-op for contiguous inputs) and the output
is contiguous NCHW. Storage dtypes float32, float16 and bfloat16, float32 math; float64 is
rejected with a ``TypeError`` (use the reference, cpu or cuda backend for it). Per-sample
parameters are ``[B]`` tensors on the image's device; the small ``[B, s, s]`` blur factors are
computed with ``relayops.reference.blur_response`` (one copy of the formula), the rest in the
kernels (``relayops.triton.kernels``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from .. import reference
from .._alloc import empty_like
from ..reference.dct import frequencies
from . import kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_PATCH = 16  # the [tile, s, s, s] products in registers stop making sense beyond this
MASK32 = 0xFFFFFFFF


def check_supported(x: torch.Tensor, s: int) -> None:
    """Raise for what this backend does not do: float64 storage and patches above 16."""
    if x.dtype not in DTYPES:
        raise TypeError(f"the 'triton' backend supports float32, float16 and bfloat16 tensors, got {x.dtype}; "
                        "use backend='reference' (or 'cpu'/'cuda' where built) for float64")
    if s > MAX_PATCH:
        raise ValueError(f"the 'triton' backend supports patch sizes s <= {MAX_PATCH}, got s = {s}; "
                         "use backend='reference' for larger patches")


def _geometry(x: torch.Tensor, s: int):
    """``(n_patches, C, H/s, W/s)`` of a ``[B, C, H, W]`` tensor."""
    b, c, h, w = x.shape
    return b * c * (h // s) * (w // s), c, h // s, w // s


def _padded(s: int) -> int:
    """s rounded up to a power of two (>= 2): the register tile's side."""
    return max(2, triton.next_power_of_2(s))


def _grid(n_patches: int, sp: int):
    return lambda meta: (triton.cdiv(n_patches, meta["TILE"] // (sp * sp)),)


def _vector(v: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` parameter as contiguous float32 (per_sample may hand an expanded view)."""
    return v.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- transforms


@triton_op("relayops_triton::patch_transform", mutates_args=())
def patch_transform(x: torch.Tensor, s: int, inverse: bool) -> torch.Tensor:
    """patch_dct (SPEC 1) of ``x`` ``[B, C, H, W]``, or patch_idct with ``inverse``."""
    x = x.contiguous()
    out = empty_like(x)
    n, _, hp, wp = _geometry(x, s)
    if n:
        sp = _padded(s)
        wrap_triton(kernels.transform_kernel)[_grid(n, sp)](x, out, n, hp, wp, S=s, SP=sp, INVERSE=inverse)
    return out


def _transform_setup(ctx, inputs, output):
    _, ctx.s, ctx.inverse = inputs


def _transform_backward(ctx, grad):
    # The DCT is orthonormal: the adjoint of the forward transform is the inverse one.
    return patch_transform(grad, ctx.s, not ctx.inverse), None, None


patch_transform.register_autograd(_transform_backward, setup_context=_transform_setup)


# ----------------------------------------------------------------------------- block noise


@triton_op("relayops_triton::block_noise", mutates_args=())
def block_noise_op(g: torch.Tensor, s: int, adjoint: bool) -> torch.Tensor:
    """Wraparound s x s box sum / s (SPEC 3); ``adjoint`` sums toward +x, +y (its gradient)."""
    g = g.contiguous()
    out = empty_like(g)
    n, _, hp, wp = _geometry(g, s)
    if n:
        sp = _padded(s)
        wrap_triton(kernels.block_noise_kernel)[_grid(n, sp)](g, out, n, hp, wp, S=s, SP=sp, ADJOINT=adjoint)
    return out


def _block_setup(ctx, inputs, output):
    _, ctx.s, ctx.adjoint = inputs


def _block_backward(ctx, grad):
    return block_noise_op(grad, ctx.s, not ctx.adjoint), None, None


block_noise_op.register_autograd(_block_backward, setup_context=_block_setup)


# ----------------------------------------------------------------------------- fused relay kernel


def _launch_relay(out, s, dummy, *, x=None, x0=None, x_prop=None, x0_prop=None, factor=None, gamma=None,
                  coef=None, sigma=None, sigma_next=None, alpha=0.0, k=1.0, words=(0, 0, 0, 0),
                  noise=0, eps=None, eps2=None):
    """Launch ``kernels.relay_kernel`` writing ``out``; absent tensors are replaced by the input
    ``dummy``, which the kernel never reads in their place (constexpr flags switch terms off)."""
    n, c, hp, wp = _geometry(out, s)
    if not n:
        return out
    sp = _padded(s)
    image = lambda t: dummy if t is None else t  # noqa: E731
    k0, k1, off0, off1 = words
    wrap_triton(kernels.relay_kernel)[_grid(n, sp)](
        image(x), image(x0), image(x_prop), image(x0_prop), image(eps), image(eps2),
        image(factor), image(gamma), image(coef), image(sigma), image(sigma_next), out,
        n, c, hp, wp, float(alpha), float(k), k0, k1, off0, off1,
        S=s, SP=sp, HAS_X=x is not None, HAS_BLUR=x0 is not None, HEUN=x_prop is not None,
        NOISE=noise, HAS_BLOCK=alpha != 0.0)
    return out


def _noise_mode(eps, present: bool = True) -> int:
    """0: no noise term; 1: draw with Philox in the kernel; 2: caller-supplied eps/eps2."""
    if not present:
        return 0
    return 1 if eps is None else 2


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@triton_op("relayops_triton::patch_blur", mutates_args=())
def patch_blur_op(x: torch.Tensor, tau_b: torch.Tensor, s: int, d_min: float) -> torch.Tensor:
    """``patch_idct(D(tau_b[b]) * patch_dct(x))`` (SPEC 2); x ``[B, C, H, W]``, tau_b ``[B]``."""
    x = x.contiguous()
    factor = reference.blur_response(_vector(tau_b), s, d_min).contiguous()
    return _launch_relay(empty_like(x), s, x, x0=x, factor=factor)


def _blur_setup(ctx, inputs, output):
    x, tau_b, ctx.s, ctx.d_min = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, tau_b)


def _blur_backward(ctx, grad):
    x, tau_b = ctx.saved_tensors
    grad_x = grad_tau = None
    if ctx.needs_input_grad[0]:
        # patch_blur is symmetric per patch (C^T diag(D) C): its adjoint is itself.
        grad_x = patch_blur_op(grad, tau_b, ctx.s, ctx.d_min)
    if ctx.needs_input_grad[1]:
        # d out / d tau = idct(dD/dtau * dct(x)); by orthonormality the inner product with grad
        # is sum over patches of dct(grad) * dD/dtau * dct(x), per sample.
        s = ctx.s
        b, c, h, w = x.shape
        prod = (patch_transform(grad, s, False).float() * patch_transform(x, s, False).float())
        per_freq = prod.reshape(b, c, h // s, s, w // s, s).sum(dim=(1, 2, 4))  # [B, s, s]
        lam = frequencies(s, torch.float32, x.device)
        tau = tau_b.float()[:, None, None]
        d_response = -(1.0 - ctx.d_min) * lam * torch.exp(-lam * tau)
        grad_tau = (per_freq * d_response).sum(dim=(1, 2)).to(tau_b.dtype)
    return grad_x, grad_tau, None, None


patch_blur_op.register_autograd(_blur_backward, setup_context=_blur_setup)


@triton_op("relayops_triton::relay_noise", mutates_args=())
def relay_noise_op(like: torch.Tensor, s: int, alpha: float, k: float, k0: int, k1: int, off0: int, off1: int,
                   eps: Optional[torch.Tensor], eps2: Optional[torch.Tensor]) -> torch.Tensor:
    """``k (eps + alpha block_noise(eps2))`` (SPEC 3); drawn at Philox key (k0, k1) and offset
    words (off0, off1) when eps is None (SPEC 4)."""
    out = empty_like(like, memory_format=torch.contiguous_format)
    return _launch_relay(out, s, like, alpha=alpha, k=k, words=(k0, k1, off0, off1), noise=_noise_mode(eps),
                         eps=_contig(eps), eps2=_contig(eps2))


@triton_op("relayops_triton::relay_corrupt", mutates_args=())
def relay_corrupt_op(y: torch.Tensor, sigma_b: torch.Tensor, tau_b: torch.Tensor, s: int, d_min: float,
                     alpha: float, k: float, k0: int, k1: int, off0: int, off1: int,
                     eps: Optional[torch.Tensor], eps2: Optional[torch.Tensor]) -> torch.Tensor:
    """``patch_blur(y, tau) + sigma * relay_noise`` per sample (SPEC 6), one pass over y."""
    y = y.contiguous()
    factor = reference.blur_response(_vector(tau_b), s, d_min).contiguous()
    return _launch_relay(empty_like(y), s, y, x0=y, factor=factor, coef=_vector(sigma_b), alpha=alpha, k=k,
                         words=(k0, k1, off0, off1), noise=_noise_mode(eps), eps=_contig(eps),
                         eps2=_contig(eps2))


@triton_op("relayops_triton::relay_step", mutates_args=())
def relay_step_op(x: torch.Tensor, x0_hat: torch.Tensor, sigma_b: torch.Tensor, sigma_next_b: torch.Tensor,
                  tau_b: torch.Tensor, tau_next_b: torch.Tensor, eta: float, s: int, d_min: float,
                  alpha: float, k: float, k0: int, k1: int, off0: int, off1: int,
                  eps: Optional[torch.Tensor], eps2: Optional[torch.Tensor],
                  x_prop: Optional[torch.Tensor], x0_hat_prop: Optional[torch.Tensor]) -> torch.Tensor:
    """One DDIM-blur (Euler) or Heun-corrected relay update (SPEC 8), one pass over the images:
    ``gamma x + idct((D' - gamma D) dct(x0)) + eta sigma' n``, gamma = sqrt(1 - eta^2) sigma'/sigma."""
    x, x0_hat = x.contiguous(), x0_hat.contiguous()
    sigma, sigma_next = _vector(sigma_b), _vector(sigma_next_b)
    gamma = (1.0 - eta * eta) ** 0.5 * sigma_next / sigma
    factor = (reference.blur_response(_vector(tau_next_b), s, d_min)
              - gamma.view(-1, 1, 1) * reference.blur_response(_vector(tau_b), s, d_min)).contiguous()
    return _launch_relay(empty_like(x), s, x, x=x, x0=x0_hat, x_prop=_contig(x_prop), x0_prop=_contig(x0_hat_prop),
                         factor=factor, gamma=gamma.contiguous(), coef=(eta * sigma_next).contiguous(),
                         sigma=sigma, sigma_next=sigma_next, alpha=alpha, k=k, words=(k0, k1, off0, off1),
                         noise=_noise_mode(eps, eta != 0.0), eps=_contig(eps), eps2=_contig(eps2))


# ----------------------------------------------------------------------------- relay ops' autograd
# The relay ops are linear in their image and noise tensors; these are their adjoints. Gradients
# w.r.t. the per-sample sigma/tau of relay_corrupt and relay_step are not implemented (an error
# says so instead of a silent zero); patch_blur has its tau gradient above.


@triton_op("relayops_triton::patch_filter", mutates_args=())
def patch_filter_op(x: torch.Tensor, factor: torch.Tensor, s: int) -> torch.Tensor:
    """``patch_idct(factor[b] * patch_dct(x))`` for a ``[B, s, s]`` float32 factor: a symmetric
    per-patch map, so also its own adjoint (used by relay_step's backward)."""
    x = x.contiguous()
    return _launch_relay(empty_like(x), s, x, x0=x, factor=factor.to(torch.float32).contiguous())


def _no_parameter_grads(ctx, indices, op):
    if any(ctx.needs_input_grad[i] for i in indices):
        raise RuntimeError(f"the 'triton' backend's {op} has no gradient w.r.t. its per-sample sigma/tau; "
                           "use backend='reference' for that")


def _noise_adjoint(grad, scale, s, alpha, k):
    """Gradients of ``scale * k (eps + alpha block_noise(eps2))`` w.r.t. eps and eps2."""
    g_eps = (k * scale) * grad.float()
    if alpha == 0.0:  # eps2 is unused (and may be None)
        return g_eps.to(grad.dtype), None
    return g_eps.to(grad.dtype), (alpha * block_noise_op(g_eps, s, True)).to(grad.dtype)


def _noise_setup(ctx, inputs, output):
    ctx.s, ctx.alpha, ctx.k = inputs[1], inputs[2], inputs[3]


def _noise_backward(ctx, grad):
    g_eps, g_eps2 = _noise_adjoint(grad, 1.0, ctx.s, ctx.alpha, ctx.k)
    return (None,) * 8 + (g_eps, g_eps2)


relay_noise_op.register_autograd(_noise_backward, setup_context=_noise_setup)


def _corrupt_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.s, ctx.d_min, ctx.alpha, ctx.k = inputs[3:7]


def _corrupt_backward(ctx, grad):
    _no_parameter_grads(ctx, (1, 2), "relay_corrupt")
    sigma_b, tau_b = ctx.saved_tensors
    g_y = patch_blur_op(grad, tau_b, ctx.s, ctx.d_min) if ctx.needs_input_grad[0] else None
    g_eps, g_eps2 = _noise_adjoint(grad, _vector(sigma_b).view(-1, 1, 1, 1), ctx.s, ctx.alpha, ctx.k)
    return (g_y,) + (None,) * 10 + (g_eps, g_eps2)


relay_corrupt_op.register_autograd(_corrupt_backward, setup_context=_corrupt_setup)


def _step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:6])
    ctx.eta, ctx.s, ctx.d_min, ctx.alpha, ctx.k = inputs[6:11]
    ctx.heun = inputs[17] is not None


def _step_backward(ctx, grad):
    _no_parameter_grads(ctx, (2, 3, 4, 5), "relay_step")
    sigma, sigma_next, tau, tau_next = (_vector(v) for v in ctx.saved_tensors)
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    gamma = (1.0 - ctx.eta * ctx.eta) ** 0.5 * sigma_next / sigma
    factor = (reference.blur_response(tau_next, ctx.s, ctx.d_min)
              - gamma.view(-1, 1, 1) * reference.blur_response(tau, ctx.s, ctx.d_min))
    g_x0 = patch_filter_op(grad, factor, ctx.s).float()  # adjoint of x0 -> idct(F dct(x0))
    g_x = col(gamma) * grad.float()
    g_xp = g_x0p = None
    if ctx.heun:
        # x0_eff = (x + x0_hat)/2 - (sigma/sigma') (x' - x0_hat')/2
        ratio = col(sigma / sigma_next)
        g_x, g_x0, g_xp, g_x0p = g_x + g_x0 / 2, g_x0 / 2, -ratio * g_x0 / 2, ratio * g_x0 / 2
    g_eps = g_eps2 = None
    if ctx.eta != 0.0:
        g_eps, g_eps2 = _noise_adjoint(grad, ctx.eta * col(sigma_next), ctx.s, ctx.alpha, ctx.k)
    cast = lambda t: None if t is None else t.to(grad.dtype)  # noqa: E731
    return ((cast(g_x), cast(g_x0)) + (None,) * 13 + (g_eps, g_eps2, cast(g_xp), cast(g_x0p)))


relay_step_op.register_autograd(_step_backward, setup_context=_step_setup)


# ----------------------------------------------------------------------------- backend table


def _words(seed: Optional[int], offset: int) -> tuple[int, int, int, int]:
    """Philox key and counter-high words: (seed lo, seed hi, offset lo, offset hi), SPEC 4."""
    seed = 0 if seed is None else seed
    return seed & MASK32, seed >> 32, offset & MASK32, offset >> 32


def patch_dct(x, s):
    check_supported(x, s)
    return patch_transform(x, s, False)


def patch_idct(u, s):
    check_supported(u, s)
    return patch_transform(u, s, True)


def patch_blur(x, tau_b, s, d_min):
    check_supported(x, s)
    return patch_blur_op(x, tau_b, s, d_min)


def block_noise(g, s):
    check_supported(g, s)
    return block_noise_op(g, s, False)


def relay_noise(like, s, alpha, k, seed, offset, eps, eps2):
    check_supported(like, s)
    return relay_noise_op(like, s, alpha, k, *_words(seed, offset), eps, eps2)


def relay_corrupt(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2):
    check_supported(y, s)
    return relay_corrupt_op(y, sigma_b, tau_b, s, d_min, alpha, k, *_words(seed, offset), eps, eps2)


def relay_step(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, seed, offset,
               eps, eps2, x_prop=None, x0_hat_prop=None):
    check_supported(x, s)
    return relay_step_op(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k,
                         *_words(seed, offset), eps, eps2, x_prop, x0_hat_prop)
