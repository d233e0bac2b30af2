"""One command for a GPU machine (``make gpu-check``): build, test, benchmark, smoke runs.

    python bench/gpu_check.py                      # every step
    python bench/gpu_check.py --steps build tests  # some of them
    python bench/gpu_check.py --quick              # fewer sizes: a first look in a few minutes

Steps, in order (each is recorded with its outcome and time, and a failing step does not stop
the ones after it):

* ``build``: ``setup.py build_ext --inplace`` for the local GPU's architecture only
  (``RELAYOPS_CUDA_ARCHS`` = its compute capability, unless set);
* ``tests``: the op matrix on the cuda and triton backends (``tests/test_backends.py -k cuda``),
  the CUDA tile kernels' own tests, the Box-Muller extreme-word tests, the gpu-marked tests, and
  every op's CUDA kernel under ``compute-sanitizer`` memcheck and racecheck (where installed);
* ``bench``: ``bench/gpu_triton.py``'s sweep (Triton vs CUDA vs a device-to-device copy of the
  same bytes) in float32 and bfloat16, 64^2 to 1024^2, batch 8 to 64, forward and the backward of
  the training-path ops;
* ``torchrun``: ``relayops train`` for a few steps under ``torchrun`` with NCCL on one GPU, saving a
  checkpoint and resuming from it;
* ``pipeline``: the sampler benchmark (``bench/test_bench_sampling.py``) on the GPU.

Writes ``bench/results/gpu-<device>.json`` (device, driver, versions, every step's outcome and the
benchmark rows) and prints the Markdown tables. Without a CUDA GPU it says so and exits with 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import record  # the commit and whether the tree was clean

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("build", "tests", "bench", "torchrun", "pipeline")


def gpu_info() -> dict | None:
    """Device, driver and library versions, or None without a usable CUDA GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    info = {"device": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "arch": f"{major}{minor}",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    smi = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = smi.strip().splitlines()[0] if smi else None
    nvcc = _output(["nvcc", "--version"])
    match = re.search(r"release ([\d.]+)", nvcc or "")
    info["nvcc"] = match.group(1) if match else None
    return info


def _output(cmd) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


class _Job:
    """One step command running in the background, its output in ``log_dir/<name>.log``."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env=None):
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        self.name, self.log = name, log_dir / f"{name}.log"
        self.start = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT)

    def finish(self, timeout: float) -> dict:
        """Wait (killing it after ``timeout`` seconds from its start); its outcome, time and tail."""
        try:
            rc = self.proc.wait(max(1.0, timeout - (time.perf_counter() - self.start)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "timeout"
        seconds = time.perf_counter() - self.start
        tail = "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-15:])
        print(f"\n== {self.name}:\n{tail}\n== {self.name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s",
              flush=True)
        return {"ok": rc == 0, "returncode": rc, "seconds": round(seconds, 1), "tail": tail}


def _run(name: str, cmd: list[str], timeout: float, env=None, log_dir: Path | None = None) -> dict:
    """Run one step's command to its end (see _Job)."""
    return _Job(name, cmd, log_dir, env).finish(timeout)


def step_build(info, args):
    env = {"RELAYOPS_CUDA": "1", "RELAYOPS_CUDA_ARCHS": os.environ.get("RELAYOPS_CUDA_ARCHS", info["arch"])}
    return _run("build", [sys.executable, "setup.py", "build_ext", "--inplace", "-j", "8"], args.timeout,
                env=env, log_dir=args.log_dir)


def _bench_command(dtype: str, args, *extra) -> list[str]:
    sizes = ["256", "1024"] if args.quick else ["64", "256", "1024"]
    return [sys.executable, "bench/gpu_triton.py", "--sizes", *sizes, "--batches", "8", "64", "--dtype", dtype,
            "--no-reference", "--backward", *extra]


def step_tests(info, args):
    """The matrix, the gpu-marked tests and the sanitizer runs at once (one GPU has room for all),
    with the benchmark's Triton kernels compiling on spare cores so the bench step finds them in
    Triton's cache."""
    cores = os.cpu_count() or 1
    warm = []
    if "bench" in args.steps:
        warm = [subprocess.Popen(_bench_command(dtype, args, "--compile-only"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) for dtype in ("float32", "bfloat16")]
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    xdist = _has_xdist()
    jobs = {
        "matrix": _Job("tests-matrix", pytest + (["-n", str(max(1, cores - 7))] if xdist else []) + [
            "tests/test_backends.py", "tests/test_box_muller_words.py", "tests/test_compiled_ops.py", "-k", "cuda"],
            args.log_dir),
        "gpu_marked": _Job("tests-gpu-marked", pytest + (["-n", "3"] if xdist else []) + ["tests", "-m", "gpu"],
                           args.log_dir),
    }
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer:
        for tool in ("memcheck", "racecheck"):
            # racecheck instruments every kernel it is given (torch's too) and did not finish in
            # 230 s on an H100 that way: give it only relayops' tile kernel
            only_ours = ["--kernel-name", "kns=tile_kernel"] if tool == "racecheck" else []
            jobs[tool] = _Job(f"sanitizer-{tool}", [sanitizer, "--tool", tool, *only_ours, "--error-exitcode", "3",
                                                    sys.executable, "bench/gpu_sanitize.py"], args.log_dir)
    results = {name: job.finish(args.timeout) for name, job in jobs.items()}
    for proc in warm:
        try:
            proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    results["ok"] = all(r["ok"] for r in results.values())
    return results


def _has_xdist() -> bool:
    import importlib.util
    return importlib.util.find_spec("xdist") is not None


def step_bench(info, args):
    rows, results = [], {"ok": True}
    for dtype in ("float32", "bfloat16"):
        out = args.log_dir / f"bench-{dtype}.json"
        r = _run(f"bench-{dtype}", _bench_command(dtype, args, "--json", str(out)), args.timeout,
                 log_dir=args.log_dir)
        results[dtype] = r
        results["ok"] &= r["ok"]
        if out.exists():
            rows += json.loads(out.read_text())["rows"]
    results["rows"] = rows
    return results


def step_torchrun(info, args):
    with tempfile.TemporaryDirectory() as tmp:
        train = ["-m", "relayops", "train", "--stage", "relay", "--out", tmp, "--steps", "{steps}",
                 "--batch-size", "8", "--resolution", "32", "--channels", "16", "--channel-mult", "1,2",
                 "--save-every", "2"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        first = _run("torchrun-train", cmd + [a.format(steps=2) for a in train], args.timeout, log_dir=args.log_dir)
        resumed = _run("torchrun-resume", cmd + [a.format(steps=4) for a in train], args.timeout,
                       log_dir=args.log_dir)
    return {"train": first, "resume": resumed, "ok": first["ok"] and resumed["ok"]}


def step_pipeline(info, args):
    out = args.log_dir / "pipeline.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "bench/test_bench_sampling.py", "-k", "cuda", f"--benchmark-json={out}"]
    r = _run("pipeline", cmd, args.timeout, log_dir=args.log_dir)
    if out.exists():
        r["benchmarks"] = [{"name": b["name"], "median_s": b["stats"]["median"], **b["extra_info"]}
                           for b in json.loads(out.read_text())["benchmarks"]]
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--quick", action="store_true", help="bench 256^2 and 1024^2 only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step command (default 1800)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/gpu-<device>.json)")
    parser.add_argument("--log-dir", type=Path, default=None, help="folder for the steps' full logs")
    args = parser.parse_args(argv)

    info = gpu_info()
    if info is None:
        print("make gpu-check: no CUDA GPU here (torch.cuda.is_available() is False), so there is nothing to "
              "build, test or time on a GPU. Run it on a machine with an NVIDIA GPU and a CUDA build of torch; "
              "on this machine `make test` runs the CPU and Triton-interpreter tests.", file=sys.stderr)
        return 2
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="relayops-gpu-check-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{name}.json"
    report = {"info": info, "command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), **record(), "steps": {}}
    print(json.dumps(info), flush=True)
    for step in args.steps:
        start = time.perf_counter()
        report["steps"][step] = globals()[f"step_{step}"](info, args)
        report["steps"][step]["seconds"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))  # after every step: partial runs keep data

    print(f"\n# relayops gpu-check: {info['device']}, driver {info['driver']}, torch {info['torch']} "
          f"(CUDA {info['torch_cuda']}), Triton {info['triton']}, nvcc {info['nvcc']}\n")
    print("| step | outcome | seconds |\n|---|---|---|")
    for step, r in report["steps"].items():
        print(f"| {step} | {'ok' if r['ok'] else 'FAILED'} | {r.get('seconds', '')} |")
    rows = report["steps"].get("bench", {}).get("rows")
    if rows:
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_triton import markdown
        backends = [b for b in ("triton", "cuda") if any(f"{b}_ms" in r for r in rows)]
        print("\n" + markdown(rows, backends))
    print(f"\nresults: {out}; logs: {args.log_dir}")
    return 0 if all(r["ok"] for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
