"""Checkpoints: one safetensors file plus a JSON copy of its configuration, written atomically.

``<dir>/checkpoint.safetensors`` holds every tensor (model, EMA, optimizer, RNG states) and, in
its metadata, the authoritative JSON record (format, stage, step, configurations). The same
record is written beside it as ``<dir>/checkpoint.json`` for people and tools. Each file is
written to a temporary name and renamed over the old one (``os.replace`` is atomic on POSIX),
so an interrupted run leaves the previous checkpoint intact, never a half-written one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

FORMAT = "relayops-checkpoint-1"
WEIGHTS_NAME = "checkpoint.safetensors"
CONFIG_NAME = "checkpoint.json"


def checkpoint_path(path) -> Path:
    """A run directory or a ``.safetensors`` file -> the ``.safetensors`` file."""
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(directory, tensors: dict[str, torch.Tensor], record: dict) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``record`` into ``directory`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, **record}
    text = json.dumps(record, indent=2, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights = directory / WEIGHTS_NAME
    _atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"relayops": text}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text + "\n"))
    return weights


def read_record(path) -> dict:
    """The JSON record of a checkpoint (from the safetensors metadata); clear errors otherwise."""
    p = checkpoint_path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint {str(p)!r} is corrupt or not a safetensors file ({e})") from None
    if "relayops" not in meta:
        raise RuntimeError(f"checkpoint {str(p)!r} is not a relayops checkpoint (no relayops metadata)")
    try:
        record = json.loads(meta["relayops"])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"checkpoint {str(p)!r} has a corrupt configuration record ({e})") from None
    if record.get("format") != FORMAT:
        raise RuntimeError(f"checkpoint {str(p)!r} has format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def load_checkpoint(path, expected_stage: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, record)`` of a checkpoint. ``expected_stage`` ("base"/"relay") is checked
    against the record, with a ``ValueError`` naming both when they differ. A record without a
    stage (a converted network whose file did not say, :mod:`relayops.models.convert`) serves
    as either."""
    p = checkpoint_path(path)
    record = read_record(p)
    stage = record.get("train", {}).get("stage")
    if expected_stage is not None and stage is not None and stage != expected_stage:
        raise ValueError(f"checkpoint {str(p)!r} is a {stage!r} stage model; a {expected_stage!r} stage "
                         f"checkpoint is needed here")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"checkpoint {str(p)!r} is corrupt ({e})") from None
    return tensors, record
