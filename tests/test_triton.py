"""What only the Triton backend has: its Philox words and Box-Muller (against the Random123 known
answer and a float64 NumPy implementation of SPEC 4 written here), its drawn noise in every fused
op (odd widths, whose pairs straddle rows, planes and samples; per-sample seeds; offsets), and its
program layout (patch-column blocks that overlap for block noise, bands of patch rows) on launch
shapes small enough to give many programs under the interpreter. Every op case, gradient, error,
opcheck and torch.compile check runs on Triton in the shared matrix (test_backends.py).

Runs on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)
and on CUDA tensors where a GPU exists.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import relayops  # noqa: E402
from relayops import reference  # noqa: E402
from compare import assert_close, scale_of  # noqa: E402

if "triton" in relayops.available_backends():
    from relayops.triton import kernels
    from relayops.triton import ops as triton_ops

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    "triton" not in relayops.available_backends() or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs a GPU or TRITON_INTERPRET=1 (set before relayops is imported)",
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
OPS = torch.ops.relayops_triton if "triton" in relayops.available_backends() else None
MASK32 = 0xFFFFFFFF


def assert_close32(actual, expected64, tol=1e-5, what="result"):
    """A float32 kernel result against a float64 expectation, relative to its scale."""
    assert actual.dtype == torch.float32
    assert_close(actual.cpu(), expected64.cpu(), atol=tol * scale_of(expected64), what=what)


# ----------------------------------------------------------------------------- SPEC 4 in NumPy


def philox_numpy(counter, key):
    """Philox4x32-10 (Salmon et al. 2011) on uint64 arrays holding uint32 words: each 32 x 32-bit
    product is exact in uint64."""
    c = [np.asarray(v, dtype=np.uint64) for v in counter]
    k0, k1 = (np.uint64(v) for v in key)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK32), (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK32)
        p0 = c[0] * np.uint64(0xD2511F53)
        p1 = c[2] * np.uint64(0xCD9E8D57)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(MASK32), (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & np.uint64(MASK32)]
    return c


def box_muller_numpy(w0, w1):
    """SPEC 4's two normals of two words, float64."""
    u1 = ((w0 >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = (w1 >> np.uint64(8)).astype(np.float64) * 2.0**-24
    rho = np.sqrt(-2.0 * np.log(u1))
    return rho * np.cos(2 * np.pi * u2), rho * np.sin(2 * np.pi * u2)


def normals_numpy(n: int, seed: int, offset: int):
    """eps, eps2 (float64, n each) of stream indices 0..n-1: pair m = e >> 1 from one Philox call
    at counter (m, offset), key seed; element 2m the cosine, 2m + 1 the sine normal."""
    m = np.arange((n + 1) // 2, dtype=np.uint64)
    words = philox_numpy([m & np.uint64(MASK32), m >> np.uint64(32), np.full_like(m, offset & MASK32),
                          np.full_like(m, offset >> 32)], (seed & MASK32, seed >> 32))
    out = []
    for a, b in ((0, 1), (2, 3)):
        cos, sin = box_muller_numpy(words[a], words[b])
        out.append(torch.from_numpy(np.stack([cos, sin], axis=-1).reshape(-1)[:n].copy()))
    return out


def drawn_normals(shape, seed: int, offset: int, seeds=None):
    """(eps, eps2) float64 of logical NCHW ``shape``: one stream, or sample b keyed by seeds[b]
    with its elements counted from 0."""
    if seeds is None:
        eps, eps2 = normals_numpy(math.prod(shape), seed % 2**64, offset)
        return eps.reshape(shape), eps2.reshape(shape)
    per = [normals_numpy(math.prod(shape[1:]), s % 2**64, offset) for s in seeds]
    return (torch.stack([p[0].reshape(shape[1:]) for p in per]), torch.stack([p[1].reshape(shape[1:]) for p in per]))


def test_numpy_philox_known_answer():
    # Random123 known answers for Philox4x32-10: counter and key zero, and all ones.
    assert [hex(int(w)) for w in philox_numpy([0, 0, 0, 0], (0, 0))] == [
        "0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]
    assert [hex(int(w)) for w in philox_numpy([MASK32] * 4, (MASK32, MASK32))] == [
        "0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd"]


# ----------------------------------------------------------------------------- the kernels' Philox and Box-Muller


@triton.jit
def _words_kernel(c_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    c = ()
    for r in tl.static_range(4):
        c = c + (tl.load(c_ptr + 4 * i + r, mask=m, other=0).to(tl.uint32),)
    zero = c[0] * 0
    x = kernels.philox4x32(c[0], c[1], c[2], c[3], zero + k0.to(tl.uint32), zero + k1.to(tl.uint32))
    for r in tl.static_range(4):
        tl.store(out_ptr + 4 * i + r, x[r].to(tl.int64), mask=m)


def philox_triton(counters: torch.Tensor, key) -> torch.Tensor:
    """The kernels' Philox words ``[n, 4]`` (int64 holding uint32) of counters ``[n, 4]``."""
    out = torch.full_like(counters, -1)
    _words_kernel[(1,)](counters, out, counters.shape[0], key[0], key[1],
                        BLOCK=triton.next_power_of_2(max(2, counters.shape[0])))
    return out


def test_philox_matches_numpy():
    gen = np.random.default_rng(0)
    counters = np.concatenate([np.zeros((1, 4), dtype=np.uint64), np.full((1, 4), MASK32, dtype=np.uint64),
                               gen.integers(0, 2**32, size=(14, 4), dtype=np.uint64)])
    for key in ((0, 0), (MASK32, MASK32), (12345, 2**31 + 7)):
        got = philox_triton(torch.from_numpy(counters.astype(np.int64)).to(DEVICE), key).cpu().numpy()
        expected = np.stack(philox_numpy(counters.T, key), axis=1).astype(np.int64)
        assert np.array_equal(got, expected), key


def test_box_muller_words_give_four_normals():
    """normals_from_words: eps[2i], eps[2i+1] from words (0, 1), eps2 from (2, 3), within 1e-5 of
    float64, at the extreme uniforms (u1 = 2^-24 and 1 - 2^-24, u2 at the quarter turns)."""
    top = [0, 1, 2**22 - 1, 2**22, 2**23, 3 * 2**22 + 1, 2**24 - 2, 2**24 - 1]
    pairs = np.array([(a << 8 | 0xFF, b << 8) for a in top for b in top], dtype=np.uint64).T
    rand = np.random.default_rng(1).integers(0, 2**32, size=(4, 500), dtype=np.uint64)
    words = np.concatenate([np.concatenate([pairs, pairs[::-1]]), rand], axis=1)
    eps, eps2 = triton_ops.normals_from_words(torch.from_numpy(words.astype(np.int64)).to(torch.int32).to(DEVICE))
    for got, (a, b) in ((eps, (0, 1)), (eps2, (2, 3))):
        cos, sin = box_muller_numpy(words[a], words[b])
        assert_close(got.cpu().double(), torch.from_numpy(np.stack([cos, sin], axis=-1).reshape(-1)), atol=1e-5,
                     what="Box-Muller")
    with pytest.raises(ValueError, match=r"Philox words of shape \[4, n\]"):
        triton_ops.normals_from_words(torch.zeros(2, 3, dtype=torch.int32))


# ----------------------------------------------------------------------------- drawn noise in every op

SEEDS = [2**64 - 1, 12345 + 2**40, 7]
# s = 3 with W = 9 and H x W odd: pairs straddle rows, planes and (one seed) samples; with
# per-sample seeds a sample's last pair has an unused element.
NOISE_SHAPES = [((2, 3, 8, 12), 4), ((3, 1, 9, 9), 3), ((2, 2, 6, 9), 3), ((1, 2, 4, 8), 2), ((1, 1, 16, 8), 8)]


def _shape_id(case):
    shape, s = case
    return "x".join(map(str, shape)) + f"-s{s}"


def _seed_args(shape, per_sample):
    if per_sample:
        seeds = SEEDS[:shape[0]]
        return 0, torch.tensor([v - 2**64 if v >= 2**63 else v for v in seeds], device=DEVICE), seeds
    return -3, None, None  # the int64 seed -3 is 2^64 - 3


@pytest.mark.parametrize("per_sample", [False, True], ids=["seed", "seeds"])
@pytest.mark.parametrize("case", NOISE_SHAPES, ids=_shape_id)
def test_relay_noise_draws_spec4(case, per_sample):
    shape, s = case
    seed, seeds, seed_list = _seed_args(shape, per_sample)
    offset = 2**33 + 5
    eps, eps2 = drawn_normals(shape, seed, offset, seed_list)
    like = torch.empty(shape, device=DEVICE)
    for alpha in (0.0, 0.3):
        got = OPS.relay_noise(like, s, alpha, 0.9, seed, offset, seeds, None, None)
        assert_close32(got, 0.9 * (eps + alpha * reference.block_noise(eps2, s)), what=f"relay_noise alpha {alpha}")


@pytest.mark.parametrize("case", NOISE_SHAPES[:3], ids=_shape_id)
def test_fused_ops_draw_what_they_would_be_given(case):
    """relay_corrupt and relay_step (Euler, Heun, second order) with drawn noise equal the float64
    reference given the SPEC 4 normals."""
    shape, s = case
    gen = torch.Generator().manual_seed(3)
    x, x0, xp, x0p, x0b = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5))
    b = shape[0]
    sigma, tau = 0.2 + torch.rand(b, generator=gen, dtype=torch.float64), 0.1 + torch.rand(b, generator=gen,
                                                                                           dtype=torch.float64)
    corr = torch.randn(b, s, s, generator=gen, dtype=torch.float64)
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    for per_sample in (False, True):
        seed, seeds, seed_list = _seed_args(shape, per_sample)
        eps, eps2 = drawn_normals(shape, seed, 11, seed_list)
        got = OPS.relay_corrupt(f32(x), f32(sigma), f32(tau), s, 0.001, 0.15, 0.8, seed, 11, seeds, None, None)
        want = reference.relay_corrupt(x, sigma, tau, s, 0.001, 0.15, 0.8, 0, 0, None, eps, eps2)
        assert_close32(got, want, what="relay_corrupt")
        for extra in ({}, dict(x_prop=xp, x0_hat_prop=x0p), dict(x0_hat_b=x0b, correction=corr)):
            args = (sigma, 0.6 * sigma, tau, 0.5 * tau, 0.3, s, 0.001, 0.15, 0.8)
            got = OPS.relay_step(f32(x), f32(x0), *(f32(a) if isinstance(a, torch.Tensor) else a for a in args), seed,
                                 11, seeds, None, None, *(f32(extra[n]) if n in extra else None for n in (
                                     "x_prop", "x0_hat_prop", "x0_hat_b", "correction")))
            want = reference.relay_step(x, x0, *args, 0, 0, None, eps, eps2, **extra)
            assert_close32(got, want, what=f"relay_step {sorted(extra)}")


# ----------------------------------------------------------------------------- program layout


@pytest.fixture
def small_programs(monkeypatch):
    """Launch shapes of 2 planes of 4 lanes and 2 patch rows: many programs per plane,
    overlapping column blocks for block noise, partial bands, blocks and plane groups."""
    monkeypatch.setattr(kernels, "launch_shape", lambda wp, hp, planes, halo: (4, 2, 2, 1))


@pytest.mark.parametrize("case", [((2, 2, 20, 36), 4), ((1, 2, 15, 21), 3), ((1, 1, 6, 10), 2)], ids=_shape_id)
def test_many_programs(small_programs, case):
    shape, s = case
    gen = torch.Generator().manual_seed(4)
    x, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    tau = 0.1 + torch.rand(shape[0], generator=gen, dtype=torch.float64)
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    assert_close32(OPS.patch_dct(f32(x), s), reference.patch_dct(x, s), what="patch_dct")
    assert_close32(OPS.patch_blur(f32(x), f32(tau), s, 0.001), reference.patch_blur(x, tau, s), what="patch_blur")
    for adjoint in (False, True):
        assert_close32(OPS.block_noise(f32(g), s, adjoint), reference.block_noise(g, s, adjoint), what="block_noise")
    eps, eps2 = drawn_normals(shape, 5, 1)
    assert_close32(OPS.relay_noise(f32(x), s, 0.5, 1.0, 5, 1, None, None, None),
                   eps + 0.5 * reference.block_noise(eps2, s), what="relay_noise")
    assert_close32(OPS.relay_noise(f32(x), s, 0.5, 1.0, 0, 0, None, f32(x), f32(g)),
                   x + 0.5 * reference.block_noise(g, s), what="relay_noise given")


def test_planes_beyond_one_launch(monkeypatch):
    """More plane groups than one launch's grid axis takes run in several launches."""
    monkeypatch.setattr(triton_ops, "GROUPS_PER_LAUNCH", 2)
    x = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    assert_close32(OPS.patch_dct(x.float().to(DEVICE), 4), reference.patch_dct(x, 4), what="patch_dct")
    eps, eps2 = drawn_normals(x.shape, 9, 2)
    assert_close32(OPS.relay_noise(x.float().to(DEVICE), 4, 0.2, 1.0, 9, 2, None, None, None),
                   eps + 0.2 * reference.block_noise(eps2, 4), what="relay_noise")


@pytest.mark.gpu
def test_larger_shapes_on_gpu():
    """Shapes that span many programs of the default launch shapes, per-sample seeds included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 96, 160, generator=gen, dtype=torch.float64)
    tau = 0.1 + 2 * torch.rand(4, generator=gen, dtype=torch.float64)
    seeds = [1, 2**62, 2**64 - 3, 7]
    for s in (2, 4, 8):
        assert_close32(relayops.patch_blur(x.float().to(DEVICE), tau.float().to(DEVICE), s, backend="triton"),
                       reference.patch_blur(x, tau, s, 0.001))
        assert_close32(relayops.block_noise(x.float().to(DEVICE), s, backend="triton"), reference.block_noise(x, s))
        eps, eps2 = drawn_normals(x.shape, 0, 11, seeds)
        got = OPS.relay_noise(torch.empty(x.shape, device=DEVICE), s, 0.15, 1.0, 0, 11,
                              torch.tensor([v - 2**64 if v >= 2**63 else v for v in seeds], device=DEVICE), None, None)
        assert_close32(got, eps + 0.15 * reference.block_noise(eps2, s), tol=2e-5)
