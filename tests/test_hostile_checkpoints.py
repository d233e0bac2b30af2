"""Crafted checkpoints of a few KB cannot change the loader, exhaust memory or time, or leave
anything half-written: each is refused quickly, with bounded memory, by one
``UnsafeCheckpointError`` (or ``ValueError`` for network sizes) naming the file and the limit.

Memory is measured with tracemalloc (Python allocations: the bytes and bytearrays a reader
would fill) and time with a wall clock; both bounds are generous (the host is shared), each far
below what the unbounded loader took on the same file.
"""
from __future__ import annotations

import io
import pickle
import struct
import sys
import time
import tracemalloc
import zipfile

import pytest
import torch

from edm_pickle import PERSISTENCE, PersistentRecord, _fake_persistence
from relayops.cli import main
from relayops.models import UnsafeCheckpointError, convert, read_checkpoint
from relayops.models import safe_pickle as sp
from relayops.models.safe_pickle import read_file

convert_mod = sys.modules["relayops.models.convert"]  # the module (relayops.models.convert is the function)

BASE = dict(img_resolution=8, img_channels=3, label_dim=0, model_type="DhariwalUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
MiB = 1 << 20


def bounded(func, *, seconds=5.0, peak=16 * MiB):
    """Runs ``func`` (which must raise) twice: timed, then under tracemalloc (which slows Python
    allocations many times over); checks the wall time and the allocation peak; returns the error."""
    t0 = time.perf_counter()
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        func()
    elapsed = time.perf_counter() - t0
    tracemalloc.start()
    try:
        with pytest.raises((UnsafeCheckpointError, ValueError)) as e:
            func()
        _, top = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert top < peak, f"allocated {top / MiB:.1f} MiB"
    return e.value


@pytest.fixture
def valid_pt(tmp_path):
    """A valid torch.save file and what it holds: loads before and after each crafted file must agree."""
    path = tmp_path / "valid.pt"
    want = {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), "n": torch.arange(6)}
    torch.save(want, path)
    yield path, want
    got = read_file(path)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].load(), v), k


def _zip_with(src: bytes, replace: dict[str, bytes], compress: dict[str, int] | None = None) -> bytes:
    """``src`` (a torch.save zip) with records replaced and optionally compressed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=(compress or {}).get(info.filename, zipfile.ZIP_STORED))
    return out.getvalue()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- the loader's own objects -------------------------------------------------------------------

def _build_on(global_ref: bytes, state: bytes) -> bytes:
    """A protocol 2 pickle: GLOBAL ``global_ref``, then BUILD with ``state`` (pickled ops)."""
    return b"\x80\x02c" + global_ref + b"\n" + state + b"b."


DTYPE_EVIL = b'}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00evils'                        # {"dtype": "evil"}
SLOT_DTYPE_EVIL = b'N}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00evils\x86'             # (None, {"dtype": "evil"})
DEFAULTS_EVIL = b'N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86'                     # (None, {"__defaults__": (1,)})


@pytest.mark.parametrize("name,raw", [
    ("storage_type_dict", _build_on(b"torch\nFloatStorage", DTYPE_EVIL)),
    ("storage_type_slots", _build_on(b"torch\nFloatStorage", SLOT_DTYPE_EVIL)),
    ("function_defaults", _build_on(b"torch._utils\n_rebuild_tensor_v2", DEFAULTS_EVIL)),
    ("codecs_defaults", _build_on(b"_codecs\nencode", DEFAULTS_EVIL)),
    ("numpy_dtype_class", _build_on(b"numpy\ndtype", DEFAULTS_EVIL)),
    ("container_class", _build_on(b"torch.nn.modules.container\nModuleDict", DTYPE_EVIL)),
    ("ordered_dict_class", _build_on(b"collections\nOrderedDict", DEFAULTS_EVIL)),
])
def test_a_pickle_cannot_change_the_loaders_objects(tmp_path, valid_pt, name, raw):
    """BUILD on an allowlisted object (a storage type, a function, a class) is refused; the
    valid file loads the same afterwards (checked by the fixture)."""
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(raw)
    with pytest.raises(UnsafeCheckpointError, match=r"tried to set the state"):
        read_file(path)


def test_every_load_gets_its_own_allowlist_objects():
    a, b = sp.safe_globals(), sp.safe_globals()
    for key in a:
        if isinstance(a[key], type) and not issubclass(a[key], sp.PlainModule):
            assert a[key] is b[key], key  # classes: set, frozenset, OrderedDict, dict, numpy dtype
        else:
            assert a[key] is not b[key], key
    assert a["torch", "FloatStorage"].dtype == torch.float32
    with pytest.raises(AttributeError):  # and storage types take no new attributes
        a["torch", "FloatStorage"].extra = 1


@pytest.mark.parametrize("ops", [
    b"\x80\x02ctorch\nFloatStorage\nK\x01a.",                          # APPEND to a storage type
    b"\x80\x02c_codecs\nencode\n(K\x01K\x02u.",                          # SETITEMS on a function
    b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x03set\x93(K\x01\x90.",  # ADDITEMS to `set`
    b"\x80\x02ctorch\nFloatStorage\n)\x81.",                            # NEWOBJ of a storage type
    b"\x80\x02c_codecs\nencode\n\x82\x01.",                              # EXT1
    b"\x80\x02(c_codecs\nencode\no.",                                    # OBJ
], ids=["append", "setitems", "additems", "newobj", "ext1", "obj"])
def test_items_go_only_into_the_pickles_own_containers(tmp_path, valid_pt, ops):
    path = tmp_path / "x.pkl"
    path.write_bytes(ops)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        read_file(path)


# --- tensors and storages -------------------------------------------------------------------------

@pytest.mark.parametrize("make,what", [
    (lambda: torch.zeros(1).expand(10**6, 10**6), "overlapping"),                  # zero strides
    (lambda: torch.zeros(2000).as_strided((1000, 1000), (1, 1)), "overlapping"),   # overlapping strides
    (lambda: torch.zeros(10).as_strided((3, 5), (2, 1)), "overlapping"),
])
def test_tensor_views_larger_than_their_storage_are_refused(tmp_path, valid_pt, make, what):
    path = tmp_path / "view.pt"
    path.write_bytes(_torch_bytes({"w": make()}))
    err = bounded(lambda: read_file(path))
    assert what in str(err) and str(path) in str(err)


def test_a_tensor_reaching_past_its_storage_on_any_dimension_is_refused(tmp_path, valid_pt):
    """The extent of every dimension counts, not just the last element of the last one."""
    raw = _torch_bytes({"w": torch.zeros(4, 3)})
    pkl = zipfile.ZipFile(io.BytesIO(raw)).read("archive/data.pkl")
    # size (4, 3) stride (3, 1) -> size (5, 3): the first dimension reaches past the 12 elements
    assert pkl.count(b"K\x04K\x03\x86") == 1
    path = tmp_path / "past.pt"
    path.write_bytes(_zip_with(raw, {"archive/data.pkl": pkl.replace(b"K\x04K\x03\x86", b"K\x05K\x03\x86")}))
    with pytest.raises(UnsafeCheckpointError, match="reaches past its storage of 12 elements"):
        read_file(path)


def test_many_views_of_one_storage_are_bounded_by_the_file_size(tmp_path, valid_pt):
    """400 full views of a 1 MiB storage: 400 MiB of tensors from a 1 MiB file."""
    big = torch.zeros(MiB // 4)
    path = tmp_path / "views.pt"
    path.write_bytes(_torch_bytes({f"v{i}": big[:] for i in range(400)}))
    err = bounded(lambda: read_file(path))
    assert "tensors need more than the limit" in str(err) and str(path) in str(err)
    # an explicit max_bytes lets it through, still without reading any data
    got = read_file(path, max_bytes=401 * MiB)
    assert len(got) == 400


def test_a_compressed_storage_is_refused_before_it_is_decompressed(tmp_path, valid_pt):
    """A 64 MiB storage record deflated to ~64 KiB: the zip directory's size is checked first."""
    raw = _torch_bytes({"w": torch.zeros(16 * MiB)})
    zeros = zipfile.ZipFile(io.BytesIO(raw)).read("archive/data/0")
    path = tmp_path / "bomb.pt"
    path.write_bytes(_zip_with(raw, {}, {"archive/data/0": zipfile.ZIP_DEFLATED}))
    del raw, zeros
    assert path.stat().st_size < MiB
    err = bounded(lambda: read_file(path).__getitem__("w").load(), peak=4 * MiB)
    assert "storages need more than the limit" in str(err) and str(path) in str(err)


def test_a_compressed_data_pkl_is_refused_before_it_is_decompressed(tmp_path, valid_pt, monkeypatch):
    raw = _torch_bytes({"w": torch.zeros(3)})
    pkl = zipfile.ZipFile(io.BytesIO(raw)).read("archive/data.pkl")
    monkeypatch.setitem(sp.LIMITS, "max_pickle_bytes", 4 * MiB)
    path = tmp_path / "pkl-bomb.pt"
    path.write_bytes(_zip_with(raw, {"archive/data.pkl": pkl + b"\x00" * (8 * MiB)},
                               {"archive/data.pkl": zipfile.ZIP_DEFLATED}))
    err = bounded(lambda: read_file(path), peak=2 * MiB)
    assert "exceeds the limit of 4194304 bytes (max_pickle_bytes)" in str(err)


def test_a_record_whose_size_disagrees_with_its_storage_is_refused(tmp_path, valid_pt):
    raw = _torch_bytes({"w": torch.zeros(3)})
    path = tmp_path / "short.pt"
    path.write_bytes(_zip_with(raw, {"archive/data/0": b"\x00" * 8}))
    with pytest.raises(UnsafeCheckpointError, match="holds 8 bytes; its storage of 3 torch.float32 elements needs 12"):
        read_file(path)


@pytest.mark.parametrize("raw", [
    b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x.",      # BINBYTES8 of 1 TiB
    b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.",      # a FRAME of 1 TiB
    b"\x80\x02B\xff\xff\xff\x7fx.",                            # BINBYTES of 2 GiB
])
def test_a_length_field_cannot_ask_for_more_than_the_file_holds(tmp_path, raw):
    path = tmp_path / "len.pkl"
    path.write_bytes(raw)
    err = bounded(lambda: read_file(path), peak=MiB)
    assert "bytes where" in str(err) and "remain" in str(err)


# --- containers -----------------------------------------------------------------------------------

P61 = 2**61 - 1


def _ops(obj) -> bytes:
    """The protocol 2 opcodes of ``obj`` alone (no PROTO, no STOP, no memo)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def test_colliding_integers_are_refused_quickly(tmp_path):
    """The reported files: a set, a frozenset and a dict of 20,000 integers of one hash value
    (multiples of 2^61 - 1), written opcode by opcode (building them in Python is itself
    quadratic)."""
    keys = [k * P61 for k in range(1, 20001)]
    assert {hash(k) for k in keys[:100]} == {0}
    items = b"".join(_ops(k) for k in keys)
    files = {
        "set_reduce": b"\x80\x02c__builtin__\nset\n](" + items + b"e\x85R.",
        "set_additems": b"\x80\x04\x8f(" + items + b"\x90.",
        "frozenset": b"\x80\x04(" + items + b"\x91.",
        "dict_setitems": b"\x80\x02}(" + b"".join(_ops(k) + b"N" for k in keys) + b"u.",
        "dict_opcode": b"\x80\x02(" + b"".join(_ops(k) + b"N" for k in keys) + b"d.",
    }
    for name, raw in files.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(raw)
        err = bounded(lambda: read_file(path), seconds=2)
        assert str(path) in str(err) and "keys are strings" in str(err), name
    # the same keys within 64 bits (one hash value for 8 of them at most) load
    small = [k * P61 for k in range(8)]
    assert sp.load_pickle(io.BytesIO(pickle.dumps(set(small), protocol=2))) == set(small)


def test_keys_of_one_hash_value_are_bounded():
    """Floats 2^k with k a multiple of 61 all hash to 1 (Python's hash of a float is its value mod
    2^61 - 1): within the key types, more than ``max_equal_hashes`` of them are refused."""
    keys = [2.0**k for k in range(-1074, 1024) if k % 61 == 0]
    assert len(keys) > sp.LIMITS["max_equal_hashes"] and {hash(k) for k in keys} == {1}
    few = keys[:sp.LIMITS["max_equal_hashes"]]
    for proto in (2, 4):
        assert sp.load_pickle(io.BytesIO(pickle.dumps(set(few), protocol=proto))) == set(few)
        assert sp.load_pickle(io.BytesIO(pickle.dumps(dict.fromkeys(few), protocol=proto))) == dict.fromkeys(few)
        for obj in (set(keys), dict.fromkeys(keys), frozenset(keys)):
            with pytest.raises(UnsafeCheckpointError, match="share a hash value"):
                sp.load_pickle(io.BytesIO(pickle.dumps(obj, protocol=proto)))


def test_container_sizes_are_capped(monkeypatch):
    monkeypatch.setitem(sp.LIMITS, "max_container_items", 100)
    for obj in (list(range(100)), dict.fromkeys(range(100)), set(range(100)), ["a"] * 100):
        assert sp.load_pickle(io.BytesIO(pickle.dumps(obj, protocol=2))) == obj
    for obj in (list(range(101)), dict.fromkeys(range(101)), set(range(101)), frozenset(range(101)), ["a"] * 101):
        for proto in (0, 2, 4):
            with pytest.raises(UnsafeCheckpointError, match="more than 100 items"):
                sp.load_pickle(io.BytesIO(pickle.dumps(obj, protocol=proto)))


def test_deep_nesting_and_cycles_are_refused_without_recursion():
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."   # lists nested 100,000 deep
    err = bounded(lambda: sp.load_pickle(io.BytesIO(deep)), peak=64 * MiB)
    assert "nested more than 100 deep (max_depth)" in str(err)
    d: dict = {}
    d["self"] = d
    loop: list = []
    loop.append([loop])
    for obj in (d, loop):
        with pytest.raises(UnsafeCheckpointError, match="cycle"):
            sp.load_pickle(io.BytesIO(pickle.dumps(obj, protocol=2)))
    # a shared (not cyclic) list is fine, however often it is referenced
    shared = [1, 2]
    assert sp.load_pickle(io.BytesIO(pickle.dumps([shared] * 1000, protocol=2))) == [shared] * 1000


def test_a_shared_list_tree_cannot_blow_up_the_depth_walk():
    """A list of two references to the level below, 90 levels: 2^90 paths, 91 objects."""
    level: list = []
    for _ in range(90):
        level = [level, level]
    raw = pickle.dumps(level, protocol=2)
    t0 = time.perf_counter()
    got = sp.load_pickle(io.BytesIO(raw))
    assert time.perf_counter() - t0 < 2
    assert got[0] is got[1] and len(raw) < 2000


# --- the module walk and the network sizes ------------------------------------------------------

def _dump_records(obj, path) -> None:
    """``pickle.dump`` of EDM persistence records (the reconstruct function importable meanwhile)."""
    with _fake_persistence(PERSISTENCE):
        path.write_bytes(pickle.dumps(obj, protocol=2))


def _shared_module_tree(levels: int):
    """A persistent EDMPrecond whose modules each hold the next level twice (2^levels paths)."""
    node = PersistentRecord("Leaf", "", _parameters={}, _buffers={}, _modules={})
    for i in range(levels):
        node = PersistentRecord(f"Level{i}", "", _parameters={}, _buffers={}, _modules={"a": node, "b": node})
    return PersistentRecord("EDMPrecond", "", _init_args=(), _init_kwargs=BASE, _parameters={}, _buffers={},
                            _modules={"model": node})


def test_the_module_walk_visits_each_module_once(tmp_path):
    """The reported graph took 10 s at 22 levels, doubling per level; a cycle raised RecursionError."""
    path = tmp_path / "shared.pkl"
    _dump_records({"ema": _shared_module_tree(40)}, path)
    err = bounded(lambda: read_checkpoint(path), seconds=10, peak=64 * MiB)
    assert "nested more than 100 deep" in str(err)       # the loader's depth bound
    _dump_records({"ema": _shared_module_tree(22)}, path)
    err = bounded(lambda: read_checkpoint(path), seconds=10, peak=64 * MiB)
    assert "appears twice in the network" in str(err)


def test_the_module_walk_is_depth_bounded():
    node = sp.PersistentObject("Leaf", {}, "", 6)
    for _ in range(convert_mod.MAX_MODULE_DEPTH + 1):
        node = sp.PersistentObject("Level", {"_modules": {"m": node}}, "", 6)
    with pytest.raises(UnsafeCheckpointError, match=f"nested more than {convert_mod.MAX_MODULE_DEPTH} deep"):
        convert_mod._module_state(node, {})


def test_shared_constructor_arguments_cannot_blow_up():
    value: list = [1]
    for _ in range(40):
        value = [value, value]   # 2^40 leaves, 41 lists
    with pytest.raises(UnsafeCheckpointError, match="holds more than"):
        convert_mod._plain(value, "channel_mult")


@pytest.mark.parametrize("change", [
    dict(num_blocks=10**6), dict(model_channels=10**9), dict(channel_mult=[1] * 1000), dict(img_resolution=2**40),
    dict(label_dim=-1), dict(num_blocks=True), dict(attn_resolutions=[10**9]),
    dict(num_blocks=16, channel_mult=[1] * 8),
    dict(model_channels=4096, channel_mult=[64], num_blocks=1),  # 6e12 parameters: counted on the meta device
])
def test_network_sizes_from_a_file_are_bounded(tmp_path, change):
    path = tmp_path / "big.pkl"
    _dump_records({"ema": PersistentRecord("EDMPrecond", "", _init_args=(), _init_kwargs=dict(BASE, **change),
                                           _parameters={}, _buffers={}, _modules={})}, path)
    err = bounded(lambda: read_checkpoint(path), seconds=20, peak=256 * MiB)
    assert "limit" in str(err)


def test_nothing_is_written_for_a_refused_file(tmp_path, capsys):
    path = tmp_path / "views.pt"
    path.write_bytes(_torch_bytes({"ema": torch.zeros(1).expand(1000, 1000)}))
    with pytest.raises(UnsafeCheckpointError):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the command line: one line, status 2, nothing written; --max-bytes raises the tensor budget
    big = torch.zeros(MiB // 4)
    path.write_bytes(_torch_bytes({f"v{i}": big[:] for i in range(4)}))  # 4 MiB of views, a 1 MiB file
    for extra, message in (([], "tensors need more than the limit of"), (["--max-bytes", str(5 * MiB)],
                                                                        "has no 'ema' network")):
        with pytest.raises(SystemExit) as e:
            main(["convert", str(path), str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
