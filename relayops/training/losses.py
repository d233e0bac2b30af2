"""Training losses for the base and relay stages (SPEC 6, 10, 11).

Every loss takes a denoiser wrapper (``EDMPrecond`` or ``VPredPrecond``), clean images
``y [B, C, H, W]`` in [-1, 1], optional class labels ``[B]`` and a ``torch.Generator`` on y's
device that supplies all the randomness (so a resumed run continues the same stream). Each
returns a scalar float32 loss (mean over the batch and pixels).
"""
from __future__ import annotations

import torch

from .. import schedules
from ..ops import linear_relay_blur, relay_corrupt
from ..sampling import nearest_upsample
from .data import area_downsample


def _col(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, None]


def _seed(generator: torch.Generator) -> int:
    """A Philox seed for the relay-noise kernels, drawn from the training generator."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def edm_base_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator,
                  P_mean: float = schedules.P_MEAN, P_std: float = schedules.P_STD) -> torch.Tensor:
    """Plain EDM (SPEC 6, base stage): ``ln sigma ~ N(P_mean, P_std^2)``, ``x = y + sigma eps``,
    loss ``lambda(sigma) |D(x; sigma) - y|^2``."""
    b = y.shape[0]
    sigma = torch.exp(P_mean + P_std * torch.randn(b, generator=generator, device=y.device))
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    x0_hat = denoiser(y + _col(sigma) * noise, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def relay_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator, s: int = 4,
               alpha: float = 0.15, normalize: bool = True, L: float = 0.93, sigma_b_max: float = 3.0,
               backend: str | None = None) -> torch.Tensor:
    """Relay stage (SPEC 6): ``u ~ U[u_min, 1]``, ``sigma = sigma(u)``, ``tau = tau(u)``,
    ``x = relay_corrupt(y, sigma, tau)`` (blur plus block-correlated noise), target y,
    weight ``lambda(sigma)``."""
    b = y.shape[0]
    u_min = schedules.relay_u_min(L)
    u = u_min + (1 - u_min) * torch.rand(b, generator=generator, device=y.device)
    sigma, tau = schedules.relay_training_levels(u, L, sigma_b_max)
    x = relay_corrupt(y, sigma.to(y.dtype), tau.to(y.dtype), s, alpha, normalize, seed=_seed(generator),
                      backend=backend)
    x0_hat = denoiser(x, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def linear_relay_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator, s: int = 4,
                      sigmas: torch.Tensor) -> torch.Tensor:
    """Latent linear relay (SPEC 10, CogView3) on any channels: ``z_L`` is the nearest
    upsampling of the area-downsampled y; with the relay grid ``sigmas`` (descending, ending
    in 0, ``T_r = len(sigmas) - 1`` steps) draw t in {1..T_r}, noise level ``sigmas[T_r - t]``,
    ``z_t = A_t(y) + sigma eps``; target y, weight ``lambda(sigma)``."""
    b = y.shape[0]
    t_relay = sigmas.numel() - 1
    z_lr = nearest_upsample(area_downsample(y, s), s)
    t = torch.randint(1, t_relay + 1, (b,), generator=generator, device=y.device)
    sigma = sigmas.to(device=y.device, dtype=torch.float32)[t_relay - t]
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    z = linear_relay_blur(y, z_lr, t.to(y.dtype), float(t_relay)) + _col(sigma).to(y.dtype) * noise
    x0_hat = denoiser(z, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def vpred_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator,
               reference: int = 64, multiscale: bool = False) -> torch.Tensor:
    """v-prediction with the resolution-shifted cosine schedule (SPEC 11): ``t ~ U(0, 1)``,
    ``logsnr = logsnr_shifted(t, d, reference)`` for ``d = y``'s width, ``z = alpha y + sigma eps``.
    Loss ``|v_hat - v|^2``, or with ``multiscale`` the multiscale epsilon loss of
    ``relayops.multires`` on ``eps_hat = sigma z + alpha v_hat``. ``denoiser``: a VPredPrecond."""
    b = y.shape[0]
    t = torch.rand(b, generator=generator, device=y.device)
    logsnr = schedules.logsnr_shifted(t, y.shape[-1], reference)
    alpha, sigma = (_col(c) for c in schedules.alpha_sigma_from_logsnr(logsnr))
    eps = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    yf = y.float()
    z = alpha * yf + sigma * eps
    v_hat = denoiser.predict_v(z, logsnr, class_labels)
    if multiscale:
        from ..multires import multiscale_loss  # SPEC 11

        return multiscale_loss(schedules.eps_from_v(z, v_hat, alpha, sigma), eps)
    return ((v_hat - schedules.v_from_eps(yf, eps, alpha, sigma)) ** 2).mean()
