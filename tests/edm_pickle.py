"""Test helper: write modules the way EDM's ``torch_utils.persistence`` pickles them.

EDM decorates each network class so that an instance pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta`` holding the source code of
the class's module (``module_src``), the class name, and the instance's ``state`` (its
``__dict__``, with the recorded constructor arguments ``_init_args``/``_init_kwargs``). Loading
such a file the usual way runs ``module_src``. :func:`persistent_dump` gives every module of a
tree that reduction (torch's own containers stay plain, as in EDM) and writes it with
``pickle.dump`` (EDM's ``.pkl``) or ``torch.save`` (RDM's ``.pt``). A stand-in
``torch_utils.persistence`` module exists only while dumping; its reconstruct function raises,
and ``MODULE_SRC`` would create a marker file if anything ever ran it.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types

import torch
from torch import nn

PERSISTENCE = "torch_utils.persistence"


def module_src(marker) -> str:
    """Source code that would create ``marker`` when executed."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src ran')\n"


def _reconstruct_persistent_obj(meta):  # the pickled reference; never called by a safe loader
    raise AssertionError("the persistence reconstruct function was called")


@contextlib.contextmanager
def _fake_persistence(name: str):
    """Module ``name`` (and its package) importable, for pickle's by-name reference, while dumping."""
    package = name.split(".")[0]
    pkg, mod = types.ModuleType(package), types.ModuleType(name)
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = name
    setattr(pkg, name.split(".")[1], mod)
    saved = {k: sys.modules.get(k) for k in (package, name)}
    sys.modules.update({package: pkg, name: mod})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        _reconstruct_persistent_obj.__module__ = __name__


_CLASSES: dict[type, type] = {}


def _persistent_class(cls: type, src: str) -> type:
    """A subclass of ``cls`` that reduces like an EDM persistent class."""
    if cls not in _CLASSES:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=src, class_name=cls.__name__, state=dict(self.__dict__))
            return _reconstruct_persistent_obj, (meta,), None
        _CLASSES[cls] = type(cls.__name__, (cls,), {"__reduce__": __reduce__, "__module__": cls.__module__})
    return _CLASSES[cls]


def persistent_dump(root: nn.Module, path, *, init_kwargs: dict, marker, extra: dict | None = None,
                    fmt: str = "pkl", sub_init_kwargs: dict | None = None, persistence: str = PERSISTENCE) -> None:
    """Write ``{"ema": root, **extra}`` as EDM (``fmt="pkl"``) or RDM (``fmt="pt"``) would.

    ``root`` and every module in ``extra`` record ``init_kwargs``; their other persistent
    submodules record ``sub_init_kwargs`` (EDM records every instance's arguments; numpy scalars
    appear there). torch's containers (``nn.ModuleDict``) stay plain. ``persistence`` names the
    module of the reconstruct function. The modules get their classes back afterwards.
    """
    src = module_src(marker)
    data = {"ema": root, **(extra or {})}
    tops = [v for v in data.values() if isinstance(v, nn.Module)]
    changed = []
    for top in tops:
        for m in top.modules():
            if type(m).__module__.startswith("torch.nn"):
                continue
            changed.append((m, type(m)))
            m._init_args = ()
            m._init_kwargs = dict(init_kwargs if m is top else (sub_init_kwargs or {}))
            m.__class__ = _persistent_class(type(m), src)
    try:
        with _fake_persistence(persistence):
            if fmt == "pkl":
                with open(path, "wb") as f:
                    pickle.dump(data, f)
            else:
                torch.save(data, path)
    finally:
        for m, cls in changed:
            m.__class__ = cls
            del m._init_args, m._init_kwargs


class PersistentRecord:
    """A non-module persistent object (EDM's loss objects): ``class_name`` and attribute state."""

    def __init__(self, class_name: str, src: str, **state):
        self._name, self._src, self._state = class_name, src, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self._src, class_name=self._name, state=dict(self._state))
        return _reconstruct_persistent_obj, (meta,), None


def dump_records(data, path, fmt: str = "pkl") -> None:
    """``pickle.dump`` (``fmt="pkl"``) or ``torch.save`` (``"pt"``) of data holding
    :class:`PersistentRecord` objects, the persistence module importable meanwhile."""
    with _fake_persistence(PERSISTENCE):
        if fmt == "pkl":
            with open(path, "wb") as f:
                pickle.dump(data, f, protocol=2)
        else:
            torch.save(data, path)


# Buffers of EDM's networks (everything else in their state dicts is a parameter).
EDM_BUFFERS = ("resample_filter", "freqs")


def records_from_state_dict(state: dict, init_kwargs: dict, src: str = "", containers=("enc", "dec")):
    """An EDMPrecond as EDM's persistence pickles it, built from a state dict and the constructor
    arguments alone (no network class involved): one persistent record per module path of the
    keys, torch ``ModuleDict``s (pickled by class reference, as EDM's are) for ``containers``,
    parameters as ``nn.Parameter``, ``EDM_BUFFERS`` as buffers."""
    tree: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(name: str, node: dict, top: bool):
        params = {k: nn.Parameter(v, requires_grad=v.is_floating_point()) for k, v in node.items()
                  if isinstance(v, torch.Tensor) and k not in EDM_BUFFERS}
        buffers = {k: v for k, v in node.items() if isinstance(v, torch.Tensor) and k in EDM_BUFFERS}
        modules = {k: build(k, v, False) for k, v in node.items() if isinstance(v, dict)}
        if name in containers and not params and not buffers:
            plain = nn.ModuleDict()
            plain.__dict__["_modules"] = dict(modules)  # records, not nn.Modules: set past __setattr__
            return plain
        return PersistentRecord("EDMPrecond" if top else "Module", src, _parameters=params, _buffers=buffers,
                                _modules=modules, _non_persistent_buffers_set=set(), training=False,
                                _init_args=(), _init_kwargs=dict(init_kwargs) if top else {})
    return build("", tree, True)
