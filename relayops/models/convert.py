"""The released EDM/RDM checkpoints as relayops checkpoints, read without running their code.

    relayops convert imagenet_first_stage.pkl runs/rdm-imagenet64
    net = relayops.models.load_checkpoint("runs/rdm-imagenet64")       # or the .pkl/.pt itself

Sources: EDM network snapshots (``.pkl``, a pickle of ``{"ema": EDMPrecond, "loss_fn": ...,
...}``) and RDM training states (``.pt``, ``torch.save`` of ``{"ema": ..., "net": ...,
"optimizer_state": ..., "step": ...}``), both read by :mod:`relayops.models.safe_pickle`. From
the chosen network (``"ema"`` by default, the weights the authors sample with) come its
constructor arguments (EDM records them with every persistent object) and its tensors; they are
checked against :class:`relayops.models.EDMPrecond` built with the same arguments (keys and
shapes, before any tensor data is read) and written as a relayops checkpoint
(``checkpoint.safetensors`` + ``checkpoint.json``, :mod:`relayops.training.checkpoint`): the
tensors under ``ema.``, and a record with ``network = {"class_name": "EDMPrecond", "kwargs":
...}``. ``relayops sample`` and :func:`relayops.training.load_denoiser` take it like a trained one.

The stage is read from the pickled loss when there is one (RDM's ``BlurLoss``: a relay stage,
with its patch size, block-noise weight, L and sigma_B_max; EDM's ``EDMLoss``: a base stage),
else from ``stage=``; a checkpoint of unknown stage serves in either role.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch

from ..training import checkpoint as ckpt
from .edm import EDMPrecond
from .safe_pickle import PersistentObject, PlainModule, TensorRef, UnsafeCheckpointError, is_zip, read_file

__all__ = ["build_network", "convert", "load_checkpoint", "network_from_record", "read_checkpoint"]

STAGES = ("base", "relay")
_EDM_NAME = "EDMPrecond"


MAX_MODULE_DEPTH = 32      # modules nested in a checkpoint's network (EDM's: 4)
MAX_ARGUMENT_ITEMS = 10_000  # values in a network's recorded constructor arguments, nested ones included
MAX_ARGUMENT_DEPTH = 16


def _module_state(root, out: dict) -> None:
    """The state-dict entries of a pickled module tree (nn.Module.state_dict's rules).

    Each module is visited once (a module reached twice is refused: EDM's networks share none,
    and a shared-node graph would otherwise double the work per level) and at most
    ``MAX_MODULE_DEPTH`` deep."""
    seen: set[int] = set()
    todo = [(root, "", 0)]
    while todo:
        obj, prefix, depth = todo.pop()
        where = prefix.rstrip(".") or "the network"
        if not isinstance(obj, (PersistentObject, PlainModule)):
            raise UnsafeCheckpointError(f"{where} is a {type(obj).__name__}, not a module")
        if id(obj) in seen:
            raise UnsafeCheckpointError(f"{where} is a module that appears twice in the network")
        if depth > MAX_MODULE_DEPTH:
            raise UnsafeCheckpointError(f"{where}: modules nested more than {MAX_MODULE_DEPTH} deep")
        seen.add(id(obj))
        state = obj.state or {}
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers", "_modules"):
            if not isinstance(state.get(group) or {}, dict):
                raise UnsafeCheckpointError(f"{prefix}{group} is not a dict")
            if not all(isinstance(name, str) for name in (state.get(group) or {})):
                raise UnsafeCheckpointError(f"{prefix}{group} has a name that is not a string")
        for group in ("_parameters", "_buffers"):
            for name, value in (state.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRef):
                    raise UnsafeCheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
                out[prefix + name] = value
        children = [(child, f"{prefix}{name}.", depth + 1)
                    for name, child in (state.get("_modules") or {}).items() if child is not None]
        todo.extend(reversed(children))  # depth first, in order: the keys come out in state_dict's order


def _plain(value, key: str, count: list | None = None, depth: int = 0):
    """A constructor argument as JSON data (tuples become lists); anything else is an error.
    ``count``: values converted so far (at most ``MAX_ARGUMENT_ITEMS``, nested at most
    ``MAX_ARGUMENT_DEPTH`` deep, so that shared lists cannot blow up the output)."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_ARGUMENT_ITEMS or depth > MAX_ARGUMENT_DEPTH:
        raise UnsafeCheckpointError(f"constructor argument {key!r} holds more than {MAX_ARGUMENT_ITEMS} values or "
                                    f"is nested more than {MAX_ARGUMENT_DEPTH} deep")
    if isinstance(value, (list, tuple)):
        return [_plain(v, key, count, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, key, count, depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"constructor argument {key!r} holds a {type(value).__name__}; expected plain data")


def _constructor_kwargs(net: PersistentObject) -> dict:
    """EDMPrecond's keyword arguments from the recorded ``_init_args``/``_init_kwargs``."""
    args, kwargs = net.init_args, net.init_kwargs
    if kwargs is None:
        raise ValueError(f"the checkpoint's {net.class_name} did not record its constructor arguments "
                         "(EDM's _record_init_args was off), so its architecture is unknown")
    if not isinstance(kwargs, dict) or not isinstance(args or (), (tuple, list)):
        raise UnsafeCheckpointError(f"malformed constructor arguments of {net.class_name}")
    names = [p for p in inspect.signature(EDMPrecond.__init__).parameters if p not in ("self", "model_kwargs")]
    if len(args or ()) > len(names):
        raise ValueError(f"{net.class_name} was built with {len(args)} positional arguments; EDMPrecond takes "
                         f"at most {len(names)}")
    merged = dict(zip(names, args or ()))
    merged.update(kwargs)
    count = [0]
    return {str(k): _plain(v, str(k), count) for k, v in merged.items()}


# The sizes a checkpoint's record may ask EDMPrecond for (the released networks: 256x256, 256
# channels, 6 levels, 3 blocks, 1000 classes, 554M parameters).
NETWORK_LIMITS = {
    "img_resolution": 4096, "img_channels": 64, "label_dim": 100_000, "augment_dim": 1024, "model_channels": 4096,
    "channel_mult_emb": 16, "channel_mult_noise": 16, "num_blocks": 16,
}
NETWORK_LIST_LIMITS = {"channel_mult": (12, 64), "attn_resolutions": (16, 4096), "resample_filter": (16, 1024)}
MAX_NETWORK_BLOCKS = 64         # len(channel_mult) * (2 num_blocks + 3): the released 256x256 networks, 42
MAX_NETWORK_PARAMETERS = 10**10


def _check_network_size(kwargs: dict) -> None:
    def bad(name, value, limit):
        raise ValueError(f"the checkpoint's network argument {name}={value!r} is outside the limit "
                         f"({limit}; relayops.models.convert.NETWORK_LIMITS)")
    for name, limit in NETWORK_LIMITS.items():
        v = kwargs.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit):
            bad(name, v, f"an integer in [0, {limit}]")
    for name, (length, limit) in NETWORK_LIST_LIMITS.items():
        v = kwargs.get(name)
        if v is not None and (not isinstance(v, (list, tuple)) or len(v) > length or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= limit for x in v)):
            bad(name, v, f"at most {length} numbers in [0, {limit}]")
    levels, blocks = len(kwargs.get("channel_mult") or (1, 2, 2, 2)), kwargs.get("num_blocks") or 4
    if levels * (2 * blocks + 3) > MAX_NETWORK_BLOCKS:  # building is linear in the blocks (defaults: SongUNet's)
        bad("num_blocks", blocks, f"{levels} levels of {blocks} blocks: at most {MAX_NETWORK_BLOCKS} blocks in all")


def build_network(kwargs: dict, device="meta") -> EDMPrecond:
    """EDMPrecond from its recorded arguments (on the meta device by default: no memory).

    The arguments come from a file: sizes outside :data:`NETWORK_LIMITS`, more than
    ``MAX_NETWORK_BLOCKS`` blocks and networks of more than ``MAX_NETWORK_PARAMETERS`` (counted on
    the meta device) are refused before anything is allocated."""
    _check_network_size(kwargs)
    try:
        with torch.device("meta"):
            net = EDMPrecond(**kwargs)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError) as e:
        raise ValueError(f"the checkpoint's network arguments do not fit relayops' EDMPrecond "
                         f"({type(e).__name__}: {e}): {kwargs}") from None
    n = sum(t.numel() for t in net.state_dict().values())
    if n > MAX_NETWORK_PARAMETERS:
        raise ValueError(f"the checkpoint's network has {n} parameters, more than the limit of "
                         f"{MAX_NETWORK_PARAMETERS} (MAX_NETWORK_PARAMETERS)")
    if torch.device(device).type == "meta":
        return net
    with torch.device(device):
        return EDMPrecond(**kwargs)


def _check_against(net: EDMPrecond, tensors: dict, source: str) -> None:
    """Keys and shapes of the file's tensors against the network's state dict, before reading data."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        if wrong:
            parts.append("wrong shapes (" + ", ".join(f"{k}: {list(tensors[k].shape)} vs {list(expected[k])}"
                                                      for k in wrong[:5]) + ")")
        raise ValueError(f"{source}: the tensors do not match EDMPrecond built with the recorded arguments: "
                         + "; ".join(parts))


def _training_info(top: dict, stage: str | None) -> dict:
    """The ``train`` part of the record: stage and, for RDM's BlurLoss, the relay settings."""
    loss = top.get("loss_fn")
    info: dict = {}
    found = None
    if isinstance(loss, PersistentObject):
        s = loss.state
        if loss.class_name == "BlurLoss":
            found = "relay"
            info.update(relay_mode="blur", patch=s.get("up_scale"), alpha=s.get("block_scale"),
                        L=s.get("prob_length"), sigma_b_max=s.get("blur_sigma_max"), normalize=False,
                        d_min=s.get("min_scale"))
            info = {k: _plain(v, k) for k, v in info.items() if v is not None}
        elif loss.class_name == "EDMLoss":
            found = "base"
    if stage is not None and found is not None and stage != found:
        raise ValueError(f"stage={stage!r} was asked for, but the checkpoint's loss ({loss.class_name}) trains a "
                         f"{found!r} stage")
    return {"stage": stage or found, **info}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path, module: str = "ema", stage: str | None = None, *, max_bytes: int | None = None):
    """``(kwargs, tensors, record)`` of an EDM ``.pkl`` or RDM ``.pt`` checkpoint, read safely.

    ``module``: which network of the file (``"ema"``; RDM's training states also hold ``"net"``,
    the raw weights). ``tensors`` maps state-dict keys to :class:`safe_pickle.TensorRef` (data not
    read yet); they match :class:`EDMPrecond` ``(**kwargs)`` in keys and shapes. ``record`` is the
    relayops checkpoint record (see the module docstring). ``max_bytes``: the most bytes the file's
    storages (and its tensors) may take; by default twice the file size plus 1 MiB
    (:func:`safe_pickle.read_file`).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    path = Path(path)
    top = read_file(path, max_bytes=max_bytes)
    if not isinstance(top, dict):
        raise ValueError(f"{path} holds a {type(top).__name__}; EDM and RDM checkpoints hold a dict with 'ema'")
    if module not in top:
        raise ValueError(f"{path} has no {module!r} network; it holds {sorted(map(str, top))}")
    net = top[module]
    if not isinstance(net, PersistentObject) or net.class_name != _EDM_NAME:
        name = net.class_name if isinstance(net, (PersistentObject, PlainModule)) else type(net).__name__
        raise ValueError(f"{path}: the {module!r} network is a {name}; relayops reads EDM's {_EDM_NAME} networks "
                         "(EDM's and RDM's released models)")
    kwargs = _constructor_kwargs(net)
    tensors: dict[str, TensorRef] = {}
    _module_state(net, tensors)
    _check_against(build_network(kwargs), tensors, str(path))
    seen = top.get("step")  # RDM's training states count images, not steps
    record = {
        "stage": None, "step": None,
        "network": {"class_name": _EDM_NAME, "kwargs": kwargs},
        "train": {**_training_info(top, stage), "resolution": kwargs.get("img_resolution")},
        "source": {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path), "module": module,
                   "container": "torch-zip" if is_zip(path) else "pickle",
                   "class_source_sha256": net.source_sha256,
                   "images_seen": seen if isinstance(seen, int) and not isinstance(seen, bool) else None},
    }
    record["stage"] = record["train"]["stage"]
    return kwargs, tensors, record


def convert(src, dest, *, module: str = "ema", stage: str | None = None, max_bytes: int | None = None) -> Path:
    """Write the ``module`` network of ``src`` (``.pkl``/``.pt``) as a relayops checkpoint in ``dest``.

    Returns the ``checkpoint.safetensors`` path. Tensors keep their dtype; they are written under
    ``ema.`` (whichever network was chosen; ``record["source"]["module"]`` says which).
    """
    kwargs, refs, record = read_checkpoint(src, module, stage, max_bytes=max_bytes)
    tensors = {f"ema.{k}": ref.load() for k, ref in refs.items()}
    return ckpt.save_checkpoint(dest, tensors, record)


def network_from_record(record: dict, state: dict[str, torch.Tensor], source: str = "checkpoint") -> EDMPrecond:
    """EDMPrecond holding ``state`` (a state dict) built from a record's ``network`` entry, in eval mode."""
    spec = record.get("network") or {}
    if spec.get("class_name") != _EDM_NAME or not isinstance(spec.get("kwargs"), dict):
        raise RuntimeError(f"{source} has no EDMPrecond network record")
    net = build_network(spec["kwargs"])
    _check_against(net, state, source)
    net.load_state_dict(state, strict=True, assign=True)
    return net.requires_grad_(False).eval()


def load_checkpoint(path, *, module: str = "ema", device="cpu", dtype: torch.dtype | None = None,
                    channels_last: bool = False, max_bytes: int | None = None) -> EDMPrecond:
    """An EDMPrecond (eval mode, no gradients) from a released ``.pkl``/``.pt`` (read safely, nothing
    written) or a converted relayops checkpoint (run directory or ``.safetensors``).

    ``dtype``: float16 or bfloat16 runs the network (and holds its weights) in that type; the
    preconditioning stays float32. ``channels_last``: weights and activations channels-last.
    ``max_bytes``: as for :func:`read_checkpoint`.
    """
    if dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    p = Path(path)
    if p.suffix in (".pkl", ".pt", ".pth"):
        _, refs, record = read_checkpoint(p, module, max_bytes=max_bytes)
        state = {k: ref.load() for k, ref in refs.items()}
    else:
        tensors, record = ckpt.load_checkpoint(p)
        state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    net = network_from_record(record, state, str(p)).to(device)
    if dtype is not None:
        net.to(dtype)
        net.activation_dtype = dtype
    if channels_last:
        net.to(memory_format=torch.channels_last)
        net.channels_last = True
    net.record = record
    return net
