"""The machine a measurement came from, recorded next to every timing the project publishes."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# Instruction sets the CPU kernels dispatch on (or that change their speed), as /proc/cpuinfo names them.
CPU_FEATURES = ("avx512f", "avx2", "fma", "neon", "asimd")


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (from /proc/cpuinfo on Linux)."""
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() in ("model name", "Model", "CPU part"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_features() -> list[str]:
    """Which of :data:`CPU_FEATURES` the CPU has."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in CPU_FEATURES if f in flags]


def git_commit(path=None) -> str | None:
    """The commit of the checkout the package runs from (None outside a git checkout)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict:
    """CPU model, its vector instruction sets, core count, torch version, GPU (if any) and commit."""
    info = {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__, "commit": git_commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
