"""Backend registry and choice (DESIGN.md, layer 4).

A backend is a name plus a table of kernel-level functions with the signatures of
``relayops.reference`` (validated arguments, per-sample parameters as ``[B]`` tensors).
Choice, first match wins: the ``backend=`` keyword of a call, then the ``RELAYOPS_BACKEND``
environment variable, then automatic: CUDA tensors use the compiled CUDA backend if built,
else Triton; CPU tensors use the compiled CPU backend if built, else the reference.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .. import reference

BACKENDS = ("reference", "cpu", "cuda", "triton")
OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise", "relay_corrupt", "relay_step")

_tables: dict[str, dict[str, Callable]] = {
    "reference": {name: getattr(reference, name) for name in OPS},
}


def register_backend(name: str, table: dict[str, Callable]) -> None:
    """Make a backend available; ``table`` maps op names to kernel-level functions."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    missing = set(OPS) - set(table)
    if missing:
        raise ValueError(f"backend {name!r} lacks ops {sorted(missing)}")
    _tables[name] = dict(table)


def _load_optional_backends() -> None:
    """Import the compiled and Triton backends if they are installed; each registers itself."""
    for module in ("relayops.ops._compiled", "relayops.triton"):
        try:
            __import__(module)
        except ImportError:
            pass


def available_backends() -> tuple[str, ...]:
    """Backends usable in this process (the device decides which of them fits a tensor)."""
    return tuple(b for b in BACKENDS if b in _tables)


def _device_ok(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    # Triton runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(backend: str | None, device, dtype=None) -> str:
    """The backend a call on ``device`` uses; raises ``ValueError`` for an unusable request.

    The automatic choice skips Triton for float64 (its kernels compute in float32).
    """
    device_type = device.type if hasattr(device, "type") else str(device)
    requested = backend if backend is not None else os.environ.get("RELAYOPS_BACKEND") or None
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
        if requested not in _tables:
            raise ValueError(f"backend {requested!r} is not available here (available: {available_backends()})")
        if not _device_ok(requested, device_type):
            raise ValueError(f"backend {requested!r} cannot run tensors on {device_type}")
        return requested
    order = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
    for name in order:
        if name == "triton" and dtype == torch.float64:
            continue
        if name in _tables and _device_ok(name, device_type):
            return name
    return "reference"


def kernel(op: str, backend: str | None, like) -> Callable:
    """The kernel-level function implementing ``op`` for a call on tensor ``like``'s device and dtype."""
    return _tables[choose_backend(backend, like.device, like.dtype)][op]


_load_optional_backends()
