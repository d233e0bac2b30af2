"""The GPU tools (bench/gpu_check.py, bench/gpu_sanitize.py, bench/gpu_triton.py) as far as a
machine without a GPU can run them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from relayops._machine import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_check  # noqa: E402
import gpu_sanitize  # noqa: E402
import gpu_triton  # noqa: E402
import provenance  # noqa: E402


def test_gpu_check_says_there_is_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_sanitizer_workload_matches_the_reference_on_cpu(capsys):
    """The calls the sanitizer runs, on the CPU kernels: every op mode, s = 1 to 16, three dtypes,
    against the float64 reference (so the script itself is known to work before a GPU runs it)."""
    assert gpu_sanitize.main(["--backend", "cpu"]) == 0
    assert "336 kernel calls, 0 mismatches" in capsys.readouterr().out


def test_benchmark_table_reports_rates_against_the_copy():
    row = {"op": "patch_blur", "dtype": "float32", "shape": [8, 3, 256, 256], "bytes": 2_000_000_000,
           "copy_ms": 1.0, "triton_ms": 2.0, "cuda_ms": 4.0}
    table = gpu_triton.markdown([row], ["triton", "cuda"])
    cells = [c.strip() for c in table.splitlines()[-1].strip("|").split("|")]
    # 2 GB in 1 ms is 2000 GB/s; half and a quarter of that rate are 50% and 25% of the copy
    assert cells[4] == "2000" and cells[5:8] == ["2.000", "1000", "50%"] and cells[8:11] == ["4.000", "500", "25%"]


def _git(*args) -> str:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def test_results_record_the_commit_and_whether_the_tree_was_clean(tmp_path):
    """gpu_check.py's record (bench/provenance.py) and the benchmark JSON's machine_info name the
    commit and the uncommitted files; the report line says so."""
    source = provenance.record()["source"]
    assert source["commit"] == _git("rev-parse", "HEAD").strip()
    changed = _git("diff", "--name-only", "HEAD").splitlines()
    assert source["dirty"] == bool(changed) and source["changed"] == changed[:50]
    assert machine_info()["commit"] == source["commit"] and machine_info()["dirty"] == source["dirty"]
    assert provenance.describe({"commit": "a" * 40, "dirty": True, "changed": ["csrc/x.h"]}) == (
        "commit aaaaaaaaaa (uncommitted changes: csrc/x.h)")
    assert provenance.describe({"commit": "b" * 40, "dirty": False}) == "commit bbbbbbbbbb"
    assert provenance.describe(None) == "commit not recorded"
