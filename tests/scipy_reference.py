"""Independent float64 references built on NumPy/SciPy, for the tests only.

Nothing here calls relayops: these are the yardsticks the package is measured against.
"""
import numpy as np
from scipy.fft import dctn, idctn


def per_patch(x: np.ndarray, s: int, fn) -> np.ndarray:
    """Apply ``fn`` to every s x s patch of a [B, C, H, W] array, one patch at a time."""
    out = np.empty_like(x, dtype=np.float64)
    b, c, h, w = x.shape
    for i in range(b):
        for j in range(c):
            for p in range(0, h, s):
                for q in range(0, w, s):
                    out[i, j, p:p + s, q:q + s] = fn(x[i, j, p:p + s, q:q + s], i)
    return out


def patch_dct(x, s):
    return per_patch(np.asarray(x, np.float64), s, lambda patch, _: dctn(patch, type=2, norm="ortho"))


def patch_idct(u, s):
    return per_patch(np.asarray(u, np.float64), s, lambda patch, _: idctn(patch, type=2, norm="ortho"))


def response(tau, s, d_min=0.001):
    """D_ij(tau) straight from SPEC 2."""
    i = np.arange(s)
    lam = np.pi**2 * (i[:, None] ** 2 + i[None, :] ** 2) / s**2
    return (1 - d_min) * np.exp(-lam * tau) + d_min


def patch_blur(x, taus, s, d_min=0.001):
    """Per patch: DCT, multiply by D(tau_b), inverse DCT (taus: one per sample)."""
    def blur(patch, b):
        return idctn(response(taus[b], s, d_min) * dctn(patch, type=2, norm="ortho"), type=2, norm="ortho")
    return per_patch(np.asarray(x, np.float64), s, blur)


def block_noise(g, s):
    """(1/s) sum_{i,j<s} g[x - i, y - j] with wraparound, by explicit rolls."""
    g = np.asarray(g, np.float64)
    out = np.zeros_like(g)
    for i in range(s):
        for j in range(s):
            out += np.roll(g, shift=(i, j), axis=(2, 3))
    return out / s


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123) on NumPy uint64 arrays holding uint32 words: the 32 x 32-bit
    products are exact in uint64. ``counter``: four arrays, ``key``: two arrays or ints."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, np.uint64) for k in key)
    for r in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def box_muller_pair(radius_word, angle_word):
    """SPEC 4's two normals (cosine, sine) of two uint32 words, in float64."""
    u1 = ((np.asarray(radius_word, np.uint64) >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = (np.asarray(angle_word, np.uint64) >> np.uint64(8)).astype(np.float64) * 2.0**-24
    rho = np.sqrt(-2.0 * np.log(u1))
    return rho * np.cos(2 * np.pi * u2), rho * np.sin(2 * np.pi * u2)


def philox_normals(shape, seed, offset, seeds=None):
    """``(eps, eps2)`` of SPEC 4 for logical NCHW ``shape``, element by element: element e uses
    pair q = e // 2 (counter (q lo, q hi, offset lo, offset hi), key = seed lo, seed hi) and takes
    the cosine normal when e is even, the sine normal when it is odd. ``seeds``: per-sample seeds
    (e then counts within the sample)."""
    n = int(np.prod(shape[1:])) if seeds is not None else int(np.prod(shape))
    e = np.arange(n, dtype=np.uint64)
    q = e >> np.uint64(1)
    odd = (e & np.uint64(1)).astype(bool)
    mask = 0xFFFFFFFF
    counter = (q & np.uint64(mask), q >> np.uint64(32),
               np.full(n, offset & mask, np.uint64), np.full(n, (offset >> 32) & mask, np.uint64))
    keys = [int(s) % 2**64 for s in seeds] if seeds is not None else [seed]
    eps, eps2 = [], []
    for k in keys:
        x0, x1, x2, x3 = philox4x32_10(counter, (k & mask, k >> 32))
        a = box_muller_pair(x0, x1)
        b = box_muller_pair(x2, x3)
        eps.append(np.where(odd, a[1], a[0]))
        eps2.append(np.where(odd, b[1], b[0]))
    if seeds is None:
        return eps[0].reshape(shape), eps2[0].reshape(shape)
    return np.stack(eps).reshape(shape), np.stack(eps2).reshape(shape)
