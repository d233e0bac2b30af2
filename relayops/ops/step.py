"""Public relay sampler update (SPEC 8) and latent linear relay (SPEC 10)."""
from __future__ import annotations

import torch

from .. import reference
from .._validate import acc_dtype, check_image, check_patch_size, check_real, check_same, per_sample
from ._backend import kernel
from ._library import CORRECTION_NOT_DIFFERENTIABLE, STEP_NOT_DIFFERENTIABLE, check_correction
from .noise import resolve_noise_args


def relay_step(x: torch.Tensor, x0_hat: torch.Tensor, sigma, sigma_next, tau, tau_next,
               eta: float = 0.2, s: int = 4, alpha: float = 0.15, normalize: bool = True,
               seed=None, offset: int = 0, eps: torch.Tensor | None = None,
               eps2: torch.Tensor | None = None, x_prop: torch.Tensor | None = None,
               x0_hat_prop: torch.Tensor | None = None, *, d_min: float = 0.001,
               x0_hat_b: torch.Tensor | None = None, correction: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """One fused step of the relay (DDIM-blur) sampler, RDM Algorithm 1 (SPEC 8).

    Euler: ``gamma x + patch_idct((D' - gamma D) patch_dct(x0_hat)) + eta sigma' n`` with
    ``gamma = sqrt(1 - eta^2) sigma'/sigma``, ``D = D(tau)``, ``D' = D(tau_next)`` and relay
    noise n (keywords as in :func:`relay_noise`; not drawn when eta = 0). With ``x_prop`` (the
    Euler proposal x') and ``x0_hat_prop`` (the denoiser at x', sigma'), the Heun-corrected update:
    x0_hat is replaced by ``x - sigma (d + d')/2``; pass a fresh offset for its noise.

    Second order (docs/spec.md section 8.1): with ``x0_hat_b`` (a second denoiser output) and
    ``correction`` (the factor E of :func:`relayops.solvers.correction_factor`, ``[s, s]`` or
    ``[B, s, s]``), the update is
    ``gamma x + patch_idct((D' - gamma D) X + E (X_b - X)) + eta sigma' n`` with
    ``X = patch_dct(x0_hat)``, ``X_b = patch_dct(x0_hat_b)``, in the same single pass.
    Not together with the Heun inputs; not differentiable w.r.t. correction.

    x, x0_hat (and x_prop, x0_hat_prop): ``[B, C, H, W]`` of one shape, dtype and device.
    sigma, sigma_next: floats or ``[B]`` tensors, > 0 (the last step, sigma' = 0, returns x0_hat
    and is the sampler's business). tau, tau_next: floats or ``[B]``, >= 0. eta in [0, 1).
    Differentiable in the image and noise tensors on every backend; not in sigma, sigma_next,
    tau, tau_next (a ``NotImplementedError`` when one of them requires grad).
    """
    s = check_patch_size(s)
    check_image("x", x, s)
    eta = check_real("eta", eta, low=0.0, high=1.0, high_open=True)
    d_min = check_real("d_min", d_min, low=0.0, high=1.0)
    sigma_b = per_sample("sigma", sigma, x, positive=True)
    sigma_next_b = per_sample("sigma_next", sigma_next, x, positive=True)
    tau_b = per_sample("tau", tau, x)
    tau_next_b = per_sample("tau_next", tau_next, x)
    if torch.is_grad_enabled() and (sigma_b.requires_grad or sigma_next_b.requires_grad or tau_b.requires_grad
                                    or tau_next_b.requires_grad):  # the conversions keep requires_grad
        raise NotImplementedError(STEP_NOT_DIFFERENTIABLE)
    if correction is not None:
        if torch.is_grad_enabled() and isinstance(correction, torch.Tensor) and correction.requires_grad:
            raise NotImplementedError(CORRECTION_NOT_DIFFERENTIABLE)
        if isinstance(correction, torch.Tensor) and correction.dim() == 2:  # one factor for the batch
            correction = correction.expand(x.shape[0], *correction.shape)
        check_correction(correction, x, s)
        correction = correction.to(acc_dtype(x.dtype))
    if eta == 0.0 and seed is None:  # no noise is drawn: no seed to draw either
        seed = 0
    alpha, k, seed, offset, seeds, eps, eps2 = resolve_noise_args(x, alpha, normalize, seed, offset, eps, eps2)
    return kernel("relay_step", backend, x)(
        x, x0_hat, sigma_b, sigma_next_b, tau_b, tau_next_b, eta, s, d_min, alpha, k, seed, offset, seeds,
        eps, eps2, x_prop, x0_hat_prop, x0_hat_b, correction)


def _check_relay_time(name: str, t, ref: torch.Tensor, t_relay: float) -> torch.Tensor:
    t_b = per_sample(name, t, ref)
    if t_b.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_b > t_relay).any()):
        raise ValueError(f"{name} must lie in [0, t_relay] = [0, {t_relay}], got {t_b.tolist()}")
    return t_b


def linear_relay_blur(z0: torch.Tensor, z_lr: torch.Tensor, t, t_relay) -> torch.Tensor:
    """CogView3's linear degradation ``A_t(z0) = (1 - t/T_r) z0 + (t/T_r) z_L`` (SPEC 10).

    z0, z_lr: ``[B, C, H, W]`` of one shape, dtype and device (z_lr is the upsampled
    low-resolution latent). t: a float or ``[B]`` tensor in [0, t_relay]; t_relay > 0.
    """
    check_image("z0", z0)
    check_same("z_lr", z_lr, "z0", z0)
    t_relay = check_real("t_relay", t_relay, low=0.0, low_open=True)
    return reference.linear_relay_blur(z0, z_lr, _check_relay_time("t", t, z0, t_relay), t_relay)


def linear_relay_step(z: torch.Tensor, z0_hat: torch.Tensor, z_lr: torch.Tensor, t, t_next, t_relay,
                      sigma, sigma_next) -> torch.Tensor:
    """Deterministic linear-relay update (SPEC 10):
    ``A_{t_next}(z0_hat) + (sigma_next / sigma) (z - A_t(z0_hat))``.

    z, z0_hat, z_lr: ``[B, C, H, W]`` alike. t, t_next: floats or ``[B]`` in [0, t_relay];
    sigma > 0, sigma_next >= 0: floats or ``[B]``. The last step (returning z0_hat) is the
    sampler's business.
    """
    check_image("z", z)
    check_same("z0_hat", z0_hat, "z", z)
    check_same("z_lr", z_lr, "z", z)
    t_relay = check_real("t_relay", t_relay, low=0.0, low_open=True)
    t_b = _check_relay_time("t", t, z, t_relay)
    t_next_b = _check_relay_time("t_next", t_next, z, t_relay)
    sigma_b = per_sample("sigma", sigma, z, positive=True)
    sigma_next_b = per_sample("sigma_next", sigma_next, z)
    return reference.linear_relay_step(z, z0_hat, z_lr, t_b, t_next_b, t_relay, sigma_b, sigma_next_b)
