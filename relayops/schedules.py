"""Noise levels, blur times, sampling grids and preconditioning (SPEC 5, 6, 7, 11).

Every function takes Python numbers or tensors (scalars or ``[B]``). Tensors stay on their
device and keep their dtype (torch.special.ndtr/ndtri, no host round trip); Python numbers
give Python floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

P_MEAN = -1.2
P_STD = 1.2
SIGMA_DATA = 0.5


def _tensor(value) -> tuple[torch.Tensor, bool]:
    """(value as a tensor, whether it came in as a Python number)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"expected a floating tensor, got dtype {value.dtype}")
        return value, False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a real number or a floating tensor, got {value!r}")
    return torch.tensor(float(value), dtype=torch.float64), True


def _out(t: torch.Tensor, scalar: bool):
    return float(t) if scalar else t


def _check_L(L) -> float:
    if not isinstance(L, (int, float)) or isinstance(L, bool) or not L > 0:
        raise ValueError(f"L (prob length) must be a number > 0, got {L!r}")
    return float(L)


# --- SPEC 5: noise level, blur time and the EDM log-normal -----------------------------------

def sigma_from_u(u, L: float = 0.93, P_mean: float = P_MEAN, P_std: float = P_STD):
    """``sigma(u) = exp(P_mean + P_std Phi^-1(u L))`` for progress u in [0, 1] (SPEC 5)."""
    t, scalar = _tensor(u)
    L = _check_L(L)
    return _out(torch.exp(P_mean + P_std * torch.special.ndtri(t * L)), scalar)


def u_from_sigma(sigma, L: float = 0.93, P_mean: float = P_MEAN, P_std: float = P_STD):
    """``u(sigma) = Phi((ln sigma - P_mean) / P_std) / L``, the inverse of :func:`sigma_from_u`."""
    t, scalar = _tensor(sigma)
    L = _check_L(L)
    return _out(torch.special.ndtr((torch.log(t) - P_mean) / P_std) / L, scalar)


def tau_from_u(u, sigma_b_max: float = 3.0):
    """Dissipation time ``tau(u) = sigma_B(u)^2 / 2`` with ``sigma_B = sigma_B_max sin(pi u / 2)^2``."""
    t, scalar = _tensor(u)
    sigma_b = sigma_b_max * torch.sin(math.pi * t / 2) ** 2
    return _out(sigma_b**2 / 2, scalar)


def tau_from_sigma(sigma, L: float = 0.93, sigma_b_max: float = 3.0):
    """``tau(u(sigma))``: the blur time that goes with noise level sigma on the relay path."""
    return tau_from_u(u_from_sigma(sigma, L), sigma_b_max)


# --- SPEC 6: preconditioning and loss weight --------------------------------------------------

def edm_precond(sigma, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` at noise level sigma (SPEC 6)."""
    t, scalar = _tensor(sigma)
    total = t**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = t * sigma_data / torch.sqrt(total)
    c_in = 1 / torch.sqrt(total)
    c_noise = torch.log(t) / 4
    return tuple(_out(c, scalar) for c in (c_skip, c_out, c_in, c_noise))


def edm_loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` (SPEC 6)."""
    t, scalar = _tensor(sigma)
    return _out((t**2 + sigma_data**2) / (t * sigma_data) ** 2, scalar)


def relay_training_levels(u, L: float = 0.93, sigma_b_max: float = 3.0):
    """``(sigma, tau)`` for training progress u (SPEC 6): ``sigma(u)``, ``tau(u)``."""
    return sigma_from_u(u, L), tau_from_u(u, sigma_b_max)


def relay_u_min(L: float = 0.93, sigma_min: float = 0.0075) -> float:
    """``u_min = u(0.0075)``: training draws ``u ~ U[u_min, 1]`` (SPEC 6)."""
    return u_from_sigma(sigma_min, L)


# --- SPEC 7: sampling grids -------------------------------------------------------------------

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *,
                  dtype=torch.float64, device=None) -> torch.Tensor:
    """Karras grid ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``, i = 0..n-1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (grid size) must be an int >= 2, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + i / (n - 1) * (lo - hi)) ** rho).to(dtype)


def relay_sigmas(n: int, sigma_trunc: float, sigma_min: float = 0.008, sigma_max: float = 80.0,
                 rho: float = 7.0, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Relay-stage grid (SPEC 7): the Karras grid's values below ``sigma_trunc``, then 0."""
    grid = karras_sigmas(n, sigma_min, sigma_max, rho, dtype=torch.float64)
    kept = grid[grid < sigma_trunc]
    if kept.numel() == 0:
        raise ValueError(f"sigma_trunc = {sigma_trunc} keeps no level of the grid (smallest {sigma_min})")
    return torch.cat([kept, kept.new_zeros(1)]).to(dtype=dtype, device=device)


# --- SPEC 11: simple diffusion log-SNR schedules and v-prediction -------------------------------

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0


def logsnr_cosine(t):
    """``logsnr(t) = -2 ln tan(pi t / 2)``, clipped to [-15, 15] (SPEC 11)."""
    x, scalar = _tensor(t)
    # clamp t to where the clip bounds are reached first, so tan stays finite and positive
    t_lo = 2 / math.pi * math.atan(math.exp(-LOGSNR_MAX / 2))
    t_hi = 2 / math.pi * math.atan(math.exp(-LOGSNR_MIN / 2))
    v = -2 * torch.log(torch.tan(math.pi * x.clamp(t_lo, t_hi) / 2))
    return _out(v.clamp(LOGSNR_MIN, LOGSNR_MAX), scalar)


def logsnr_shifted(t, resolution: int, reference: int = 64):
    """Resolution-shifted cosine: ``logsnr(t) + 2 ln(reference / resolution)`` (SPEC 11)."""
    x, scalar = _tensor(t)
    return _out(logsnr_cosine(x) + 2 * math.log(reference / resolution), scalar)


def logsnr_interpolated(t, resolution: int, reference_hi: int = 256, reference_lo: int = 32):
    """``t * logsnr_shift_hi(t) + (1 - t) * logsnr_shift_lo(t)`` (SPEC 11)."""
    x, scalar = _tensor(t)
    hi = logsnr_shifted(x, resolution, reference_hi)
    lo = logsnr_shifted(x, resolution, reference_lo)
    return _out(x * hi + (1 - x) * lo, scalar)


def alpha_sigma_from_logsnr(logsnr):
    """``(alpha_t, sigma_t)`` with ``alpha_t^2 = sigmoid(logsnr)``, ``sigma_t^2 = sigmoid(-logsnr)``."""
    x, scalar = _tensor(logsnr)
    return _out(torch.sqrt(torch.sigmoid(x)), scalar), _out(torch.sqrt(torch.sigmoid(-x)), scalar)


def v_from_eps(x, eps, alpha, sigma):
    """v-prediction target ``v = alpha_t eps - sigma_t x`` (SPEC 11)."""
    return alpha * eps - sigma * x


def x_from_v(z, v, alpha, sigma):
    """Clean image from the noisy ``z = alpha x + sigma eps`` and ``v``: ``x = alpha z - sigma v``."""
    return alpha * z - sigma * v


def eps_from_v(z, v, alpha, sigma):
    """Noise from ``z`` and ``v``: ``eps = sigma z + alpha v`` (since alpha^2 + sigma^2 = 1)."""
    return sigma * z + alpha * v


# --- Presets (SPEC table, the authors' released code) -----------------------------------------

@dataclass(frozen=True)
class RelayPreset:
    """Relay-stage settings of the authors' released configurations."""
    name: str
    L_train: float
    L_sample: float
    sigma_b_max: float
    alpha: float
    eta: float
    num_grid: int
    rho: float
    sigma_trunc: float
    normalize: bool
    s: int = 4
    sigma_min: float = 0.008
    sigma_max: float = 80.0

    def sigmas(self, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """The sampling grid of SPEC 7 for this preset (truncated, ending in 0)."""
        return relay_sigmas(self.num_grid, self.sigma_trunc, self.sigma_min, self.sigma_max, self.rho,
                            dtype=dtype, device=device)


imagenet256 = RelayPreset("imagenet256", L_train=0.93, L_sample=0.93, sigma_b_max=3.0, alpha=0.15, eta=0.2,
                          num_grid=200, rho=100.0, sigma_trunc=0.9, normalize=False)
celebahq256 = RelayPreset("celebahq256", L_train=0.89, L_sample=1.05, sigma_b_max=2.0, alpha=0.15, eta=0.2,
                          num_grid=150, rho=7.0, sigma_trunc=0.95, normalize=False)
PRESETS = {p.name: p for p in (imagenet256, celebahq256)}


def get_preset(name) -> RelayPreset:
    """A preset by name (``"imagenet256"`` or ``"celebahq256"``), or the preset itself."""
    if isinstance(name, RelayPreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
