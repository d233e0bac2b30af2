"""Output allocation for kernels.

``empty_like`` is ``torch.empty_like``, except that under test (``RELAYOPS_NAN_FILL=1``, set by
tests/conftest.py before relayops is imported) fresh outputs are filled with NaN, so a kernel
that skips an element fails. The variable is read once, at import: reading the environment costs
about a microsecond, a noticeable part of a small op call.
"""
from __future__ import annotations

import os

import torch

NAN_FILL = os.environ.get("RELAYOPS_NAN_FILL") == "1"


def nan_fill_enabled() -> bool:
    return NAN_FILL


def empty_like(x: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(x, **kwargs)
    if nan_fill_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty(shape, **kwargs) -> torch.Tensor:
    out = torch.empty(shape, **kwargs)
    if nan_fill_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
