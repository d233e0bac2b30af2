"""Philox4x32-10 and Box-Muller in plain PyTorch (SPEC 4).

Layout (the same in every backend, so a seed gives the same noise everywhere). ``e`` is the
element's index in the logical contiguous NCHW order, ``((b * C + c) * H + h) * W + w``, whatever
the tensor's memory format; with per-sample seeds ``e = (c * H + h) * W + w`` counts within the
sample. Elements go in pairs: pair ``q = e >> 1`` holds elements ``2q`` and ``2q + 1``, and one
Philox call per pair gives its four normals:

* key     ``(k0, k1)``           = low and high 32 bits of the 64-bit ``seed`` (or ``seeds[b]``);
* counter ``(c0, c1, c2, c3)``   = low and high 32 bits of ``q``, then low and high 32 bits of
  the 64-bit ``offset``;
* words ``(x0, x1, x2, x3)``: ``box_muller(x0, x1)`` gives ``(eps[2q], eps[2q + 1])`` and
  ``box_muller(x2, x3)`` gives ``(eps2[2q], eps2[2q + 1])``.

A pair may straddle two rows (odd widths), planes or samples; with per-sample seeds and an odd
element count per sample, the last pair's second element is not used. Successive draws (sampler
steps, the Heun correction) use different offsets.

Box-Muller uses the top 24 bits of each word, so that its uniforms are exact in float32:
``u1 = ((x0 >> 8) + 1) / 2^24`` in (0, 1], ``u2 = (x1 >> 8) / 2^24`` in [0, 1);
``rho = sqrt(-2 ln u1)``, the two normals ``rho cos(2 pi u2)`` and ``rho sin(2 pi u2)``.

uint32 arithmetic is emulated in int64 tensors; the 32 x 32 -> 64-bit product is split into
16-bit halves so that nothing overflows int64. Works on any device, no host round trip.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and words ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = a_lo * b  # < 2^48
    x = a_hi * b + (t >> 16)  # product = x * 2^16 + (t mod 2^16)
    hi = x >> 16
    lo = ((x & 0xFFFF) << 16) | (t & 0xFFFF)
    return hi, lo


def philox4x32(counter, key) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words.

    ``counter``: four broadcastable int64 tensors; ``key``: two ints or int64 tensors.
    Returns four int64 tensors of uint32 words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def box_muller(w0: torch.Tensor, w1: torch.Tensor, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The two standard normals ``(rho cos(2 pi u2), rho sin(2 pi u2))`` of two uint32 words
    (24-bit uniforms)."""
    u1 = ((w0 >> 8) + 1).to(dtype) * 2.0**-24
    u2 = (w1 >> 8).to(dtype) * 2.0**-24
    rho = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return rho * torch.cos(angle), rho * torch.sin(angle)


def _interleave(even: torch.Tensor, odd: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., 2 P]`` from the pair values ``[..., P]``: element 2q is even[q], 2q + 1 is odd[q];
    the first ``n`` elements."""
    return torch.stack((even, odd), dim=-1).flatten(-2)[..., :n]


def philox_normal_pair(shape, seed: int, offset: int, device=None, dtype=torch.float64, seeds=None):
    """``(eps, eps2)`` of the relay-noise layout for a tensor of logical NCHW ``shape``.

    ``seeds``: None (one stream for the batch, keyed by ``seed``) or an int64 ``[B]`` tensor of
    per-sample seeds (two's complement): sample b is keyed by ``seeds[b]`` and its elements are
    indexed from 0, exactly as if it were drawn alone.
    """
    per_sample = seeds is not None
    n = math.prod(shape[1:]) if per_sample else math.prod(shape)
    q = torch.arange((n + 1) // 2, dtype=torch.int64, device=device)
    counter = (q & MASK32, q >> 32,
               torch.full_like(q, offset & MASK32), torch.full_like(q, (offset >> 32) & MASK32))
    if per_sample:
        seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1, 1)  # [B, 1] keys against [P] counters
    else:
        seeds = seed
    key = (seeds & MASK32, (seeds >> 32) & MASK32)
    x0, x1, x2, x3 = philox4x32(counter, key)
    z0 = _interleave(*box_muller(x0, x1, dtype), n).reshape(shape)
    z1 = _interleave(*box_muller(x2, x3, dtype), n).reshape(shape)
    return z0, z1
