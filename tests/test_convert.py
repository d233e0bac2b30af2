"""Released EDM/RDM checkpoints: the restricted unpickler, the converter, and the CLI on files
written the way EDM's persistence writes them (tests/edm_pickle.py), without the real files."""
from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm_pickle import PersistentRecord, module_src, persistent_dump
from relayops.cli import main
from relayops.models import EDMPrecond, UnsafeCheckpointError, convert, load_checkpoint, read_checkpoint
from relayops.models.safe_pickle import read_file
from relayops.training import load_denoiser, read_record

BASE = dict(img_resolution=8, img_channels=3, label_dim=5, model_type="DhariwalUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.1, eff_attn=True,
            use_fp16=False)
SONG = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type="fourier", channel_mult_noise=2,
            encoder_type="residual", resample_filter=[1, 3, 3, 1])
# what EDM records for every block: numpy scalars among the init arguments
SUB_KWARGS = dict(init=dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.float32(0.5)))
BLUR_LOSS = dict(up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3.0, min_scale=0.001)


def random_net(kwargs, seed=0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def inputs(net):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, net.img_resolution, net.img_resolution, generator=g)
    labels = torch.eye(net.label_dim)[[1, 4, 0]] if net.label_dim else None
    return x, torch.tensor([0.02, 0.7, 30.0]), labels


@pytest.fixture
def marker(tmp_path):
    """A file that exists only if code from a checkpoint ran."""
    path = tmp_path / "code-from-the-checkpoint-ran"
    yield path
    assert not path.exists(), "code from the checkpoint ran"


@pytest.mark.parametrize("fmt,kwargs", [("pkl", BASE), ("pt", BASE), ("pkl", SONG)], ids=["pkl", "pt", "song-pkl"])
def test_round_trip(tmp_path, marker, fmt, kwargs):
    net = random_net(kwargs)
    path = tmp_path / f"net.{fmt}"
    if fmt == "pkl":  # EDM's snapshot: the network, the loss (RDM's BlurLoss here) and more
        extra = {"loss_fn": PersistentRecord("BlurLoss", module_src(marker), **BLUR_LOSS), "augment_pipe": None,
                 "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "resolution": 8}}
    else:  # RDM's training state: raw and EMA networks, optimizer state, images seen
        extra = {"net": random_net(kwargs, seed=1), "step": 1250000, "optimizer_state": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(4, 4)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}}
    persistent_dump(net, path, init_kwargs=kwargs, marker=marker, fmt=fmt, extra=extra, sub_init_kwargs=SUB_KWARGS)

    got_kwargs, refs, record = read_checkpoint(path)
    assert got_kwargs == kwargs
    want = net.state_dict()
    assert set(refs) == set(want)
    for k, ref in refs.items():
        assert torch.equal(ref.load(), want[k]), k

    x, sigma, labels = inputs(net)
    with torch.no_grad():
        ref_out = net(x, sigma, labels)
        torch.testing.assert_close(load_checkpoint(path)(x, sigma, labels), ref_out, rtol=0, atol=0)
        dest = tmp_path / "converted"
        assert convert(path, dest) == dest / "checkpoint.safetensors"
        torch.testing.assert_close(load_checkpoint(dest)(x, sigma, labels), ref_out, rtol=0, atol=0)
        denoiser, rec = load_denoiser(dest, "relay" if fmt == "pkl" else "base")
        torch.testing.assert_close(denoiser(x, sigma, labels), ref_out, rtol=0, atol=0)

    on_disk = json.loads((dest / "checkpoint.json").read_text())
    assert on_disk == read_record(dest) and on_disk["network"] == {"class_name": "EDMPrecond", "kwargs": kwargs}
    assert on_disk["source"]["module"] == "ema" and on_disk["source"]["file"] == path.name
    if fmt == "pkl":
        assert on_disk["stage"] == "relay"
        assert {k: on_disk["train"][k] for k in ("patch", "alpha", "L", "sigma_b_max", "normalize")} == dict(
            patch=4, alpha=0.15, L=0.93, sigma_b_max=3.0, normalize=False)
    else:
        assert on_disk["stage"] is None and on_disk["source"]["images_seen"] == 1250000
        raw = load_checkpoint(path, module="net")
        assert torch.equal(raw.model.out_conv.weight, extra["net"].model.out_conv.weight)


def test_a_training_state_reads_only_the_chosen_network(tmp_path, marker, monkeypatch):
    """Storages are read on demand: loading 'ema' from an RDM training state reads its records only."""
    net = random_net(BASE)
    path = tmp_path / "state.pt"
    persistent_dump(net, path, init_kwargs=BASE, marker=marker, fmt="pt",
                    extra={"net": random_net(BASE, 1), "optimizer_state": {"state": {0: {"m": torch.ones(1000)}}}})
    read = []
    original = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k:
                        read.append(getattr(name, "filename", name)) or original(self, name, *a, **k))
    load_checkpoint(path)
    records = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]
    storages = [n for n in read if "/data/" in n]
    assert len(storages) == len(net.state_dict()) < len(records)


@pytest.mark.parametrize("fmt", ["pkl", "pt"])
def test_tensor_views_and_dtypes(tmp_path, fmt):
    """Views (offsets, strides, shared storages) and the storage dtypes read back exactly."""
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    data = {"t": base[1:3].t(), "row": base[2], "whole": base, "half": torch.randn(3, 2).half(),
            "bf16": torch.randn(5).bfloat16(), "long": torch.arange(-3, 3), "bool": torch.tensor([True, False]),
            "empty": torch.zeros(0, 3)}
    path = tmp_path / f"views.{fmt}"
    _write(data, path, fmt)
    got = read_file(path)
    for k, v in data.items():
        t = got[k].load()
        assert t.dtype == v.dtype and torch.equal(t, v), k
        assert t.is_contiguous()


# --- refusals -------------------------------------------------------------------------------------

class Payload:
    """Unpickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write(obj, path, fmt):
    if fmt == "pkl":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("fmt", ["pkl", "pt"])
def test_os_system_is_refused_and_nothing_runs(tmp_path, marker, fmt):
    path = tmp_path / f"evil.{fmt}"
    _write({"ema": Payload(os.system, f"touch {marker}")}, path, fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load (posix|os)\.system"):
        read_checkpoint(path)
    # the same payload deep inside a network's state
    net = random_net(BASE)
    net.model.enc["8x8_conv"].evil = Payload(os.system, f"touch {marker}")
    persistent_dump(net, path, init_kwargs=BASE, marker=marker, fmt=fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the same bytes, unpickled the usual way, do run the command."""
    ran = tmp_path / "ran"
    data = pickle.dumps({"ema": Payload(os.system, f"touch {ran}")})
    pickle.loads(data)
    assert ran.exists()


@pytest.mark.parametrize("payload", [
    Payload(eval, "1 + 1"), Payload(getattr, 1, "real"), Payload(exec, "x = 1"),
    Payload(np.dtype, "O"),                       # object dtypes would unpickle arbitrary objects
    Payload(torch.load, "x.pt"),
], ids=["eval", "getattr", "exec", "numpy-object-dtype", "torch.load"])
def test_other_names_are_refused(tmp_path, payload):
    path = tmp_path / "bad.pkl"
    _write({"ema": payload}, path, "pkl")
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        read_file(path)


def test_a_lookalike_persistence_module_is_refused(tmp_path, marker):
    """Only torch_utils.persistence's reconstruct function is mapped to the stub."""
    persistent_dump(random_net(BASE), tmp_path / "net.pkl", init_kwargs=BASE, marker=marker,
                    persistence="my_utils.persistence")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load my_utils.persistence"):
        read_file(tmp_path / "net.pkl")


def test_malformed_and_mismatched_files(tmp_path, marker):
    net = random_net(BASE)
    path = tmp_path / "net.pt"
    persistent_dump(net, path, init_kwargs=dict(BASE, model_channels=32), marker=marker, fmt="pt")
    with pytest.raises(ValueError, match="wrong shapes"):
        read_checkpoint(path)
    persistent_dump(net, path, init_kwargs=dict(BASE, fancy_option=1), marker=marker, fmt="pt")
    with pytest.raises(ValueError, match="do not fit relayops' EDMPrecond"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="has no 'net' network"):
        persistent_dump(net, path, init_kwargs=BASE, marker=marker, fmt="pt")
        read_checkpoint(path, module="net")
    good = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(UnsafeCheckpointError, match="malformed"):
        read_checkpoint(tmp_path / "junk.pkl")
    _write({"ema": torch.nn.ModuleDict()}, tmp_path / "plain.pkl", "pkl")
    with pytest.raises(ValueError, match="is a ModuleDict; relayops reads EDM's EDMPrecond"):
        read_checkpoint(tmp_path / "plain.pkl")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pkl")
    persistent_dump(net, path, init_kwargs=BASE, marker=marker, fmt="pkl",
                    extra={"loss_fn": PersistentRecord("EDMLoss", "", P_mean=-1.2)})
    with pytest.raises(ValueError, match="trains a 'base' stage"):
        read_checkpoint(path, stage="relay")


# --- the command line -----------------------------------------------------------------------------

def test_cli_convert_and_sample_with_the_authors_preset(tmp_path, marker, capsys):
    base_kw = dict(BASE, augment_dim=0)
    relay_kw = dict(base_kw, img_resolution=32)
    persistent_dump(random_net(base_kw), tmp_path / "first.pkl", init_kwargs=base_kw, marker=marker,
                    extra={"loss_fn": PersistentRecord("EDMLoss", module_src(marker), P_mean=-1.2)})
    persistent_dump(random_net(relay_kw, 1), tmp_path / "second.pt", init_kwargs=relay_kw, marker=marker, fmt="pt")
    assert main(["convert", str(tmp_path / "first.pkl"), str(tmp_path / "base")]) == 0
    assert main(["convert", str(tmp_path / "second.pt"), str(tmp_path / "relay")]) == 0
    out = capsys.readouterr().out
    assert "stage base" in out and "stage not recorded" in out
    stages = ["--base", str(tmp_path / "base"), "--relay", str(tmp_path / "relay"), "--num", "2", "--base-steps", "3",
              "--relay-steps", "12", "--no-progress"]
    common = [*stages, "--class", "3"]
    assert main(["sample", *common, "--preset", "imagenet256", "--out", str(tmp_path / "a")]) == 0
    assert main(["sample", *common, "--preset", "imagenet256", "--no-enhance", "--out", str(tmp_path / "b")]) == 0
    assert "wrote 2 images of 32x32" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(tmp_path / d / "000001.png"), dtype=np.float64) for d in "ab")
    assert a.shape == (32, 32, 3)
    # the preset saves as the authors' script does: PIL brightness 1.06 on the 8-bit image
    want = np.asarray(Image.fromarray(b.astype(np.uint8)).point(lambda v: min(255, round(v * 1.06))), np.float64)
    assert np.abs(a - want).max() <= 1

    # no --class: the authors' rule, class (seed + b) mod label_dim; bfloat16 networks
    assert main(["sample", *stages, "--preset", "imagenet256",
                 "--network-dtype", "bfloat16", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "000001.png").exists()

    # without a preset, a relay network that did not record its settings needs one
    with pytest.raises(SystemExit):
        main(["sample", *common, "--out", str(tmp_path / "c")])
    assert "does not record its relay settings" in capsys.readouterr().err

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Payload(os.system, f"touch {marker}")}))
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "evil.pkl"), str(tmp_path / "evil")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "refusing to load" in err and "Traceback" not in err
