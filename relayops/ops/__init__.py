"""Public ops: validation, per-sample conversion, backend choice, dispatch (docs/design.md)."""
from ._backend import available_backends, choose_backend, cpu_isa, set_cpu_isa
from .blur import blur_response, patch_blur, patch_dct, patch_idct
from .noise import block_noise, noise_scale, relay_corrupt, relay_noise
from .step import linear_relay_blur, linear_relay_step, relay_step

__all__ = ["available_backends", "block_noise", "blur_response", "choose_backend", "cpu_isa", "linear_relay_blur",
           "linear_relay_step", "noise_scale", "patch_blur", "patch_dct", "patch_idct", "relay_corrupt", "relay_noise",
           "relay_step", "set_cpu_isa"]
