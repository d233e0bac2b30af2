"""SPEC 12: per-DCT-frequency SNR; block noise at high resolution reproduces low-resolution white noise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.fft
import torch

from relayops.analysis import dct_power, load_images, low_band_snr_db, snr_spectrum, write_spectrum

RES, S = 64, 4


@pytest.fixture(scope="module")
def photos():
    return load_images(resolution=RES)


@pytest.fixture(scope="module")
def result(photos):
    return snr_spectrum(photos, sigma=0.5, s=S, resolution=RES, draws=64, seed=1)


def analytic_noise_power(kind: str) -> np.ndarray:
    """Exact E[DCT coefficient^2] per frequency for unit-sigma noise, from the 1-D covariances.

    Both noises are separable, so the 2-D power at (i, j) is p[i] p[j] with p = diag(C K1 C^T):
    block noise K1[x, x'] = max(0, s - d)/s at wraparound distance d (SPEC 3); nearest-upsampled
    white noise K1 = U U^T with U the H x H/s block indicator; white noise K1 = I.
    """
    c = scipy.fft.dct(np.eye(RES), type=2, norm="ortho", axis=0)
    d = np.abs(np.arange(RES)[:, None] - np.arange(RES)[None])
    d = np.minimum(d, RES - d)
    k1 = {"high_res_block": np.maximum(0, S - d) / S,
          "low_res_white": np.kron(np.eye(RES // S), np.ones((S, S))),
          "high_res_white": np.eye(RES)}[kind]
    p = np.diag(c @ k1 @ c.T)
    return np.outer(p, p)


def test_dct_power_matches_scipy():
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)) ** 2).mean(axis=(0, 1))
    np.testing.assert_allclose(dct_power(x).numpy(), expected, rtol=1e-12, atol=1e-14)


def test_noise_spectra_match_their_covariances(result):
    """The measured noise spectra (6 photos x 3 channels x 64 draws = 1152 maps per curve) match
    the exact ones: per frequency the estimate's relative sd is sqrt(2/1152) = 4.2%, so 20%
    is a 4.8 sd bound, and its average over the low band (r < R/(2s)) within 3%."""
    band = np.add.outer(np.arange(RES) ** 2, np.arange(RES) ** 2) < (RES / (2 * S)) ** 2
    for name in ("low_res_white", "high_res_white", "high_res_block"):
        exact = 0.25 * analytic_noise_power(name)  # sigma^2 = 0.25
        ok = band & (exact > 1e-6)  # the upsampled noise has exact zeros at i or j = R/s, 2R/s, ...
        ratio = np.array(result["noise_map"][name])[ok] / exact[ok]
        assert np.abs(ratio - 1).max() < 0.2, (name, ratio.min(), ratio.max())
        assert abs(ratio.mean() - 1) < 0.03, (name, ratio.mean())


def test_block_noise_reproduces_low_resolution_snr(result):
    """SPEC 12 / RDM Fig. 2. Noise: below half the low-resolution band (rings r < R/(2s)) block
    noise at high resolution has the power of nearest-upsampled low-resolution white noise within
    0.75 dB per ring (the exact per-frequency ratio lies in [0.922^2, 1] = [-0.7, 0] dB: the
    wraparound box against the DCT's even boundary), and s^2 = 12 dB more than high-resolution
    white noise at ring 0, over 10 dB more throughout. SNR: in the lowest quarter of the
    low-resolution band (r < R/(4s)), where s x s pooling barely changes the photos' power
    (< 0.3 dB), the block-noise SNR equals the low-resolution one within 1 dB, and the
    high-resolution white-noise SNR is over 10 dB above both."""
    freq = np.array(result["frequency"])
    half = freq < 1 / (2 * S)
    quarter = freq < 1 / (4 * S)
    assert half.sum() == RES // (2 * S) and quarter.sum() == RES // (4 * S)

    def db(curve, key="noise_power"):
        return 10 * np.log10(np.array(result[key][curve]))

    assert np.abs(db("high_res_block") - db("low_res_white"))[half].max() < 0.75
    gap = (db("high_res_block") - db("high_res_white"))[half]
    assert gap.min() > 10.0 and abs(gap[0] - 10 * np.log10(S**2)) < 0.5, gap

    snr = {k: np.array(v) for k, v in result["snr_db"].items()}
    assert np.abs(snr["high_res_block"] - snr["low_res_white"])[quarter].max() < 1.0
    assert (snr["high_res_white"] - snr["high_res_block"])[quarter].min() > 10.0
    assert (snr["high_res_white"] - snr["low_res_white"])[quarter].min() > 10.0


def test_write_spectrum_writes_png_and_json(tmp_path):
    result = snr_spectrum(load_images(["astronaut", "coffee"], 32), sigma=0.3, resolution=32, draws=2)
    png, js = write_spectrum(result, tmp_path / "sub" / "fig2")
    assert (png, js) == (tmp_path / "sub" / "fig2.png", tmp_path / "sub" / "fig2.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["sigma"] == 0.3 and data["resolution"] == 32 and data["num_images"] == 2
    assert set(data["snr_db"]) == {"low_res_white", "high_res_white", "high_res_block"}
    assert len(data["frequency"]) == 32 and all(len(v) == 32 for v in data["snr"].values())
    assert not any(k.endswith("_map") for k in data)


def test_low_band_snr(result):
    """Rings 1 .. R/(2s) - 1; there the two high-resolution curves share the signal and the white
    noise has over 10 dB less power (test above), so its SNR is over 10 dB higher."""
    low_band = low_band_snr_db(result)
    expected = {k: np.mean(v[1:RES // (2 * S)]) for k, v in result["snr_db"].items()}
    assert low_band.keys() == expected.keys()
    for k in expected:
        assert low_band[k] == pytest.approx(expected[k], rel=1e-12)
    assert low_band["high_res_white"] - low_band["high_res_block"] > 10.0


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of s"):
        snr_spectrum(torch.zeros(1, 1, 10, 10), s=4)
    with pytest.raises(ValueError, match="neither an image file"):
        load_images(["no_such_sample_image"], 32)
