"""The reference backend: plain PyTorch straight from docs/spec.md, the executable spec.

Functions here take already validated arguments with the op signatures of
``relayops.ops._library`` (per-sample parameters as ``[B]`` tensors, seeds as int64); the public
ops in ``relayops.ops`` validate and then call a backend with the same signatures. Gradients
come from PyTorch's autograd through this code: the yardstick for every backend's gradients.
"""
from .dct import (blur_response, blur_response_grad, dct_matrix, patch_blur, patch_dct, patch_idct,
                  scale_coefficients)
from .noise import block_noise, draw_normals, relay_corrupt, relay_noise
from .philox import box_muller, philox4x32, philox_normal_pair
from .step import linear_relay_blur, linear_relay_step, relay_step

__all__ = [
    "blur_response", "blur_response_grad", "dct_matrix", "patch_blur", "patch_dct", "patch_idct", "scale_coefficients",
    "block_noise", "draw_normals", "relay_corrupt", "relay_noise",
    "box_muller", "philox4x32", "philox_normal_pair",
    "linear_relay_blur", "linear_relay_step", "relay_step",
]
