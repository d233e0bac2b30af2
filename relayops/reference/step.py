"""Reference relay sampler update, Euler and Heun (SPEC 8), and the latent linear relay (SPEC 10)."""
from __future__ import annotations

import torch

from .._validate import acc_dtype
from .dct import blur_response, patch_dct, patch_idct, scale_coefficients
from .noise import relay_noise


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def heun_x0(x, x0_hat, sigma, x_prop, x0_hat_prop, sigma_next):
    """``x0_eff = x - sigma (d + d') / 2`` with ``d = (x - x0_hat)/sigma``, ``d' = (x' - x0_hat')/sigma'``."""
    d = (x - x0_hat) / _col(sigma)
    d_prop = (x_prop - x0_hat_prop) / _col(sigma_next)
    return x - _col(sigma) * (d + d_prop) / 2


def relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta: float, s: int, d_min: float,
               alpha: float, k: float, seed: int, offset: int, seeds, eps, eps2, x_prop=None, x0_hat_prop=None,
               x0_hat_b=None, correction=None):
    """One DDIM-blur update (SPEC 8, pixel form):

    ``gamma x + patch_idct((D' - gamma D) patch_dct(x0_hat)) + eta sigma' n``,
    ``gamma = sqrt(1 - eta^2) sigma' / sigma``; with ``x_prop``/``x0_hat_prop`` the Heun
    correction replaces ``x0_hat`` by ``x0_eff``; with ``x0_hat_b`` and ``correction`` (E,
    ``[B, s, s]``) the second-order step adds ``E * patch_dct(x0_hat_b - x0_hat)`` to the
    coefficients (SPEC 8.1). sigma, sigma_next, tau, tau_next: ``[B]``; noise as in
    :func:`relay_noise` (not drawn when eta = 0).
    """
    dt = acc_dtype(x.dtype)
    xd, x0d = x.to(dt), x0_hat.to(dt)
    sigma, sigma_next, tau, tau_next = (v.to(dt) for v in (sigma, sigma_next, tau, tau_next))
    if x_prop is not None:
        x0d = heun_x0(xd, x0d, sigma, x_prop.to(dt), x0_hat_prop.to(dt), sigma_next)
    gamma = (1.0 - eta * eta) ** 0.5 * sigma_next / sigma
    factor = blur_response(tau_next, s, d_min) - gamma.view(-1, 1, 1) * blur_response(tau, s, d_min)
    coef = scale_coefficients(patch_dct(x0d, s), factor, s)
    if x0_hat_b is not None:
        coef = coef + scale_coefficients(patch_dct(x0_hat_b.to(dt) - x0d, s), correction.to(dt), s)
    out = _col(gamma) * xd + patch_idct(coef, s)
    if eta != 0.0:
        out = out + (eta * _col(sigma_next)) * relay_noise(xd, s, alpha, k, seed, offset, seeds, eps, eps2)
    return out.to(x.dtype)


def linear_relay_blur(z0, z_lr, t, t_relay: float):
    """``A_t(z0) = (1 - t/T_r) z0 + (t/T_r) z_L`` with ``t`` a ``[B]`` tensor (SPEC 10)."""
    w = _col(t.to(acc_dtype(z0.dtype)) / t_relay)
    return ((1 - w) * z0 + w * z_lr).to(z0.dtype)


def linear_relay_step(z, z0_hat, z_lr, t, t_next, t_relay: float, sigma, sigma_next):
    """``A_{t'}(z0_hat) + (sigma'/sigma) (z - A_t(z0_hat))`` (SPEC 10); all per-sample ``[B]``."""
    dt, out_dtype = acc_dtype(z.dtype), z.dtype
    z, z0_hat, z_lr = z.to(dt), z0_hat.to(dt), z_lr.to(dt)
    ratio = _col(sigma_next.to(dt) / sigma.to(dt))
    out = linear_relay_blur(z0_hat, z_lr, t_next, t_relay) + ratio * (z - linear_relay_blur(z0_hat, z_lr, t, t_relay))
    return out.to(out_dtype)
