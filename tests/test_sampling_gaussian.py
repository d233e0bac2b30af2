"""Samplers transport a known Gaussian distribution (SPEC 8, 9, 10), float64, no trained network.

Data: x* ~ N(0, Sigma) on 8x8 single-channel images, Sigma a smooth squared-exponential field
(length 1.5 pixels, variance 0.25, plus a 1% nugget so it is well conditioned). Every corruption
here is linear-Gaussian, so the optimal denoiser is linear and closed-form:
``E[x | x_t] = Sigma B^T (B Sigma B^T + sigma^2 K)^-1 x_t``, with B the patch blur at sigma's tau
(built by applying ``reference.patch_blur`` to the identity basis) and K the relay-noise
covariance (built from the block-noise covariance formula of SPEC 3, independently of the ops).

Each test runs many chains and checks two things:
1. The implementation: the chains' covariance matches the covariance of the *discrete* sampler,
   computed exactly by propagating covariance matrices through the linear steps written in matrix
   form straight from the SPEC. Bound: 1.5x the rms sampling error of an empirical covariance of
   N Gaussian vectors, ``sqrt(sum_ij (C_ij^2 + C_ii C_jj) / N)`` (relative to ||Sigma||_F).
2. The algorithm: the covariance of the chains is close to Sigma. Bound: the exact discretisation
   error of the grid used (asserted below a stated number), plus 1.5x the rms sampling error;
   the error of N true samples (the chains' own x*) is measured beside it and must itself sit
   within 1.5x of that rms, which is what justifies the yardstick.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from relayops import reference, schedules
from relayops.sampling import edm_sample, linear_relay_sample, relay_sample

H = 8
S = 4
N_PIX = H * H
N_CHAINS = 4000
DT = torch.float64


def _positions():
    ij = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    return torch.stack(ij, -1).reshape(-1, 2).to(DT)


POS = _positions()
_D2 = ((POS[:, None] - POS[None]) ** 2).sum(-1)
SIGMA = 0.25 * torch.exp(-_D2 / (2 * 1.5**2)) + 0.25 * 0.01 * torch.eye(N_PIX, dtype=DT)
EYE = torch.eye(N_PIX, dtype=DT)


@functools.lru_cache(maxsize=None)
def blur_matrix(tau: float) -> torch.Tensor:
    """B with ``vec(patch_blur(x, tau)) = B vec(x)``: the blur applied to every basis image."""
    basis = EYE.reshape(N_PIX, 1, H, H)
    cols = reference.patch_blur(basis, torch.full((N_PIX,), float(tau), dtype=DT), S)
    return cols.reshape(N_PIX, N_PIX).T


def relay_noise_cov(alpha: float, normalize: bool) -> torch.Tensor:
    """K = k^2 (I + alpha^2 Kb), Kb[p, q] = max(0, s - dx) max(0, s - dy) / s^2 at wraparound distances."""
    d = (POS[:, None] - POS[None]).abs()
    d = torch.minimum(d, H - d)
    kb = (S - d[..., 0]).clamp(min=0) * (S - d[..., 1]).clamp(min=0) / S**2
    k2 = 1 / (1 + alpha**2) if normalize else 1.0
    return k2 * (EYE + alpha**2 * kb)


def rel_err(c: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.norm(c - target) / torch.linalg.norm(SIGMA))


def rms_sampling_err(c: torch.Tensor, n: int) -> float:
    """rms of ||S_n - C||_F / ||Sigma||_F for S_n the empirical covariance of n draws of N(0, C)."""
    var = c**2 + torch.outer(c.diag(), c.diag())
    return math.sqrt(float(var.sum()) / n) / float(torch.linalg.norm(SIGMA))


def empirical_cov(x: torch.Tensor) -> torch.Tensor:
    """Covariance about the known mean 0 of ``[N, 1, H, W]`` samples."""
    v = x.reshape(x.shape[0], -1)
    return v.T @ v / v.shape[0]


def true_samples(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, N_PIX, generator=g, dtype=DT)
    return (z @ torch.linalg.cholesky(SIGMA).T).reshape(n, 1, H, H)


def check_transport(samples, c_exact, x_true, bias_bound):
    """The two checks of the module docstring; returns the numbers for the failure message."""
    n = samples.shape[0]
    c_emp = empirical_cov(samples)
    rms = rms_sampling_err(SIGMA, n)
    bias = rel_err(c_exact, SIGMA)
    numbers = dict(vs_exact=rel_err(c_emp, c_exact), vs_sigma=rel_err(c_emp, SIGMA), bias=bias, rms=rms,
                   true_samples=rel_err(empirical_cov(x_true), SIGMA))
    assert numbers["true_samples"] <= 1.5 * rms, numbers
    assert bias <= bias_bound, numbers
    assert numbers["vs_exact"] <= 1.5 * rms_sampling_err(c_exact, n), numbers
    assert numbers["vs_sigma"] <= bias + 1.5 * rms, numbers
    return numbers


class LinearDenoiser:
    """``x -> x W(sigma)^T`` with one cached matrix per noise level (looked up by sigma's value)."""

    def __init__(self, make_w):
        self.make_w, self.cache = make_w, {}

    def matrix(self, sigma: float) -> torch.Tensor:
        if sigma not in self.cache:
            self.cache[sigma] = self.make_w(sigma)
        return self.cache[sigma]

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        w = self.matrix(float(sigma[0]))
        return (x.reshape(x.shape[0], -1) @ w.T).reshape(x.shape)


# --- SPEC 8: the relay sampler ---------------------------------------------------------------

L_PATH, SIGMA_B_MAX, ALPHA = 0.93, 3.0, 0.15
RELAY_GRID = schedules.relay_sigmas(200, 0.9, rho=100.0).tolist()  # the imagenet256 grid: 100 steps


def relay_tau(sigma: float) -> float:
    return schedules.tau_from_sigma(sigma, L_PATH, SIGMA_B_MAX) if sigma > 0 else 0.0


def posterior_denoiser(k: torch.Tensor, tau=relay_tau) -> LinearDenoiser:
    """The posterior mean under the relay corruption with noise covariance k and blur time tau(sigma)."""
    def make_w(sigma):
        b = blur_matrix(tau(sigma))
        return SIGMA @ b.T @ torch.linalg.inv(b @ SIGMA @ b.T + sigma**2 * k)
    return LinearDenoiser(make_w)


@functools.lru_cache(maxsize=None)
def relay_denoiser(normalize: bool) -> LinearDenoiser:
    """The posterior mean on this module's path (one per noise normalisation, shared by tests)."""
    return posterior_denoiser(relay_noise_cov(ALPHA, normalize))


def relay_exact_cov(grid, eta, heun, k, den: LinearDenoiser, tau=relay_tau) -> torch.Tensor:
    """Covariance of the discrete relay sampler's output, SPEC 8 in matrix form (``tau``: the
    blur time of a noise level; the default is this module's path).

    Euler: ``x' = g x + (B' - g B) x0 + eta sigma' n``, ``g = sqrt(1 - eta^2) sigma'/sigma``,
    x0 = W x. Heun: x0_eff = x - sigma (d + d')/2, d = (x - W x)/sigma, d' = (x' - W' x')/sigma'
    with the Euler proposal x' (its own noise), then the Euler formula with x0_eff and fresh noise.
    """
    b0 = blur_matrix(tau(grid[0]))
    c = b0 @ SIGMA @ b0.T + grid[0] ** 2 * k
    for sig, sig_n in zip(grid, grid[1:]):
        w = den.matrix(sig)
        if sig_n == 0:
            return w @ c @ w.T
        g = math.sqrt(1 - eta**2) * sig_n / sig
        m = blur_matrix(tau(sig_n)) - g * blur_matrix(tau(sig))
        euler = g * EYE + m @ w
        if not heun:
            c = euler @ c @ euler.T + (eta * sig_n) ** 2 * k
        else:
            e1 = (EYE + w) / 2
            e2 = -(sig / (2 * sig_n)) * (EYE - den.matrix(sig_n))
            a = g * EYE + m @ (e1 + e2 @ euler)
            f = m @ e2
            c = a @ c @ a.T + (eta * sig_n) ** 2 * (f @ k @ f.T + k)
    raise AssertionError("grid must end in 0")


@pytest.mark.parametrize("eta,heun,normalize,bias_bound", [
    # bias bounds: the exact discretisation errors of this 100-step grid are 0.031, 0.013, 0.037,
    # 0.021 (Euler first order; RDM's "Heun" also converges at first order on the blur path)
    (0.0, False, True, 0.04),
    (0.0, True, True, 0.02),
    (0.2, False, False, 0.045),
    (0.2, True, True, 0.03),
])
def test_relay_sampler_transports_gaussian(eta, heun, normalize, bias_bound):
    k = relay_noise_cov(ALPHA, normalize)
    den = relay_denoiser(normalize)
    x_true = true_samples(N_CHAINS, seed=1)
    # start on the path: x_0 = patch_blur(x*, tau_0) + sigma_0 n with relay noise n ~ N(0, K)
    g = torch.Generator().manual_seed(2)
    n0 = torch.randn(N_CHAINS, N_PIX, generator=g, dtype=DT) @ torch.linalg.cholesky(k).T
    x0 = reference.patch_blur(x_true, torch.full((N_CHAINS,), relay_tau(RELAY_GRID[0]), dtype=DT), S)
    x0 = x0 + RELAY_GRID[0] * n0.reshape(x_true.shape)
    out = relay_sample(den, x_start=x0, s=S, sigmas=RELAY_GRID, eta=eta, heun=heun, alpha=ALPHA,
                       normalize=normalize, L=L_PATH, sigma_b_max=SIGMA_B_MAX, seed=torch.Generator().manual_seed(3),
                       dtype=DT)
    assert out.shape == x_true.shape and out.dtype == DT
    check_transport(out, relay_exact_cov(RELAY_GRID, eta, heun, k, den), x_true, bias_bound)


def test_relay_sampler_few_steps_error_grows():
    """With 14 steps (Karras N = 40) the discretisation error is several times the 100-step one."""
    k = relay_noise_cov(ALPHA, True)
    den = relay_denoiser(True)
    short = schedules.relay_sigmas(40, 0.9, rho=7.0).tolist()
    assert len(short) == 15
    assert rel_err(relay_exact_cov(short, 0.0, False, k, den), SIGMA) > 3 * rel_err(
        relay_exact_cov(RELAY_GRID, 0.0, False, k, den), SIGMA)


# --- SPEC 9: the EDM sampler from pure noise -------------------------------------------------

def edm_denoiser() -> LinearDenoiser:
    return LinearDenoiser(lambda sigma: SIGMA @ torch.linalg.inv(SIGMA + sigma**2 * EYE))


def edm_exact_cov(grid, churn_gammas, den: LinearDenoiser, s_noise=1.0) -> torch.Tensor:
    """Karras et al. Algorithm 2 in matrix form: churn to t_hat, Euler, Heun unless t_next = 0."""
    c = grid[0] ** 2 * EYE
    for t, t_n, gam in zip(grid, grid[1:], churn_gammas):
        t_hat = t * (1 + gam)
        c = c + (t_hat**2 - t**2) * s_noise**2 * EYE
        drift = (EYE - den.matrix(t_hat)) / t_hat  # d = drift x_hat
        euler = EYE + (t_n - t_hat) * drift
        if t_n > 0:
            heun_d = (EYE - den.matrix(t_n)) / t_n @ euler
            step = EYE + (t_n - t_hat) * (drift + heun_d) / 2
        else:
            step = euler
        c = step @ c @ step.T
    return c


@pytest.mark.parametrize("num_steps,churn,bias_bound", [
    # exact discretisation errors (second order: 0.084, 0.024, 0.0053, 0.0011 at 18, 32, 64, 128 steps)
    (64, 0.0, 0.01),    # deterministic Heun: 0.0053
    (64, 10.0, 0.025),  # stochastic, S_churn = 10 at every level: 0.0169
])
def test_edm_sampler_transports_gaussian(num_steps, churn, bias_bound):
    den = edm_denoiser()
    gen = torch.Generator().manual_seed(4) if churn else 4  # churn draws noise every step: torch's RNG is faster
    out = edm_sample(den, (N_CHAINS, 1, H, H), num_steps=num_steps, S_churn=churn, seed=gen, dtype=DT)
    grid = schedules.karras_sigmas(num_steps, 0.002, 80.0, 7.0).tolist() + [0.0]
    gammas = [min(churn / num_steps, math.sqrt(2) - 1)] * num_steps
    check_transport(out, edm_exact_cov(grid, gammas, den), true_samples(N_CHAINS, seed=5), bias_bound)


def edm_sde_exact_cov(grid, den: LinearDenoiser, sde_scale: float) -> torch.Tensor:
    """The SDE variant in matrix form: from t to t', the deterministic part lands at noise
    a = sqrt(t'^2 - g^2), g = sde_scale t', and g n adds fresh noise, in the Euler step and again
    in the Heun step (whose slope d' is taken at the noisy Euler state)."""
    c = grid[0] ** 2 * EYE
    for t, t_n in zip(grid, grid[1:]):
        g = sde_scale * t_n
        h = math.sqrt(t_n**2 - g**2) - t
        drift = (EYE - den.matrix(t)) / t
        euler = EYE + h * drift
        if t_n > 0:
            d_n = (EYE - den.matrix(t_n)) / t_n
            step = EYE + h * (drift + d_n @ euler) / 2
            # x' = step x + (h/2) d_n g n1 + g n2
            c = step @ c @ step.T + (h / 2) ** 2 * g**2 * d_n @ d_n.T + g**2 * EYE
        else:
            c = euler @ c @ euler.T
    return c


def test_edm_sde_sampler_transports_gaussian():
    """sde_scale (the authors' CelebA-HQ base sampler, 0.05) against its exact discrete covariance."""
    den = edm_denoiser()
    out = edm_sample(den, (N_CHAINS, 1, H, H), num_steps=64, sde_scale=0.05, seed=torch.Generator().manual_seed(6),
                     dtype=DT)
    grid = schedules.karras_sigmas(64, 0.002, 80.0, 7.0).tolist() + [0.0]
    check_transport(out, edm_sde_exact_cov(grid, den, 0.05), true_samples(N_CHAINS, seed=7), 0.02)


# --- SPEC 10: the latent linear relay along its own path -------------------------------------

T_RELAY = 50.0


def pool_matrix() -> torch.Tensor:
    """Q: 8x8 -> 4x4 by 2x2 average pooling, as a [16, 64] matrix."""
    basis = EYE.reshape(N_PIX, 1, H, H)
    return torch.nn.functional.avg_pool2d(basis, 2).reshape(N_PIX, -1).T


def test_linear_relay_sampler_transports_gaussian():
    """z_L = nearest_upsample(avgpool(z0)) = P z0; the path z_t = A_t(z0) + sigma_t eps. The
    optimal denoiser sees z_t and (through its conditioning) the low-resolution a = Q z0:
    ``E[z0 | z_t, a] = Sigma H^T (H Sigma H^T + R)^-1 [z_t; a]`` with H = [M_t; Q],
    R = diag(sigma_t^2 I, 0), M_t = (1 - t/T) I + (t/T) P."""
    q = pool_matrix()
    up = q.T * 4  # nearest upsampling 4x4 -> 8x8: each low-res pixel to its 2x2 block
    p = up @ q
    grid = schedules.karras_sigmas(50, 0.01, 1.0, 7.0).tolist() + [0.0]
    ts = torch.linspace(T_RELAY, 0.0, len(grid), dtype=DT).tolist()
    t_of = dict(zip(grid, ts))

    def weights(sigma):
        w_t = t_of[sigma] / T_RELAY
        m = (1 - w_t) * EYE + w_t * p
        h = torch.cat([m, q])
        r = torch.zeros(h.shape[0], h.shape[0], dtype=DT)
        r[:N_PIX, :N_PIX] = sigma**2 * EYE
        full = SIGMA @ h.T @ torch.linalg.inv(h @ SIGMA @ h.T + r)
        return full[:, :N_PIX], full[:, N_PIX:], m  # W_z, W_a, M_t

    cache = {v: weights(v) for v in grid[:-1]}
    x_true = true_samples(N_CHAINS, seed=6)
    a = x_true.reshape(N_CHAINS, -1) @ q.T

    def denoiser(z, sigma):
        w_z, w_a, _ = cache[float(sigma[0])]
        return (z.reshape(z.shape[0], -1) @ w_z.T + a @ w_a.T).reshape(z.shape)

    z_lr = (a @ up.T).reshape(x_true.shape)
    out = linear_relay_sample(denoiser, z_lr, t_relay=T_RELAY, sigmas=grid, seed=torch.Generator().manual_seed(7),
                              dtype=DT)

    # exact: z = F z0 + e with cov(e) = Ce; z' = (M' - r M)(W_z z + W_a Q z0) + r z, r = sigma'/sigma
    f, ce = p.clone(), grid[0] ** 2 * EYE
    for i, (sig, sig_n) in enumerate(zip(grid, grid[1:])):
        w_z, w_a, m = cache[sig]
        if sig_n == 0:
            f_out = w_z @ f + w_a @ q
            c_exact = f_out @ SIGMA @ f_out.T + w_z @ ce @ w_z.T
            break
        r = sig_n / sig
        m_n = cache[sig_n][2]
        f = (m_n - r * m) @ (w_z @ f + w_a @ q) + r * f
        g = (m_n - r * m) @ w_z + r * EYE
        ce = g @ ce @ g.T
    # bias bound: the exact discretisation error of this 50-step grid is 0.0053
    check_transport(out, c_exact, x_true, 0.015)
