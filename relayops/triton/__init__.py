"""The Triton backend (DESIGN.md, layer 4): fused Triton kernels for every patch op.

Importing this package is cheap: it only checks that ``triton`` is installed (``ImportError``
otherwise, which ``relayops.ops._backend`` takes as "not available") and registers the
backend table. The kernels and their ``torch.library.triton_op`` registrations
(``relayops.triton.ops``) load on first use. Run ``TRITON_INTERPRET=1`` before anything
imports them to execute the kernels on CPU tensors with Triton's interpreter.

The table's functions have exactly the reference signatures (``relayops.reference``).
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is None:
    raise ImportError("relayops.triton needs the 'triton' package (pip install triton)")

from ..ops._backend import OPS, register_backend  # noqa: E402

_ops = None


def _impl():
    """``relayops.triton.ops``, imported on first use (imports triton, defines the kernels)."""
    global _ops
    if _ops is None:
        from . import ops
        _ops = ops
    return _ops


def patch_dct(x, s):
    return _impl().patch_dct(x, s)


def patch_idct(u, s):
    return _impl().patch_idct(u, s)


def patch_blur(x, tau_b, s, d_min):
    return _impl().patch_blur(x, tau_b, s, d_min)


def block_noise(g, s):
    return _impl().block_noise(g, s)


def relay_noise(like, s, alpha, k, seed, offset, eps, eps2):
    return _impl().relay_noise(like, s, alpha, k, seed, offset, eps, eps2)


def relay_corrupt(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2):
    return _impl().relay_corrupt(y, sigma_b, tau_b, s, d_min, alpha, k, seed, offset, eps, eps2)


def relay_step(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, seed, offset,
               eps, eps2, x_prop=None, x0_hat_prop=None):
    return _impl().relay_step(x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k,
                              seed, offset, eps, eps2, x_prop, x0_hat_prop)


register_backend("triton", {name: globals()[name] for name in OPS})
