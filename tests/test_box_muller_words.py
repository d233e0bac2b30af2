"""Box-Muller at the extreme uniforms, on every backend (SPEC 4).

Seeded draws almost never produce the words where Box-Muller is hardest (u1 = 2^-24, where
-2 ln u1 is largest; u1 = 1 - 2^-24, where it is about 1.2e-7 and its square root is sensitive to
how sqrt and log are computed; u2 near 0, 1/4, 1/2, 3/4 where cos and sin are 1, 0 or -1), so
each backend has a test-only entry point that takes the Philox words of n pairs and runs its own
Box-Muller code, giving the 2n normals of each stream (the cosine normal of pair i at 2i, the sine
normal at 2i + 1): the CPU and CUDA modules' ``normals_from_words`` and the Triton
``words_kernel``. The tests' own float64 NumPy formula (scipy_reference.box_muller_pair) is the
expected value.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import scipy_reference

CUDA = torch.cuda.is_available()


TOP1 = [0, 1, 2, 2**23, 2**24 - 3, 2**24 - 2, 2**24 - 1]  # u1 = (top + 1) 2^-24
TOP2 = [0, 1, 2**22 - 1, 2**22, 2**22 + 1, 2**23 - 1, 2**23, 2**23 + 1, 3 * 2**22, 2**24 - 1]
N_EXTREME = len(TOP1) * len(TOP2) * 2  # the extreme columns come first, then random words


def extreme_words() -> torch.Tensor:
    """[4, n] int64 word values in [0, 2^32): every pair of extreme (u1, u2) mantissas, each with
    low bytes 0x00 and 0xFF (Box-Muller uses the top 24 bits only), plus random words."""
    pairs = [(a << 8 | low, b << 8 | low) for a, b in itertools.product(TOP1, TOP2) for low in (0, 0xFF)]
    a, b = (torch.tensor(col, dtype=torch.int64) for col in zip(*pairs))
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**32, (4, 4096), generator=gen, dtype=torch.int64)
    # streams 0 and 1 both see the extremes: rows (a, b, b, a) swap the roles
    extremes = torch.stack([a, b, b.flip(0), a.flip(0)])
    return torch.cat([extremes, rand], dim=1)


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """The uint32 bit patterns as int32 (what the kernels read)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def expected(words: torch.Tensor):
    """float64 ``(eps, eps2)``, 2n each: pair i's cosine normal at 2i, its sine normal at 2i + 1."""
    w = words.numpy()
    return tuple(torch.from_numpy(np.stack(scipy_reference.box_muller_pair(w[i], w[i + 1]), axis=-1).reshape(-1))
                 for i in (0, 2))


# Largest error of one float32 normal against float64, per backend. The CUDA kernels use the
# hardware sine and cosine (relayops/philox.h; docs/spec.md 13.8): their absolute error (below
# 2^-21.19 on [-pi, pi]) plus the rounding of the angle, about 8e-7, times rho <= 5.8 bounds a
# normal's error by 5e-6, looser than the other backends' 1e-6 and inside SPEC 4's 1e-5.
FLOAT32_TOLERANCE = {"cpu": 1e-6, "triton": 1e-6, "cuda": 5e-6}


def targets():
    out = [("cpu", "cpu")]
    if CUDA:
        out += [("cuda", "cuda"), ("triton", "cuda")]
    else:
        out.append(("triton", "cpu"))  # the interpreter: NumPy maths, not the GPU's
    return out


def run(backend: str, words: torch.Tensor, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
        from relayops.triton import ops as triton_ops
        return triton_ops.normals_from_words(words)
    from relayops.ops import _compiled
    return _compiled.normals_from_words(words, dtype)


@pytest.mark.parametrize("backend, device", targets(), ids=lambda v: str(v))
def test_float32_box_muller_at_extreme_words(backend, device):
    words = extreme_words()
    eps, eps2 = run(backend, as_int32(words).to(device), torch.float32)
    ref, ref2 = expected(words)
    for got, want in ((eps, ref), (eps2, ref2)):
        assert got.dtype == torch.float32
        err = (got.cpu().double() - want).abs()
        assert torch.isfinite(got).all()
        assert err.max() < FLOAT32_TOLERANCE[backend], (
            f"worst error {err.max():.3g} at words index {int(err.argmax()) // 2}")
    # the cases themselves are what they claim: both ends of the u1 range are present, in both
    # the cosine and the sine normals
    for part in (ref[0:2 * N_EXTREME:2], ref[1:2 * N_EXTREME:2]):
        assert part.abs().max() > 5.7 and ((part.abs() < 4e-4) & (part != 0)).any()


@pytest.mark.parametrize("backend, device", targets(), ids=lambda v: str(v))
def test_words_of_n_pairs_give_2n_normals(backend, device):
    """Odd pair counts and the vector tails of every path: 1, 3, 17 and 37 pairs."""
    words = extreme_words()
    for n in (1, 3, 17, 37):
        w = words[:, N_EXTREME:N_EXTREME + n]
        eps, eps2 = run(backend, as_int32(w).to(device), torch.float32)
        want, want2 = expected(w)
        assert eps.shape == eps2.shape == (2 * n,)
        tol = FLOAT32_TOLERANCE[backend]
        assert (eps.cpu().double() - want).abs().max() < tol and (eps2.cpu().double() - want2).abs().max() < tol


def test_words_must_be_four_rows():
    from relayops.ops import _compiled
    with pytest.raises(ValueError, match=r"shape \[4, n\]"):
        _compiled.normals_from_words(torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_float64_box_muller_at_extreme_words(device):
    words = extreme_words()
    eps, eps2 = run("cpu", as_int32(words).to(device), torch.float64)
    ref, ref2 = expected(words)
    torch.testing.assert_close(eps.cpu(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps2.cpu(), ref2, rtol=0, atol=1e-12)
