"""The relay sampler update (SPEC 8) and the latent linear relay (SPEC 10)."""
import math

import numpy as np
import pytest
import torch

import relayops
import scipy_reference as ref
from relayops import schedules

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in relayops.available_backends()]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def path_point(x_star, z, sigma, L=0.93, sigma_b_max=3.0):
    tau = schedules.tau_from_sigma(sigma, L, sigma_b_max)
    return relayops.patch_blur(x_star, tau, backend="reference") + sigma * z


def test_invariant_single_step(backend):
    x_star = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    z = torch.randn_like(x_star)
    sigma, sigma_next = 0.8, 0.3
    tau, tau_next = schedules.tau_from_sigma(sigma), schedules.tau_from_sigma(sigma_next)
    out = relayops.relay_step(path_point(x_star, z, sigma), x_star, sigma, sigma_next, tau, tau_next,
                              eta=0.0, backend=backend)
    torch.testing.assert_close(out, path_point(x_star, z, sigma_next), atol=1e-12, rtol=0)


@pytest.mark.parametrize("heun,sbm", [(False, 2.0), (False, 0.0), (True, 0.0)])
def test_invariant_whole_chain_ends_at_x_star(backend, heun, sbm):
    """eta = 0, a denoiser that always returns x*: every state stays on the path, same z.

    The Heun correction's d = (x - x0_hat)/sigma ignores the blur, so with a changing blur it
    leaves the path (by design of SPEC 8); without blur (sigma_B_max = 0) it stays on it exactly.
    """
    x_star = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    z = torch.randn_like(x_star)
    sigmas = schedules.celebahq256.sigmas().tolist()
    L = 1.05
    x = path_point(x_star, z, sigmas[0], L, sbm)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sigma_next == 0:
            x = x_star  # the last step returns the denoiser's output
            break
        tau, tau_next = schedules.tau_from_sigma(sigma, L, sbm), schedules.tau_from_sigma(sigma_next, L, sbm)
        step = dict(eta=0.0, backend=backend)
        x_new = relayops.relay_step(x, x_star, sigma, sigma_next, tau, tau_next, **step)
        if heun:
            x_new = relayops.relay_step(x, x_star, sigma, sigma_next, tau, tau_next, x_prop=x_new,
                                        x0_hat_prop=x_star, **step)
        x = x_new
        torch.testing.assert_close(x, path_point(x_star, z, sigma_next, L, sbm), atol=1e-10, rtol=0)
    assert torch.equal(x, x_star)


def euler_dct_domain(x, x0, sigma, sigma_next, tau, tau_next, eta, noise, s=4):
    """SPEC 8's second line, with SciPy DCTs: patch_idct((D' + g(1-D)) U + sigma (g D - D') d) + eta s' n."""
    u, u0 = ref.patch_dct(x, s), ref.patch_dct(x0, s)
    out = np.empty_like(u)
    for b in range(x.shape[0]):
        g = math.sqrt(1 - eta**2) * sigma_next[b] / sigma[b]
        dd, dn = ref.response(tau[b], s), ref.response(tau_next[b], s)
        tile = lambda m: np.tile(m, (x.shape[2] // s, x.shape[3] // s))  # noqa: E731
        d = (u[b] - u0[b]) / sigma[b]
        out[b] = (tile(dn + g * (1 - dd)) * u[b] + sigma[b] * tile(g * dd - dn) * d)
    return ref.patch_idct(out, s) + eta * np.asarray(sigma_next)[:, None, None, None] * noise


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.9])
def test_euler_matches_dct_domain_form(backend, eta):
    x, x0 = torch.randn(3, 2, 8, 12, dtype=torch.float64), torch.randn(3, 2, 8, 12, dtype=torch.float64)
    eps, eps2 = torch.randn_like(x), torch.randn_like(x)
    sigma = torch.tensor([2.0, 0.5, 0.05], dtype=torch.float64)
    sigma_next = torch.tensor([1.5, 0.2, 0.01], dtype=torch.float64)
    tau, tau_next = schedules.tau_from_sigma(sigma), schedules.tau_from_sigma(sigma_next)
    out = relayops.relay_step(x, x0, sigma, sigma_next, tau, tau_next, eta=eta, eps=eps, eps2=eps2,
                              backend=backend)
    noise = (eps.numpy() + 0.15 * ref.block_noise(eps2.numpy(), 4)) / math.sqrt(1 + 0.15**2)
    expected = euler_dct_domain(x.numpy(), x0.numpy(), sigma.numpy(), sigma_next.numpy(), tau.numpy(),
                                tau_next.numpy(), eta, noise)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-11)


def test_heun_matches_direct_computation(backend):
    shape = (2, 3, 8, 8)
    x, x0, xp, x0p = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    eps, eps2 = torch.randn_like(x), torch.randn_like(x)
    sigma, sigma_next = torch.tensor([1.2, 0.4], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    tau, tau_next = schedules.tau_from_sigma(sigma), schedules.tau_from_sigma(sigma_next)
    out = relayops.relay_step(x, x0, sigma, sigma_next, tau, tau_next, eta=0.2, eps=eps, eps2=eps2,
                              x_prop=xp, x0_hat_prop=x0p, backend=backend)
    sig, sig_n = sigma.numpy()[:, None, None, None], sigma_next.numpy()[:, None, None, None]
    d = (x.numpy() - x0.numpy()) / sig
    d_prop = (xp.numpy() - x0p.numpy()) / sig_n
    x0_eff = x.numpy() - sig * (d + d_prop) / 2
    noise = (eps.numpy() + 0.15 * ref.block_noise(eps2.numpy(), 4)) / math.sqrt(1 + 0.15**2)
    expected = euler_dct_domain(x.numpy(), x0_eff, sigma.numpy(), sigma_next.numpy(), tau.numpy(),
                                tau_next.numpy(), 0.2, noise)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-11)


def test_seeded_step_noise_is_relay_noise(backend):
    x, x0 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    args = (x, x0, 1.0, 0.5, 0.2, 0.1)
    seeded = relayops.relay_step(*args, eta=0.5, seed=11, offset=4, backend=backend)
    n = relayops.relay_noise(x, seed=11, offset=4, backend=backend)
    eps, eps2 = relayops.reference.draw_normals(x, 11, 4)
    given = relayops.relay_step(*args, eta=0.5, eps=eps, eps2=eps2, backend=backend)
    torch.testing.assert_close(seeded, given, atol=1e-12, rtol=0)
    no_noise = relayops.relay_step(*args, eta=0.5, eps=torch.zeros_like(x), eps2=torch.zeros_like(x), backend=backend)
    torch.testing.assert_close(seeded - no_noise, 0.5 * 0.5 * n, atol=1e-12, rtol=0)


def test_linear_relay_blur_and_step():
    z0, zl, z = (torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3.0, 10.0], dtype=torch.float64)
    a = relayops.linear_relay_blur(z0, zl, t, 10)
    w = (t / 10).view(-1, 1, 1, 1)
    torch.testing.assert_close(a, (1 - w) * z0 + w * zl, atol=1e-14, rtol=0)
    torch.testing.assert_close(relayops.linear_relay_blur(z0, zl, 0.0, 10), z0, atol=0, rtol=0)
    torch.testing.assert_close(relayops.linear_relay_blur(z0, zl, 10.0, 10), zl, atol=0, rtol=0)
    sigma, sigma_next = torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.6, 0.2], dtype=torch.float64)
    out = relayops.linear_relay_step(z, z0, zl, t, t - 1, 10, sigma, sigma_next)
    w_next = ((t - 1) / 10).view(-1, 1, 1, 1)
    ratio = (sigma_next / sigma).view(-1, 1, 1, 1)
    expected = (1 - w_next) * z0 + w_next * zl + ratio * (z - ((1 - w) * z0 + w * zl))
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=0)
    # on the path z_t = A_t(z*) + sigma_t e with z0_hat = z* the step lands on the path at t - 1
    e = torch.randn_like(z)
    zt = relayops.linear_relay_blur(z0, zl, t, 10) + sigma.view(-1, 1, 1, 1) * e
    nxt = relayops.linear_relay_step(zt, z0, zl, t, t - 1, 10, sigma, sigma_next)
    torch.testing.assert_close(nxt, relayops.linear_relay_blur(z0, zl, t - 1, 10) + sigma_next.view(-1, 1, 1, 1) * e,
                               atol=1e-13, rtol=0)
