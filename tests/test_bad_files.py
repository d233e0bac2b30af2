"""Every file relayops reads refuses truncated, corrupted, wrong-type and oversized input with one
clear error, and no file it loads can run code.

The files relayops reads: training/analysis images (``read_image``: PNG and JPEG only) and
checkpoints (safetensors with a JSON record in its metadata; the JSON copy beside it is never
read). Configurations live inside the checkpoint, so the checkpoint cases cover them.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

import relayops
from relayops import cli
from relayops.training import checkpoint as ckpt
from relayops.training import data
from relayops.training.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(relayops.__file__).resolve().parent


# --- images ---------------------------------------------------------------------------------------

def _image_bytes(fmt: str, h: int = 24, w: int = 20) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid checksum) declares ``width x height``."""
    png = bytearray(_image_bytes("PNG", 1, 1))
    ihdr = bytes(png[12:16]) + struct.pack(">II", width, height) + bytes(png[24:29])
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(png)


def _flip(b: bytes, i: int) -> bytes:
    out = bytearray(b)
    out[i] ^= 0xFF
    return bytes(out)


PNG, JPEG = _image_bytes("PNG"), _image_bytes("JPEG")
_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(hello) print\n"


def _bad_images():
    idat = PNG.index(b"IDAT")
    cases = {
        "empty": b"",
        "text": b"this is not an image\n",
        "json": b'{"a": 1}',
        "png_magic_flipped": _flip(PNG, 1),
        "png_ihdr_flipped": _flip(PNG, 18),
        "png_idat_flipped": _flip(PNG, idat + 30),
        "png_idat_crc_flipped": _flip(PNG, PNG.index(b"IEND") - 5),
        "png_too_many_pixels": _png_with_size(100_000, 100_000),
        "png_zero_width": _png_with_size(0, 5),
        "jpeg_truncated_half": JPEG[:len(JPEG) // 2],
        "jpeg_truncated_end": JPEG[:-2],
        "jpeg_header_only": JPEG[:200],
        "gif": _image_bytes("GIF"),
        "bmp": _image_bytes("BMP"),
        "tiff": _image_bytes("TIFF"),
        "eps": _EPS,
        "pickle": pickle.dumps({"a": 1}),
    }
    # A PNG cut anywhere, the last bytes of its end chunk included.
    for cut in (8, 16, 33, idat, idat + 40, len(PNG) // 2, len(PNG) - 13, len(PNG) - 12, len(PNG) - 4,
                len(PNG) - 1):
        cases[f"png_truncated_{cut}"] = PNG[:cut]
    return cases


BAD_IMAGES = _bad_images()


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_refused_with_one_clear_error(tmp_path, name):
    p = tmp_path / "img.png"
    p.write_bytes(BAD_IMAGES[name])
    with pytest.raises(ValueError, match=r"cannot read image '.*img\.png'"):
        data.read_image(p)
    # The same error from the training loader (a folder) and from the spectrum analysis.
    with pytest.raises(ValueError, match=r"cannot read image '.*img\.png'"):
        data.folder_images(tmp_path)
    with pytest.raises(ValueError, match=r"cannot read image '.*img\.png'"):
        relayops.analysis.load_images([str(p)], resolution=8)


def test_good_images_still_load(tmp_path):
    for fmt, raw in (("png", PNG), ("jpg", JPEG)):
        p = tmp_path / f"ok.{fmt}"
        p.write_bytes(raw)
        assert tuple(data.read_image(p).shape) == (3, 24, 20)
    assert tuple(data.read_image(tmp_path / "ok.png")[:, 0, 0].tolist()) == tuple(np.asarray(
        Image.open(io.BytesIO(PNG)))[0, 0].tolist())


def test_oversized_file_and_not_a_file(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    p.write_bytes(PNG)
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", len(PNG) - 1)
    with pytest.raises(ValueError, match="more than the limit"):
        data.read_image(p)
    with pytest.raises(FileNotFoundError):
        data.read_image(tmp_path / "missing.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        data.read_image(tmp_path / "dir.png")


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    p.write_bytes(PNG)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 24 * 20 - 1)
    with pytest.raises(ValueError, match="24 pixels is more than the limit"):
        data.read_image(p)


# --- checkpoints ----------------------------------------------------------------------------------

def _good_checkpoint(d: Path) -> bytes:
    tensors = {"model.w": torch.randn(64, 33, generator=torch.Generator().manual_seed(0)),
               "model.b": torch.arange(5, dtype=torch.bfloat16), "opt.0.step": torch.tensor(3.0),
               "rng.0.cpu": torch.get_rng_state()}
    save_checkpoint(d, tensors, {"train": {"stage": "base"}, "step": 3})
    return (d / ckpt.WEIGHTS_NAME).read_bytes()


class _RunsCode:
    """Unpickling this would create ``path``: a stand-in for a hostile file."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _bad_checkpoints(good: bytes, marker: Path):
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8:8 + n]
    meta = json.loads(header)
    cases = {
        "empty": b"",
        "text": b"not a checkpoint",
        "json_record": json.dumps(meta["__metadata__"]).encode(),
        "png": PNG,
        "pickle_that_runs_code": pickle.dumps(_RunsCode(marker)),
        "torch_save_zip": _torch_save_bytes(marker),
        "header_length_huge": struct.pack("<Q", 2**62) + good[8:],
        "header_length_past_end": struct.pack("<Q", len(good)) + good[8:],
        "header_json_flipped": good[:8 + n // 2] + bytes([good[8 + n // 2] ^ 0xFF]) + good[9 + n // 2:],
        "data_byte_flipped": _flip(good, 8 + n + 100),
        "data_last_byte_flipped": _flip(good, len(good) - 1),
        "bytes_appended": good + b"\x00" * 16,
        "no_relayops_metadata": st_save({"a": torch.zeros(2)}),
        "record_not_an_object": st_save({"a": torch.zeros(2)}, metadata={"relayops": "[1, 2]"}),
        "record_wrong_format": st_save({"a": torch.zeros(2)}, metadata={"relayops": '{"format": "other"}'}),
        "record_not_json": st_save({"a": torch.zeros(2)}, metadata={"relayops": "{oops"}),
    }
    # Tensors and record that disagree: a record from one checkpoint, tensors of another.
    record = dict(json.loads(meta["__metadata__"]["relayops"]))
    cases["record_of_other_tensors"] = st_save({"model.w": torch.zeros(64, 33)},
                                               metadata={"relayops": json.dumps(record)})
    for cut in (1, 7, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(good) // 2, len(good) - 1):
        cases[f"truncated_{cut}"] = good[:cut]
    return cases


def _torch_save_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _RunsCode(marker)}, buf)
    return buf.getvalue()


BAD_CHECKPOINT = r"checkpoint '.*' (is corrupt|has a corrupt|is not a relayops|has format)"


def test_bad_checkpoints_are_refused_with_one_clear_error_and_run_no_code(tmp_path):
    good = _good_checkpoint(tmp_path / "good")
    marker = tmp_path / "code_ran"
    cases = _bad_checkpoints(good, marker)
    assert not marker.exists()
    for name, raw in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / ckpt.WEIGHTS_NAME).write_bytes(raw)
        with pytest.raises(RuntimeError, match=BAD_CHECKPOINT) as e:
            load_checkpoint(d)
        assert "\n" not in str(e.value), name
        # The command line prints one line and exits with status 2, whatever the damage.
        with pytest.raises(SystemExit) as exit_:
            cli.main(["sample", "--base", str(d), "--out", str(tmp_path / "o"), "--num", "1"])
        assert exit_.value.code == 2, name
    assert not marker.exists(), "loading a bad checkpoint ran code"
    assert len(cases) >= 25


def test_good_checkpoint_loads_and_record_matches_json_copy(tmp_path):
    _good_checkpoint(tmp_path)
    tensors, record = load_checkpoint(tmp_path)
    assert record["tensors_sha256"] == ckpt.tensors_digest(tensors)
    assert json.loads((tmp_path / ckpt.CONFIG_NAME).read_text()) == record


def test_no_code_running_loaders_in_the_package():
    """Loading uses safetensors and JSON only: no pickle, torch.load, numpy pickles or eval. The
    one exception is the converter's restricted unpickler (relayops/models/safe_pickle.py), which
    resolves names through an allowlist only; no file calls the unrestricted pickle.load(s)."""
    banned = ("import pickle", "torch.load(", "allow_pickle=True", "eval(", "exec(", "import yaml", "marshal.")
    restricted = ROOT / "models" / "safe_pickle.py"
    for path in ROOT.rglob("*.py"):
        text = path.read_text().replace(".eval()", "")
        for word in ("pickle.load(", "pickle.loads("):
            assert word not in text, f"{path.relative_to(ROOT.parent)} uses {word!r}"
        if path == restricted:
            assert "def find_class" in text  # every global goes through the allowlist
            continue
        for word in banned:
            assert word not in text, f"{path.relative_to(ROOT.parent)} uses {word!r}"
