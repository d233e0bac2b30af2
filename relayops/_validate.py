"""Input checks shared by every public op.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and says what is
allowed. Nothing is silently cropped, broadcast or cast.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_image(name: str, x, s: int | None = None) -> torch.Tensor:
    """A floating ``[B, C, H, W]`` tensor whose H and W are multiples of ``s``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if s is not None:
        h, w = x.shape[-2:]
        if h % s or w % s:
            raise ValueError(
                f"{name} has H x W = {h} x {w}; both must be multiples of the patch size s = {s}"
            )
    return x


def check_patch_size(s) -> int:
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
        raise TypeError(f"s (patch size) must be an int >= 1, got {s!r}")
    if s < 1:
        raise ValueError(f"s (patch size) must be an int >= 1, got {s}")
    return int(s)


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` must match ``ref`` in shape, dtype and device."""
    check_image(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match {ref_name}'s {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}; it must be on {ref_name}'s device {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must match {ref_name}'s {ref.dtype}")
    return t


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A Python real number in a range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value}")
    return int(value)


def per_sample(name: str, value, ref: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """A per-sample parameter as a ``[B]`` tensor on ``ref``'s device.

    ``value`` is a Python real or a ``[B]`` floating tensor (a 0-d tensor is taken as a scalar).
    The result is float64 for float64 images and float32 otherwise, so the math runs in at least
    float32 whatever the image dtype. Values must be >= 0 (> 0 with ``positive``): checked on
    the host for Python numbers and CPU tensors; for device tensors the check is asynchronous
    (no host round trip), and it is skipped while torch.compile traces.
    """
    b = ref.shape[0]
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float or a floating [B] tensor, got dtype {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(b)
        if value.dim() != 1 or value.shape[0] != b:
            raise ValueError(
                f"{name} must be a float or a tensor of shape [B] = [{b}], got shape {tuple(value.shape)}"
            )
        if value.device != ref.device:
            raise ValueError(f"{name} is on {value.device}; it must be on the image's device {ref.device}")
        if not _is_compiling():
            bad = (value <= 0) if positive else (value < 0)
            bad = bad | torch.isnan(value)
            if value.device.type == "cpu":
                if bool(bad.any()):
                    raise ValueError(f"{name} must be {bound} everywhere, got {value.tolist()}")
            else:
                torch._assert_async(~bad.any(), f"{name} must be {bound} everywhere")
        return value.to(dtype)
    v = check_real(name, value, low=0.0, low_open=positive)
    return torch.full((b,), v, dtype=dtype, device=ref.device)
