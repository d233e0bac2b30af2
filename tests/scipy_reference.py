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
