"""Training losses for the base and relay stages (SPEC 6, 10, 11).

Every loss takes a denoiser wrapper (``EDMPrecond`` or ``VPredPrecond``), clean images
``y [B, C, H, W]`` in [-1, 1], optional class labels ``[B]`` and the source of its randomness:
``seeds``, per-sample seeds (an int64 ``[B]`` tensor on y's device), or a ``torch.Generator``
on y's device that draws such seeds. Each returns a scalar float32 loss (mean over the batch
and pixels).

All randomness of sample b (its noise level or time, and its noise image) comes from the Philox
streams keyed by ``seeds[b]`` (SPEC 4), drawn in the kernels on y's device: sample b is
corrupted exactly as it would be in a batch of one with the same seed. The trainer keys the
seeds by a sample's position in the global batch, so a batch split over processes is corrupted
as one process would corrupt it. Within a sample's stream, offset ``NOISE_OFFSET`` holds the
noise image and ``LEVEL_OFFSET`` the normals that set the noise level (further offsets are
free for the caller; the trainer's label dropout uses ``LABEL_OFFSET``, MDM's noise images
``MDM_NOISE_OFFSET + k``).
"""
from __future__ import annotations

import torch

from .. import schedules
from .._validate import seed_args
from ..ops import linear_relay_blur, relay_corrupt, relay_noise
from ..sampling import nearest_upsample
from .data import area_downsample

NOISE_OFFSET, LEVEL_OFFSET, LABEL_OFFSET = 0, 1, 2
# MDM: resolution k (0 = the lowest of the model's resolutions) draws its noise at MDM_NOISE_OFFSET + k,
# so a resolution's noise does not change when the progressive schedule adds higher ones.
MDM_NOISE_OFFSET = 3


def _col(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, None]


def resolve_seeds(y: torch.Tensor, generator: torch.Generator | None = None, seeds=None) -> torch.Tensor:
    """The per-sample seeds of a loss call: ``seeds`` as an int64 ``[B]`` tensor on y's device,
    or B seeds drawn from ``generator`` (on the device, no host round trip). Exactly one is needed."""
    if (generator is None) == (seeds is None):
        raise ValueError("give exactly one source of randomness: generator= or seeds= (per-sample seeds)")
    if seeds is None:
        return torch.randint(0, 2**62, (y.shape[0],), generator=generator, device=generator.device).to(y.device)
    _, per_sample = seed_args(seeds, y)
    if per_sample is None:
        raise TypeError("seeds must be per-sample seeds (a list of B ints or an int64 [B] tensor), "
                        f"got {seeds!r}")
    return per_sample


def white_noise(like: torch.Tensor, seeds: torch.Tensor, offset: int, backend: str | None = None) -> torch.Tensor:
    """Standard normals shaped like ``like``; sample b's from the Philox stream ``seeds[b]`` at
    ``offset`` (relay noise with alpha = 0, s = 1, k = 1)."""
    return relay_noise(like, 1, alpha=0.0, seed=seeds, offset=offset, backend=backend)


def sample_normals(seeds: torch.Tensor, like: torch.Tensor, count: int, offset: int,
                   backend: str | None = None) -> torch.Tensor:
    """``[B, count]`` float32 standard normals, row b from the stream ``seeds[b]`` at ``offset``."""
    shape = (like.shape[0], 1, 1, count)
    return white_noise(torch.empty(shape, dtype=torch.float32, device=like.device), seeds, offset, backend)[:, 0, 0]


def sample_uniforms(seeds: torch.Tensor, like: torch.Tensor, count: int, offset: int,
                    backend: str | None = None) -> torch.Tensor:
    """``[B, count]`` float32 uniforms in [0, 1]: ``Phi(z)`` of :func:`sample_normals`
    (exactly uniform for exactly normal z; computed on the device)."""
    return torch.special.ndtr(sample_normals(seeds, like, count, offset, backend))


def edm_base_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator | None = None,
                  seeds=None, P_mean: float = schedules.P_MEAN, P_std: float = schedules.P_STD,
                  backend: str | None = None) -> torch.Tensor:
    """Plain EDM (SPEC 6, base stage): ``ln sigma ~ N(P_mean, P_std^2)``, ``x = y + sigma eps``,
    loss ``lambda(sigma) |D(x; sigma) - y|^2``."""
    seeds = resolve_seeds(y, generator, seeds)
    sigma = torch.exp(P_mean + P_std * sample_normals(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0])
    noise = white_noise(y, seeds, NOISE_OFFSET, backend)
    x0_hat = denoiser(y + _col(sigma).to(y.dtype) * noise, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def relay_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator | None = None,
               seeds=None, s: int = 4, alpha: float = 0.15, normalize: bool = True, L: float = 0.93,
               sigma_b_max: float = 3.0, backend: str | None = None) -> torch.Tensor:
    """Relay stage (SPEC 6): ``u ~ U[u_min, 1]``, ``sigma = sigma(u)``, ``tau = tau(u)``,
    ``x = relay_corrupt(y, sigma, tau)`` (blur plus block-correlated noise), target y,
    weight ``lambda(sigma)``."""
    seeds = resolve_seeds(y, generator, seeds)
    u_min = schedules.relay_u_min(L)
    u = u_min + (1 - u_min) * sample_uniforms(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0]
    sigma, tau = schedules.relay_training_levels(u, L, sigma_b_max)
    x = relay_corrupt(y, sigma.to(y.dtype), tau.to(y.dtype), s, alpha, normalize, seed=seeds, offset=NOISE_OFFSET,
                      backend=backend)
    x0_hat = denoiser(x, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def linear_relay_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator | None = None,
                      seeds=None, s: int = 4, sigmas: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Latent linear relay (SPEC 10, CogView3) on any channels: ``z_L`` is the nearest
    upsampling of the area-downsampled y; with the relay grid ``sigmas`` (descending, ending
    in 0, ``T_r = len(sigmas) - 1`` steps) draw t in {1..T_r}, noise level ``sigmas[T_r - t]``,
    ``z_t = A_t(y) + sigma eps``; target y, weight ``lambda(sigma)``."""
    seeds = resolve_seeds(y, generator, seeds)
    t_relay = sigmas.numel() - 1
    z_lr = nearest_upsample(area_downsample(y, s), s)
    # t uniform on {1..T_r}; the clamp only catches a uniform that rounded to exactly 1.
    u = sample_uniforms(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0]
    t = (u * t_relay).long().clamp(max=t_relay - 1) + 1
    sigma = sigmas.to(device=y.device, dtype=torch.float32)[t_relay - t]
    noise = white_noise(y, seeds, NOISE_OFFSET, backend)
    z = linear_relay_blur(y, z_lr, t.to(y.dtype), float(t_relay)) + _col(sigma).to(y.dtype) * noise
    x0_hat = denoiser(z, sigma, class_labels)
    weight = schedules.edm_loss_weight(sigma)
    return (_col(weight) * (x0_hat.float() - y.float()) ** 2).mean()


def vpred_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator | None = None,
               seeds=None, reference: int = 64, multiscale: bool = False, backend: str | None = None) -> torch.Tensor:
    """v-prediction with the resolution-shifted cosine schedule (SPEC 11): ``t ~ U(0, 1)``,
    ``logsnr = logsnr_shifted(t, d, reference)`` for ``d = y``'s width, ``z = alpha y + sigma eps``.
    Loss ``|v_hat - v|^2``, or with ``multiscale`` the multiscale epsilon loss of
    ``relayops.multires`` on ``eps_hat = sigma z + alpha v_hat``. ``denoiser``: a VPredPrecond."""
    seeds = resolve_seeds(y, generator, seeds)
    t = sample_uniforms(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0]
    logsnr = schedules.logsnr_shifted(t, y.shape[-1], reference)
    alpha, sigma = (_col(c) for c in schedules.alpha_sigma_from_logsnr(logsnr))
    yf = y.float()
    eps = white_noise(yf, seeds, NOISE_OFFSET, backend)
    z = alpha * yf + sigma * eps
    v_hat = denoiser.predict_v(z, logsnr, class_labels)
    if multiscale:
        from ..multires import multiscale_loss  # SPEC 11

        return multiscale_loss(schedules.eps_from_v(z, v_hat, alpha, sigma), eps)
    return ((v_hat - schedules.v_from_eps(yf, eps, alpha, sigma)) ** 2).mean()


def mdm_train_loss(denoiser, y: torch.Tensor, class_labels=None, *, generator: torch.Generator | None = None,
                   seeds=None, num_resolutions: int | None = None, weights=None, weighting: str = "v",
                   backend: str | None = None) -> torch.Tensor:
    """Matryoshka diffusion's joint loss (SPEC 11) on the lowest ``num_resolutions`` (default all)
    of the model's resolutions. ``denoiser``: an :class:`~relayops.training.nested_unet.MDMDenoiser`;
    y: ``[B, C, R, R]`` crops at the highest resolution R (every lower one is its avgpool).
    ``t ~ U(0, 1)`` per sample, shared by the resolutions; ``z^r = alpha_t^r avgpool_r(y) +
    sigma_t^r eps^r`` (:func:`relayops.multires.mdm_noising`); the loss is
    :func:`relayops.multires.mdm_loss` with ``weights`` (one per resolution used) and ``weighting``."""
    from ..multires import mdm_loss, mdm_noising

    seeds = resolve_seeds(y, generator, seeds)
    res = denoiser.resolutions[:num_resolutions]
    if y.shape[-1] != denoiser.resolutions[-1] or y.shape[-2] != y.shape[-1]:
        raise ValueError(f"y must be [B, C, {denoiser.resolutions[-1]}, {denoiser.resolutions[-1]}] crops at the "
                         f"model's highest resolution, got {tuple(y.shape)}")
    t = sample_uniforms(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0]
    yf = y.float()
    eps = [white_noise(yf.new_empty(y.shape[0], y.shape[1], r, r), seeds, MDM_NOISE_OFFSET + k, backend)
           for k, r in enumerate(res)]
    noised = mdm_noising(yf, t, res, eps=eps, schedule=denoiser.schedule, reference=denoiser.reference)
    x_hats = denoiser(noised.z, t, class_labels)
    return mdm_loss([x.float() for x in x_hats], noised, weights, weighting=weighting)
