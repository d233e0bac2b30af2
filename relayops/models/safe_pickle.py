"""Reading EDM and RDM checkpoints without running code from them, within set resource limits.

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

A file can neither change the loader nor make it exhaust the machine:

* Nothing shared is handed out: every load gets its own storage types, container record classes
  and rebuild functions. pickle's BUILD (``__setstate__``/attribute update) is refused on
  everything but the two record types that need it (:class:`PlainModule`, numpy dtypes).
  Items are added only to lists, dicts and sets the pickle made itself; protocol 0/1 object
  opcodes, extension codes and out-of-band buffers are refused.
* Sizes are checked before anything is allocated or decompressed (:data:`LIMITS`): a length
  field may not ask for more bytes than remain in the pickle; ``data.pkl`` and every storage
  record of a zip are checked from the zip directory (a storage must hold exactly its
  elements) and read in chunks; the storages and the tensors of one file may not add up to more
  than ``max_bytes`` (by default twice the file size plus 1 MiB: a tensor view holds at most
  its storage, torch.save's zip is uncompressed); every tensor's full extent lies inside its
  storage and its elements do not overlap (zero or overlapping strides are refused; torch can
  save expanded tensors, networks never hold them).
* Containers hold at most ``max_container_items``; keys of dicts and elements of sets are
  strings, bytes, numbers (integers of at most 64 bits), None or short flat tuples of these,
  and at most ``max_equal_hashes`` of them may share a hash value (a file of colliding
  integers would otherwise take time quadratic in its size).
* The loaded object graph is walked once (iteratively): a cycle or nesting deeper than
  ``max_depth`` is refused, so later recursive walks are bounded.

Each refusal is one :class:`UnsafeCheckpointError` naming the file and, for a limit, the limit.

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
import itertools
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["LIMITS", "PersistentObject", "PlainModule", "TensorRef", "UnsafeCheckpointError", "load_pickle",
           "read_file"]

# The limits a checkpoint must stay within (see the module docstring).
LIMITS = {
    "max_pickle_bytes": 64 << 20,       # data.pkl of a torch.save zip (the released ones: well under 1 MiB)
    "max_container_items": 1 << 20,     # items of one list, dict or set
    "max_equal_hashes": 32,             # dict keys / set elements of one container sharing a hash value
    "max_depth": 100,                   # nesting of containers and records (EDM's networks: about 25)
    "max_dims": 64,                     # dimensions of one tensor
}
_CHUNK = 1 << 20  # storage records are read this many bytes at a time


def default_max_bytes(file_size: int) -> int:
    """The default bound on the storage bytes (and, separately, the tensor bytes) of one file."""
    return 2 * file_size + (1 << 20)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint asks for a name off the allowlist, is malformed or exceeds a limit; nothing from
    it ran. A ValueError too, so callers that catch bad input (the command line) catch it."""


class _Budget:
    """What one file may make the loader allocate: storage bytes and tensor bytes, each up to
    ``max_bytes``; ``source`` names the file in errors."""

    def __init__(self, source: str, max_bytes: int):
        self.source, self.max_bytes = source, max_bytes
        self.used = {"storage": 0, "tensor": 0}

    def charge(self, kind: str, nbytes: int) -> None:
        self.used[kind] += nbytes
        if self.used[kind] > self.max_bytes:
            raise UnsafeCheckpointError(
                f"{self.source}: its {kind}s need more than the limit of {self.max_bytes} bytes "
                f"(max_bytes; by default twice the file size plus 1 MiB)")


# --- what the allowlisted names build ------------------------------------------------------------

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _NoState:
    """Objects a checkpoint may create but never modify (pickle's BUILD opcode is refused)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"a checkpoint tried to set the state of a {type(self).__name__}")


class StorageType(_NoState):
    """Stands for ``torch.<Name>Storage`` in a persistent id: only its dtype is used. Each load
    has its own instances."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageRef(_NoState):
    """A storage of ``numel`` elements of ``dtype``; ``readinto(buf)`` fills a bytearray of its
    size with its bytes, on demand.

    Not cached: each tensor's data is read when it is loaded, so a whole network is never held
    twice (tensors of EDM's modules each have a storage of their own)."""

    def __init__(self, dtype: torch.dtype, numel: int, readinto: Callable[[bytearray], None], budget: _Budget):
        self.dtype, self.numel, self._readinto, self.budget = dtype, numel, readinto, budget
        self.nbytes = numel * dtype.itemsize
        budget.charge("storage", self.nbytes)

    def data(self) -> torch.Tensor:
        """The storage as a new 1-D tensor."""
        if not self.nbytes:
            return torch.empty(0, dtype=self.dtype)
        buf = bytearray(self.nbytes)
        try:
            self._readinto(buf)
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # zlib, CRC, I/O and zipfile errors of a damaged record
            raise UnsafeCheckpointError(f"{self.budget.source}: a storage could not be read "
                                        f"({type(e).__name__}: {e})") from None
        return torch.frombuffer(buf, dtype=self.dtype)


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class TensorRef(_NoState):
    """A tensor of a checkpoint: shape, dtype and where its data lies; :meth:`load` reads it.

    Its geometry is checked here, before any data is read: every element inside the storage,
    no two elements on one storage element (no zero or overlapping strides), and its bytes
    charged to the file's budget."""

    def __init__(self, storage: StorageRef, offset: int, size, stride):
        if not isinstance(storage, StorageRef):
            raise UnsafeCheckpointError(f"a tensor rebuild got {type(storage).__name__} instead of a storage")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
                and len(size) == len(stride) <= LIMITS["max_dims"]):
            raise UnsafeCheckpointError("malformed tensor geometry: size and stride are not two sequences of one "
                                        f"length of at most {LIMITS['max_dims']}")
        size, stride = tuple(size), tuple(stride)
        if not all(map(_is_index, (offset, *size, *stride))):
            raise UnsafeCheckpointError(f"malformed tensor geometry: offset {offset!r}, size {size}, stride {stride}")
        numel = math.prod(size)
        reach = 0  # the largest element offset the dimensions so far reach
        for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
            if st <= reach:
                raise UnsafeCheckpointError(f"a tensor of size {size} and stride {stride} has overlapping elements "
                                            "(zero or overlapping strides are refused)")
            reach += (n - 1) * st
        if (offset + reach >= storage.numel) if numel else (offset > storage.numel):
            raise UnsafeCheckpointError(f"a tensor of size {size} and stride {stride} at offset {offset} reaches past "
                                        f"its storage of {storage.numel} elements")
        storage.budget.charge("tensor", numel * storage.dtype.itemsize)
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
    """A torch container (``ModuleDict`` ...) pickled by class reference: ``class_name`` and ``state``.

    Each load has its own subclasses (:func:`_plain_module_class`); an instance takes one dict
    state, once."""

    class_name = "Module"
    state = None

    def __init__(self):  # instances come from pickle's NEWOBJ, which calls __new__ only
        raise TypeError("PlainModule records come from a checkpoint")

    def __setstate__(self, state):
        if not isinstance(state, dict) or self.state is not None:
            raise UnsafeCheckpointError(f"a {self.class_name} whose state is not one dict")
        self.state = state

    def __repr__(self) -> str:
        return f"PlainModule({self.class_name!r})"


def _plain_module_class(name: str) -> type:
    return type(f"Plain{name}", (PlainModule,), {"class_name": name})


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


def _fresh(func: Callable) -> Callable:
    """A new function object calling ``func``: what one load holds, no other load shares."""
    def call(*args):
        return func(*args)
    call.__name__ = func.__name__
    return call


def safe_globals() -> dict[tuple[str, str], Any]:
    """The allowlist, built anew for every load: its storage types, container record classes and
    functions are that load's own, so nothing one file does reaches another."""
    return {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor"): _fresh(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _fresh(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _fresh(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _fresh(_rebuild_parameter),
        ("numpy", "dtype"): NumpyDType,
        ("numpy.core.multiarray", "scalar"): _fresh(_numpy_scalar),
        ("numpy._core.multiarray", "scalar"): _fresh(_numpy_scalar),
        ("_codecs", "encode"): _fresh(_codecs_encode),
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _fresh(_persistent_stub),
        ("dnnlib.util", "EasyDict"): dict,  # EDM's attribute dict: its items are all that matter
        **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
        **{("torch.nn.modules.container", name): _plain_module_class(name)
           for name in ("ModuleDict", "ModuleList", "Sequential")},
    }


# Python 2 module names that protocol 2 pickles use.
_COMPAT_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))


def _check_key(key) -> None:
    """Dict keys and set elements whose hashing costs O(1): see the module docstring."""
    if isinstance(key, tuple) and len(key) <= 8:
        parts = key
    else:
        parts = (key,)
    for k in parts:
        if type(k) not in _SCALAR_KEYS or (type(k) is int and not -(1 << 63) <= k < (1 << 64)):
            raise UnsafeCheckpointError(f"a dict key or set element of type {type(k).__name__} (keys are strings, "
                                        "bytes, numbers, None or short tuples of these)")


class _BoundedReader:
    """A file whose reads may not ask for more than the ``size`` bytes left of the pickle: a length
    field is checked before anything of that length is allocated."""

    def __init__(self, file, size: int):
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise UnsafeCheckpointError(f"the pickle asks for {n} bytes where {self._left} remain")
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._file.readline(self._left)
        self._left -= len(line)
        return line


def _refuse(what: str):
    def load(self):
        raise UnsafeCheckpointError(f"refusing pickle opcode {what} (checkpoints do not use it)")
    return load


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's Python unpickler with names from :func:`safe_globals` only and its item-adding,
    object-building and state-setting opcodes restricted (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, size: int, persistent_load: Callable | None, extra_globals: dict | None = None):
        super().__init__(_BoundedReader(file, size))
        self._persistent = persistent_load
        self._allowed = {**safe_globals(), **(extra_globals or {})}
        self._hashes: dict[int, tuple[Any, dict]] = {}  # id of a dict/set -> (it, hash counts)

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

    # -- items go into containers of this pickle only, with bounded size and hash collisions --

    def _add_keys(self, container, keys) -> None:
        """Counts the hash values of ``keys`` about to enter ``container`` (before they enter it)."""
        if len(container) + len(keys) > LIMITS["max_container_items"]:
            raise UnsafeCheckpointError(f"a container of more than {LIMITS['max_container_items']} items")
        entry = self._hashes.get(id(container))
        if entry is None:  # keeps the container alive, so that its id is not reused during the load
            entry = self._hashes[id(container)] = (container, {})
        counts = entry[1]
        for key in keys:
            _check_key(key)
            h = hash(key)
            counts[h] = counts.get(h, 0) + 1
            if counts[h] > LIMITS["max_equal_hashes"]:
                raise UnsafeCheckpointError(f"more than {LIMITS['max_equal_hashes']} keys of one dict or set share a "
                                            "hash value (a hash-collision file)")

    def _construct(self, cls: type, args: tuple):
        """``cls(*args)`` for the allowlisted container types, keys checked before they go in."""
        if len(args) > 1:
            raise UnsafeCheckpointError(f"a {cls.__name__} built from {len(args)} arguments")
        items = args[0] if args else ()
        if issubclass(cls, dict):
            items = list(items.items()) if isinstance(items, dict) else items
            if not isinstance(items, (list, tuple)) or not all(isinstance(p, (tuple, list)) and len(p) == 2
                                                                for p in items):
                raise UnsafeCheckpointError(f"a {cls.__name__} built from something other than a list of pairs")
            out = cls()
            self._add_keys(out, [k for k, _ in items])
            out.update(items)
            return out
        if not isinstance(items, (list, tuple)):
            raise UnsafeCheckpointError(f"a {cls.__name__} built from something other than a list")
        probe: set = set()
        self._add_keys(probe, items)
        out = cls(items)
        self._hashes[id(out)] = (out, self._hashes.pop(id(probe))[1])
        return out

    def _list_target(self):
        target = self.stack[-1]
        if type(target) is not list:
            raise UnsafeCheckpointError(f"a pickle appends to a {type(target).__name__}")
        return target

    def _mapping_target(self):
        target = self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict):
            raise UnsafeCheckpointError(f"a pickle sets items of a {type(target).__name__}")
        return target

    def load_append(self):
        value = self.stack.pop()
        target = self._list_target()
        if len(target) >= LIMITS["max_container_items"]:
            raise UnsafeCheckpointError(f"a container of more than {LIMITS['max_container_items']} items")
        target.append(value)

    def load_appends(self):
        items = self.pop_mark()
        target = self._list_target()
        if len(target) + len(items) > LIMITS["max_container_items"]:
            raise UnsafeCheckpointError(f"a container of more than {LIMITS['max_container_items']} items")
        target.extend(items)

    def load_list(self):
        items = self.pop_mark()
        if len(items) > LIMITS["max_container_items"]:
            raise UnsafeCheckpointError(f"a container of more than {LIMITS['max_container_items']} items")
        self.append(items)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        target = self._mapping_target()
        self._add_keys(target, (key,))
        target[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._mapping_target()
        keys = items[0::2]
        if len(items) % 2:
            raise UnsafeCheckpointError("SETITEMS with an odd number of items")
        self._add_keys(target, keys)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise UnsafeCheckpointError("DICT with an odd number of items")
        out: dict = {}
        self._add_keys(out, items[0::2])
        for i in range(0, len(items), 2):
            out[items[i]] = items[i + 1]
        self.append(out)

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise UnsafeCheckpointError(f"a pickle adds set items to a {type(target).__name__}")
        self._add_keys(target, items)
        target.update(items)

    def load_frozenset(self):
        self.append(self._construct(frozenset, (self.pop_mark(),)))

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise UnsafeCheckpointError("REDUCE without an argument tuple")
        if isinstance(func, type) and func in (dict, collections.OrderedDict, set, frozenset):
            self.stack[-1] = self._construct(func, args)
        else:
            self.stack[-1] = func(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and (issubclass(cls, PlainModule) or cls in (dict, collections.OrderedDict))):
            raise UnsafeCheckpointError(f"refusing to create a {getattr(cls, '__name__', type(cls).__name__)} "
                                        "with NEWOBJ (only container records are)")
        if args != ():
            raise UnsafeCheckpointError("NEWOBJ with arguments (container records take none)")
        self.append(cls.__new__(cls))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, (PlainModule, NumpyDType)):
            raise UnsafeCheckpointError(f"a checkpoint tried to set the state of a "
                                        f"{getattr(inst, '__name__', type(inst).__name__)} (only container records "
                                        "and numpy dtypes take a state)")
        inst.__setstate__(state)

    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    for _op in ("INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "BYTEARRAY8", "NEXT_BUFFER",
                "READONLY_BUFFER"):
        dispatch[getattr(pickle, _op)[0]] = _refuse(_op)
    del _op


def _remaining(file) -> int:
    """Bytes left in a seekable binary file from its position."""
    pos = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(pos)
    return end - pos


def load_pickle(file, persistent_load: Callable | None = None, extra_globals: dict | None = None,
                size: int | None = None):
    """One pickle from a binary file object through the restricted unpickler, its object graph
    checked (:func:`check_graph`). ``size``: the bytes the pickle may take (default: the rest of
    a seekable file)."""
    try:
        if size is None:
            size = _remaining(file)
        obj = _RestrictedUnpickler(file, size, persistent_load, extra_globals).load()
    except (UnsafeCheckpointError, MemoryError):  # a MemoryError would be a bug of the limits: not hidden
        raise
    except Exception as e:  # whatever a damaged pickle makes the opcodes raise: the loader's error
        raise UnsafeCheckpointError(f"malformed pickle ({type(e).__name__}: {e})") from None
    check_graph(obj)
    return obj


def _children(obj):
    """The objects a loaded container or record holds (none for anything else)."""
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return obj
    if t in (dict, collections.OrderedDict):
        return itertools.chain(obj.keys(), obj.values())
    if isinstance(obj, (PersistentObject, PlainModule)) and obj.state is not None:
        return (obj.state,)
    return ()


_CONTAINERS = (list, tuple, set, frozenset, dict, collections.OrderedDict, PersistentObject, PlainModule)


def check_graph(root) -> None:
    """Refuses a loaded object graph with a cycle or nested deeper than ``LIMITS["max_depth"]``.

    Iterative (no recursion) and linear: each container is entered once; a shared one counts
    with its own height wherever it is reached."""
    limit = LIMITS["max_depth"]
    height: dict[int, int] = {}   # id -> height of a finished container
    on_path: set[int] = set()
    stack = [[root, iter(_children(root)), 0]]  # object, its children, the highest child so far
    on_path.add(id(root))
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            if not isinstance(child, _CONTAINERS):
                continue
            cid = id(child)
            if cid in on_path:
                raise UnsafeCheckpointError("the pickled objects form a cycle (checkpoints hold none)")
            if cid not in height:
                if len(stack) >= limit:
                    raise UnsafeCheckpointError(f"objects nested more than {limit} deep (max_depth)")
                on_path.add(cid)
                stack.append([child, iter(_children(child)), 0])
                break
            if len(stack) + height[cid] > limit:
                raise UnsafeCheckpointError(f"objects nested more than {limit} deep (max_depth)")
            frame[2] = max(frame[2], height[cid])
        else:
            stack.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2] + 1
            if stack:
                stack[-1][2] = max(stack[-1][2], frame[2] + 1)


# --- the legacy torch.save blob of a storage inside a plain pickle --------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _storage_from_bytes(blob, budget: _Budget) -> StorageRef:
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
    view = memoryview(blob)
    spans: dict[str, int] = {}  # key -> where its data starts in the blob

    def readinto_of(key):
        def readinto(buf):
            buf[:] = view[spans[key]:spans[key] + len(buf)]
        return readinto

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and _is_index(pid[4])):
            raise UnsafeCheckpointError("an unexpected persistent id in a storage blob")
        _, stype, key, _location, numel, view_ = pid
        if view_ is not None:  # torch.save of one storage never writes views
            raise UnsafeCheckpointError("a storage view in a storage blob (not supported)")
        if key not in storages:
            if numel * stype.dtype.itemsize > len(blob):
                raise UnsafeCheckpointError(f"a storage blob of {len(blob)} bytes announces {numel} elements")
            storages[key] = StorageRef(stype.dtype, numel, readinto_of(key), budget)
        return storages[key]

    root = load_pickle(f, persistent)
    keys = load_pickle(f)
    if (not isinstance(root, StorageRef) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
            or set(keys) != set(storages)):
        raise UnsafeCheckpointError("a storage blob whose key list does not match its storages")
    for key in keys:
        ref = storages[key]
        (count,) = struct.unpack("<q", f.read(8))
        if count != ref.numel:
            raise UnsafeCheckpointError(f"a storage blob announces {ref.numel} elements and holds {count}")
        start = f.tell()
        if start + ref.nbytes > len(blob):
            raise UnsafeCheckpointError("a truncated storage blob")
        spans[key] = start
        f.seek(start + ref.nbytes)
    return root


# --- the two containers --------------------------------------------------------------------------

def is_zip(path: Path) -> bool:
    """Whether ``path`` is a zip (``torch.save``'s container) rather than a plain pickle."""
    return zipfile.is_zipfile(path)


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo, buf: bytearray) -> None:
    """Fills ``buf`` with the zip record ``info`` (whose directory size is len(buf)), a chunk at a time."""
    view = memoryview(buf)
    with zf.open(info) as f:
        pos = 0
        while pos < len(buf):
            chunk = f.read(min(_CHUNK, len(buf) - pos))
            if not chunk:
                raise UnsafeCheckpointError(f"record {info.filename!r} is shorter than its directory entry")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if f.read(1):
            raise UnsafeCheckpointError(f"record {info.filename!r} is longer than its directory entry")


def _read_zip(path: Path, budget: _Budget):
    """``torch.save``'s zip: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>`` per storage."""
    try:
        return _read_zip_records(path, budget)
    except (UnsafeCheckpointError, MemoryError):
        raise
    except Exception as e:  # zipfile's, zlib's and I/O errors of a damaged zip
        raise UnsafeCheckpointError(f"{path} is a corrupt zip ({type(e).__name__}: {e})") from None


def _read_zip_records(path: Path, budget: _Budget):
    zf = zipfile.ZipFile(path)
    records = {info.filename: info for info in zf.infolist()}
    pkls = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise UnsafeCheckpointError(f"{path} is a zip without exactly one <archive>/data.pkl (not a torch.save file)")
    pkl = records[pkls[0]]
    prefix = pkls[0][: -len("data.pkl")]
    if pkl.file_size > LIMITS["max_pickle_bytes"]:
        raise UnsafeCheckpointError(f"{path}: its data.pkl of {pkl.file_size} bytes exceeds the limit of "
                                    f"{LIMITS['max_pickle_bytes']} bytes (max_pickle_bytes)")
    order = records.get(f"{prefix}byteorder")
    if order is not None:
        if order.file_size > 16:
            raise UnsafeCheckpointError(f"{path}: a byteorder record of {order.file_size} bytes")
        buf = bytearray(order.file_size)
        _read_record(zf, order, buf)
        if bytes(buf).strip() != b"little":
            raise UnsafeCheckpointError(f"{path} was saved on a big-endian machine (not supported)")
    storages: dict[str, StorageRef] = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and _is_index(pid[4])):
            raise UnsafeCheckpointError("an unexpected persistent id")
        _, stype, key, _location, numel = pid
        if key not in storages:
            info = records.get(f"{prefix}data/{key}")
            if info is None:
                raise UnsafeCheckpointError(f"no record {prefix}data/{key} for a storage")
            if info.file_size != numel * stype.dtype.itemsize:
                raise UnsafeCheckpointError(f"record {info.filename!r} holds {info.file_size} bytes; its storage of "
                                            f"{numel} {stype.dtype} elements needs {numel * stype.dtype.itemsize}")
            storages[key] = StorageRef(stype.dtype, numel, lambda buf, i=info: _read_record(zf, i, buf), budget)
        return storages[key]

    with zf.open(pkl) as f:
        return load_pickle(f, persistent, size=pkl.file_size)


def read_file(path, *, max_bytes: int | None = None) -> Any:
    """The object pickled in ``path`` (a plain pickle or a ``torch.save`` zip), restricted as above.

    ``max_bytes``: the most bytes the file's storages, and separately its tensors, may take
    (default :func:`default_max_bytes` of the file size). Raises ``FileNotFoundError`` for a
    missing file and :class:`UnsafeCheckpointError` (naming the file) for a name off the
    allowlist, a malformed file or one over a limit. Tensors are :class:`TensorRef` (read by
    ``load()``), EDM persistent objects :class:`PersistentObject`, torch containers
    :class:`PlainModule`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    budget = _Budget(str(path), default_max_bytes(size) if max_bytes is None else max_bytes)
    try:
        if is_zip(path):
            return _read_zip(path, budget)
        extra = {("torch.storage", "_load_from_bytes"): lambda blob: _storage_from_bytes(blob, budget)}
        with open(path, "rb") as f:
            return load_pickle(f, None, extra, size=size)
    except UnsafeCheckpointError as e:
        if str(e).startswith(str(path)):
            raise
        raise UnsafeCheckpointError(f"{path}: {e}") from None
