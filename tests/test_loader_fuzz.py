"""Property-based fuzzing (hypothesis) of the checkpoint loader (relayops.models.safe_pickle).

Valid files of each container the loader reads: a ``torch.save`` zip (tensors, views, dtypes,
containers), the same zip with deflated records, a plain pickle (``pickle.dumps``: legacy storage
blobs, numpy scalars, sets) and an EDM network snapshot written the way EDM's persistence writes
it (tests/edm_pickle.py). Each example applies 1-4 random mutations (bit flips, byte writes,
little-endian integers written over length fields, truncation, insertion, deletion, duplication
of a span) and reads the result with every tensor loaded. Properties:

* the load either succeeds or raises ``UnsafeCheckpointError``: never another exception;
* it takes less than 10 s and allocates less than 64 MiB (tracemalloc) for files of a few KB;
* for zip files (every record has a CRC-32) a load that succeeds returns exactly the original
  content; a plain pickle has no checksum, so a mutated tensor byte may load as another value;
* a valid file read after it still returns exactly its content (no state survives a load).

In CI each test runs a fixed, derandomized set of ``5 x RELAYOPS_FUZZ_EXAMPLES`` examples (50
by default: about 20 s for the four files); ``make fuzz`` runs many more with random seeds.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edm_pickle import persistent_dump
from relayops.models import EDMPrecond
from relayops.models import safe_pickle as sp

EXAMPLES = 5 * int(os.environ.get("RELAYOPS_FUZZ_EXAMPLES", "10"))
LONG = os.environ.get("RELAYOPS_FUZZ_LONG") == "1"
FUZZ = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)
MiB = 1 << 20


def _content(g: torch.Generator) -> dict:
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return collections.OrderedDict(
        w=torch.randn(3, 5, generator=g), t=base[1:3].t(), row=base[2], half=torch.randn(2, 3, generator=g).half(),
        bf16=torch.randn(4, generator=g).bfloat16(), n=torch.arange(-3, 3), b=torch.tensor([True, False]),
        empty=torch.zeros(0, 2), meta={"step": 7, "lr": 1e-4, "betas": (0.9, 0.999), "names": ["a", "b"]})


def _valid_files(tmp) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    files = {}
    buf = io.BytesIO()
    torch.save(_content(g), buf)
    files["pt"] = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(files["pt"])) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    files["pt-deflated"] = out.getvalue()
    plain = _content(g) | {"np": np.float32(1.5), "tags": {"x", "y"}, "frozen": frozenset({1, 2})}
    files["pkl"] = pickle.dumps(plain, protocol=2)
    torch.manual_seed(0)
    kwargs = dict(img_resolution=8, img_channels=1, model_type="DhariwalUNet", model_channels=8, channel_mult=[1],
                  num_blocks=1, attn_resolutions=[])
    net = EDMPrecond(**kwargs)
    persistent_dump(net, tmp / "edm.pkl", init_kwargs=kwargs, marker=tmp / "ran")
    files["edm-pkl"] = (tmp / "edm.pkl").read_bytes()
    return files


def canonical(obj):
    """A comparable form of what the loader returned, every tensor loaded."""
    if isinstance(obj, sp.TensorRef):
        t = obj.load()
        return ("tensor", str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()
                if t.numel() else b"")
    if isinstance(obj, sp.PersistentObject):
        return ("persistent", obj.class_name, canonical(obj.state))
    if isinstance(obj, sp.PlainModule):
        return ("plain", obj.class_name, canonical(obj.state))
    if isinstance(obj, dict):
        return ("dict", tuple((canonical(k), canonical(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(canonical(v) for v in obj))
    if isinstance(obj, (set, frozenset)):
        return (type(obj).__name__, frozenset(obj))
    return ("value", type(obj).__name__, obj)


def load_all(path):
    return canonical(sp.read_file(path))


class Valid(tuple):
    """(files, paths, loaded content) of the valid files, with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return "Valid(...)"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("valid")
    files = _valid_files(tmp)
    paths, want = {}, {}
    for kind, raw in files.items():
        paths[kind] = tmp / f"valid-{kind}.{'pt' if kind.startswith('pt') else 'pkl'}"
        paths[kind].write_bytes(raw)
        want[kind] = load_all(paths[kind])
    return Valid((files, paths, want))


INTERESTING = (0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 31, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)


@st.composite
def mutations(draw, size: int):
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "byte", "int", "truncate", "insert", "delete", "duplicate")))
        pos = draw(st.integers(0, size - 1))
        if kind == "flip":
            ops.append((kind, pos, 1 << draw(st.integers(0, 7))))
        elif kind == "byte":
            ops.append((kind, pos, draw(st.integers(0, 255))))
        elif kind == "int":
            ops.append((kind, pos, draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)),
                        draw(st.sampled_from((1, 2, 4, 8)))))
        elif kind == "insert":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        else:
            ops.append((kind, pos, draw(st.integers(1, 64))))
    return ops


def mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op in ops:
        kind, pos = op[0], min(op[1], max(len(data) - 1, 0))
        if not data:
            break
        if kind == "flip":
            data[pos] ^= op[2]
        elif kind == "byte":
            data[pos] = op[2]
        elif kind == "int":
            width = op[3]
            data[pos:pos + width] = (op[2] & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = op[2]
        elif kind == "delete":
            del data[pos:pos + op[2]]
        elif kind == "duplicate":
            data[pos:pos] = data[pos:pos + op[2]]
    return bytes(data)


@pytest.mark.parametrize("kind", ["pt", "pt-deflated", "pkl", "edm-pkl"])
@FUZZ
@given(data=st.data())
def test_fuzz_mutated_checkpoints(valid, tmp_path_factory, kind, data):
    files, paths, want = valid
    ops = data.draw(mutations(len(files[kind])))
    raw = mutate(files[kind], ops)
    path = tmp_path_factory.getbasetemp() / f"mutated.{'pt' if kind.startswith('pt') else 'pkl'}"
    path.write_bytes(raw)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        got = load_all(path)
    except sp.UnsafeCheckpointError as e:
        got = e
        assert str(path) in str(e)  # the error names the file
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 10, f"{kind} {ops}: {elapsed:.1f} s"
    assert peak < 64 * MiB, f"{kind} {ops}: {peak / MiB:.1f} MiB"
    if kind.startswith("pt") and not isinstance(got, Exception):
        assert got == want[kind], f"a mutated zip loaded other content: {ops}"
    assert load_all(paths[kind]) == want[kind]  # nothing of the mutated load survives


def test_the_valid_files_load_as_written(valid):
    """Control for the fuzz test: the unmutated files load, and their tensors equal torch's own."""
    files, paths, want = valid
    g = torch.Generator().manual_seed(0)
    written = _content(g)
    for kind in ("pt", "pt-deflated"):
        got = sp.read_file(paths[kind])
        for k, v in written.items():
            if isinstance(v, torch.Tensor):
                assert got[k].dtype == v.dtype and torch.equal(got[k].load(), v), (kind, k)
        assert got["meta"] == written["meta"]
    assert mutate(files["pkl"], [("int", 0, 0, 1)]) != files["pkl"]
    assert struct.unpack("<I", mutate(b"\0" * 8, [("int", 2, 1 << 31, 4)])[2:6])[0] == 1 << 31
