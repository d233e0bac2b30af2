"""The machine a measurement came from, recorded next to every timing the project publishes
(benchmark JSON, the demo's metrics.json)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _cpuinfo() -> dict:
    """The first value of every key in /proc/cpuinfo (Linux; empty elsewhere)."""
    cpu: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                cpu.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return cpu


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_state() -> dict:
    """The git commit of the source tree, whether tracked files differ from it (``dirty``) and
    which (``changed``, at most 50); None values outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed": None}
    changed = (_git("diff", "--name-only", "HEAD") or "").splitlines()
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def machine_info() -> dict:
    """CPU model and flags (as ``lscpu`` shows them), whether it has AVX-512F, cores, torch and
    relayops versions, threads, GPU, and the git commit (and whether the tree had changes)."""
    import relayops

    cpu = _cpuinfo()
    flags = (cpu.get("flags") or cpu.get("Features") or "").split()
    source = source_state()
    return {"cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": flags, "avx512f": "avx512f" in flags, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "relayops": relayops.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": source["commit"], "dirty": source["dirty"], "changed": source["changed"]}
