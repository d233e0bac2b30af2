"""Block noise, relay noise and Philox (SPEC 3, 4) against rolls, statistics and known answers."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import relayops
import scipy_reference as ref
from relayops.reference.philox import box_muller, philox4x32

MASK = 0xFFFFFFFF
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
    # the tests' independent NumPy Philox (the yardstick of the layout tests below) too
    assert tuple(int(w[0]) for w in ref.philox4x32_10([[c] for c in counter], key)) == expected


def test_box_muller_is_standard_normal():
    w = torch.randint(0, 2**32, (4, 200_000), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    z_cos, z_sin = (z.numpy() for z in box_muller(w[0], w[1]))
    for z in (z_cos, z_sin):
        assert stats.kstest(z, "norm").pvalue > 1e-3
    # the partners are independent: uncorrelated, and so are their squares (which the common
    # radius would correlate if the angle were not uniform)
    n = len(z_cos)
    assert abs(np.corrcoef(z_cos, z_sin)[0, 1]) < 5 / math.sqrt(n)
    assert abs(np.corrcoef(z_cos**2, z_sin**2)[0, 1]) < 5 / math.sqrt(n)
    # the same words through the independent float64 formula
    want_cos, want_sin = ref.box_muller_pair(w[0].numpy(), w[1].numpy())
    np.testing.assert_allclose(z_cos, want_cos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(z_sin, want_sin, rtol=0, atol=1e-12)
    # extreme words stay finite: u1 = 2^-24 is the smallest uniform; u2 = 0, 1/4 give the axes
    r = math.sqrt(-2 * math.log(2.0**-24))
    edge_cos, edge_sin = box_muller(torch.tensor([0, 2**32 - 1, 0]), torch.tensor([0, 0, 2**30]))
    np.testing.assert_allclose(edge_cos.numpy(), [r, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(edge_sin.numpy(), [0.0, 0.0, r], atol=1e-12)


# Shapes and seeds for the layout: an odd width (pairs straddle rows, planes and samples), s = 3,
# W = 9; per-sample seeds with an odd number of elements per sample (3 * 3 * 9 = 81: the last
# pair's second normal is unused), seeds and offsets with high words set.
LAYOUT_CASES = [
    ((2, 3, 3, 9), 0x0123456789ABCDEF, 0xFEDCBA9876543210, None),
    ((2, 3, 3, 9), None, 2**32 + 5, [7, 2**64 - 2]),
    ((3, 1, 5, 5), None, 0, [1, 2, 3]),
    ((1, 2, 4, 8), 2**64 - 1, 1, None),
    ((1, 1, 1, 1), 42, 2**63, None),
]


@pytest.mark.parametrize("shape, seed, offset, seeds", LAYOUT_CASES)
def test_reference_draws_the_pair_layout(shape, seed, offset, seeds):
    """draw_normals against the tests' own element-by-element NumPy Philox and float64 Box-Muller."""
    like = torch.empty(shape, dtype=torch.float64)
    seeds_t = None if seeds is None else torch.tensor([v - 2**64 if v >= 2**63 else v for v in seeds])
    eps, eps2 = relayops.reference.draw_normals(like, seed or 0, offset, seeds_t)
    want, want2 = ref.philox_normals(shape, seed, offset, seeds)
    np.testing.assert_allclose(eps.numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eps2.numpy(), want2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape, seed, offset, seeds", LAYOUT_CASES)
def test_seeded_noise_draws_the_pair_layout(backend, shape, seed, offset, seeds, dtype, tol):
    """Each backend's seeded eps (relay_noise with alpha = 0, k = 1) and eps + eps2 (alpha = 1,
    s = 1: block_noise(g, 1) = g) against the tests' own NumPy Philox and float64 Box-Muller."""
    like = torch.empty(shape, dtype=dtype)
    want, want2 = ref.philox_normals(shape, seed, offset, seeds)
    key = seeds if seeds is not None else seed
    eps = relayops.relay_noise(like, 1, 0.0, normalize=False, seed=key, offset=offset, backend=backend)
    both = relayops.relay_noise(like, 1, 1.0, normalize=False, seed=key, offset=offset, backend=backend)
    np.testing.assert_allclose(eps.double().numpy(), want, rtol=0, atol=tol)
    np.testing.assert_allclose(both.double().numpy(), want + want2, rtol=0, atol=2 * tol)


def test_per_sample_seeds_draw_each_sample_alone():
    """With per-sample seeds and an odd count per sample, sample b equals a batch of one drawn with
    seed seeds[b] (so the unused last normal of a sample is not carried into the next)."""
    like = torch.empty(3, 3, 3, 9, dtype=torch.float64)
    seeds = torch.tensor([11, -5, 2**40])
    eps, eps2 = relayops.reference.draw_normals(like, 0, 9, seeds)
    for b in range(3):
        alone, alone2 = relayops.reference.draw_normals(like[:1], int(seeds[b]) % 2**64, 9)
        assert torch.equal(eps[b:b + 1], alone) and torch.equal(eps2[b:b + 1], alone2)


def test_draws_are_standard_normal_and_independent():
    """One draw of 2^18 normals per stream: mean 0, variance 1, normal (KS), and no correlation
    between the two normals of a pair (cosine and sine of one Philox call), between neighbouring
    pairs, between eps and eps2, or between the two offsets' draws."""
    like = torch.empty(4, 4, 128, 128, dtype=torch.float64)
    eps, eps2 = (z.flatten().numpy() for z in relayops.reference.draw_normals(like, 2024, 3))
    other, _ = (z.flatten().numpy() for z in relayops.reference.draw_normals(like, 2024, 4))
    n = eps.size
    se = 5 / math.sqrt(n)
    for z in (eps, eps2):
        assert abs(z.mean()) < se and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
        assert stats.kstest(z, "norm").pvalue > 1e-4
        cos_part, sin_part = z[0::2], z[1::2]
        pair_se = 5 / math.sqrt(n / 2)
        assert abs(np.corrcoef(cos_part, sin_part)[0, 1]) < pair_se  # partners
        assert abs(np.corrcoef(cos_part**2, sin_part**2)[0, 1]) < pair_se  # their common radius
        assert abs(np.corrcoef(z[1:-1:2], z[2::2])[0, 1]) < pair_se  # across pairs
        # per-pair variance: the pair's cosine and sine halves are each unit variance
        assert abs(cos_part.var() - 1) < 5 * math.sqrt(4 / n) and abs(sin_part.var() - 1) < 5 * math.sqrt(4 / n)
    assert abs(np.corrcoef(eps, eps2)[0, 1]) < se
    assert abs(np.corrcoef(eps, other)[0, 1]) < se


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
    """Element e of a [B,C,H,W] draw uses the words of pair q = e >> 1, counter (q lo, q hi,
    offset lo, offset hi), key = seed: the cosine normal for even e, the sine normal for odd e.
    Written out here in plain Python: the Random123 rounds and float64 math."""
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    like = torch.empty(1, 2, 4, 4, dtype=torch.float64)
    eps, eps2 = relayops.reference.draw_normals(like, seed, offset)

    def philox(c, k):
        c, k = list(c), list(k)
        for _ in range(10):
            p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
            k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
        return c

    def normals(radius_word, angle_word):
        rho = math.sqrt(-2 * math.log(((radius_word >> 8) + 1) * 2.0**-24))
        angle = 2 * math.pi * (angle_word >> 8) * 2.0**-24
        return rho * math.cos(angle), rho * math.sin(angle)

    q = 10  # elements e = 20 (b=0, c=1, h=1, w=0) and 21 (w=1)
    x = philox((q, 0, offset & MASK, offset >> 32), (seed & MASK, seed >> 32))
    (a_cos, a_sin), (b_cos, b_sin) = normals(x[0], x[1]), normals(x[2], x[3])
    assert abs(float(eps[0, 1, 1, 0]) - a_cos) < 1e-12 and abs(float(eps[0, 1, 1, 1]) - a_sin) < 1e-12
    assert abs(float(eps2[0, 1, 1, 0]) - b_cos) < 1e-12 and abs(float(eps2[0, 1, 1, 1]) - b_sin) < 1e-12


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
