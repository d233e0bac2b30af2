"""Image-quality measures for the demo: PSNR and the log-spectral distance of radially averaged
power spectra, per frequency band.

Images are ``[N, C, H, W]`` tensors in [-1, 1] (square, H = W).
"""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale: ``10 log10(1 / mse)`` with
    ``mse = mean(((x - ref) / 2)^2)`` over C, H, W. Returns ``[N]`` float64."""
    err = ((x.double() - ref.double()) / 2) ** 2
    mse = err.flatten(1).mean(1).clamp_min(1e-20)
    return -10 * torch.log10(mse)


def radial_power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power spectrum of each image: ``[N, C, H, H] -> (freq [H], power [N, H])``.

    Per image, the squared full-image orthonormal DCT-II coefficients (channel mean), averaged
    over rings of integer radius (``relayops.analysis.dct_power`` and ``radial_profile``). The
    DCT needs no window: it sees the image mirrored, so the borders add no spurious edges.
    ``freq`` = ring / H, as a fraction of the Nyquist frequency.
    """
    from ..analysis import dct_power, radial_profile

    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"radial_power_spectrum needs square images, got {tuple(x.shape[-2:])}")
    rows = [radial_profile(dct_power(x[i:i + 1])) for i in range(x.shape[0])]
    return rows[0][0], torch.stack([p for _, p in rows])


def log_spectral_distance(x: torch.Tensor, ref: torch.Tensor, bands) -> dict:
    """Mean over images of the RMS difference in dB of the radial power spectra,
    ``sqrt(mean_r (10 log10(P_x(r) / P_ref(r)))^2)``, over the radii r of each band.

    bands: ``(lo, hi)`` pairs in units of the Nyquist frequency; ring r (of H) is in the band
    when ``lo <= r / H < hi``. Ring 0 (the mean colour) is left out. Returns ``{"lo-hi": dB}``.
    """
    rel, px = radial_power_spectrum(x)
    _, pref = radial_power_spectrum(ref)
    diff_db = 10 * torch.log10(px.clamp_min(1e-30) / pref.clamp_min(1e-30))
    out = {}
    for lo, hi in bands:
        sel = (rel >= lo) & (rel < hi)
        sel[0] = False
        if not bool(sel.any()):
            raise ValueError(f"band {lo}-{hi} contains no frequency at this resolution")
        out[f"{lo:.2f}-{hi:.2f}"] = float(torch.sqrt((diff_db[:, sel] ** 2).mean(1)).mean())
    return out
