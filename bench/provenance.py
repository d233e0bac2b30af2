"""What a results file was measured from: the commit and whether the tree had uncommitted changes.

Every results writer records it (``bench/conftest.py`` through ``relayops._machine.machine_info``,
``bench/gpu_check.py`` through :func:`record`), so that a number can be traced to the code that
produced it, and a run from an uncommitted tree says so. ``relayops/_machine.py`` is loaded from
its file, without importing the package (``gpu_check.py`` records this before it builds anything).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def record() -> dict:
    """``{"source": {"commit": ..., "dirty": ..., "changed": [...]}}`` of the tree at ROOT."""
    spec = importlib.util.spec_from_file_location("relayops_machine", ROOT / "relayops" / "_machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    return {"source": machine.source_state()}


def describe(source: dict | None) -> str:
    """One line for a report: the commit, and "(uncommitted changes: ...)" where the tree had some."""
    if not source or not source.get("commit"):
        return "commit not recorded"
    line = f"commit {source['commit'][:10]}"
    if source.get("dirty"):
        line += " (uncommitted changes: " + ", ".join(source.get("changed") or ["?"]) + ")"
    return line
