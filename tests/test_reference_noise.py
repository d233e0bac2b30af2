"""Block noise, relay noise and Philox (SPEC 3, 4) against rolls, statistics and known answers."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import relayops
import scipy_reference as ref
from relayops.reference.philox import box_muller, philox4x32

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in relayops.available_backends()]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


# Known-answer vectors of Philox4x32-10 from the Random123 suite: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in out) == expected


def test_box_muller_is_standard_normal():
    w = torch.randint(0, 2**32, (4, 200_000), dtype=torch.int64)
    z = box_muller(w[0], w[1]).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # extreme words stay finite: u1 = 2^-24 is the smallest uniform
    edge = box_muller(torch.tensor([0, 2**32 - 1]), torch.tensor([0, 0]))
    np.testing.assert_allclose(edge.numpy(), [math.sqrt(-2 * math.log(2.0**-24)), 0.0], atol=1e-12)


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_block_noise_matches_roll_sum(backend, s):
    g = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    np.testing.assert_allclose(relayops.block_noise(g, s, backend=backend).numpy(),
                               ref.block_noise(g.numpy(), s), atol=1e-12)


def test_block_noise_float32_and_channels_last(backend):
    g = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    out = relayops.block_noise(g.float().to(memory_format=torch.channels_last), 4, backend=backend)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref.block_noise(g.float().double().numpy(), 4), atol=1e-5)


def block_cov(dx, dy, s):
    return max(0, s - abs(dx)) * max(0, s - abs(dy)) / s**2


def sample_cov(n: torch.Tensor, dx: int, dy: int) -> float:
    """Mean of n[x] n[x + (dx, dy)] over all positions (wraparound), n zero-mean."""
    return float((n * torch.roll(n, shifts=(-dx, -dy), dims=(2, 3))).mean())


@pytest.mark.parametrize("normalize", [True, False])
def test_relay_noise_statistics(backend, normalize):
    s, alpha = 4, 0.5
    like = torch.empty(16, 4, 64, 64, dtype=torch.float64)
    n = relayops.relay_noise(like, s, alpha, normalize=normalize, seed=1234, backend=backend)
    k2 = 1 / (1 + alpha**2) if normalize else 1.0
    count = n.numel()
    se_mean = math.sqrt(k2 * (1 + alpha**2) * 16 / count)  # block correlation inflates it
    assert abs(float(n.mean())) < 5 * se_mean
    for dx, dy in [(0, 0), (1, 0), (0, 2), (3, 3), (2, -1), (4, 0), (5, 1)]:
        expected = k2 * ((dx == 0 and dy == 0) + alpha**2 * block_cov(dx, dy, s))
        se = 2 * k2 * (1 + alpha**2) / math.sqrt(count)  # var of a product, generously bounded
        assert abs(sample_cov(n, dx, dy) - expected) < 5 * se + 1e-4, (dx, dy)


def test_block_noise_covariance_across_the_edge(backend):
    s = 4
    g = torch.randn(256, 8, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    n = relayops.block_noise(g, s, backend=backend)
    assert abs(float(n.var()) - 1.0) < 0.03
    last_row, first_row = n[:, :, -1, :], n[:, :, 0, :]
    for dy in (0, 1, 3):
        est = float((last_row * torch.roll(first_row, -dy, dims=-1)).mean())
        se = 1.5 / math.sqrt(last_row.numel())
        assert abs(est - block_cov(1, dy, s)) < 5 * se, dy
    # beyond s - 1 rows apart (wrapping) the covariance is zero
    est = float((n[:, :, -2, :] * n[:, :, 2, :]).mean())
    assert abs(est) < 5 * 1.5 / math.sqrt(last_row.numel())


def test_relay_noise_from_given_normals(backend):
    eps = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eps2 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    alpha = 0.15
    expected = (eps.numpy() + alpha * ref.block_noise(eps2.numpy(), 4)) / math.sqrt(1 + alpha**2)
    n = relayops.relay_noise(eps, 4, alpha, eps=eps, eps2=eps2, backend=backend)
    np.testing.assert_allclose(n.numpy(), expected, atol=1e-12)
    n_raw = relayops.relay_noise(eps, 4, alpha, normalize=False, eps=eps, eps2=eps2, backend=backend)
    np.testing.assert_allclose(n_raw.numpy(), expected * math.sqrt(1 + alpha**2), atol=1e-12)


def test_seeded_noise_is_a_pure_function(backend):
    like = torch.empty(2, 3, 8, 8)
    a = relayops.relay_noise(like, seed=5, offset=3, backend=backend)
    assert torch.equal(a, relayops.relay_noise(like, seed=5, offset=3, backend=backend))
    assert not torch.allclose(a, relayops.relay_noise(like, seed=5, offset=4, backend=backend))
    assert not torch.allclose(a, relayops.relay_noise(like, seed=6, offset=3, backend=backend))
    # the seeded draw is SPEC 3's combination of the layout's two normal streams
    eps, eps2 = relayops.reference.draw_normals(like, 5, 3)
    np.testing.assert_allclose(a.double().numpy(),
                               ((eps + 0.15 * torch.from_numpy(ref.block_noise(eps2.double().numpy(), 4)))
                                / math.sqrt(1 + 0.15**2)).numpy(), atol=1e-5)


def test_philox_layout_written_in_the_docs():
    """Element e of a [B,C,H,W] draw uses counter (e lo, e hi, offset lo, offset hi), key = seed."""
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    like = torch.empty(1, 2, 4, 4, dtype=torch.float64)
    eps, eps2 = relayops.reference.draw_normals(like, seed, offset)
    e = 21  # (b=0, c=1, h=1, w=1)
    words = philox4x32((torch.tensor([e]), torch.tensor([0]), torch.tensor([offset & 0xFFFFFFFF]),
                        torch.tensor([offset >> 32])), (seed & 0xFFFFFFFF, seed >> 32))

    def box_muller(radius_word, angle_word):
        u = ((int(radius_word) >> 8) + 1) * 2.0**-24
        return math.sqrt(-2 * math.log(u)) * math.cos(2 * math.pi * (int(angle_word) >> 8) * 2.0**-24)

    z0, z1 = box_muller(words[0], words[1]), box_muller(words[2], words[3])
    assert abs(float(eps[0, 1, 1, 1]) - z0) < 1e-12
    assert abs(float(eps2[0, 1, 1, 1]) - z1) < 1e-12


def test_relay_corrupt_is_blur_plus_scaled_noise(backend):
    y = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    eps, eps2 = torch.randn_like(y), torch.randn_like(y)
    sigma = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    tau = torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64)
    out = relayops.relay_corrupt(y, sigma, tau, eps=eps, eps2=eps2, backend=backend)
    noise = (eps.numpy() + 0.15 * ref.block_noise(eps2.numpy(), 4)) / math.sqrt(1 + 0.15**2)
    expected = ref.patch_blur(y.numpy(), tau.numpy(), 4) + sigma.numpy()[:, None, None, None] * noise
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)
    seeded = relayops.relay_corrupt(y, sigma, tau, seed=9, offset=2, backend=backend)
    n = relayops.relay_noise(y, seed=9, offset=2, backend=backend)
    np.testing.assert_allclose(seeded.numpy(), ref.patch_blur(y.numpy(), tau.numpy(), 4)
                               + sigma.numpy()[:, None, None, None] * n.numpy(), atol=1e-12)
