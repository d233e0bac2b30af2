"""Schedules (SPEC 5, 6, 7, 11) against SciPy and closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from relayops import schedules


def test_sigma_u_roundtrip_against_scipy():
    u = np.linspace(0.01, 1.0, 50)
    for L in (0.93, 0.89, 1.05):
        expected = np.exp(-1.2 + 1.2 * stats.norm.ppf(np.minimum(u * L, 1 - 1e-16)))
        if L > 1:
            u = np.linspace(0.01, 0.95, 50)
            expected = np.exp(-1.2 + 1.2 * stats.norm.ppf(u * L))
        got = schedules.sigma_from_u(torch.tensor(u), L)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
        back = schedules.u_from_sigma(got, L)
        np.testing.assert_allclose(back.numpy(), u, rtol=1e-10)
        np.testing.assert_allclose(back.numpy(), stats.norm.cdf((np.log(expected) + 1.2) / 1.2) / L, rtol=1e-10)


def test_scalars_give_floats_and_tensors_keep_dtype():
    assert isinstance(schedules.sigma_from_u(0.5), float)
    assert abs(schedules.sigma_from_u(0.5, L=1.0) - math.exp(-1.2)) < 1e-14
    t32 = schedules.u_from_sigma(torch.tensor([0.5, 1.0], dtype=torch.float32))
    assert t32.dtype == torch.float32 and t32.shape == (2,)


def test_tau_closed_form():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    np.testing.assert_allclose(schedules.tau_from_u(u, 3.0).numpy(),
                               (3.0 * np.sin(np.pi * u.numpy() / 2) ** 2) ** 2 / 2, rtol=1e-14)
    assert schedules.tau_from_u(0.0) == 0.0
    assert abs(schedules.tau_from_u(1.0, 2.0) - 2.0) < 1e-14  # sigma_B = 2 at u = 1, tau = 2^2 / 2
    sigma = 0.5
    assert abs(schedules.tau_from_sigma(sigma, 0.93, 3.0)
               - schedules.tau_from_u(stats.norm.cdf((math.log(sigma) + 1.2) / 1.2) / 0.93, 3.0)) < 1e-12


def test_karras_grid_and_relay_truncation():
    g = schedules.karras_sigmas(18, 0.002, 80.0, 7.0)
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-13)
    assert abs(float(g[0]) - 80) < 1e-12 and abs(float(g[-1]) - 0.002) < 1e-15
    # the authors' presets keep 100 (ImageNet) and 54 (CelebA-HQ) levels, then 0
    inet, celeb = schedules.imagenet256.sigmas(), schedules.celebahq256.sigmas()
    assert len(inet) == 101 and len(celeb) == 55
    assert float(inet[-1]) == 0.0 and float(inet[:-1].max()) < 0.9 and float(celeb[:-1].max()) < 0.95
    assert torch.all(inet[:-1][1:] < inet[:-1][:-1])


def test_edm_precond_and_weight():
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = schedules.edm_precond(sigma)
    s, sd = sigma.numpy(), 0.5
    np.testing.assert_allclose(c_skip.numpy(), sd**2 / (s**2 + sd**2), rtol=1e-14)
    np.testing.assert_allclose(c_out.numpy(), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-14)
    np.testing.assert_allclose(c_in.numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-14)
    np.testing.assert_allclose(c_noise.numpy(), np.log(s) / 4, rtol=1e-14)
    # EDM's design: unit-variance network input and effective training target, weight = 1/c_out^2
    np.testing.assert_allclose(schedules.edm_loss_weight(sigma).numpy(), 1 / c_out.numpy() ** 2, rtol=1e-12)
    np.testing.assert_allclose((c_in**2 * (sd**2 + sigma**2)).numpy(), 1.0, rtol=1e-14)


def test_relay_u_min():
    u = schedules.relay_u_min(0.93)
    assert abs(u - stats.norm.cdf((math.log(0.0075) + 1.2) / 1.2) / 0.93) < 1e-14
    assert abs(schedules.sigma_from_u(u, 0.93) - 0.0075) < 1e-12


def test_logsnr_schedules():
    t = torch.linspace(0.01, 0.99, 25, dtype=torch.float64)
    tn = t.numpy()
    cos = -2 * np.log(np.tan(np.pi * tn / 2))
    np.testing.assert_allclose(schedules.logsnr_cosine(t).numpy(), np.clip(cos, -15, 15), rtol=1e-13)
    assert float(schedules.logsnr_cosine(torch.tensor(0.0))) == 15.0
    assert float(schedules.logsnr_cosine(torch.tensor(1.0))) == -15.0
    shifted = schedules.logsnr_shifted(t, 256, 64)
    np.testing.assert_allclose(shifted.numpy(), np.clip(cos, -15, 15) + 2 * np.log(64 / 256), rtol=1e-13)
    interp = schedules.logsnr_interpolated(t, 512, 256, 32)
    hi = np.clip(cos, -15, 15) + 2 * np.log(256 / 512)
    lo = np.clip(cos, -15, 15) + 2 * np.log(32 / 512)
    np.testing.assert_allclose(interp.numpy(), tn * hi + (1 - tn) * lo, rtol=1e-13)


def test_alpha_sigma_and_v_prediction():
    logsnr = torch.tensor([-10.0, -1.0, 0.0, 2.5, 14.0], dtype=torch.float64)
    alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
    np.testing.assert_allclose((alpha**2 + sigma**2).numpy(), 1.0, rtol=1e-14)
    np.testing.assert_allclose(np.log(alpha.numpy() ** 2 / sigma.numpy() ** 2), logsnr.numpy(), atol=1e-9)
    x, eps = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    a, s = alpha[:, None], sigma[:, None]
    z = a * x + s * eps
    v = schedules.v_from_eps(x, eps, a, s)
    torch.testing.assert_close(schedules.x_from_v(z, v, a, s), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(schedules.eps_from_v(z, v, a, s), eps, atol=1e-12, rtol=0)


def test_presets():
    p = schedules.get_preset("celebahq256")
    assert (p.L_train, p.L_sample, p.sigma_b_max, p.num_grid, p.rho, p.sigma_trunc, p.normalize) == \
        (0.89, 1.05, 2.0, 150, 7.0, 0.95, False)
    assert schedules.get_preset(schedules.imagenet256) is schedules.imagenet256
    with pytest.raises(ValueError, match="unknown preset"):
        schedules.get_preset("ffhq")


@pytest.mark.parametrize("bad", [dict(n=1), dict(sigma_min=0.0), dict(rho=0.0)])
def test_karras_rejects_bad_arguments(bad):
    args = dict(n=10, sigma_min=0.002, sigma_max=80.0, rho=7.0) | bad
    with pytest.raises(ValueError):
        schedules.karras_sigmas(**args)
