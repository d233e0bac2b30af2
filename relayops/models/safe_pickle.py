"""Reading EDM and RDM checkpoints without running code from them.

The released checkpoints are Python pickles of whole modules in EDM's *persistence* format: each
network object pickles as a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
where ``meta`` holds the source code of the module that defined its class (``module_src``), the
class name, and the object's ``state`` (its ``__dict__``: parameters, buffers, submodules and
the recorded constructor arguments ``_init_args``/``_init_kwargs``). Unpickling them the usual
way ``exec``s that source. Here a restricted unpickler resolves only the names on an allowlist:

* tensor and parameter rebuilders, storage types and storage blobs (rebuilt here, lazily);
* ``collections.OrderedDict``, ``set``, ``frozenset``, torch's plain containers
  (``ModuleDict``, ``ModuleList``, ``Sequential``: kept as :class:`PlainModule` records);
* numpy scalars and dtypes (non-object dtypes only; scalars become Python numbers), and the
  latin-1 ``_codecs.encode`` protocol 2 uses for bytes;
* the persistence reconstruct function, mapped to :func:`_persistent_stub`, which keeps
  ``class_name`` and ``state`` in a :class:`PersistentObject` and never runs ``module_src``.

Any other name (``os.system``, ``builtins.eval``, a class from the file's own code ...) raises
:class:`UnsafeCheckpointError` naming it, before anything is called.

Two containers are read: a plain pickle (EDM's ``network-snapshot-*.pkl``, ``pickle.dump`` of
``{"ema": ...}``; each tensor storage is an embedded legacy ``torch.save`` blob) and a
``torch.save`` zip (RDM's ``training-state-*.pt``: ``data.pkl`` plus one record per storage).
Tensors come back as :class:`TensorRef` objects whose data is read only by :meth:`TensorRef.load`,
so the optimizer state of a training dump is never read into memory.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["PersistentObject", "PlainModule", "TensorRef", "UnsafeCheckpointError", "load_pickle", "read_file"]


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint asks for a name off the allowlist, or is malformed; nothing from it ran. A
    ValueError too, so callers that catch bad input (the command line) catch it."""


# --- what the allowlisted names build ------------------------------------------------------------

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class StorageType:
    """Stands for ``torch.<Name>Storage`` in a persistent id: only its dtype is used."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _NoState:
    """Objects a checkpoint may create but never modify (pickle's BUILD opcode is refused)."""

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"a checkpoint tried to set the state of a {type(self).__name__}")


class StorageRef(_NoState):
    """A storage of ``numel`` elements of ``dtype`` whose bytes ``read()`` returns, on demand.

    Not cached: each tensor's data is read when it is loaded, so a whole network is never held
    twice (tensors of EDM's modules each have a storage of their own)."""

    def __init__(self, dtype: torch.dtype, numel: int, read: Callable[[], bytes]):
        self.dtype, self.numel, self._read = dtype, numel, read

    def data(self) -> torch.Tensor:
        """The storage as a new 1-D tensor."""
        try:
            raw = self._read()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise UnsafeCheckpointError(f"a storage could not be read ({type(e).__name__}: {e})") from None
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if len(raw) != self.numel * itemsize:
            raise UnsafeCheckpointError(f"a {self.dtype} storage of {self.numel} elements holds {len(raw)} bytes")
        return torch.frombuffer(bytearray(raw), dtype=self.dtype) if raw else torch.empty(0, dtype=self.dtype)


class TensorRef(_NoState):
    """A tensor of a checkpoint: shape, dtype and where its data lies; :meth:`load` reads it."""

    def __init__(self, storage: StorageRef, offset: int, size, stride):
        if not isinstance(storage, StorageRef):
            raise UnsafeCheckpointError(f"a tensor rebuild got {type(storage).__name__} instead of a storage")
        size, stride = tuple(size), tuple(stride)
        ints = (offset, *size, *stride)
        if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in ints):
            raise UnsafeCheckpointError(f"malformed tensor geometry: offset {offset!r}, size {size}, stride {stride}")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if last >= storage.numel:
            raise UnsafeCheckpointError(f"a tensor of size {size} reaches past its storage of {storage.numel} elements")
        self.storage, self.offset, self.shape, self.stride = storage, offset, size, stride

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        """The tensor's values: a new contiguous CPU tensor."""
        flat = self.storage.data()
        if self.offset == 0 and self.numel() == flat.numel() and self.stride == _contiguous_strides(self.shape):
            return flat.view(self.shape)  # the whole storage, in order: no copy
        return torch.as_strided(flat, self.shape, self.stride, self.offset).clone(memory_format=torch.contiguous_format)

    def __repr__(self) -> str:
        return f"TensorRef({list(self.shape)}, {self.dtype})"


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """``torch._utils._rebuild_tensor(_v2)``: requires_grad, hooks and metadata are not kept."""
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter(_with_state)``: a parameter is kept as its tensor."""
    if not isinstance(data, TensorRef):
        raise UnsafeCheckpointError(f"a parameter rebuild got {type(data).__name__} instead of a tensor")
    return data


class PersistentObject(_NoState):
    """An object of EDM's persistence format: ``class_name`` and ``state``, its source never run.

    ``init_args``/``init_kwargs``: the constructor arguments EDM records with every persistent
    object (None where recording was off). ``source_sha256`` identifies the pickled source code.
    """

    def __init__(self, class_name: str, state: dict, source_sha256: str, version):
        self.class_name, self.state, self.source_sha256, self.version = class_name, state, source_sha256, version

    @property
    def init_args(self):
        return self.state.get("_init_args")

    @property
    def init_kwargs(self):
        return self.state.get("_init_kwargs")

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r})"


def _persistent_stub(meta) -> PersistentObject:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: records, runs nothing."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafeCheckpointError("a persistent object without the expected meta (type 'class')")
    name, src, state = meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if not isinstance(name, str) or not isinstance(src, str):
        raise UnsafeCheckpointError("a persistent object without a class name or module source")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"the state of persistent {name!r} is a {type(state).__name__}, not a dict")
    return PersistentObject(name, state, hashlib.sha256(src.encode("utf-8", "replace")).hexdigest(),
                            meta.get("version"))


class PlainModule:
    """A torch container (``ModuleDict`` ...) pickled by class reference: ``class_name`` and ``state``."""

    class_name = "Module"

    def __init__(self):  # instances come from pickle's NEWOBJ, which calls __new__ only
        raise TypeError("PlainModule records come from a checkpoint")

    def __setstate__(self, state):
        if not isinstance(state, dict) or self.state is not None:
            raise UnsafeCheckpointError(f"a {self.class_name} whose state is not one dict")
        self.state = state

    def __repr__(self) -> str:
        return f"PlainModule({self.class_name!r})"


def _plain_module_class(name: str) -> type:
    return type(f"Plain{name}", (PlainModule,), {"class_name": name, "state": None})


_NUMPY_CODES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class NumpyDType:
    """Stands for ``numpy.dtype(code)`` of a plain numeric type (never object dtypes)."""

    def __init__(self, code, align=False, copy=False):
        if code not in _NUMPY_CODES:
            raise UnsafeCheckpointError(f"refusing numpy dtype {code!r} (only plain numeric dtypes are read)")
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar``: a numpy scalar of a numeric dtype, as a Python number."""
    if not isinstance(dtype, NumpyDType) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("a numpy scalar without a numeric dtype and its bytes")
    order = ">" if dtype.byteorder == ">" else "<"
    np_dtype = np.dtype(order + dtype.code) if dtype.code not in ("b1", "i1", "u1") else np.dtype(dtype.code)
    if len(data) != np_dtype.itemsize:
        raise UnsafeCheckpointError(f"a numpy {dtype.code} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=np_dtype)[0].item()


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``, which protocol 2 pickles use for bytes: latin-1 text to bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("refusing _codecs.encode of anything but latin-1 text")
    return text.encode("latin1")


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy", "dtype"): NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _codecs_encode,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_stub,
    ("dnnlib.util", "EasyDict"): dict,  # EDM's attribute dict: its items are all that matter
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
    **{("torch.nn.modules.container", name): _plain_module_class(name)
       for name in ("ModuleDict", "ModuleList", "Sequential")},
}
# Python 2 module names that protocol 2 pickles use.
_COMPAT_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load: Callable | None, extra_globals: dict | None = None):
        super().__init__(file)
        self._persistent = persistent_load
        self._allowed = {**SAFE_GLOBALS, **(extra_globals or {})}

    def find_class(self, module: str, name: str):
        key = (_COMPAT_MODULES.get(module, module), name)
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: it is not on relayops' allowlist of names a checkpoint may use "
            "(tensors, containers, numpy scalars, EDM persistence records), so nothing from this file was run")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafeCheckpointError("a persistent id in a pickle that has no storages")
        return self._persistent(pid)


def load_pickle(file, persistent_load: Callable | None = None, extra_globals: dict | None = None):
    """One pickle from a binary file object through the restricted unpickler."""
    try:
        return _RestrictedUnpickler(file, persistent_load, extra_globals).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            struct.error, UnicodeDecodeError) as e:
        raise UnsafeCheckpointError(f"malformed pickle ({type(e).__name__}: {e})") from None


# --- the legacy torch.save blob of a storage inside a plain pickle --------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _storage_from_bytes(blob) -> StorageRef:
    """``torch.storage._load_from_bytes``: a storage saved by legacy ``torch.save``, parsed here.

    Layout: pickles of the magic number, the protocol version and the system info, the storage
    (a persistent id), the list of storage keys; then per key an int64 element count and the
    raw little-endian data.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafeCheckpointError("a storage blob that is not bytes")
    f = io.BytesIO(blob)
    if load_pickle(f) != _LEGACY_MAGIC or load_pickle(f) != _LEGACY_PROTOCOL:
        raise UnsafeCheckpointError("a storage blob without torch's legacy magic number and protocol")
    info = load_pickle(f)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsafeCheckpointError("a storage blob saved on a big-endian machine (not supported)")
    storages: dict[str, StorageRef] = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise UnsafeCheckpointError(f"an unexpected persistent id in a storage blob: {pid!r}")
        _, stype, key, _location, numel, view = pid
        if view is not None:  # torch.save of one storage never writes views
            raise UnsafeCheckpointError("a storage view in a storage blob (not supported)")
        return storages.setdefault(key, StorageRef(stype.dtype, numel, lambda: b""))

    root = load_pickle(f, persistent)
    keys = load_pickle(f)
    if not isinstance(root, StorageRef) or not isinstance(keys, list) or set(keys) != set(storages):
        raise UnsafeCheckpointError("a storage blob whose key list does not match its storages")
    view = memoryview(blob)
    for key in keys:
        ref = storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        if count != ref.numel:
            raise UnsafeCheckpointError(f"a storage blob announces {ref.numel} elements and holds {count}")
        start = f.tell()
        nbytes = count * torch.empty((), dtype=ref.dtype).element_size()
        if start + nbytes > len(blob):
            raise UnsafeCheckpointError("a truncated storage blob")
        ref._read = (lambda s=start, n=nbytes: bytes(view[s:s + n]))
        f.seek(start + nbytes)
    return root


# --- the two containers --------------------------------------------------------------------------

def is_zip(path: Path) -> bool:
    """Whether ``path`` is a zip (``torch.save``'s container) rather than a plain pickle."""
    return zipfile.is_zipfile(path)


def _read_zip(path: Path):
    """``torch.save``'s zip: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` per storage."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeCheckpointError(f"{path} is a corrupt zip ({e})") from None
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise UnsafeCheckpointError(f"{path} is a zip without exactly one <archive>/data.pkl (not a torch.save file)")
    prefix = pkls[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in set(zf.namelist()) and zf.read(f"{prefix}byteorder").strip() != b"little":
        raise UnsafeCheckpointError(f"{path} was saved on a big-endian machine (not supported)")
    names = set(zf.namelist())
    storages: dict[str, StorageRef] = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise UnsafeCheckpointError(f"an unexpected persistent id in {path}: {pid!r}")
        _, stype, key, _location, numel = pid
        if key not in storages:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeCheckpointError(f"{path} has no record {name!r} for a storage")
            storages[key] = StorageRef(stype.dtype, numel, lambda n=name: zf.read(n))
        return storages[key]

    try:
        with zf.open(pkls[0]) as f:
            return load_pickle(f, persistent)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeCheckpointError(f"{path}: data.pkl could not be read ({e})") from None


def read_file(path) -> Any:
    """The object pickled in ``path`` (a plain pickle or a ``torch.save`` zip), restricted as above.

    Raises ``FileNotFoundError`` for a missing file and :class:`UnsafeCheckpointError` for a name
    off the allowlist or a malformed file. Tensors are :class:`TensorRef` (read by ``load()``),
    EDM persistent objects :class:`PersistentObject`, torch containers :class:`PlainModule`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if is_zip(path):
        return _read_zip(path)
    extra = {("torch.storage", "_load_from_bytes"): _storage_from_bytes}
    with open(path, "rb") as f:
        return load_pickle(f, None, extra)
