"""The GPU tools (bench/gpu_check.py, bench/gpu_sanitize.py, bench/gpu_triton.py) as far as a
machine without a GPU can run them."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


# --- gpu_check.py --perf, as far as a CPU runs it ---------------------------------------------

GPU_INFO = {"device": "NVIDIA H200", "capability": "9.0", "arch": "90", "torch": torch.__version__,
            "torch_cuda": "13.0", "python": "3", "triton": None, "driver": "1", "nvcc": "13.0"}


def _fake_nvidia_smi(tmp_path, monkeypatch, apps: str):
    """An nvidia-smi on PATH that lists ``apps`` as the GPU's compute processes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\ncase \"$*\" in *query-compute-apps*) printf '%s' \"$APPS\";; *) echo 580.1;; esac\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APPS", apps)


def test_perf_refuses_a_busy_gpu(tmp_path, monkeypatch, capsys):
    _fake_nvidia_smi(tmp_path, monkeypatch, "4242, python3, 1024 MiB\n")
    monkeypatch.setattr(gpu_check, "gpu_info", lambda: dict(GPU_INFO))
    monkeypatch.setattr(gpu_check, "step_build", lambda *a: pytest.fail("built on a busy GPU"))
    out = tmp_path / "r.json"
    assert gpu_check.main(["--perf", "--out", str(out), "--log-dir", str(tmp_path / "logs")]) == 3
    err = capsys.readouterr().err
    assert "another process holds the GPU" in err and "4242, python3, 1024 MiB" in err
    assert not out.exists()


def test_busy_check_leaves_out_this_process_and_an_idle_gpu(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, f"{os.getpid()}, python3, 500 MiB\n")
    assert gpu_check.busy_processes() == []
    monkeypatch.setenv("APPS", "")
    assert gpu_check.busy_processes() == []
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert gpu_check.busy_processes() is None  # no nvidia-smi: cannot say


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has not collected it


def test_timeout_kills_the_whole_process_group(tmp_path):
    """A step that starts a child and times out: the child goes too (not only the direct child)."""
    pid_file = tmp_path / "child.pid"
    job = gpu_check._Job("sleeper", ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], tmp_path)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    result = job.finish(timeout=1.0)
    assert result["returncode"] == "timeout" and not result["ok"]
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_perf_builds_for_the_local_gpu_only(tmp_path, monkeypatch):
    assert gpu_check.local_arch((9, 0)) == "90" and gpu_check.local_arch((12, 0)) == "120"
    seen = {}
    monkeypatch.setattr(gpu_check, "_run", lambda name, cmd, timeout, env=None, log_dir=None: seen.update(env) or {})
    monkeypatch.setenv("RELAYOPS_CUDA_ARCHS", "75,80,90,100,120")
    args = argparse.Namespace(perf=True, timeout=10, log_dir=tmp_path)
    gpu_check.step_build(dict(GPU_INFO, capability="8.6", arch="86"), args)
    assert seen["RELAYOPS_CUDA_ARCHS"] == "86"
    gpu_check.step_build(dict(GPU_INFO), argparse.Namespace(perf=False, timeout=10, log_dir=tmp_path))
    assert seen["RELAYOPS_CUDA_ARCHS"] == "75,80,90,100,120"  # the full check keeps an explicit choice


def test_perf_dry_run_writes_the_record(tmp_path):
    """The whole --perf flow on the CPU (no build, tiny sizes): the timing code runs and the JSON
    record holds the commit measured, whether the tree was clean, and timed rows."""
    out = tmp_path / "gpu-dry.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "perf" and record["budget_s"] == 360
    source = record["source"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and isinstance(source["dirty"], bool)
    bench = record["steps"]["perf_bench"]
    assert bench["ok"] and record["steps"]["build"]["skipped"] == "dry run"
    rows = {r["op"]: r for r in bench["rows"]}
    assert set(rows) == {"patch_blur", "relay_step"}
    for row in rows.values():
        assert row["copy_ms"] > 0 and row["cpu_ms"] > 0 and row["cpu_eager_ms"] > 0
    assert "randn_ms" in rows["relay_step"] and "randn_ms" not in rows["patch_blur"]
    assert bench["sampler"]["graph_ms"] > 0 and bench["sampler"]["shape"] == [8, 3, 8, 8]


def test_perf_timing_rows_measure_the_ops(monkeypatch):
    """gpu_perf's kernel calls compute the ops (the values of the public op), on CPU tensors."""
    import gpu_perf
    import relayops
    backend = "cpu" if "cpu" in relayops.available_backends() else "reference"
    if backend == "reference":
        pytest.skip("relayops._C is not built")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for op in gpu_perf.OPS:
        kernel, public = gpu_perf.op_call(op, backend, x)
        torch.testing.assert_close(kernel(), public(), rtol=0, atol=0)
