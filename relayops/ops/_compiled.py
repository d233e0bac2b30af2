"""The compiled backends "cpu" (``relayops._C``) and "cuda" (``relayops._C_cuda``): forward kernels.

The ops themselves (schema, checks, fake, autograd) are defined once in ``ops/_library.py``; this
module registers them in the ``relayops`` namespace (``torch.ops.relayops.patch_blur`` etc.) with
forward functions that call the pybind11 modules built from ``csrc/``.

The modules take no torch types: this file passes ``data_ptr()``, element strides, shapes and,
for CUDA, the current stream handle; op and dtype codes come from ``relayops._C``'s enums.
Strides are passed as they are, so contiguous NCHW, channels_last and other strided inputs are
read in place (no copy); outputs come from ``relayops._alloc.empty_like`` and keep the input's
memory format. Patch sizes above ``relayops._C.max_s`` (16) run the reference instead.

Importing this module raises ImportError when ``relayops._C`` is not built
(``python setup.py build_ext --inplace``); the CUDA backend is registered only when
``relayops._C_cuda`` was built too.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .._alloc import empty_like
from . import _library
from ._backend import register_backend

try:
    from .. import _C
except ImportError as exc:  # ops/_backend.py treats this as "cpu backend not built"
    raise ImportError("relayops._C is not built; run `python setup.py build_ext --inplace`") from exc

try:
    from .. import _C_cuda
except ImportError:
    _C_cuda = None

Mode, DType = _C.Mode, _C.DType
DTYPE_CODES = {torch.float32: DType.float32, torch.float64: DType.float64, torch.float16: DType.float16,
               torch.bfloat16: DType.bfloat16}
_DTYPE_INTS = {dtype: int(code) for dtype, code in DTYPE_CODES.items()}  # int() of an enum costs per call
_U64 = (1 << 64) - 1

# Instruction sets of the CPU kernels, in increasing order: "portable" (the compiler's vector
# extensions at the build's baseline: SSE2 on x86-64, NEON on aarch64), "avx2" (AVX2 + FMA),
# "avx512" (AVX-512F). The kernels use the best one the CPU has, capped by set_cpu_isa or the
# environment variable RELAYOPS_CPU_ISA (read when this module is imported).
CPU_ISAS = tuple(_C.Isa.__members__)


def best_cpu_isa() -> str:
    """The best instruction set this CPU runs, whatever the cap."""
    return _C.Isa(_C.best_isa()).name


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: the best one the CPU has, capped."""
    return _C.Isa(_C.cpu_isa()).name


def set_cpu_isa(cap: str) -> str:
    """Cap the instruction set of every later CPU kernel call at ``cap`` (one of CPU_ISAS;
    "avx512" removes the cap). A cap never raises the instruction set above what the CPU has.
    Returns the instruction set now in use (cpu_isa())."""
    if not isinstance(cap, str):
        raise TypeError(f"cap must be a str, one of {CPU_ISAS}; got {type(cap).__name__}")
    if cap not in CPU_ISAS:
        raise ValueError(f"cap must be one of {CPU_ISAS}; got {cap!r}")
    _C.set_isa_cap(int(_C.Isa.__members__[cap]))
    return cpu_isa()


if os.environ.get("RELAYOPS_CPU_ISA"):
    if os.environ["RELAYOPS_CPU_ISA"] not in CPU_ISAS:
        raise ValueError(f"RELAYOPS_CPU_ISA must be one of {CPU_ISAS}; got {os.environ['RELAYOPS_CPU_ISA']!r}")
    set_cpu_isa(os.environ["RELAYOPS_CPU_ISA"])

# Tests set this to run CPU tensors through an emulation of the CUDA kernels' thread blocks
# (csrc/include/relayops/tile.h): the CUDA tile, halo and wraparound indexing, checked on a CPU.
CPU_EMULATE_CUDA_TILES = False

# Tests set this to run CPU tensors through an emulation of relayops._C_cuda's whole launch: its
# choice between the specialised kernels (csrc/include/relayops/patch_kernels.h) and the tile
# kernel, and every thread of the chosen grid ("record": also every global access).
# LAST_EMULATION then holds (path, accesses) of the last call: path 0 tiles, 1 patch kernels,
# 2 block-noise kernel; accesses (warp, step, k, lane, address, bytes, store) when recorded.
CPU_EMULATE_CUDA: bool | str = False
LAST_EMULATION = None


def _launch(mode, like: Tensor, s: int, *, x=None, x0=None, xp=None, x0p=None, x0b=None, eps=None, eps2=None,
            sigma=None, sigma_next=None, tau=None, tau_next=None, correction=None, seeds=None, eta=0.0, d_min=0.0,
            alpha=0.0, k=1.0, seed=0, offset=0, noise=True, shift=0) -> Tensor:
    """Run kernel ``mode`` writing a new tensor like ``like``. noise: the op's noise term is present
    (drawn in the kernel unless eps is given); shift: s - 1 for the adjoint box sum (patch.h Params)."""
    out = empty_like(like)
    if out.numel() == 0:
        return out
    # [B] (correction: [B, s, s]), contiguous, in the accumulation dtype (_library)
    params = (sigma, sigma_next, tau, tau_next, correction)
    images = (x, x0, xp, x0p, x0b, eps, eps2, out)
    draw = noise and eps is None
    flags = (int(draw), int(noise), int(alpha != 0.0 and (draw or eps2 is not None)), shift)
    args = (int(mode), _DTYPE_INTS[out.dtype], s, tuple(out.shape),
            # (data pointer, element strides) of each image-shaped tensor; zeros for an absent one
            [(0, 0, 0, 0, 0) if t is None else (t.data_ptr(), *t.stride()) for t in images],
            [0 if v is None else v.data_ptr() for v in params],
            0 if seeds is None else seeds.data_ptr(), (float(eta), float(d_min), float(alpha), float(k)),
            seed & _U64, offset & _U64, flags)
    if out.is_cuda:
        if _C_cuda is None:
            raise RuntimeError("relayops._C_cuda is not built; rebuild with nvcc available (RELAYOPS_CUDA=1)")
        with torch.cuda.device(out.device):
            _C_cuda.run(*args, torch.cuda.current_stream(out.device).cuda_stream)
    elif CPU_EMULATE_CUDA:
        global LAST_EMULATION
        LAST_EMULATION = _C.emulate_cuda(*args, CPU_EMULATE_CUDA == "record")
    else:
        _C.run(*args, CPU_EMULATE_CUDA_TILES)
    return out


def patch_dct(x, s):
    return _launch(Mode.patch_dct, x, s, x=x)


def patch_idct(u, s):
    return _launch(Mode.patch_idct, u, s, x=u)


def patch_blur(x, tau, s, d_min):
    return _launch(Mode.patch_blur, x, s, x=x, tau=tau, d_min=d_min)


def block_noise(g, s, adjoint):
    # relay noise with only the alpha * box-sum term, read from g: k = alpha = 1, no eps term
    return _launch(Mode.relay_noise, g, s, eps2=g, alpha=1.0, k=1.0, noise=False, shift=s - 1 if adjoint else 0)


def relay_noise(like, s, alpha, k, seed, offset, seeds, eps, eps2):
    return _launch(Mode.relay_noise, like, s, eps=eps, eps2=eps2, seeds=seeds, alpha=alpha,
                   k=k, seed=seed, offset=offset)


def relay_corrupt(y, sigma, tau, s, d_min, alpha, k, seed, offset, seeds, eps, eps2):
    return _launch(Mode.relay_corrupt, y, s, x=y, eps=eps, eps2=eps2, sigma=sigma, tau=tau,
                   seeds=seeds, d_min=d_min, alpha=alpha, k=k, seed=seed, offset=offset)


def relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta, s, d_min, alpha, k, seed, offset, seeds, eps, eps2,
               x_prop, x0_hat_prop, x0_hat_b, correction):
    return _launch(Mode.relay_step, x, s, x=x, x0=x0_hat, xp=x_prop, x0p=x0_hat_prop, x0b=x0_hat_b, eps=eps,
                   eps2=eps2, sigma=sigma, sigma_next=sigma_next, tau=tau, tau_next=tau_next, correction=correction,
                   seeds=seeds,
                   eta=eta, d_min=d_min, alpha=alpha, k=k, seed=seed, offset=offset)


def normals_from_words(words: Tensor, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """``(eps, eps2)``, ``[2 n]`` each, from the Philox words ``[4, n]`` of n pairs (int32 tensor
    holding the uint32 bits, on CPU or CUDA) through the kernels' own Box-Muller code (SPEC 4):
    ``eps[2i], eps[2i + 1]`` (cosine, sine) from words (0, 1) of pair i, ``eps2[2i], eps2[2i + 1]``
    from (2, 3). For tests that force the extreme uniforms."""
    if words.dim() != 2 or words.shape[0] != 4:
        raise ValueError(f"normals_from_words takes Philox words of shape [4, n], got {tuple(words.shape)}")
    words = words.contiguous()
    n = words.shape[1]
    eps, eps2 = (torch.empty(2 * n, dtype=dtype, device=words.device) for _ in range(2))
    args = (words.data_ptr(), n, int(DTYPE_CODES[dtype]), eps.data_ptr(), eps2.data_ptr())
    if words.device.type == "cuda":
        with torch.cuda.device(words.device):
            _C_cuda.normals_from_words(*args, torch.cuda.current_stream(words.device).cuda_stream)
    else:
        _C.normals_from_words(*args)
    return eps, eps2


_missing_image: dict[int, Optional[str]] = {}


def cuda_device_problem(device: torch.device) -> Optional[str]:
    """Why the CUDA backend cannot run on ``device`` (None when it can): this build of
    ``relayops._C_cuda`` has neither machine code for the GPU's architecture nor PTX its driver
    can compile. Checked once per device, on first use (not at import: no CUDA context is made
    before a CUDA tensor needs one)."""
    if not torch.cuda.is_available():
        return None  # no GPU to ask; no CUDA tensor can reach the kernels either
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _missing_image:
        problem = None
        if not _C_cuda.has_kernel_image(index):
            major, minor = torch.cuda.get_device_capability(index)
            built = getattr(_C_cuda, "archs", "?").replace(",", ", sm_")
            problem = (f"relayops._C_cuda has no kernel image for {torch.cuda.get_device_name(index)} "
                       f"(sm_{major}{minor}); it was built for sm_{built} (PTX of the last). "
                       f"Rebuild with RELAYOPS_CUDA_ARCHS={major}{minor} "
                       "python setup.py build_ext --inplace, or use backend='triton'")
        _missing_image[index] = problem
    return _missing_image[index]


KERNELS = {name: globals()[name] for name in _library.OPS}
_DEVICES = ("cpu", "cuda") if _C_cuda is not None else ("cpu",)
OPS = _library.define_ops("relayops", KERNELS, backend="cpu/cuda", device_types=_DEVICES, max_s=_C.max_s)

register_backend("cpu", {name: getattr(OPS, name) for name in _library.OPS})
if _C_cuda is not None:
    register_backend("cuda", {name: getattr(OPS, name) for name in _library.OPS}, device_check=cuda_device_problem)
