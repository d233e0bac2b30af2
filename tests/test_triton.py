"""What only the Triton backend has: its Philox words (against the Random123 known answer and
the reference) and its noise streams, on shapes that span many tiles. Every op case, gradient,
error, opcheck and torch.compile check runs on Triton in the shared matrix (test_backends.py).

Runs on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py when there is no GPU)
and on CUDA tensors where a GPU exists.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import relayops  # noqa: E402
from relayops import reference  # noqa: E402
from compare import assert_close, scale_of  # noqa: E402

if "triton" in relayops.available_backends():
    from relayops.triton.kernels import philox_words

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    "triton" not in relayops.available_backends() or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs a GPU or TRITON_INTERPRET=1 (set before relayops is imported)",
)
DEVICE = "cuda" if HAS_CUDA else "cpu"


def assert_close32(actual, expected64, tol=1e-5, what="result"):
    """A float32 kernel result against the float64 reference, relative to the result's scale."""
    assert actual.dtype == torch.float32
    assert_close(actual, expected64, atol=tol * scale_of(expected64), what=what)


# ----------------------------------------------------------------------------- Philox


@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def _words_kernel(q_ptr, out_ptr, n, k0, k1, off0, off1, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    q = tl.load(q_ptr + i, mask=i < n, other=0)
    x0, x1, x2, x3 = philox_words(q, k0, k1, off0, off1)
    tl.store(out_ptr + 4 * i, x0.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=i < n)


def philox_words_triton(q: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The kernels' Philox words ``[n, 4]`` (int64 holding uint32) at pair indices q (SPEC 4)."""
    out = torch.full((q.numel(), 4), -1, dtype=torch.int64, device=q.device)
    m = 0xFFFFFFFF
    _words_kernel[(1,)](q, out, q.numel(), seed & m, seed >> 32, offset & m, offset >> 32,
                       BLOCK=triton.next_power_of_2(max(2, q.numel())))
    return out


def test_philox_known_answer():
    # Philox4x32-10, counter (0, 0, 0, 0), key (0, 0) (Salmon et al. 2011, Random123 KAT).
    words = philox_words_triton(torch.zeros(1, dtype=torch.int64, device=DEVICE), 0, 0)
    assert [hex(int(w)) for w in words[0]] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("seed, offset", [(0, 0), (12345, 7), (2**64 - 1, 2**40 + 3)])
def test_philox_words_match_reference(seed, offset):
    q = torch.tensor([0, 1, 2, 1000, 2**31 + 5, 2**33 + 17], dtype=torch.int64, device=DEVICE)
    m = 0xFFFFFFFF
    counter = (q & m, q >> 32, torch.full_like(q, offset & m), torch.full_like(q, offset >> 32))
    expected = torch.stack(reference.philox4x32(counter, (seed & m, seed >> 32)), dim=1)
    assert torch.equal(philox_words_triton(q, seed, offset), expected)


# ----------------------------------------------------------------------------- noise streams


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**63 + 12345, 2**40 + 3)])
@pytest.mark.parametrize("s, shape", [(4, (2, 3, 8, 12)), (2, (1, 1, 2, 2)), (8, (2, 1, 16, 24)), (3, (2, 3, 3, 9))],
                         ids=["s4", "s2-tiny", "s8", "s3-odd-width"])
def test_seeded_noise_streams_equal_reference(s, shape, seed, offset):
    """eps (stream 0) and block_noise(eps2) (stream 1) from the kernel's Philox equal the
    reference Philox + Box-Muller in float64 within 1e-5 (SPEC 4); with W = 9 the pairs of
    normals straddle rows."""
    like = torch.empty(shape, device=DEVICE)
    z0, z1 = reference.philox_normal_pair(shape, seed, offset, DEVICE, torch.float64)
    eps = relayops.relay_noise(like, s, alpha=0.0, normalize=False, seed=seed, offset=offset, backend="triton")
    assert_close32(eps, z0)
    mixed = relayops.relay_noise(like, s, alpha=1.0, normalize=False, seed=seed, offset=offset, backend="triton")
    assert_close32(mixed - eps, reference.block_noise(z1, s), tol=2e-5)


def test_per_sample_seeds_with_odd_sample_sizes():
    """Per-sample seeds where a sample holds an odd number of elements (3 x 3 x 9): each sample's
    noise is what its seed gives it alone (the last pair's second normal unused)."""
    like = torch.empty(3, 3, 3, 9, device=DEVICE)
    seeds = torch.tensor([4, -9, 2**50], dtype=torch.int64, device=DEVICE)
    k = relayops.ops.noise_scale(0.15, True)
    got = relayops.relay_noise(like, 3, seed=seeds, offset=5, backend="triton")
    assert_close32(got, reference.relay_noise(like.double(), 3, 0.15, k, 0, 5, seeds, None, None))
    for b in range(3):
        alone = relayops.relay_noise(like[b:b + 1], 3, seed=int(seeds[b]) % 2**64, offset=5, backend="triton")
        assert torch.equal(got[b:b + 1], alone)


@pytest.mark.gpu
def test_larger_shapes_on_gpu():
    """Shapes that span many tiles of the kernels' tile configurations, per-sample seeds included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 96, 160, generator=gen, dtype=torch.float64)
    tau = 0.1 + 2 * torch.rand(4, generator=gen, dtype=torch.float64)
    seeds = torch.tensor([1, 2**62, -3, 7], dtype=torch.int64, device=DEVICE)
    for s in (2, 4, 8):
        assert_close32(relayops.patch_blur(x.float().to(DEVICE), tau.float().to(DEVICE), s, backend="triton"),
                       reference.patch_blur(x.to(DEVICE), tau.to(DEVICE), s, 0.001))
        assert_close32(relayops.block_noise(x.float().to(DEVICE), s, backend="triton"),
                       reference.block_noise(x.to(DEVICE), s))
        like = torch.empty(x.shape, device=DEVICE)
        k = relayops.ops.noise_scale(0.15, True)
        assert_close32(relayops.relay_noise(like, s, seed=seeds, offset=11, backend="triton"),
                       reference.relay_noise(like.double(), s, 0.15, k, 0, 11, seeds, None, None))
