"""Input checks and conversions shared by every public op and every op backend.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and says what is
allowed. Nothing is silently cropped, broadcast or cast. The same functions serve the public
ops (also while torch.compile traces them), the ops' real implementations (a direct
``torch.ops.relayops.*`` call with bad input fails here, before any kernel sees a pointer) and
their fake implementations (with symbolic shapes a check becomes a guard). The message is
formatted only when a check fails.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
U64 = 1 << 64
# Per-sample CPU tensors up to this many values are range-checked as Python floats; tensor
# comparisons cost tens of microseconds per op call, more than a small kernel's own run.
HOST_CHECK_MAX = 256


def require(ok, error: type[Exception], message) -> None:
    """Raise ``error(message())`` unless ``ok`` (a bool, or a symbolic bool under tracing)."""
    if not ok:
        raise error(message())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 data, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_image(name: str, x, s: int | None = None) -> torch.Tensor:
    """A floating ``[B, C, H, W]`` tensor whose H and W are multiples of ``s``."""
    # Every op call runs this more than once: plain ifs and one read of the shape (no require
    # calls, no lambdas) keep it cheap.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}")
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(shape)}")
    if s is not None:
        h, w = shape[2], shape[3]
        if not (h % s == 0 and w % s == 0):
            raise ValueError(_not_multiple(name, h, w, s))
    return x


def _not_multiple(name, h, w, s) -> str:
    return f"{name} has H x W = {h} x {w}; both must be multiples of the patch size s = {s}"


def check_patch_size(s) -> int:
    if type(s) is not int and (isinstance(s, bool) or not isinstance(s, numbers.Integral)):
        raise TypeError(f"s (patch size) must be an int >= 1, got {s!r}")
    if s < 1:
        raise ValueError(f"s (patch size) must be an int >= 1, got {s}")
    return int(s)


def check_same(name: str, t, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` must match ``ref`` in shape, dtype and device."""
    check_image(name, t)
    if not t.shape == ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match {ref_name}'s {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}; it must be on {ref_name}'s device {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must match {ref_name}'s {ref.dtype}")
    return t


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A Python real number in a range."""
    # type() first: the abstract-class check costs more than the rest of the function
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_seed(name: str, value) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {value!r}")
    if not 0 <= int(value) < U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value}")
    return int(value)


def signed64(v: int) -> int:
    """A value in [0, 2^64) as the int64 with the same bits (what an op schema's int carries)."""
    return v - U64 if v >= 1 << 63 else v


def _check_vector(name: str, t: torch.Tensor, ref: torch.Tensor, dtype_ok: bool, kind: str, shape_text: str):
    """``t`` is a ``[B]`` tensor on the device of ``ref`` (the ``[B, C, H, W]`` image)."""
    if not dtype_ok:
        raise TypeError(f"{name} must be {kind}, got dtype {t.dtype}")
    shape = t.shape
    if not (len(shape) == 1 and shape[0] == ref.shape[0]):
        raise ValueError(f"{name} must be {shape_text} [B] = [{ref.shape[0]}], got shape {tuple(shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}; it must be on the image's device {ref.device}")
    return t


def check_per_sample_tensor(name: str, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A per-sample parameter: a floating ``[B]`` tensor on the image ``ref``'s device."""
    return _check_vector(name, t, ref, t.dtype in FLOAT_DTYPES, "a float or a floating [B] tensor",
                         "a float or a tensor of shape")


def check_seeds_tensor(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample seeds: an int64 ``[B]`` tensor on the image ``ref``'s device (two's complement)."""
    return _check_vector("seed", t, ref, t.dtype == torch.int64,
                         "an int, a list of B ints or an int64 [B] tensor (values in [0, 2**64) as two's complement)",
                         "a tensor of shape")


def per_sample(name: str, value, ref: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """A per-sample parameter as a ``[B]`` tensor on ``ref``'s device, in ``acc_dtype(ref.dtype)``.

    ``value`` is a Python real or a ``[B]`` floating tensor (a 0-d tensor is taken as a scalar).
    Values must be >= 0 (> 0 with ``positive``): checked on the host for Python numbers and CPU
    tensors; for device tensors the check is asynchronous (no host round trip), and it is
    skipped while torch.compile traces. Gradients flow through the conversion.
    """
    dtype = acc_dtype(ref.dtype)
    if not isinstance(value, torch.Tensor):  # the common case first: a Python number
        v = check_real(name, value, low=0.0, low_open=positive)
        return torch.full((ref.shape[0],), v, dtype=dtype, device=ref.device)
    if value.dim() == 0 and value.dtype in FLOAT_DTYPES:
        value = value.reshape(1).expand(ref.shape[0])
    check_per_sample_tensor(name, value, ref)
    if not torch.compiler.is_compiling():
        bound = "> 0" if positive else ">= 0"
        if value.device.type == "cpu" and value.numel() <= HOST_CHECK_MAX:
            # a batch's few values as Python floats: far cheaper than tensor ops on every call
            ok = all(v > 0 if positive else v >= 0 for v in value.tolist())  # NaN fails both
        else:
            ok = ((value > 0) if positive else (value >= 0)).all()  # NaN fails both
        if value.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"{name} must be {bound} everywhere, got {value.tolist()}")
        else:
            torch._assert_async(ok, f"{name} must be {bound} everywhere")
    return value.to(dtype).contiguous()  # as the kernels take it: no conversion after this


def seed_args(seed, ref: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The ops' ``(seed, seeds)`` arguments from a public ``seed`` (docs/spec.md section 4).

    ``seed``: an int in [0, 2^64) (one Philox stream for the batch), or per-sample seeds: a list
    or tuple of B such ints, or an int64 ``[B]`` tensor on ``ref``'s device. Returns
    ``(signed seed, None)`` for an int and ``(0, int64 [B] tensor)`` for per-sample seeds.
    """
    if isinstance(seed, torch.Tensor):
        return 0, check_seeds_tensor(seed, ref).contiguous()
    if isinstance(seed, (list, tuple)):
        b = ref.shape[0]
        if len(seed) != b:
            raise ValueError(f"seed is a list of {len(seed)} seeds; per-sample seeds need one per sample (B = {b})")
        values = [signed64(check_seed("every per-sample seed", v)) for v in seed]
        return 0, torch.tensor(values, dtype=torch.int64).to(ref.device, non_blocking=True)
    return signed64(check_seed("seed", seed)), None
