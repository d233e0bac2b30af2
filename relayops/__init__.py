"""relayops: fast, tested kernels and samplers for relay diffusion (RDM, ICLR 2024).

The public API is re-exported here; see docs/api.md, and docs/spec.md for the formulas.
"""
from . import analysis, multires, reference, sampling, schedules
from .ops import (
    available_backends,
    block_noise,
    blur_response,
    choose_backend,
    cpu_isa,
    linear_relay_blur,
    linear_relay_step,
    patch_blur,
    patch_dct,
    patch_idct,
    relay_corrupt,
    relay_noise,
    relay_step,
    set_cpu_isa,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends", "block_noise", "blur_response", "choose_backend", "cpu_isa", "linear_relay_blur",
    "linear_relay_step", "patch_blur", "patch_dct", "patch_idct", "relay_corrupt", "relay_noise",
    "relay_step", "set_cpu_isa", "reference", "schedules", "sampling", "analysis", "multires",
]
