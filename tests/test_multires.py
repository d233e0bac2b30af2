"""SPEC 11: multiscale loss and MDM joint noising against direct computations (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relayops.multires import (avgpool_to, mdm_alpha_sigma, mdm_loss, mdm_noising, multiscale_loss,
                               multiscale_resolutions)

DT = torch.float64


def block_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Direct avgpool to r x r: reshape into (d/r) x (d/r) blocks and average them."""
    b, c, d, _ = a.shape
    k = d // r
    return a.reshape(b, c, r, k, r, k).mean(axis=(3, 5))


def direct_logsnr(t: float, r: int, reference: int = 64) -> float:
    """SPEC 11 by hand: -2 ln tan(pi t / 2), clipped to [-15, 15], plus 2 ln(reference / r)."""
    return min(15.0, max(-15.0, -2 * math.log(math.tan(math.pi * t / 2)))) + 2 * math.log(reference / r)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_resolutions():
    assert multiscale_resolutions(256) == [32, 64, 128, 256]
    assert multiscale_resolutions(32) == [32] and multiscale_resolutions(16) == [16]
    with pytest.raises(ValueError, match="2\\^k"):
        multiscale_resolutions(96)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_multiscale_loss_matches_direct_sum(d):
    eps, eps_hat = _rand(3, 2, d, d, seed=1), _rand(3, 2, d, d, seed=2)
    e, eh = eps.numpy(), eps_hat.numpy()
    rs = [d] if d <= 32 else [r for r in (32, 64, 128) if r <= d]
    per_sample = sum(((block_mean(e, r) - block_mean(eh, r)) ** 2).reshape(3, -1).mean(1) / r for r in rs)
    np.testing.assert_allclose(multiscale_loss(eps_hat, eps, reduction="none").numpy(), per_sample, rtol=1e-12)
    np.testing.assert_allclose(float(multiscale_loss(eps_hat, eps)), per_sample.mean(), rtol=1e-12)


def test_multiscale_loss_gradient():
    eps = _rand(2, 1, 64, 64, seed=3)
    eps_hat = _rand(2, 1, 64, 64, seed=4).requires_grad_()
    multiscale_loss(eps_hat, eps).backward()
    # d/d eps_hat of (1/r) mean over B r^2 of (pooled diff)^2, with k x k blocks (k = 64/r): every
    # pixel gets (1/r) 2 (its block's pooled diff) / (B r^2) / k^2, summed over r = 32, 64 (B = 2)
    diff = (eps_hat - eps).detach().numpy()
    grad = np.zeros_like(diff)
    for r in (32, 64):
        k = 64 // r
        spread = np.repeat(np.repeat(block_mean(diff, r), k, 2), k, 3)
        grad += spread * 2 / (r * 2 * r * r * k * k)
    np.testing.assert_allclose(eps_hat.grad.numpy(), grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("schedule", ["cosine", "shifted", "interpolated"])
def test_alpha_sigma_direct(schedule):
    for t in (0.05, 0.3, 0.5, 0.9):
        for r in (32, 64, 256):
            if schedule == "cosine":
                lam = direct_logsnr(t, 64)
            elif schedule == "shifted":
                lam = direct_logsnr(t, r)
            else:  # t * shift to 256 + (1 - t) * shift to 32
                lam = t * direct_logsnr(t, r, 256) + (1 - t) * direct_logsnr(t, r, 32)
            a, s = mdm_alpha_sigma(torch.tensor([t], dtype=DT), r, schedule)
            assert math.isclose(float(a) ** 2, 1 / (1 + math.exp(-lam)), rel_tol=1e-12)
            assert math.isclose(float(s) ** 2, 1 / (1 + math.exp(lam)), rel_tol=1e-12)


def test_mdm_noising_and_loss_direct():
    x = _rand(2, 3, 64, 64, seed=5)
    t = torch.tensor([0.2, 0.7], dtype=DT)
    res = [16, 64, 32]
    eps = [_rand(2, 3, r, r, seed=10 + r) for r in sorted(res)]
    out = mdm_noising(x, t, res, eps=eps)
    assert out.resolutions == [16, 32, 64]
    for k, r in enumerate(out.resolutions):
        target = block_mean(x.numpy(), r)
        np.testing.assert_allclose(out.target[k].numpy(), target, rtol=1e-12, atol=1e-15)
        for b in range(2):
            lam = direct_logsnr(float(t[b]), r)
            a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
            np.testing.assert_allclose(out.z[k][b].numpy(), a * target[b] + s * eps[k][b].numpy(), rtol=1e-12,
                                       atol=1e-14)
    # higher resolutions are noisier at the same t (the shift lowers their log-SNR)
    assert bool((out.sigma[2] > out.sigma[1]).all() and (out.sigma[1] > out.sigma[0]).all())
    x_hats = [tg + 0.1 * (k + 1) for k, tg in enumerate(out.target)]
    w = [0.5, 1.0, 2.0]
    expected = sum(wk * (0.1 * (k + 1)) ** 2 for k, wk in enumerate(w))
    np.testing.assert_allclose(mdm_loss(x_hats, out, w, reduction="none").numpy(), [expected] * 2, rtol=1e-12)
    assert math.isclose(float(mdm_loss(x_hats, out)), sum((0.1 * (k + 1)) ** 2 for k in range(3)), rel_tol=1e-12)


def test_mdm_noising_draws_and_validates():
    x = _rand(2, 1, 32, 32, seed=6)
    t = torch.tensor([0.5, 0.5], dtype=DT)
    a = mdm_noising(x, t, [8, 32], generator=torch.Generator().manual_seed(1))
    b = mdm_noising(x, t, [8, 32], generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.z, b.z))
    assert a.z[0].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        mdm_noising(x, t, [12])
    with pytest.raises(ValueError, match="square"):
        avgpool_to(torch.zeros(1, 1, 4, 8), 2)
    with pytest.raises(ValueError, match="one prediction per resolution"):
        mdm_loss([a.target[0]], a)
