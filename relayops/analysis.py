"""Frequency analysis of noise (SPEC 12): the per-DCT-frequency SNR of RDM's Figure 2.

The same noise level sigma corrupts a high-resolution image less than a low-resolution one:
compared at one resolution (the low one nearest-upsampled), low-resolution white noise puts s^2
times more power into the low frequencies than high-resolution white noise. Block noise with
kernel s at the high resolution restores the low-resolution spectrum there.

:func:`snr_spectrum` measures it on real photographs (by default those that scikit-image ships,
so it runs offline); :func:`write_spectrum` saves a PNG plot and a JSON of the numbers, which
is what the ``relayops spectrum`` command does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference
from ._optional import require
from .ops import block_noise
from .training.data import read_image, skimage_image

# Colour photographs bundled with scikit-image (no download needed).
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
CURVES = ("low_res_white", "high_res_white", "high_res_block")
LABELS = {"low_res_white": "{lo}x{lo}, white noise (upsampled)", "high_res_white": "{hi}x{hi}, white noise",
          "high_res_block": "{hi}x{hi}, block noise (s = {s})"}


def _square_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """``[C, H, W]`` in [0, 1] -> centre square crop, antialiased resize to size x size, [-1, 1]."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[:, top:top + side, left:left + side].unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (out[0] * 2 - 1).clamp(-1, 1)


def load_images(names_or_paths=None, resolution: int = 256) -> torch.Tensor:
    """Photographs as ``[N, 3, resolution, resolution]`` float64 in [-1, 1].

    ``names_or_paths``: scikit-image sample names (``skimage.data.<name>``) or image file paths;
    default :data:`DEFAULT_IMAGES`. Grey images are repeated to 3 channels.
    """
    out = []
    for item in names_or_paths or DEFAULT_IMAGES:
        if Path(str(item)).is_file():
            img = read_image(item)
        else:
            try:
                img = skimage_image(str(item))
            except ValueError:
                raise ValueError(f"{item!r} is neither an image file nor a scikit-image sample name") from None
        out.append(_square_resize(img.to(torch.float64) / 255.0, resolution))
    return torch.stack(out)


def dct_power(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and channels of the squared full-image orthonormal DCT-II coefficients.

    x: ``[N, C, H, W]``. Returns ``[H, W]`` float64 (entry [i, j]: row frequency i, column j).
    """
    h, w = x.shape[-2:]
    ch = reference.dct_matrix(h, torch.float64, x.device)
    cw = reference.dct_matrix(w, torch.float64, x.device)
    coef = ch @ x.to(torch.float64) @ cw.T
    return (coef**2).mean(dim=(0, 1))


def radial_profile(power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average an ``[H, H]`` map over rings of integer radius ``round(sqrt(i^2 + j^2))``.

    Returns ``(radius / H, mean per ring)`` for the rings up to H - 1 (the inscribed quarter disc).
    """
    h = power.shape[-1]
    i = torch.arange(h, dtype=torch.float64)
    ring = torch.sqrt(i[:, None] ** 2 + i[None] ** 2).round().long().flatten()
    keep = ring < h
    sums = torch.zeros(h, dtype=torch.float64).index_add_(0, ring[keep], power.flatten()[keep])
    ones = torch.ones(int(keep.sum()), dtype=torch.float64)
    counts = torch.zeros(h, dtype=torch.float64).index_add_(0, ring[keep], ones)
    return torch.arange(h, dtype=torch.float64) / h, sums / counts


def snr_spectrum(images: torch.Tensor | None = None, *, sigma: float = 0.5, s: int = 4, resolution: int = 256,
                 draws: int = 8, seed: int = 0) -> dict:
    """Per-DCT-frequency SNR at two resolutions, with and without block noise (SPEC 12).

    images: ``[N, C, resolution, resolution]`` in [-1, 1] (default: :func:`load_images`).
    The low resolution is ``resolution / s``: images are s x s average-pooled, and both they and
    their white noise ``sigma eps`` are nearest-upsampled back before the transform. Curves:
    ``low_res_white`` (that), ``high_res_white`` (``sigma eps`` at full resolution) and
    ``high_res_block`` (``sigma block_noise(eps, s)``, SPEC 3). Noise spectra average ``draws``
    noise draws per image.

    Returns a dict of plain lists (JSON-ready): ``frequency`` (ring radius / resolution),
    ``snr`` and ``snr_db`` (per curve, ring means of signal power / noise power),
    ``signal_power`` and ``noise_power`` (per curve, ring means), ``snr_map`` and ``noise_map``
    (per curve, the full ``[resolution, resolution]`` maps), plus the settings.
    """
    if images is None:
        images = load_images(resolution=resolution)
    if images.dim() != 4 or images.shape[-1] != images.shape[-2] or images.shape[-1] % s:
        raise ValueError(f"images must be [N, C, R, R] with R a multiple of s = {s}, got {tuple(images.shape)}")
    if not sigma > 0 or draws < 1:
        raise ValueError(f"need sigma > 0 and draws >= 1, got sigma = {sigma}, draws = {draws}")
    x = images.to(torch.float64)
    hi = x.shape[-1]
    lo = hi // s

    def up(v):
        return v.repeat_interleave(s, -2).repeat_interleave(s, -1)

    gen = torch.Generator(device=x.device).manual_seed(seed)
    rep = x.repeat(draws, 1, 1, 1).shape  # one noise map per image, channel and draw
    white_hi = sigma * torch.randn(rep, generator=gen, dtype=torch.float64, device=x.device)
    white_lo = sigma * torch.randn((rep[0], rep[1], lo, lo), generator=gen, dtype=torch.float64, device=x.device)
    signal = {"low_res_white": dct_power(up(F.avg_pool2d(x, s))), "high_res_white": dct_power(x)}
    signal["high_res_block"] = signal["high_res_white"]
    noise = {"low_res_white": dct_power(up(white_lo)), "high_res_white": dct_power(white_hi),
             "high_res_block": dct_power(block_noise(white_hi, s))}
    result = {"sigma": sigma, "s": s, "resolution": hi, "low_resolution": lo, "num_images": int(x.shape[0]),
              "draws": draws, "curves": list(CURVES), "snr": {}, "snr_db": {}, "signal_power": {},
              "noise_power": {}, "snr_map": {}, "noise_map": {}}
    for name in CURVES:
        freq, sig_r = radial_profile(signal[name])
        _, noise_r = radial_profile(noise[name])
        snr_r = sig_r / noise_r
        result["frequency"] = freq.tolist()
        result["snr"][name] = snr_r.tolist()
        result["snr_db"][name] = (10 * torch.log10(snr_r)).tolist()
        result["signal_power"][name] = sig_r.tolist()
        result["noise_power"][name] = noise_r.tolist()
        result["snr_map"][name] = (signal[name] / noise[name]).tolist()
        result["noise_map"][name] = noise[name].tolist()
    return result


def plot_spectrum(result: dict, path) -> None:
    """Write the SNR curves (dB against frequency, log axis) as a PNG, like RDM's Figure 2."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plotting").FigureCanvasAgg
    Figure = require("matplotlib.figure", "plotting").Figure

    # A bare Figure on the Agg canvas: no pyplot state, no change to the session's backend.
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    freq = result["frequency"][1:]  # ring 0 (the mean) has no place on a log axis
    for name, style in zip(CURVES, ("-", "--", ":")):
        label = LABELS[name].format(lo=result["low_resolution"], hi=result["resolution"], s=result["s"])
        ax.plot(freq, result["snr_db"][name][1:], style, label=label, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("DCT frequency (ring radius / resolution)")
    ax.set_ylabel("SNR (dB)")
    ax.set_title(f"SNR per frequency at sigma = {result['sigma']:g} ({result['num_images']} images)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_spectrum(result: dict, out_prefix) -> tuple[Path, Path]:
    """Write :func:`snr_spectrum`'s ``result`` as ``<out_prefix>.png`` (:func:`plot_spectrum`) and
    ``<out_prefix>.json`` (everything but the full maps), creating the folder. Returns both paths."""
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    png, js = out.with_suffix(".png"), out.with_suffix(".json")
    plot_spectrum(result, png)
    summary = {k: v for k, v in result.items() if not k.endswith("_map")}  # the maps would dwarf the rest
    js.write_text(json.dumps(summary, indent=1))
    return png, js


def low_band_snr_db(result: dict) -> dict[str, float]:
    """Mean SNR in dB per curve over the rings with 0 < frequency < 1/(2s) (the lower half of the
    low-resolution band, where block noise should match low-resolution white noise)."""
    low = [r for r, f in enumerate(result["frequency"]) if 0 < f < 1 / (2 * result["s"])]
    return {name: sum(result["snr_db"][name][r] for r in low) / len(low) for name in CURVES}
