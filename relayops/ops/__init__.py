"""Public ops: validation, backend choice, dispatch (DESIGN.md, layer 2)."""
from ._backend import available_backends, choose_backend
from .blur import blur_response, patch_blur, patch_dct, patch_idct
from .noise import block_noise, noise_scale, relay_corrupt, relay_noise
from .step import linear_relay_blur, linear_relay_step, relay_step
