"""relayops.models and the converter against golden data from the authors' own network code
(tests/data/edm-reference, see its README): the state-dict keys, shapes, tensor and parameter
counts of every released configuration, and two small networks (DhariwalUNet and SongUNet under
EDMPrecond) with random weights, inputs and the authors' outputs.

The checkpoint files converted here are built from the golden state dicts and constructor
arguments alone (tests/edm_pickle.py ``records_from_state_dict``), in EDM's persistence format:
no relayops network is involved in writing them, so the key names, the constructor arguments
and the outputs are the authors'.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edm_pickle import dump_records, records_from_state_dict
from relayops.models import RDM_CONFIGS, EDMPrecond, build_network, convert, load_checkpoint, read_checkpoint

DATA = Path(__file__).resolve().parent / "data" / "edm-reference"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
CONFIGS = MANIFEST["configs"]
# relayops' presets for the released stages and the manifest's names of the same configurations
PRESETS = {"imagenet64": "imagenet64", "imagenet256": "imagenet256-relay", "celebahq64": "celebahq64",
           "celebahq256": "celebahq256-relay"}


def golden(name: str):
    """(constructor kwargs, state dict under the authors' keys, inputs, the authors' output)."""
    with safe_open(DATA / f"{name}.safetensors", "pt") as f:
        kwargs = json.loads(f.metadata()["kwargs"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    x, sigma, labels, y = (tensors[f"io.{n}"] for n in ("x", "sigma", "class_labels", "y"))
    return kwargs, state, (x, sigma, labels), y


def assert_matches_authors(out: torch.Tensor, y: torch.Tensor) -> None:
    """float32 forward passes of the same weights: equal up to rounding (sums in another order)."""
    assert out.shape == y.shape and out.dtype == y.dtype
    torch.testing.assert_close(out, y, rtol=0, atol=2e-5 * float(y.abs().max()))


def test_the_golden_data_is_what_its_readme_says():
    assert len(CONFIGS) == 8 and "a97877f" in MANIFEST["source"]
    for name in ("tiny_dhariwal", "tiny_song"):
        kwargs, state, (x, sigma, labels), y = golden(name)
        assert x.shape == (3, 3, 16, 16) and sigma.shape == (3,) and labels.shape == (3, 10)
        assert y.shape == x.shape and y.dtype == torch.float32 and len(state) > 50


@pytest.mark.parametrize("name", list(CONFIGS))
def test_released_configurations_match_the_authors_state_dicts(name):
    """Every key and shape, the tensor count and the parameter count, on the meta device."""
    cfg = CONFIGS[name]
    net = build_network(cfg["kwargs"])
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert got == cfg["keys"]
    assert list(got) == list(cfg["keys"])  # in the authors' order, too
    assert len(got) == cfg["tensors"]
    assert sum(p.numel() for p in net.parameters()) == cfg["parameters"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_relayops_presets_are_the_released_configurations(name):
    """RDM_CONFIGS (relayops' names for the released stages) builds the same networks."""
    cfg = CONFIGS[name]
    preset = PRESETS[name.split("/")[0]]
    net = build_network(dict(RDM_CONFIGS[preset], augment_dim=cfg["kwargs"]["augment_dim"]))
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == cfg["keys"]
    assert sum(p.numel() for p in net.parameters()) == cfg["parameters"]


@pytest.mark.parametrize("name", ["tiny_dhariwal", "tiny_song"])
def test_relayops_networks_reproduce_the_authors_outputs(name):
    kwargs, state, inputs, y = golden(name)
    torch.manual_seed(0)
    net = EDMPrecond(**kwargs).eval()
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = net(*inputs)
    assert_matches_authors(out, y)
    # control: the comparison sees a change of one weight
    key = [k for k in state if k.endswith(".weight")][-1]  # a weight of the output layer
    with torch.no_grad(), pytest.raises(AssertionError):
        net.state_dict()[key].add_(0.1)
        assert_matches_authors(net(*inputs), y)


@pytest.mark.parametrize("fmt", ["pkl", "pt"])
@pytest.mark.parametrize("name", ["tiny_dhariwal", "tiny_song"])
def test_the_converter_reads_the_authors_keys_and_reproduces_their_outputs(tmp_path, name, fmt):
    kwargs, state, inputs, y = golden(name)
    path = tmp_path / f"{name}.{fmt}"
    dump_records({"ema": records_from_state_dict(state, kwargs), "augment_pipe": None}, path, fmt)

    got_kwargs, refs, record = read_checkpoint(path)
    assert got_kwargs == kwargs
    assert sorted(refs) == sorted(state)  # (safetensors stores keys sorted: the order is checked on the manifest)
    for k, ref in refs.items():
        assert torch.equal(ref.load(), state[k]), k
    assert sum(ref.numel() for k, ref in refs.items() if not k.endswith("resample_filter")) == sum(
        v.numel() for k, v in state.items() if not k.endswith("resample_filter"))

    with torch.no_grad():
        assert_matches_authors(load_checkpoint(path)(*inputs), y)
        dest = convert(path, tmp_path / "converted").parent
        assert_matches_authors(load_checkpoint(dest)(*inputs), y)
    assert record["network"]["kwargs"] == kwargs
