"""Triton kernels for the patch ops (SPEC 1-4, 6, 8): one program per tile of s x s patches.

Every kernel views a contiguous ``[B, C, H, W]`` tensor as ``n_patches = B * C * (H/s) * (W/s)``
patches, numbered ``(plane, p, q)`` with ``plane = b * C + c`` (so neighbouring patch ids sit
side by side in memory and loads coalesce). A program loads ``BLOCK_P`` patches as a
``[BLOCK_P, SP, SP]`` register tile (``SP`` = s rounded up to a power of two, masked beyond s),
applies s x s matrices from the left and the right in registers, and stores the tile back.
All arithmetic is float32 whatever the storage dtype; scalar arguments arrive as float32.

* DCT (SPEC 1): ``U = Cm X Cm^T``, ``X = Cm^T U Cm`` with the DCT-II matrix built in-kernel.
* Block noise (SPEC 3): the wraparound s x s box sum of output patch (p, q) only reads input
  patches (p, q), (p-1, q), (p, q-1), (p-1, q-1) (indices mod the patch grid). Within those,
  it is ``L0 G[p,q] L0^T + L0 G[p,q-1] L1^T + L1 G[p-1,q] L0^T + L1 G[p-1,q-1] L1^T`` with
  ``L0[a, k] = [k <= a]`` (rows of this patch) and ``L1[a, k] = [k > a]`` (rows of the one
  before). The adjoint (its gradient) transposes the matrices and looks at (p+1, q+1) instead.
* Noise (SPEC 4): Philox4x32-10 with key = (seed lo, seed hi), counter = (e lo, e hi,
  offset lo, offset hi), e the element's NCHW index; Box-Muller of words (x0, x1) gives eps,
  of (x2, x3) eps2, exactly as ``relayops.reference.philox``. With per-sample seeds the key of
  sample b comes from ``seeds[b]`` and e counts from the sample's first element.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PI = tl.constexpr(3.141592653589793)


AUTOTUNE = os.environ.get("RELAYOPS_TRITON_AUTOTUNE") == "1"


def tile_configs():
    """Autotune space (``RELAYOPS_TRITON_AUTOTUNE=1``): ``TILE`` elements per program
    (BLOCK_P = TILE // SP^2 patches) and warps."""
    return [triton.Config({"TILE": t}, num_warps=w, num_stages=1)
            for t, w in ((256, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8))]


def default_tile(sp: int) -> int:
    """Elements per program without autotuning. The per-patch products hold [BLOCK_P, SP, SP, SP]
    temporaries, so large patches get fewer patches per program; under the interpreter fewer,
    bigger programs run faster."""
    if INTERPRET:
        return 256
    return 1024 if sp <= 8 else 256


def _autotune(fn):
    """One fixed configuration per patch size by default: every configuration of a kernel
    specialisation is a separate compile (seconds to a minute each for the fused relay kernel on
    a GPU), so a five-way autotune made first calls slow for little gain. Opt in to autotuning with
    RELAYOPS_TRITON_AUTOTUNE=1; constexpr mode flags are in its key so each specialisation is
    tuned on its own."""
    if AUTOTUNE and not INTERPRET:
        key = ["n_patches", "S", "INVERSE", "ADJOINT", "HAS_X", "HAS_BLUR", "HEUN", "SECOND", "NOISE", "HAS_BLOCK",
               "PER_SAMPLE_SEEDS"]
        return triton.autotune(configs=tile_configs(), key=[k for k in key if k in fn.arg_names])(fn)
    return triton.heuristics({"TILE": lambda args: default_tile(args["SP"]),
                              "num_warps": lambda args: 1 if INTERPRET else 4})(fn)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _tile(pid, n_patches, Hp, Wp, S: tl.constexpr, SP: tl.constexpr, BLOCK_P: tl.constexpr):
    """Patch coordinates ``(plane, p, q)`` ([BLOCK_P] int64) of this program's tile, which of
    its patches exist ([BLOCK_P]) and the ``[BLOCK_P, SP, SP]`` element mask (row/column < s)."""
    g = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    per_plane = Hp * Wp
    plane = g // per_plane
    r = g - plane * per_plane
    p = r // Wp
    q = r - p * Wp
    k = tl.arange(0, SP)
    valid = g < n_patches
    mask = valid[:, None, None] & (k < S)[None, :, None] & (k < S)[None, None, :]
    return plane, p, q, valid, mask


@triton.jit
def _patch_offsets(plane, p, q, Hp, Wp, S: tl.constexpr, SP: tl.constexpr):
    """NCHW element index of entry (k, l) of patch (plane, p, q): ``[BLOCK_P, SP, SP]`` int64."""
    W = Wp * S
    k = tl.arange(0, SP)
    base = plane * (Hp * S) * W + (p * S) * W + q * S
    return base[:, None, None] + k[None, :, None] * W + k[None, None, :]


@triton.jit
def _store(ptrs, value, mask):
    """Store float32 ``value`` in the output's dtype, rounded to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        # By hand: the interpreter's float32 -> bfloat16 cast truncates (the GPU's rounds), and
        # this way both give the same bits.
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        half = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptrs, tl.where(value == value, half, value.to(tl.bfloat16)), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _wrap(i, step: tl.constexpr, n):
    """``(i + step) mod n`` for step in {-1, +1} and 0 <= i < n."""
    j = i + step
    if step < 0:
        j = tl.where(j < 0, j + n, j)
    else:
        j = tl.where(j >= n, j - n, j)
    return j


@triton.jit
def _dct_matrix(S: tl.constexpr, SP: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Orthonormal DCT-II ``Cm[i, n] = c_i cos(pi (2n + 1) i / (2s))`` (SPEC 1), or its
    transpose, as ``[SP, SP]`` float32, zero outside s x s."""
    r = tl.arange(0, SP)[:, None]
    c = tl.arange(0, SP)[None, :]
    if TRANSPOSE:
        freq, pos = c, r
    else:
        freq, pos = r, c
    angle = (freq * (2 * pos + 1)).to(tl.float32) * (PI / (2 * S))
    scale = tl.sqrt_rn(tl.where(freq == 0, 1.0, 2.0) / S)
    return tl.where((r < S) & (c < S), scale * tl.cos(angle), 0.0)


@triton.jit
def _left(m, x):
    """``Y[p] = m @ X[p]`` for a tile ``x`` [P, SP, SP] and a matrix ``m`` [SP, SP]."""
    return tl.sum(m[None, :, :, None] * x[:, None, :, :], axis=2)


@triton.jit
def _right(x, m):
    """``Y[p] = X[p] @ m^T`` for a tile ``x`` [P, SP, SP] and a matrix ``m`` [SP, SP]."""
    return tl.sum(x[:, :, None, :] * m[None, None, :, :], axis=3)


@triton.jit
def _box_matrices(S: tl.constexpr, SP: tl.constexpr, ADJOINT: tl.constexpr):
    """``(L0, L1)`` of the block-noise box sum (module docstring) as boolean masks, transposed
    for the adjoint."""
    a = tl.arange(0, SP)[:, None]
    k = tl.arange(0, SP)[None, :]
    inside = (a < S) & (k < S)
    if ADJOINT:
        l0 = inside & (k >= a)
        l1 = inside & (k < a)
    else:
        l0 = inside & (k <= a)
        l1 = inside & (k > a)
    return l0, l1


@triton.jit
def _left_select(m, x):
    """``Y[p] = m @ X[p]`` for a boolean ``m``: a sum of the selected entries. Not a product
    with 0/1: 0 * NaN is NaN, which would spread one non-finite input over the whole tile."""
    return tl.sum(tl.where(m[None, :, :, None], x[:, None, :, :], 0.0), axis=2)


@triton.jit
def _right_select(x, m):
    """``Y[p] = X[p] @ m^T`` for a boolean ``m`` (see ``_left_select``)."""
    return tl.sum(tl.where(m[None, None, :, :], x[:, :, None, :], 0.0), axis=3)


@triton.jit
def _box_sum(g00, g01, g10, g11, S: tl.constexpr, SP: tl.constexpr, ADJOINT: tl.constexpr):
    """``(1/s) * box sum`` of one output patch from its four input patches (gRC = patch
    (p -+ R, q -+ C)), in float32 (SPEC 3)."""
    l0, l1 = _box_matrices(S, SP, ADJOINT)
    upper = _right_select(g00, l0) + _right_select(g01, l1)
    lower = _right_select(g10, l0) + _right_select(g11, l1)
    return (_left_select(l0, upper) + _left_select(l1, lower)) * (1.0 / S)


@triton.jit
def _box_muller(a, b, odd):
    """One standard normal from its pair's two uint32 words (top 24 bits, SPEC 4):
    ``sqrt(-2 ln u1)`` times ``cos(2 pi u2)`` for the pair's first element (``odd`` = 0) or
    ``sin(2 pi u2) = cos(2 pi (u2 - 1/4))`` for its second (``odd`` = 1)."""
    u1 = ((a >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact
    u2 = (b >> 8).to(tl.float32) * 5.9604644775390625e-08 - 0.25 * odd  # exact, in [-1/4, 1)
    # cos has period 1 in u2: move the angle into [-pi, pi) (exactly) for an accurate cos.
    u2 = tl.where(u2 >= 0.5, u2 - 1.0, u2)
    # sqrt_rn: tl.sqrt compiles to the approximate sqrt.approx.ftz on NVIDIA GPUs
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(u2 * (2.0 * PI))


@triton.jit
def philox_words(q, k0, k1, off0, off1):
    """Philox4x32-10 words (x0, x1, x2, x3) for pair indices ``q`` (int64 tensor): key
    (k0, k1) = seed words, counter (q lo, q hi, off0, off1) (SPEC 4). Triton's philox_impl
    takes (counter, key) in exactly this order and runs the same rounds as the reference."""
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + off0.to(tl.uint32)
    c3 = zero + off1.to(tl.uint32)
    return tl.philox_impl(c0, c1, c2, c3, k0.to(tl.uint32) + zero, k1.to(tl.uint32) + zero, 10)


@triton.jit
def _philox_normals(e, k0, k1, off0, off1):
    """eps and eps2 at element indices ``e`` (int64 tile), SPEC 4 layout: the words of pair
    ``e >> 1``, the cosine normal for even ``e``, the sine normal for odd ``e``; the key words
    k0, k1 are scalars or broadcast against ``e`` (per-sample seeds)."""
    x0, x1, x2, x3 = philox_words(e >> 1, k0, k1, off0, off1)
    odd = (e & 1).to(tl.float32)
    return _box_muller(x0, x1, odd), _box_muller(x2, x3, odd)


@triton.jit
def _noise_stream(seeds_ptr, b, valid, k0, k1, sample_size, PER_SAMPLE_SEEDS: tl.constexpr):
    """The Philox key words of each patch's sample and the index of its first element: the
    batch's (k0, k1) and 0, or with per-sample seeds the words of ``seeds[b]`` ([BLOCK_P, 1, 1])
    and ``b * sample_size``, so a sample draws what it would draw alone (SPEC 4)."""
    if PER_SAMPLE_SEEDS:
        seed = tl.load(seeds_ptr + b, mask=valid, other=0)[:, None, None]
        key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        base = (b.to(tl.int64) * sample_size)[:, None, None]
    else:
        key0 = k0.to(tl.uint32)
        key1 = k1.to(tl.uint32)
        base = 0
    return key0, key1, base


@triton.jit
def _eps2_at(eps2_ptr, e, base, mask, k0, k1, off0, off1, NOISE: tl.constexpr):
    """Stream-1 normals at NCHW elements ``e``: drawn with Philox at stream index ``e - base``
    (NOISE = 1) or loaded (NOISE = 2)."""
    if NOISE == 1:
        _, z = _philox_normals(e - base, k0, k1, off0, off1)
    else:
        z = tl.load(eps2_ptr + e, mask=mask, other=0.0).to(tl.float32)
    return z


# ----------------------------------------------------------------------------- kernels


@triton.jit
def words_kernel(w_ptr, eps_ptr, eps2_ptr, n, BLOCK: tl.constexpr):
    """The four normals of pair i from its Philox words w[i], w[n + i], w[2n + i], w[3n + i]
    (int32 holding uint32 bits) through ``_box_muller``, as the relay kernel draws them:
    eps[2i], eps[2i + 1] from (w[i], w[n + i]), eps2[2i], eps2[2i + 1] from the others; for tests."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    w0 = tl.load(w_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(w_ptr + n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(w_ptr + 2 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    w3 = tl.load(w_ptr + 3 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    tl.store(eps_ptr + 2 * i, _box_muller(w0, w1, 0.0), mask=m)
    tl.store(eps_ptr + 2 * i + 1, _box_muller(w0, w1, 1.0), mask=m)
    tl.store(eps2_ptr + 2 * i, _box_muller(w2, w3, 0.0), mask=m)
    tl.store(eps2_ptr + 2 * i + 1, _box_muller(w2, w3, 1.0), mask=m)


@_autotune
@triton.jit
def transform_kernel(src_ptr, dst_ptr, n_patches, Hp, Wp,
                     S: tl.constexpr, SP: tl.constexpr, INVERSE: tl.constexpr, TILE: tl.constexpr):
    """patch_dct (``Cm X Cm^T``) or, with INVERSE, patch_idct (``Cm^T U Cm``), SPEC 1."""
    BLOCK_P: tl.constexpr = TILE // (SP * SP)
    plane, p, q, valid, mask = _tile(tl.program_id(0), n_patches, Hp, Wp, S, SP, BLOCK_P)
    e = _patch_offsets(plane, p, q, Hp, Wp, S, SP)
    x = tl.load(src_ptr + e, mask=mask, other=0.0).to(tl.float32)
    m = _dct_matrix(S, SP, INVERSE)
    y = _right(_left(m, x), m)
    _store(dst_ptr + e, y, mask)


@_autotune
@triton.jit
def block_noise_kernel(g_ptr, out_ptr, n_patches, Hp, Wp,
                       S: tl.constexpr, SP: tl.constexpr, ADJOINT: tl.constexpr, TILE: tl.constexpr):
    """block_noise (SPEC 3) or, with ADJOINT, its adjoint (box sum toward +x, +y)."""
    BLOCK_P: tl.constexpr = TILE // (SP * SP)
    plane, p, q, valid, mask = _tile(tl.program_id(0), n_patches, Hp, Wp, S, SP, BLOCK_P)
    STEP: tl.constexpr = 1 if ADJOINT else -1
    pn = _wrap(p, STEP, Hp)
    qn = _wrap(q, STEP, Wp)
    e = _patch_offsets(plane, p, q, Hp, Wp, S, SP)
    g00 = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
    g01 = tl.load(g_ptr + _patch_offsets(plane, p, qn, Hp, Wp, S, SP), mask=mask, other=0.0).to(tl.float32)
    g10 = tl.load(g_ptr + _patch_offsets(plane, pn, q, Hp, Wp, S, SP), mask=mask, other=0.0).to(tl.float32)
    g11 = tl.load(g_ptr + _patch_offsets(plane, pn, qn, Hp, Wp, S, SP), mask=mask, other=0.0).to(tl.float32)
    y = _box_sum(g00, g01, g10, g11, S, SP, ADJOINT)
    _store(out_ptr + e, y, mask)


@_autotune
@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def relay_kernel(x_ptr, x0_ptr, xp_ptr, x0p_ptr, x0b_ptr, eps_ptr, eps2_ptr,
                 factor_ptr, corr_ptr, gamma_ptr, coef_ptr, sigma_ptr, sigma_next_ptr, seeds_ptr, out_ptr,
                 n_patches, C, Hp, Wp, alpha, k, k0, k1, off0, off1,
                 S: tl.constexpr, SP: tl.constexpr,
                 HAS_X: tl.constexpr, HAS_BLUR: tl.constexpr, HEUN: tl.constexpr, SECOND: tl.constexpr,
                 NOISE: tl.constexpr, HAS_BLOCK: tl.constexpr, PER_SAMPLE_SEEDS: tl.constexpr,
                 TILE: tl.constexpr):
    """The fused relay update, per patch and sample b (SPEC 2, 3, 6, 8):

    ``out = [gamma[b] x] + [idct(F[b] * dct(x0))] + [coef[b]] k (eps + alpha block_noise(eps2))``

    HAS_X: the ``gamma x`` term. HAS_BLUR: the blurred term, with ``F`` a ``[B, s, s]`` factor
    (``D(tau)`` for patch_blur / relay_corrupt, ``D' - gamma D`` for relay_step); noise is then
    scaled by ``coef[b]`` (sigma, or eta sigma'). HEUN: ``x0 = x - sigma (d + d')/2`` from x,
    x0_hat, x', x0_hat' (SPEC 8). SECOND: plus ``E[b] * dct(x0_b - x0)`` in the coefficients,
    E a ``[B, s, s]`` correction factor (SPEC 8.1). NOISE: 0 none, 1 Philox at (seed, offset), 2 loaded eps/eps2.
    HAS_BLOCK: alpha != 0 (the block-noise term is present). PER_SAMPLE_SEEDS: the seed of
    sample b is ``seeds[b]`` instead of the words (k0, k1).
    """
    BLOCK_P: tl.constexpr = TILE // (SP * SP)
    plane, p, q, valid, mask = _tile(tl.program_id(0), n_patches, Hp, Wp, S, SP, BLOCK_P)
    e = _patch_offsets(plane, p, q, Hp, Wp, S, SP)
    b = plane // C
    acc = tl.zeros((BLOCK_P, SP, SP), dtype=tl.float32)
    if HAS_X or HEUN:
        x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        acc = tl.load(gamma_ptr + b, mask=valid, other=0.0)[:, None, None] * x
    if HAS_BLUR:
        x0 = tl.load(x0_ptr + e, mask=mask, other=0.0).to(tl.float32)
        if HEUN:
            sigma = tl.load(sigma_ptr + b, mask=valid, other=1.0)[:, None, None]
            sigma_next = tl.load(sigma_next_ptr + b, mask=valid, other=1.0)[:, None, None]
            xp = tl.load(xp_ptr + e, mask=mask, other=0.0).to(tl.float32)
            x0p = tl.load(x0p_ptr + e, mask=mask, other=0.0).to(tl.float32)
            d = (x - x0) / sigma
            dp = (xp - x0p) / sigma_next
            x0 = x - sigma * (d + dp) / 2
        i = tl.arange(0, SP)
        f_off = b[:, None, None] * (S * S) + i[None, :, None] * S + i[None, None, :]
        factor = tl.load(factor_ptr + f_off, mask=mask, other=0.0)
        fwd = _dct_matrix(S, SP, False)
        inv = _dct_matrix(S, SP, True)
        u = _right(_left(fwd, x0), fwd) * factor
        if SECOND:
            x0b = tl.load(x0b_ptr + e, mask=mask, other=0.0).to(tl.float32)
            corr = tl.load(corr_ptr + f_off, mask=mask, other=0.0)
            u += _right(_left(fwd, x0b - x0), fwd) * corr
        acc += _right(_left(inv, u), inv)
    if NOISE != 0:
        key0, key1, base = _noise_stream(seeds_ptr, b, valid, k0, k1, C * Hp * S * Wp * S, PER_SAMPLE_SEEDS)
        if NOISE == 1:
            eps, g00 = _philox_normals(e - base, key0, key1, off0, off1)
        else:
            eps = tl.load(eps_ptr + e, mask=mask, other=0.0).to(tl.float32)
        noise = eps
        if HAS_BLOCK:
            if NOISE == 2:
                g00 = tl.load(eps2_ptr + e, mask=mask, other=0.0).to(tl.float32)
            pn = _wrap(p, -1, Hp)
            qn = _wrap(q, -1, Wp)
            g01 = _eps2_at(eps2_ptr, _patch_offsets(plane, p, qn, Hp, Wp, S, SP), base, mask, key0, key1, off0,
                          off1, NOISE)
            g10 = _eps2_at(eps2_ptr, _patch_offsets(plane, pn, q, Hp, Wp, S, SP), base, mask, key0, key1, off0,
                          off1, NOISE)
            g11 = _eps2_at(eps2_ptr, _patch_offsets(plane, pn, qn, Hp, Wp, S, SP), base, mask, key0, key1, off0,
                          off1, NOISE)
            noise = noise + alpha * _box_sum(g00, g01, g10, g11, S, SP, False)
        noise = k * noise
        if HAS_BLUR:
            noise = tl.load(coef_ptr + b, mask=valid, other=0.0)[:, None, None] * noise
        acc += noise
    _store(out_ptr + e, acc, mask)
