"""Checkpoints: one safetensors file plus a JSON copy of its configuration, written atomically.

``<dir>/checkpoint.safetensors`` holds every tensor (model, EMA, optimizer, RNG states) and, in
its metadata, the authoritative JSON record (format, stage, step, configurations and
``tensors_sha256``, a SHA-256 digest of every tensor's name, dtype, shape and bytes). Loading
recomputes the digest, so a record and tensors that disagree (a flipped bit, a truncated or
spliced file) are refused with one error before anything is handed to a model. The same record
is written beside it as ``<dir>/checkpoint.json`` for people and tools; relayops never reads it.

Each file is written to a temporary name, flushed and fsynced, renamed over the old one
(``os.replace`` is atomic on POSIX) and the directory is fsynced, so a crash or a kill at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
safetensors and JSON only: loading a checkpoint never runs code (no pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .._optional import require

FORMAT = "relayops-checkpoint-1"
WEIGHTS_NAME = "checkpoint.safetensors"
CONFIG_NAME = "checkpoint.json"
# Test hook for the fault-injection tests: when set to a path, every checkpoint write stops
# half-way through its temporary file, creates that path and waits there to be killed.
PAUSE_ENV = "RELAYOPS_TEST_PAUSE_IN_WRITE"
_CHUNK = 1 << 20


def _safetensors():
    """``(safetensors, safetensors.torch)``: the [train] extra, imported on first use."""
    feature = "saving and loading checkpoints"
    return require("safetensors", feature), require("safetensors.torch", feature)


def checkpoint_path(path) -> Path:
    """A run directory or a ``.safetensors`` file -> the ``.safetensors`` file."""
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` -> temporary file, flush + fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            view, half = memoryview(data), len(data) // 2
            for start in range(0, len(data), _CHUNK):
                f.write(view[start:start + _CHUNK])
                if os.environ.get(PAUSE_ENV) and start < half <= start + _CHUNK:
                    f.flush()
                    Path(os.environ[PAUSE_ENV]).touch()
                    while True:   # until the test kills this process
                        time.sleep(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writers that were killed (one writer per run directory)."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for p in directory.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def save_checkpoint(directory, tensors: dict[str, torch.Tensor], record: dict) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``record`` into ``directory`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    record = {"format": FORMAT, **record, "tensors_sha256": tensors_digest(tensors)}
    text = json.dumps(record, indent=2, sort_keys=True)
    weights = directory / WEIGHTS_NAME
    _, st = _safetensors()
    _atomic_write(weights, st.save(tensors, metadata={"relayops": text}))
    _atomic_write(directory / CONFIG_NAME, (text + "\n").encode())
    return weights


def read_record(path) -> dict:
    """The JSON record of a checkpoint (from the safetensors metadata); clear errors otherwise."""
    p = checkpoint_path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_file():
        raise RuntimeError(f"checkpoint {str(p)!r} is not a file")
    safetensors, st = _safetensors()
    try:
        with st.safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint {str(p)!r} is corrupt or not a safetensors file ({e})") from None
    if "relayops" not in meta:
        raise RuntimeError(f"checkpoint {str(p)!r} is not a relayops checkpoint (no relayops metadata)")
    try:
        record = json.loads(meta["relayops"])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"checkpoint {str(p)!r} has a corrupt configuration record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RuntimeError(f"checkpoint {str(p)!r} has format {got!r}, expected {FORMAT!r}")
    return record


def load_checkpoint(path, expected_stage: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, record)`` of a checkpoint. ``expected_stage`` ("base"/"relay"/"mdm") is checked
    against the record, with a ``ValueError`` naming both when they differ. A record without a
    stage (a converted network whose file did not say, :mod:`relayops.models.convert`) serves
    as either. A file whose tensors do not match the digest in its record raises
    ``RuntimeError`` (checkpoints written before the digest existed load without the check)."""
    p = checkpoint_path(path)
    record = read_record(p)
    stage = record.get("train", {}).get("stage") if isinstance(record.get("train"), dict) else None
    if expected_stage is not None and stage is not None and stage != expected_stage:
        raise ValueError(f"checkpoint {str(p)!r} is a {stage!r} stage model; a {expected_stage!r} stage "
                         f"checkpoint is needed here")
    safetensors, st = _safetensors()
    try:
        tensors = st.load_file(str(p))
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RuntimeError(f"checkpoint {str(p)!r} is corrupt ({e})") from None
    want = record.get("tensors_sha256")
    if want is not None and tensors_digest(tensors) != want:
        raise RuntimeError(f"checkpoint {str(p)!r} is corrupt: its tensors do not match the digest in its record")
    return tensors, record
