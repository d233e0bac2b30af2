"""Backend registry and choice (docs/design.md).

A backend is a name plus a table of forward functions with the op signatures of
``ops/_library.py`` (validated arguments, per-sample parameters as ``[B]`` tensors): the
reference (``relayops.reference``), or the custom ops that a kernel backend registered.
Choice, first match wins: the ``backend=`` keyword of a call, then the ``RELAYOPS_BACKEND``
environment variable, then automatic: CUDA tensors use the compiled CUDA backend if built with
code for the GPU's architecture (else Triton, with one warning), then Triton; CPU tensors use the
compiled CPU backend if built, else the reference.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from .._validate import FLOAT_DTYPES
from ._library import OPS, check_supported, reference_table

BACKENDS = ("reference", "cpu", "cuda", "triton")

_tables: dict[str, dict[str, Callable]] = {"reference": reference_table()}
_dtypes: dict[str, tuple] = {"reference": FLOAT_DTYPES}
_device_checks: dict[str, Callable[[torch.device], Optional[str]]] = {}
_warned: set = set()


def register_backend(name: str, table: dict[str, Callable], dtypes=FLOAT_DTYPES, device_check=None) -> None:
    """Make a backend available; ``table`` maps op names to forward functions, ``dtypes`` lists
    the storage dtypes it takes, ``device_check(device)`` (optional) says why it cannot run on a
    device (a message), or None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    missing = set(OPS) - set(table)
    if missing:
        raise ValueError(f"backend {name!r} lacks ops {sorted(missing)}")
    _tables[name] = dict(table)
    _dtypes[name] = tuple(dtypes)
    if device_check is not None:
        _device_checks[name] = device_check


# The module that registers each optional backend, and why it could not be imported (for errors).
_MODULE_OF = {"cpu": "relayops.ops._compiled", "cuda": "relayops.ops._compiled", "triton": "relayops.triton"}
_import_errors: dict[str, str] = {}


def _load_optional_backends() -> None:
    """Import the compiled and Triton backends if they are installed; each registers itself."""
    for module in ("relayops.ops._compiled", "relayops.triton"):
        try:
            __import__(module)
        except ImportError as e:
            _import_errors[module] = str(e)


def cpu_isa() -> str:
    """The instruction set the compiled CPU kernels use now ("portable", "avx2" or "avx512"): the
    best one the CPU has, capped by set_cpu_isa or RELAYOPS_CPU_ISA. ImportError when relayops._C
    is not built."""
    from . import _compiled
    return _compiled.cpu_isa()


def set_cpu_isa(cap: str) -> str:
    """Cap the instruction set of the compiled CPU kernels at ``cap`` ("portable", "avx2" or
    "avx512" = no cap) for every later call; it never rises above what the CPU has. Returns the
    instruction set now in use. ImportError when relayops._C is not built."""
    from . import _compiled
    return _compiled.set_cpu_isa(cap)


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


def _device_problem(name: str, device: torch.device) -> Optional[str]:
    check = _device_checks.get(name)
    return None if check is None else check(device)


def choose_backend(backend: str | None, device, dtype=None) -> str:
    """The backend a call on ``device`` uses; raises ``ValueError`` for an unusable request.

    The automatic choice skips backends that do not take ``dtype`` (Triton: float64) and, with a
    warning once per device, backends that cannot run on the device (the CUDA build lacks the
    GPU's architecture).
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    device_type = device.type
    requested = backend if backend is not None else os.environ.get("RELAYOPS_BACKEND") or None
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
        if requested not in _tables:
            why = _import_errors.get(_MODULE_OF.get(requested, ""))
            raise ValueError(f"backend {requested!r} is not available here (available: {available_backends()})"
                             + (f": {why}" if why else ""))
        if not _device_ok(requested, device_type):
            raise ValueError(f"backend {requested!r} cannot run tensors on {device_type}")
        problem = _device_problem(requested, device)
        if problem is not None:
            raise ValueError(problem)
        return requested
    order = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
    for name in order:
        if name in _tables and _device_ok(name, device_type) and (dtype is None or dtype in _dtypes[name]):
            problem = _device_problem(name, device)
            if problem is None:
                return name
            if (name, str(device)) not in _warned:
                _warned.add((name, str(device)))
                warnings.warn(f"{problem}; using the next backend instead", RuntimeWarning, stacklevel=3)
    return "reference"


def kernel(op: str, backend: str | None, like: torch.Tensor) -> Callable:
    """The forward function implementing ``op`` for a call on tensor ``like``'s device and dtype;
    a ``TypeError`` if the chosen backend does not take that dtype."""
    name = choose_backend(backend, like.device, like.dtype)
    check_supported(name, _dtypes[name], like)
    return _tables[name][op]


_load_optional_backends()
