"""The compiled backends "cpu" (``relayops._C``) and "cuda" (``relayops._C_cuda``), issue 3.

Each op is a ``torch.library.custom_op`` in the ``relayops`` namespace (``relayops::patch_blur``
etc.) with a CPU/CUDA implementation that calls the pybind11 modules built from ``csrc/``,
a ``register_fake`` (for torch.compile) and, where the op is differentiable, a
``register_autograd``. The backend tables at the bottom have exactly the signatures of
``relayops.reference`` and are registered with ``ops._backend``.

The modules take no torch types: this file passes ``data_ptr()``, element strides, shapes and,
for CUDA, the current stream handle. Strides are passed as they are, so contiguous NCHW,
channels_last and other strided inputs are read in place (no copy); outputs come from
``relayops._alloc.empty_like`` and keep the input's memory format. Patch sizes above
``relayops._C.max_s`` (16) fall back to the reference implementation.

Importing this module raises ImportError when ``relayops._C`` is not built
(``python setup.py build_ext --inplace``); the CUDA backend is registered only when
``relayops._C_cuda`` was built too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._alloc import empty_like
from ..reference.dct import scale_coefficients
from ._backend import register_backend

try:
    from .. import _C
except ImportError as exc:  # ops/_backend.py treats this as "cpu backend not built"
    raise ImportError("relayops._C is not built; run `python setup.py build_ext --inplace`") from exc

try:
    from .. import _C_cuda
except ImportError:
    _C_cuda = None

# Codes shared with csrc/include/relayops/common.h (DType) and patch.h (Mode).
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DCT, _IDCT, _BLUR, _NOISE, _CORRUPT, _STEP = range(6)
_U64 = (1 << 64) - 1

# Tests set this to run the CPU kernels with the CUDA kernels' per-patch window noise.
CPU_PATCHWISE = False


def _signed64(v: int) -> int:
    """A seed/offset in [0, 2^64) as the int64 a custom-op schema carries."""
    return v - (1 << 64) if v >= (1 << 63) else v


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _vec(v: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A per-sample ``[B]`` tensor in the kernels' accumulation dtype, contiguous."""
    return None if v is None else v.to(_acc_dtype(x)).contiguous()


def _view(t: Optional[Tensor]):
    return (0, 0, 0, 0, 0) if t is None else (t.data_ptr(), *t.stride())


def _launch(mode: int, out: Tensor, s: int, *, x=None, x0=None, xp=None, x0p=None, eps=None, eps2=None,
            per_sample=(None, None, None, None), scalars=(0.0, 0.0, 0.0, 0.0), seed: int = 0, offset: int = 0,
            flags=(0, 0, 0, 0)) -> Tensor:
    """Run one kernel writing ``out``. flags: (draw, has_eps, has_block, shift), see patch.h Params."""
    if out.numel() == 0:
        return out
    views = [_view(t) for t in (x, x0, xp, x0p, eps, eps2, out)]
    ptrs = [0 if t is None else t.data_ptr() for t in per_sample]
    args = (mode, _DTYPES[out.dtype], s, tuple(out.shape), views, ptrs, tuple(float(v) for v in scalars),
            seed & _U64, offset & _U64, tuple(int(f) for f in flags))
    if out.device.type == "cuda":
        if _C_cuda is None:
            raise RuntimeError("relayops._C_cuda is not built; rebuild with nvcc available (RELAYOPS_CUDA=1)")
        with torch.cuda.device(out.device):
            _C_cuda.run(*args, torch.cuda.current_stream(out.device).cuda_stream)
    else:
        _C.run(*args, CPU_PATCHWISE)
    return out


def _noise_flags(eps: Optional[Tensor], eps2: Optional[Tensor], alpha: float, shift: int = 0):
    """(draw, has_eps, has_block, shift): draw in the kernel unless eps was given."""
    draw = eps is None
    return (int(draw), 1, int(alpha != 0.0 and (draw or eps2 is not None)), shift)



def _patch_apply(g: Tensor, factor: Tensor, s: int) -> Tensor:
    """``patch_idct(factor * patch_dct(g))`` with a ``[B, s, s]`` factor: the per-patch symmetric
    linear map of patch_blur / relay_step, so also its own adjoint (used in backward)."""
    u = patch_dct_op(g, s)
    u = scale_coefficients(u.to(factor.dtype), factor, s).to(g.dtype)
    return patch_idct_op(u, s)


_DEVICES = ("cpu", "cuda") if _C_cuda is not None else ("cpu",)


# ----------------------------------------------------------------------------------------------
# patch_dct / patch_idct (SPEC 1): orthonormal, so each one's adjoint is the other.
@torch.library.custom_op("relayops::patch_dct", mutates_args=(), device_types=_DEVICES)
def patch_dct_op(x: Tensor, s: int) -> Tensor:
    return _launch(_DCT, empty_like(x), s, x=x)


@torch.library.custom_op("relayops::patch_idct", mutates_args=(), device_types=_DEVICES)
def patch_idct_op(u: Tensor, s: int) -> Tensor:
    return _launch(_IDCT, empty_like(u), s, x=u)


@patch_dct_op.register_fake
def _(x, s):
    return torch.empty_like(x)


@patch_idct_op.register_fake
def _(u, s):
    return torch.empty_like(u)


def _save_s(ctx, inputs, output):
    ctx.s = inputs[1]


patch_dct_op.register_autograd(lambda ctx, g: (patch_idct_op(g, ctx.s), None), setup_context=_save_s)
patch_idct_op.register_autograd(lambda ctx, g: (patch_dct_op(g, ctx.s), None), setup_context=_save_s)


# ----------------------------------------------------------------------------------------------
# patch_blur (SPEC 2): symmetric per patch, so the gradient is patch_blur(grad, tau).
# Not differentiable in tau (its gradient is None).
@torch.library.custom_op("relayops::patch_blur", mutates_args=(), device_types=_DEVICES)
def patch_blur_op(x: Tensor, tau_b: Tensor, s: int, d_min: float) -> Tensor:
    return _launch(_BLUR, empty_like(x), s, x=x, per_sample=(None, None, _vec(tau_b, x), None),
                   scalars=(0.0, d_min, 0.0, 0.0))


@patch_blur_op.register_fake
def _(x, tau_b, s, d_min):
    return torch.empty_like(x)


def _blur_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.s, ctx.d_min = inputs[2], inputs[3]


def _blur_backward(ctx, g):
    (tau_b,) = ctx.saved_tensors
    return patch_blur_op(g, tau_b, ctx.s, ctx.d_min), None, None, None


patch_blur_op.register_autograd(_blur_backward, setup_context=_blur_setup)


# ----------------------------------------------------------------------------------------------
# Wraparound box sum scaled by 1/s (SPEC 3): block_noise when adjoint is False; with adjoint the
# sum runs over (x + i, y + j), which is block_noise's adjoint (and vice versa).
@torch.library.custom_op("relayops::box_sum", mutates_args=(), device_types=_DEVICES)
def box_sum_op(g: Tensor, s: int, adjoint: bool) -> Tensor:
    return _launch(_NOISE, empty_like(g), s, eps2=g, scalars=(0.0, 0.0, 1.0, 1.0),
                   flags=(0, 0, 1, s - 1 if adjoint else 0))


@box_sum_op.register_fake
def _(g, s, adjoint):
    return torch.empty_like(g)


def _box_setup(ctx, inputs, output):
    ctx.s, ctx.adjoint = inputs[1], inputs[2]


box_sum_op.register_autograd(lambda ctx, g: (box_sum_op(g, ctx.s, not ctx.adjoint), None, None),
                             setup_context=_box_setup)


# ----------------------------------------------------------------------------------------------
# relay_noise (SPEC 3, 4): k (eps + alpha block_noise(eps2)); linear in given eps, eps2.
@torch.library.custom_op("relayops::relay_noise", mutates_args=(), device_types=_DEVICES)
def relay_noise_op(like: Tensor, s: int, alpha: float, k: float, seed: int, offset: int,
                   eps: Optional[Tensor], eps2: Optional[Tensor]) -> Tensor:
    return _launch(_NOISE, empty_like(like), s, eps=eps, eps2=eps2, scalars=(0.0, 0.0, alpha, k),
                   seed=seed, offset=offset, flags=_noise_flags(eps, eps2, alpha))


@relay_noise_op.register_fake
def _(like, s, alpha, k, seed, offset, eps, eps2):
    return torch.empty_like(like)


def _noise_setup(ctx, inputs, output):
    ctx.s, ctx.alpha, ctx.k = inputs[1], inputs[2], inputs[3]


def _noise_grads(g: Tensor, scale, s: int, alpha: float, k: float):
    """Gradients of ``scale * k (eps + alpha block_noise(eps2))`` w.r.t. eps and eps2."""
    g_eps = (k * scale) * g
    return g_eps, alpha * box_sum_op(g_eps, s, True)


def _noise_backward(ctx, g):
    g_eps = g_eps2 = None
    if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
        g_eps, g_eps2 = _noise_grads(g, 1.0, ctx.s, ctx.alpha, ctx.k)
    return None, None, None, None, None, None, g_eps, g_eps2


relay_noise_op.register_autograd(_noise_backward, setup_context=_noise_setup)


# ----------------------------------------------------------------------------------------------
# relay_corrupt (SPEC 6): patch_blur(y, tau) + sigma * relay_noise in one pass; linear in y, eps, eps2.
@torch.library.custom_op("relayops::relay_corrupt", mutates_args=(), device_types=_DEVICES)
def relay_corrupt_op(y: Tensor, sigma_b: Tensor, tau_b: Tensor, s: int, d_min: float, alpha: float, k: float,
                     seed: int, offset: int, eps: Optional[Tensor], eps2: Optional[Tensor]) -> Tensor:
    return _launch(_CORRUPT, empty_like(y), s, x=y, eps=eps, eps2=eps2,
                   per_sample=(_vec(sigma_b, y), None, _vec(tau_b, y), None), scalars=(0.0, d_min, alpha, k),
                   seed=seed, offset=offset, flags=_noise_flags(eps, eps2, alpha))


@relay_corrupt_op.register_fake
def _(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2):
    return torch.empty_like(y)


def _corrupt_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.s, ctx.d_min, ctx.alpha, ctx.k = inputs[3], inputs[4], inputs[5], inputs[6]


def _corrupt_backward(ctx, g):
    sigma_b, tau_b = ctx.saved_tensors
    g_y = patch_blur_op(g, tau_b, ctx.s, ctx.d_min)
    g_eps = g_eps2 = None
    if ctx.needs_input_grad[9] or ctx.needs_input_grad[10]:
        scale = sigma_b.to(_acc_dtype(g)).view(-1, 1, 1, 1)
        g_eps, g_eps2 = _noise_grads(g, scale, ctx.s, ctx.alpha, ctx.k)
        g_eps, g_eps2 = g_eps.to(g.dtype), g_eps2.to(g.dtype)
    return g_y, None, None, None, None, None, None, None, None, g_eps, g_eps2


relay_corrupt_op.register_autograd(_corrupt_backward, setup_context=_corrupt_setup)


# ----------------------------------------------------------------------------------------------
# relay_step (SPEC 8): gamma x + patch_idct((D' - gamma D) patch_dct(x0)) + eta sigma' n, with the
# Heun x0_eff = (x + x0_hat)/2 - (sigma/sigma')(x' - x0_hat')/2 when x_prop is given.
@torch.library.custom_op("relayops::relay_step", mutates_args=(), device_types=_DEVICES)
def relay_step_op(x: Tensor, x0_hat: Tensor, sigma_b: Tensor, sigma_next_b: Tensor, tau_b: Tensor,
                  tau_next_b: Tensor, eta: float, s: int, d_min: float, alpha: float, k: float, seed: int,
                  offset: int, eps: Optional[Tensor], eps2: Optional[Tensor], x_prop: Optional[Tensor],
                  x0_hat_prop: Optional[Tensor]) -> Tensor:
    return _launch(_STEP, empty_like(x), s, x=x, x0=x0_hat, xp=x_prop, x0p=x0_hat_prop, eps=eps, eps2=eps2,
                   per_sample=tuple(_vec(v, x) for v in (sigma_b, sigma_next_b, tau_b, tau_next_b)),
                   scalars=(eta, d_min, alpha, k), seed=seed, offset=offset, flags=_noise_flags(eps, eps2, alpha))


@relay_step_op.register_fake
def _(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, seed, offset, eps, eps2,
      x_prop, x0_hat_prop):
    return torch.empty_like(x)


def _step_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[2:6])
    ctx.eta, ctx.s, ctx.d_min, ctx.alpha, ctx.k = inputs[6], inputs[7], inputs[8], inputs[9], inputs[10]
    ctx.heun = inputs[15] is not None


def _step_backward(ctx, g):
    sigma, sigma_next, tau, tau_next = (v.to(_acc_dtype(g)) for v in ctx.saved_tensors)
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    gamma = (1.0 - ctx.eta * ctx.eta) ** 0.5 * sigma_next / sigma
    factor = (reference.blur_response(tau_next, ctx.s, ctx.d_min)
              - gamma.view(-1, 1, 1) * reference.blur_response(tau, ctx.s, ctx.d_min))
    m = _patch_apply(g, factor, ctx.s)  # adjoint of the x0 -> output map
    g_x = col(gamma) * g
    g_x0 = g_xp = g_x0p = None
    if ctx.heun:
        half = 0.5 * m
        ratio = col(sigma / sigma_next)
        g_x, g_x0, g_xp, g_x0p = g_x + half, half, -ratio * half, ratio * half
    else:
        g_x0 = m
    g_eps = g_eps2 = None
    if ctx.eta != 0.0 and (ctx.needs_input_grad[13] or ctx.needs_input_grad[14]):
        g_eps, g_eps2 = _noise_grads(g, ctx.eta * col(sigma_next), ctx.s, ctx.alpha, ctx.k)
    cast = lambda t: None if t is None else t.to(g.dtype)  # noqa: E731
    return (cast(g_x), cast(g_x0), None, None, None, None, None, None, None, None, None, None, None,
            cast(g_eps), cast(g_eps2), cast(g_xp), cast(g_x0p))


relay_step_op.register_autograd(_step_backward, setup_context=_step_setup)


# ----------------------------------------------------------------------------------------------
# Backend tables: the signatures of relayops.reference (validated arguments, [B] parameters).
def _compiled(s: int) -> bool:
    return s <= _C.max_s


def _seed(seed: Optional[int]) -> int:
    return _signed64(0 if seed is None else seed)


def patch_dct(x, s):
    return patch_dct_op(x, s) if _compiled(s) else reference.patch_dct(x, s)


def patch_idct(u, s):
    return patch_idct_op(u, s) if _compiled(s) else reference.patch_idct(u, s)


def patch_blur(x, tau_b, s, d_min):
    return patch_blur_op(x, tau_b, s, d_min) if _compiled(s) else reference.patch_blur(x, tau_b, s, d_min)


def block_noise(g, s):
    return box_sum_op(g, s, False) if _compiled(s) else reference.block_noise(g, s)


def relay_noise(like, s, alpha, k, seed, offset, eps, eps2):
    if not _compiled(s):
        return reference.relay_noise(like, s, alpha, k, seed, offset, eps, eps2)
    return relay_noise_op(like, s, alpha, k, _seed(seed), _signed64(offset), eps, eps2)


def relay_corrupt(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2):
    if not _compiled(s):
        return reference.relay_corrupt(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2)
    return relay_corrupt_op(y, sigma_b, tau_b, s, d_min, alpha, k, _seed(seed), _signed64(offset), eps, eps2)


def relay_step(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, seed, offset,
               eps, eps2, x_prop=None, x0_hat_prop=None):
    if not _compiled(s):
        return reference.relay_step(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k,
                                    seed, offset, eps, eps2, x_prop, x0_hat_prop)
    return relay_step_op(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, _seed(seed),
                         _signed64(offset), eps, eps2, x_prop, x0_hat_prop)


TABLE = {
    "patch_dct": patch_dct, "patch_idct": patch_idct, "patch_blur": patch_blur, "block_noise": block_noise,
    "relay_noise": relay_noise, "relay_corrupt": relay_corrupt, "relay_step": relay_step,
}

register_backend("cpu", TABLE)
if _C_cuda is not None:
    register_backend("cuda", TABLE)
