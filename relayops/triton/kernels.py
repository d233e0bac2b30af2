"""Triton kernels for the patch ops (SPEC 1-4, 6, 8): one kernel per op, a thread per patch.

Layout. A launch covers ``[B, C, H, W]`` contiguous storage with a 2-D grid: axis 1 is the plane
(``b * C + c``, from ``plane_start``), axis 0 a band of ``ROWS`` patch rows times a block of
``BLOCK_Q`` patch columns. Lane l of a program owns one patch column ``q`` and walks the band's
patch rows one after the other. The plane's base is the only 64-bit address arithmetic; offsets
inside a plane are int32 (the host checks ``H * W < 2^31``), and nothing is divided per element.

Registers. A patch is a tuple of ``S`` rows, a row a tuple of ``S`` float32 ``[BLOCK_Q]``
tensors: every lane holds its whole patch, so the DCT's row and column mixes are plain FMAs with
compile-time coefficients (``dct_coefficient``), with no reductions across lanes. Rows are
loaded and stored as ``[BLOCK_Q, S]`` vectors (128 bits for float32 at s = 4) when s is a power
of two, and element by element otherwise. All arithmetic is float32 whatever the storage dtype.

Noise (SPEC 4): one Philox4x32-10 call per pair of elements ``(2m, 2m + 1)`` of the logical NCHW
order (counter (lo m, hi m, lo offset, hi offset), key = the seed's words) gives eps and eps2 of
both elements (``normal_quad``). A patch row starting at an odd index (odd s) draws one more pair
and picks its elements.

Block noise (SPEC 3), separable: the row sum ``h`` of s consecutive values (this patch's columns
up to j and the last ``s - 1 - j`` columns of the patch to the left, wrapping around), then the
column sum of s consecutive ``h`` rows (this patch's rows up to i and the last rows of the patch
row above). A lane walking down its patch column carries the above part in registers (``s - 1``
partial sums per column), so each value of the band is drawn or read once, plus one patch row
above the band. The left part comes from the neighbouring lane (``tl.gather``): the first lane
of a program only supplies it (programs overlap by one patch column). The adjoint (box toward
+x, +y) is the same computation on patches mirrored in both axes, walking up and taking the
right-hand neighbour.
"""
from __future__ import annotations

import math
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)
INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24, exact
LN2 = tl.constexpr(0.6931471805599453)


def launch_shape(wp: int, hp: int, planes: int, halo: bool):
    """``(BLOCK_Q, PLANES, ROWS, num_warps)`` for ``planes`` planes of ``hp x wp`` patches:
    lanes for the patch columns (up to 128), one plane a program, and a band of rows long enough
    that the patch row a block-noise band reads above itself is a small extra. The interpreter
    runs one program over every plane and row (its cost is per operation, not per lane). On a
    GPU, planes side by side (per-lane sample parameters) make the fused relay_step spill at the
    register cap, so they stay interpreter-only."""
    block_q = min(128, max(2, triton.next_power_of_2(wp + halo)))
    per_program = 1
    rows = min(hp, 8) if halo else min(hp, 2)
    if INTERPRET:
        per_program, rows = triton.next_power_of_2(planes), hp
    return block_q, per_program, max(rows, 1), max(1, min(4, block_q * per_program // 32))


# ----------------------------------------------------------------------------- compile-time constants


@triton.constexpr_function
def dct_coefficient(s, k, n):
    """Entry ``C[k, n] = c_k cos(pi (2n + 1) k / (2s))`` of the orthonormal DCT-II matrix (SPEC 1)."""
    scale = math.sqrt((1.0 if k == 0 else 2.0) / s)
    return scale * math.cos(math.pi * (2 * n + 1) * k / (2 * s))


# ----------------------------------------------------------------------------- tuples of lanes


@triton.jit
def _reversed(t, S: tl.constexpr):
    out = ()
    for i in tl.static_range(S):
        out = out + (t[S - 1 - i],)
    return out


@triton.jit
def _mirrored(patch, S: tl.constexpr):
    """The patch flipped in both axes (rows and columns)."""
    out = ()
    for i in tl.static_range(S):
        out = out + (_reversed(patch[S - 1 - i], S),)
    return out


@triton.jit
def _transposed(patch, S: tl.constexpr):
    out = ()
    for j in tl.static_range(S):
        col = ()
        for i in tl.static_range(S):
            col = col + (patch[i][j],)
        out = out + (col,)
    return out


@triton.jit
def _unpack(v, S: tl.constexpr):
    """``[B, S]`` (S a power of two) -> tuple of S ``[B]`` columns; splits inside each thread."""
    if S == 2:
        a, b = tl.split(v)
        return a, b
    else:
        a, b = tl.split(tl.reshape(v, [v.shape[0], S // 2, 2]))
        even = _unpack(a, S // 2)
        odd = _unpack(b, S // 2)
        out = ()
        for i in tl.static_range(S // 2):
            out = out + (even[i], odd[i])
        return out


@triton.jit
def _pack(t, S: tl.constexpr):
    """Inverse of ``_unpack``."""
    if S == 2:
        return tl.join(t[0], t[1])
    else:
        even = ()
        odd = ()
        for i in tl.static_range(S // 2):
            even = even + (t[2 * i],)
            odd = odd + (t[2 * i + 1],)
        v = tl.join(_pack(even, S // 2), _pack(odd, S // 2))
        return tl.reshape(v, [v.shape[0], S])


@triton.jit
def _load_row(ptr, off, mask, S: tl.constexpr):
    """The S values at ``ptr + off + j`` of each lane, float32, as a tuple."""
    if S > 1 and (S & (S - 1)) == 0:  # row vectors; S = 1 and other sizes element by element
        j = tl.arange(0, S)
        v = tl.load((ptr + off)[:, None] + j[None, :], mask=mask[:, None], other=0.0)
        return _unpack(v.to(tl.float32), S)
    else:
        out = ()
        for j in tl.static_range(S):
            out = out + (tl.load(ptr + off + j, mask=mask, other=0.0).to(tl.float32),)
        return out


@triton.jit
def _rounded(ptr, value):
    """float32 ``value`` in the dtype ``ptr`` points to, rounded to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16 and ROUND_BF16_BY_HAND:
        # The interpreter's float32 -> bfloat16 cast truncates (the GPU's cast rounds to nearest
        # even); NaN keeps the cast.
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        half = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value == value, half, value.to(tl.bfloat16))
    else:
        return value.to(ptr.dtype.element_ty)


@triton.jit
def _store_row(ptr, off, row, mask, S: tl.constexpr):
    if S > 1 and (S & (S - 1)) == 0:
        j = tl.arange(0, S)
        tl.store((ptr + off)[:, None] + j[None, :], _rounded(ptr, _pack(row, S)), mask=mask[:, None])
    else:
        for j in tl.static_range(S):
            tl.store(ptr + off + j, _rounded(ptr, row[j]), mask=mask)


@triton.jit
def _load_patch(ptr, off, W, mask, S: tl.constexpr):
    """Patch at in-plane offset ``off`` (its top-left element) of rows ``W`` apart."""
    out = ()
    for i in tl.static_range(S):
        out = out + (_load_row(ptr, off + i * W, mask, S),)
    return out


@triton.jit
def _store_patch(ptr, off, W, patch, mask, S: tl.constexpr):
    for i in tl.static_range(S):
        _store_row(ptr, off + i * W, patch[i], mask, S)


@triton.jit
def _zero_patch(like, S: tl.constexpr):
    out = ()
    for i in tl.static_range(S):
        row = ()
        for j in tl.static_range(S):
            row = row + (like * 0.0,)
        out = out + (row,)
    return out


@triton.jit
def _axpy(a, x, y, S: tl.constexpr):
    """``a * x + y`` elementwise on patches (``a`` a scalar or a patch-broadcastable value)."""
    out = ()
    for i in tl.static_range(S):
        row = ()
        for j in tl.static_range(S):
            row = row + (a * x[i][j] + y[i][j],)
        out = out + (row,)
    return out


@triton.jit
def _sub(x, y, S: tl.constexpr):
    return _axpy(-1.0, y, x, S)


# ----------------------------------------------------------------------------- DCT (SPEC 1)


@triton.jit
def _dct_1d(x, S: tl.constexpr, INVERSE: tl.constexpr):
    """``y = C x`` (or ``C^T x`` with INVERSE) of S values. For even s the even/odd symmetry
    ``C[k, s-1-n] = (-1)^k C[k, n]`` halves the multiplies."""
    out = ()
    if S % 2 == 0:
        H: tl.constexpr = S // 2
        if INVERSE:
            even = ()
            odd = ()
            for n in tl.static_range(H):
                e = x[0] * dct_coefficient(S, 0, n)
                o = x[1] * dct_coefficient(S, 1, n)
                for k in tl.static_range(2, S, 2):
                    e += x[k] * dct_coefficient(S, k, n)
                    o += x[k + 1] * dct_coefficient(S, k + 1, n)
                even = even + (e,)
                odd = odd + (o,)
            first = ()
            second = ()
            for n in tl.static_range(H):
                first = first + (even[n] + odd[n],)
                second = second + (even[H - 1 - n] - odd[H - 1 - n],)
            out = first + second
        else:
            total = ()
            diff = ()
            for n in tl.static_range(H):
                total = total + (x[n] + x[S - 1 - n],)
                diff = diff + (x[n] - x[S - 1 - n],)
            for k in tl.static_range(S):
                if k % 2 == 0:
                    acc = total[0] * dct_coefficient(S, k, 0)
                    for n in tl.static_range(1, H):
                        acc += total[n] * dct_coefficient(S, k, n)
                else:
                    acc = diff[0] * dct_coefficient(S, k, 0)
                    for n in tl.static_range(1, H):
                        acc += diff[n] * dct_coefficient(S, k, n)
                out = out + (acc,)
    else:
        for k in tl.static_range(S):
            if INVERSE:
                acc = x[0] * dct_coefficient(S, 0, k)
                for n in tl.static_range(1, S):
                    acc += x[n] * dct_coefficient(S, n, k)
            else:
                acc = x[0] * dct_coefficient(S, k, 0)
                for n in tl.static_range(1, S):
                    acc += x[n] * dct_coefficient(S, k, n)
            out = out + (acc,)
    return out


@triton.jit
def _dct_2d(patch, S: tl.constexpr, INVERSE: tl.constexpr):
    """``C X C^T`` (or ``C^T X C``): the 1-D transform of every row, then of every column."""
    rows = ()
    for i in tl.static_range(S):
        rows = rows + (_dct_1d(patch[i], S, INVERSE),)
    cols = ()
    for j in tl.static_range(S):
        cols = cols + (_dct_1d(_transposed(rows, S)[j], S, INVERSE),)
    return _transposed(cols, S)


# ----------------------------------------------------------------------------- random numbers (SPEC 4)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 words (x0, x1, x2, x3) of counter (c0..c3) and key (k0, k1), uint32 tensors.
    Triton's philox_impl takes (counter, key) in this order and runs the same rounds as the
    reference."""
    return tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)


@triton.jit
def _sincos_2pi(u):
    """``(cos(2 pi u), sin(2 pi u))`` for u in [0, 1): an exact reduction to the nearest quarter
    turn, then Taylor polynomials on |angle| <= pi/4 (error below 1e-7, plain FMAs, the same on
    the GPU and in the interpreter)."""
    t = u * 4.0  # exact
    quarter = tl.floor(t + 0.5)
    a = (t - quarter) * 1.5707963267948966  # in [-pi/4, pi/4]
    a2 = a * a
    sin_a = a + a * a2 * (-1.6666666666666666e-01 + a2 * (8.333333333333333e-03 + a2 * (
        -1.984126984126984e-04 + a2 * (2.7557319223985893e-06 + a2 * -2.505210838544172e-08))))
    cos_a = 1.0 + a2 * (-0.5 + a2 * (4.1666666666666664e-02 + a2 * (-1.388888888888889e-03 + a2 * (
        2.48015873015873e-05 + a2 * -2.755731922398589e-07))))
    k = quarter.to(tl.int32) & 3  # angle = k quarter turns + a
    c = tl.where(k == 0, cos_a, tl.where(k == 1, -sin_a, tl.where(k == 2, -cos_a, sin_a)))
    s = tl.where(k == 0, sin_a, tl.where(k == 1, cos_a, tl.where(k == 2, -sin_a, -cos_a)))
    return c, s


@triton.jit
def box_muller(w0, w1):
    """The two normals ``(rho cos(2 pi u2), rho sin(2 pi u2))``, ``rho = sqrt(-2 ln u1)``, of two
    uint32 words through their top 24 bits: ``u1 = ((w0 >> 8) + 1) 2^-24``, ``u2 = (w1 >> 8) 2^-24``."""
    u1 = ((w0 >> 8) + 1).to(tl.float32) * INV_2_24
    u2 = (w1 >> 8).to(tl.float32) * INV_2_24
    # tl.log is the accurate logarithm (near u1 = 1 an approximate one would swamp -2 ln u1);
    # tl.sqrt is the approximate square root (relative error about 1e-7; sqrt_rn spills the
    # fused relay_step at the register cap).
    rho = tl.sqrt(-2.0 * tl.log(u1))
    c, s = _sincos_2pi(u2)
    return rho * c, rho * s


@triton.jit
def normal_quad(m_lo, m_hi, off0, off1, k0, k1):
    """``(eps[2m], eps[2m+1], eps2[2m], eps2[2m+1])`` of pair m from one Philox call."""
    x0, x1, x2, x3 = philox4x32(m_lo, m_hi, off0 + m_lo * 0, off1 + m_lo * 0, k0 + m_lo * 0, k1 + m_lo * 0)
    e0, e1 = box_muller(x0, x1)
    f0, f1 = box_muller(x2, x3)
    return e0, e1, f0, f1


@triton.jit
def _draw_row(t, base_lo, base_hi, off0, off1, k0, k1, S: tl.constexpr):
    """eps and eps2 (tuples of S) of the elements ``e = 2 base + t + j``, j < S: a patch row at
    in-plane offset ``t - (E mod 2)`` of a plane whose first element has stream index E =
    ``2 base + E mod 2`` (``base`` as uint32 words). Pairs from ``(2 base + t) >> 1`` on."""
    first = (t >> 1).to(tl.uint32)
    eps = ()
    eps2 = ()
    for m in tl.static_range((S + 1) // 2):
        step = first + m
        lo = base_lo + step
        hi = base_hi + (lo < step).to(tl.uint32)  # carry
        e0, e1, f0, f1 = normal_quad(lo, hi, off0, off1, k0, k1)
        eps = eps + (e0, e1)
        eps2 = eps2 + (f0, f1)
    if S % 2 == 0:  # rows start at even indices
        return eps, eps2
    else:  # a row starting at an odd index starts at the second element of its first pair
        odd = (t & 1) == 1
        a = ()
        b = ()
        for j in tl.static_range(S):
            a = a + (tl.where(odd, eps[j + 1], eps[j]),)
            b = b + (tl.where(odd, eps2[j + 1], eps2[j]),)
        return a, b


@triton.jit
def _draw_patch(t, W, base_lo, base_hi, off0, off1, k0, k1, S: tl.constexpr):
    eps = ()
    eps2 = ()
    for i in tl.static_range(S):
        a, b = _draw_row(t + i * W, base_lo, base_hi, off0, off1, k0, k1, S)
        eps = eps + (a,)
        eps2 = eps2 + (b,)
    return eps, eps2


# ----------------------------------------------------------------------------- block noise (SPEC 3)


@triton.jit
def _row_tails(patch, S: tl.constexpr):
    """``tails[i][j] = sum_{t >= j} patch[i][t]`` for j = 1 .. s-1 (index j - 1): what the lane to
    the right adds to its row sums."""
    out = ()
    for i in tl.static_range(S):
        acc = patch[i][S - 1]
        row = (acc,)
        for j in tl.static_range(S - 2, 0, -1):
            acc = acc + patch[i][j]
            row = (acc,) + row
        out = out + (row,)
    return out


@triton.jit
def _from_lane(t, source, S: tl.constexpr):
    """Tails ``t`` (S rows of S - 1) as held by lane ``source[l]``, for every lane l."""
    out = ()
    for i in tl.static_range(S):
        row = ()
        for j in tl.static_range(S - 1):
            row = row + (tl.gather(t[i][j], source, 0),)
        out = out + (row,)
    return out


@triton.jit
def _row_sums(patch, left_tails, S: tl.constexpr):
    """``h[i][j] = sum_{t <= j} patch[i][t] + left_tails[i][j]`` (the left patch's last s-1-j)."""
    out = ()
    for i in tl.static_range(S):
        acc = patch[i][0]
        if S > 1:
            row = (acc + left_tails[i][0],)
        else:  # s = 1: no neighbour enters the box
            row = (acc,)
        for j in tl.static_range(1, S):
            acc = acc + patch[i][j]
            if j < S - 1:
                row = row + (acc + left_tails[i][j],)
            else:
                row = row + (acc,)
        out = out + (row,)
    return out


@triton.jit
def _column_tails(h, S: tl.constexpr):
    """``carry[i][j] = sum_{t > i} h[t][j]``, i < s - 1: what the patch row below adds."""
    acc = h[S - 1]
    out = (acc,)
    for i in tl.static_range(S - 2, 0, -1):
        row = ()
        for j in tl.static_range(S):
            row = row + (acc[j] + h[i][j],)
        acc = row
        out = (acc,) + out
    return out


@triton.jit
def _column_sums(h, carry, S: tl.constexpr):
    """``sum_{t <= i} h[t][j] + carry[i][j]`` (the rows above), the box sums of the patch."""
    acc = h[0]
    out = ()
    for i in tl.static_range(S):
        if i > 0:
            row = ()
            for j in tl.static_range(S):
                row = row + (acc[j] + h[i][j],)
            acc = row
        if i < S - 1:
            row = ()
            for j in tl.static_range(S):
                row = row + (acc[j] + carry[i][j],)
            out = out + (row,)
        else:
            out = out + (acc,)
    return out


@triton.jit
def _box_rows(g, source, ADJOINT: tl.constexpr, S: tl.constexpr):
    """Row sums ``h`` of a patch row of eps2 patches ``g`` (one per lane), in walking order
    (mirrored for the adjoint), with the neighbour's tails from lane ``source``."""
    if ADJOINT:
        g = _mirrored(g, S)
    return _row_sums(g, _from_lane(_row_tails(g, S), source, S), S)


# ----------------------------------------------------------------------------- program layout


@triton.jit
def _program(n_planes, C, Hp, Wp, n_qblocks, plane_start, S: tl.constexpr, BLOCK_Q: tl.constexpr,
             PLANES: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, ADJOINT: tl.constexpr):
    """This program's first patch row and row count, and per lane (``PLANES`` groups of
    ``BLOCK_Q``): plane, sample b, channel c, patch column q (wrapped into the plane), whether
    it exists, whether it is written, and the lane it takes block-noise tails from. HALO: the
    column blocks overlap by one patch column (the first lane of a group, or the last for the
    adjoint, only supplies tails)."""
    pid = tl.program_id(0)
    band = pid // n_qblocks  # scalar divisions, once per program
    qb = pid - band * n_qblocks
    p0 = band * ROWS
    n_rows = tl.minimum(ROWS, Hp - p0)
    lane = tl.arange(0, PLANES * BLOCK_Q)
    ql = lane % BLOCK_Q  # powers of two: a mask and a shift
    if PLANES == 1:  # one plane: its sample's parameters are scalars (uniform registers)
        plane = plane_start + tl.program_id(1)
        has_plane = ql >= 0
    else:
        plane = plane_start + tl.program_id(1) * PLANES + lane // BLOCK_Q
        has_plane = plane < n_planes
        plane = tl.where(has_plane, plane, 0)
    b = plane // C  # int32, once per program
    c = plane - b * C
    if HALO:
        if ADJOINT:
            q = qb * (BLOCK_Q - 1) + ql
            written = (ql < BLOCK_Q - 1) & (q < Wp)
            source = (lane + 1) % (PLANES * BLOCK_Q)
        else:
            q = qb * (BLOCK_Q - 1) - 1 + ql
            written = (ql > 0) & (q < Wp)
            source = (lane + PLANES * BLOCK_Q - 1) % (PLANES * BLOCK_Q)
        q = tl.where(q < 0, q + Wp, tl.where(q >= Wp, q - Wp, q))
    else:
        q = qb * BLOCK_Q + ql
        written = q < Wp
        source = lane
    exists = (q < Wp) & has_plane
    written = written & has_plane
    return plane, b, c, p0, n_rows, q, exists, written, source


@triton.jit
def _plane(ptr, plane, HW):
    """Pointer to the first element of each lane's ``plane`` (the only 64-bit offsets)."""
    return ptr + plane.to(tl.int64) * HW


@triton.jit
def _per_sample_patch(ptr, b, S: tl.constexpr):
    """The ``[s, s]`` per-sample factor of each lane's sample b."""
    out = ()
    for i in tl.static_range(S):
        row = ()
        for j in tl.static_range(S):
            row = row + (tl.load(ptr + b * (S * S) + i * S + j).to(tl.float32),)
        out = out + (row,)
    return out


@triton.jit
def _scaled(u, f, S: tl.constexpr):
    out = ()
    for i in tl.static_range(S):
        row = ()
        for j in tl.static_range(S):
            row = row + (u[i][j] * f[i][j],)
        out = out + (row,)
    return out


# ----------------------------------------------------------------------------- kernels


@triton.jit
def words_kernel(w_ptr, eps_ptr, eps2_ptr, n, BLOCK: tl.constexpr):
    """The normals of n pairs from their Philox words ``w[i], w[n+i], w[2n+i], w[3n+i]`` (int32
    holding uint32 bits) through ``box_muller``, as the kernels draw them: eps[2i], eps[2i+1]
    from words 0, 1 and eps2[2i], eps2[2i+1] from words 2, 3. For tests."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    w = ()
    for r in tl.static_range(4):
        w = w + (tl.load(w_ptr + r * n + i, mask=m, other=0).to(tl.uint32, bitcast=True),)
    e0, e1 = box_muller(w[0], w[1])
    f0, f1 = box_muller(w[2], w[3])
    tl.store(eps_ptr + 2 * i, e0, mask=m)
    tl.store(eps_ptr + 2 * i + 1, e1, mask=m)
    tl.store(eps2_ptr + 2 * i, f0, mask=m)
    tl.store(eps2_ptr + 2 * i + 1, f1, mask=m)


@triton.jit
def patch_dct_kernel(src_ptr, dst_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start, S: tl.constexpr,
                     INVERSE: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr, ROWS: tl.constexpr):
    """patch_dct (``C X C^T``) or, with INVERSE, patch_idct (``C^T U C``), SPEC 1."""
    plane, b, c, p0, n_rows, q, exists, written, source = _program(n_planes, C, Hp, Wp, n_qblocks, plane_start, S,
                                                                   BLOCK_Q, PLANES, ROWS, False, False)
    W = Wp * S
    HW = Hp * S * W
    src = _plane(src_ptr, plane, HW)
    dst = _plane(dst_ptr, plane, HW)
    for r in range(n_rows):
        off = (p0 + r) * S * W + q * S
        x = _load_patch(src, off, W, exists, S)
        _store_patch(dst, off, W, _dct_2d(x, S, INVERSE), written, S)


@triton.jit
def _relay_program(x_ptr, x0_ptr, xp_ptr, x0p_ptr, x0b_ptr, eps_ptr, eps2_ptr, factor_ptr, corr_ptr, gamma_ptr,
                   coef_ptr, sigma_ptr, sigma_next_ptr, seeds_ptr, out_ptr,
                   n_planes, C, Hp, Wp, n_qblocks, plane_start, alpha, k, k0, k1, off0, off1,
                   S: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr, ROWS: tl.constexpr,
                   HAS_X: tl.constexpr, HAS_BLUR: tl.constexpr, HEUN: tl.constexpr, SECOND: tl.constexpr,
                   NOISE: tl.constexpr, HAS_EPS: tl.constexpr, HAS_BLOCK: tl.constexpr, ADJOINT: tl.constexpr,
                   PER_SAMPLE_SEEDS: tl.constexpr):
    """Per patch of sample b (SPEC 2, 3, 6, 8):

    ``out = [gamma[b] x] + [idct(F[b] * dct(x0))] + [coef[b]] k ([eps] + [alpha block_noise(eps2)])``

    HAS_X: the ``gamma x`` term. HAS_BLUR: the blurred term, with ``F`` a ``[B, s, s]`` factor
    (``D(tau)`` for patch_blur / relay_corrupt, ``D' - gamma D`` for relay_step); noise is then
    scaled by ``coef[b]`` (sigma, or eta sigma'). HEUN: ``x0 = x - sigma (d + d')/2`` from x,
    x0_hat, x', x0_hat' (SPEC 8). SECOND: plus ``E[b] * dct(x0_b - x0)`` in the coefficients
    (SPEC 8.1). NOISE: 0 none, 1 drawn (Philox at seed/seeds[b], offset), 2 read from eps/eps2.
    HAS_EPS: the eps term; HAS_BLOCK: the block-noise term (ADJOINT: its adjoint).
    """
    HALO: tl.constexpr = HAS_BLOCK
    plane, b, c, p0, n_rows, q, exists, written, source = _program(n_planes, C, Hp, Wp, n_qblocks, plane_start, S,
                                                                   BLOCK_Q, PLANES, ROWS, HALO, ADJOINT)
    W = Wp * S
    HW = Hp * S * W
    out = _plane(out_ptr, plane, HW)
    if HAS_X:
        x_plane = _plane(x_ptr, plane, HW)
        gamma = tl.load(gamma_ptr + b)
    if HAS_BLUR:
        x0_plane = _plane(x0_ptr, plane, HW)
        factor = _per_sample_patch(factor_ptr, b, S)
        if HEUN:
            xp_plane = _plane(xp_ptr, plane, HW)
            x0p_plane = _plane(x0p_ptr, plane, HW)
            # x0_eff = x - sigma (d + d')/2 = (x + x0)/2 - (sigma / sigma') (x' - x0')/2
            half_ratio = 0.5 * tl.load(sigma_ptr + b) / tl.load(sigma_next_ptr + b)
        if SECOND:
            x0b_plane = _plane(x0b_ptr, plane, HW)
            corr = _per_sample_patch(corr_ptr, b, S)
    if NOISE != 0:
        scale = k
        if HAS_BLUR:
            scale = scale * tl.load(coef_ptr + b)
        if NOISE == 1:
            if PER_SAMPLE_SEEDS:
                seed = tl.load(seeds_ptr + b)
                k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
                k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
                first = c.to(tl.int64) * HW  # the sample's stream index of this plane's first element
            else:
                k0 = k0.to(tl.uint32)
                k1 = k1.to(tl.uint32)
                first = plane.to(tl.int64) * HW
            off0 = off0.to(tl.uint32)
            off1 = off1.to(tl.uint32)
            base_lo = ((first >> 1) & 0xFFFFFFFF).to(tl.uint32)
            base_hi = (first >> 33).to(tl.uint32)
            parity = (first & 1).to(tl.int32)
        else:
            eps_plane = _plane(eps_ptr, plane, HW)
            eps2_plane = _plane(eps2_ptr, plane, HW)
        if HAS_BLOCK:
            # The column sums' carry from the patch row above the band (below, for the adjoint).
            if ADJOINT:
                p_prev = p0 + n_rows
                p_prev = tl.where(p_prev == Hp, 0, p_prev)
            else:
                p_prev = tl.where(p0 == 0, Hp - 1, p0 - 1)
            off = p_prev * S * W + q * S
            if NOISE == 1:
                _, g = _draw_patch(off + parity, W, base_lo, base_hi, off0, off1, k0, k1, S)
            else:
                g = _load_patch(eps2_plane, off, W, exists, S)
            carry = _column_tails(_box_rows(g, source, ADJOINT, S), S)
    for r in range(n_rows):
        if ADJOINT:
            p = p0 + n_rows - 1 - r
        else:
            p = p0 + r
        off = p * S * W + q * S
        acc = _zero_patch(q * 0.0, S)
        if HAS_X or HEUN:
            x = _load_patch(x_plane, off, W, exists, S)
        if HAS_X:
            acc = _axpy(gamma, x, acc, S)
        if HAS_BLUR:
            x0 = _load_patch(x0_plane, off, W, exists, S)
            if HEUN:
                xp = _load_patch(xp_plane, off, W, exists, S)
                x0p = _load_patch(x0p_plane, off, W, exists, S)
                x0 = _axpy(-half_ratio, _sub(xp, x0p, S), _axpy(0.5, _sub(x, x0, S), x0, S), S)
            u = _scaled(_dct_2d(x0, S, False), factor, S)
            if SECOND:
                x0b = _load_patch(x0b_plane, off, W, exists, S)
                u = _axpy(1.0, _scaled(_dct_2d(_sub(x0b, x0, S), S, False), corr, S), u, S)
            acc = _axpy(1.0, _dct_2d(u, S, True), acc, S)
        if NOISE != 0:
            if NOISE == 1:
                eps, g = _draw_patch(off + parity, W, base_lo, base_hi, off0, off1, k0, k1, S)
            else:
                if HAS_EPS:
                    eps = _load_patch(eps_plane, off, W, exists, S)
                if HAS_BLOCK:
                    g = _load_patch(eps2_plane, off, W, exists, S)
            if HAS_EPS:
                acc = _axpy(scale, eps, acc, S)
            if HAS_BLOCK:
                h = _box_rows(g, source, ADJOINT, S)
                box = _column_sums(h, carry, S)
                carry = _column_tails(h, S)
                if ADJOINT:
                    box = _mirrored(box, S)
                acc = _axpy(scale * alpha * (1.0 / S), box, acc, S)
        _store_patch(out, off, W, acc, written, S)


@triton.jit
def block_noise_kernel(g_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start,
                       S: tl.constexpr, ADJOINT: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr,
                       ROWS: tl.constexpr):
    """block_noise (SPEC 3) of g, or with ADJOINT its adjoint (box toward +x, +y)."""
    _relay_program(g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr, g_ptr,
                   out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start, 1.0, 1.0, 0, 0, 0, 0,
                   S, BLOCK_Q, PLANES, ROWS, False, False, False, False, 2, False, True, ADJOINT, False)


@triton.jit
def patch_blur_kernel(x_ptr, factor_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start,
                      S: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr, ROWS: tl.constexpr):
    """patch_blur: ``idct(F[b] * dct(x))`` with F = D(tau[b]) (SPEC 2)."""
    _relay_program(x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, factor_ptr, factor_ptr, factor_ptr, factor_ptr,
                   factor_ptr, factor_ptr, factor_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start, 0.0, 1.0,
                   0, 0, 0, 0, S, BLOCK_Q, PLANES, ROWS, False, True, False, False, 0, False, False, False, False)


@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def relay_noise_kernel(eps_ptr, eps2_ptr, seeds_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start, alpha, k,
                       k0, k1, off0, off1, S: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr,
                       ROWS: tl.constexpr, NOISE: tl.constexpr, HAS_BLOCK: tl.constexpr,
                       PER_SAMPLE_SEEDS: tl.constexpr):
    """relay_noise: ``k (eps + alpha block_noise(eps2))``, drawn (NOISE = 1) or given (2) (SPEC 3, 4)."""
    _relay_program(eps_ptr, eps_ptr, eps_ptr, eps_ptr, eps_ptr, eps_ptr, eps2_ptr, eps_ptr, eps_ptr, eps_ptr,
                   eps_ptr, eps_ptr, eps_ptr, seeds_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start,
                   alpha, k, k0, k1, off0, off1, S, BLOCK_Q, PLANES, ROWS, False, False, False, False, NOISE, True,
                   HAS_BLOCK, False, PER_SAMPLE_SEEDS)


@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def relay_corrupt_kernel(y_ptr, eps_ptr, eps2_ptr, factor_ptr, sigma_ptr, seeds_ptr, out_ptr,
                         n_planes, C, Hp, Wp, n_qblocks, plane_start, alpha, k, k0, k1, off0, off1,
                         S: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr, ROWS: tl.constexpr,
                         NOISE: tl.constexpr, HAS_BLOCK: tl.constexpr, PER_SAMPLE_SEEDS: tl.constexpr):
    """relay_corrupt: ``patch_blur(y, tau[b]) + sigma[b] k (eps + alpha block_noise(eps2))`` (SPEC 6)."""
    _relay_program(y_ptr, y_ptr, y_ptr, y_ptr, y_ptr, eps_ptr, eps2_ptr, factor_ptr, factor_ptr, sigma_ptr,
                   sigma_ptr, sigma_ptr, sigma_ptr, seeds_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks, plane_start,
                   alpha, k, k0, k1, off0, off1, S, BLOCK_Q, PLANES, ROWS, False, True, False, False, NOISE, True,
                   HAS_BLOCK, False, PER_SAMPLE_SEEDS)


@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def relay_step_kernel(x_ptr, x0_ptr, xp_ptr, x0p_ptr, x0b_ptr, eps_ptr, eps2_ptr, factor_ptr, corr_ptr, gamma_ptr,
                      coef_ptr, sigma_ptr, sigma_next_ptr, seeds_ptr, out_ptr,
                      n_planes, C, Hp, Wp, n_qblocks, plane_start, alpha, k, k0, k1, off0, off1,
                      S: tl.constexpr, BLOCK_Q: tl.constexpr, PLANES: tl.constexpr, ROWS: tl.constexpr,
                      HEUN: tl.constexpr, SECOND: tl.constexpr, NOISE: tl.constexpr, HAS_BLOCK: tl.constexpr,
                      PER_SAMPLE_SEEDS: tl.constexpr):
    """relay_step, Euler, Heun or second order (SPEC 8, 8.1):
    ``gamma x + idct((D' - gamma D) dct(x0) [+ E dct(x0_b - x0)]) + eta sigma' k (eps + alpha block_noise(eps2))``."""
    _relay_program(x_ptr, x0_ptr, xp_ptr, x0p_ptr, x0b_ptr, eps_ptr, eps2_ptr, factor_ptr, corr_ptr, gamma_ptr,
                   coef_ptr, sigma_ptr, sigma_next_ptr, seeds_ptr, out_ptr, n_planes, C, Hp, Wp, n_qblocks,
                   plane_start, alpha, k, k0, k1, off0, off1, S, BLOCK_Q, PLANES, ROWS, True, True, HEUN, SECOND,
                   NOISE, True, HAS_BLOCK, False, PER_SAMPLE_SEEDS)
