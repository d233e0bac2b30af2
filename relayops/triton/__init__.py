"""The Triton backend (docs/design.md): fused Triton kernels for every patch op.

Importing this package is cheap: it checks that ``triton`` is installed (``ImportError``
otherwise, which ``relayops.ops._backend`` takes as "not available") and registers the ops of
``relayops/ops/_library.py`` in the ``relayops_triton`` namespace. The kernels
(``relayops.triton.ops`` and ``.kernels``) load on the first call. Set ``TRITON_INTERPRET=1``
before anything imports them to execute the kernels on CPU tensors with Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
import os

from .._optional import missing_extra

if importlib.util.find_spec("triton") is None:  # find_spec: the check does not import triton
    raise missing_extra("triton", "the Triton backend")

import torch  # noqa: E402

from ..ops import _library  # noqa: E402
from ..ops._backend import register_backend  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float32 math inside; no float64
MAX_PATCH = 16  # the [tile, s, s, s] products in registers stop making sense beyond this


def _forward(name: str):
    """The forward function of op ``name``, importing the kernels on first use."""
    def forward(*args):
        from . import ops
        return getattr(ops, name)(*args)
    return forward


_DEVICES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
OPS = _library.define_ops("relayops_triton", {name: _forward(name) for name in _library.OPS}, backend="triton",
                          device_types=_DEVICES, max_s=MAX_PATCH, dtypes=DTYPES)
register_backend("triton", {name: getattr(OPS, name) for name in _library.OPS}, dtypes=DTYPES)
