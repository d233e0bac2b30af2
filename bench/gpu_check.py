"""One command for a GPU machine (``make gpu-check``): build, test, benchmark, smoke runs.

    python bench/gpu_check.py                      # every step
    python bench/gpu_check.py --steps build tests  # some of them
    python bench/gpu_check.py --quick              # fewer sizes: a first look in a few minutes
    python bench/gpu_check.py --perf               # a short lease: build, time, a few tests (< 6 min)

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

``--perf`` (``make gpu-check-perf``) fits a short GPU lease: it refuses to start while another
process holds the GPU (``nvidia-smi --query-compute-apps``; exit status 3, naming them), builds
for the local GPU's architecture only (``torch.cuda.get_device_capability``), runs
``bench/gpu_perf.py`` first (kernels timed by CUDA graph replay; the anchors; the sampler step),
then the float32 CUDA op matrix in whatever time is left of ``--budget`` (360 s). ``--dry-run``
runs the same flow on the CPU with tiny sizes and no build (for the tests).

Writes ``bench/results/gpu-<device>.json`` (device, driver, versions, the commit measured and
whether the tree was clean, every step's outcome and the benchmark rows) and prints the Markdown
tables. Without a CUDA GPU it says so and exits with 2. Every step runs in its own process group,
killed whole (``os.killpg``) when it runs past its time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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
            # its own session: on a timeout the whole process group goes, not only the direct child
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, timeout: float) -> dict:
        """Wait (killing its process group after ``timeout`` seconds from its start); its outcome,
        time and tail."""
        try:
            rc = self.proc.wait(max(1.0, timeout - (time.perf_counter() - self.start)))
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            rc = "timeout"
        seconds = time.perf_counter() - self.start
        tail = "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-15:])
        print(f"\n== {self.name}:\n{tail}\n== {self.name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.0f} s",
              flush=True)
        return {"ok": rc == 0, "returncode": rc, "seconds": round(seconds, 1), "tail": tail}


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``proc``'s process group (it leads one: start_new_session): SIGTERM, ``grace`` seconds,
    then SIGKILL for whatever is left of the group (children that outlived the leader too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # the group is gone
        if sig == signal.SIGTERM:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _run(name: str, cmd: list[str], timeout: float, env=None, log_dir: Path | None = None) -> dict:
    """Run one step's command to its end (see _Job)."""
    return _Job(name, cmd, log_dir, env).finish(timeout)


def local_arch(capability: tuple[int, int]) -> str:
    """RELAYOPS_CUDA_ARCHS for a GPU of compute capability ``(major, minor)``: "90" for (9, 0)."""
    major, minor = capability
    return f"{major}{minor}"


def busy_processes(own_pids=None) -> list[str] | None:
    """Other processes holding a GPU (``nvidia-smi --query-compute-apps``), one line each; None when
    nvidia-smi cannot say."""
    own = {str(p) for p in (own_pids or {os.getpid()})}
    out = _output(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"])
    if out is None:
        return None
    return [line.strip() for line in out.splitlines() if line.strip() and line.split(",")[0].strip() not in own]


def step_build(info, args):
    arch = local_arch(tuple(int(v) for v in info["capability"].split("."))) if args.perf else (
        os.environ.get("RELAYOPS_CUDA_ARCHS", info["arch"]))
    env = {"RELAYOPS_CUDA": "1", "RELAYOPS_CUDA_ARCHS": arch}
    timeout = args.timeout
    if getattr(args, "deadline", None) is not None:  # --perf: leave two minutes of the budget for timing
        timeout = min(timeout, max(30.0, args.deadline - time.monotonic() - 120))
    return _run("build", [sys.executable, "setup.py", "build_ext", "--inplace", "-j", "8"], timeout,
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
                                 stderr=subprocess.DEVNULL, start_new_session=True)
                for dtype in ("float32", "bfloat16")]
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
            kill_group(proc)
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


def step_perf_bench(info, args):
    """bench/gpu_perf.py in its own process group, stopped at its share of the budget."""
    out = args.log_dir / "perf.json"
    left = args.deadline - time.monotonic()
    cmd = [sys.executable, "bench/gpu_perf.py", "--json", str(out), "--deadline", str(max(10.0, left - 90))]
    if args.dry_run:
        cmd += ["--dry-run", "--dtypes", "float32", "--ops", "patch_blur", "relay_step"]
    r = _run("perf-bench", cmd, max(10.0, left - 60), log_dir=args.log_dir)
    if out.exists():
        r.update(json.loads(out.read_text()))
    return r


def step_perf_tests(info, args):
    """The float32 CUDA op matrix in the time left (stopped, not failed, at the budget's end)."""
    left = args.deadline - time.monotonic()
    if args.dry_run or left < 20:
        return {"ok": True, "skipped": "dry run" if args.dry_run else "no time left"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_backends.py",
           "-k", "cuda and float32"]
    r = _run("perf-tests", cmd, left - 5, log_dir=args.log_dir)
    if r["returncode"] == "timeout":  # the budget ran out: what ran is in the tail
        r["ok"] = True
        r["stopped"] = "time budget"
    return r


PERF_STEPS = ("build", "perf_bench", "perf_tests")


def perf_main(args, argv) -> int:
    """``--perf``: refuse a busy GPU, build for it, time, test in the time left; one JSON record."""
    import torch
    if args.dry_run:
        info = {"device": "dry-run cpu", "capability": "0.0", "arch": "00", "torch": torch.__version__}
    else:
        info = gpu_info()
        if info is None:
            return main_no_gpu()
        busy = busy_processes()
        if busy:
            print("make gpu-check-perf: another process holds the GPU, so timings now would be disturbed; not "
                  "benchmarking. Processes (pid, name, memory):\n  " + "\n  ".join(busy) +
                  "\nEnd them (or wait), then run it again; --allow-busy times it anyway.", file=sys.stderr)
            if not args.allow_busy:
                return 3
        elif busy is None:
            print("make gpu-check-perf: nvidia-smi could not list the GPU's processes; going on without that check",
                  file=sys.stderr)
    args.deadline = time.monotonic() + args.budget
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{name}.json"
    report = {"mode": "perf", "info": info, "arch_built": None if args.dry_run else local_arch(
        tuple(int(v) for v in info["capability"].split("."))), **record(),
        "command": "python bench/gpu_check.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d"),
        "budget_s": args.budget, "steps": {}}
    start_all = time.monotonic()
    for step in PERF_STEPS:
        start = time.perf_counter()
        if step == "build" and args.dry_run:
            report["steps"][step] = {"ok": True, "skipped": "dry run"}
        else:
            report["steps"][step] = globals()[f"step_{step}"](info, args)
        report["steps"][step]["seconds"] = round(time.perf_counter() - start, 1)
        if step == "build" and not report["steps"][step]["ok"]:
            break  # nothing to time without the build
    report["seconds"] = round(time.monotonic() - start_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nresults: {out} ({report['seconds']} s); logs: {args.log_dir}")
    return 0 if all(r["ok"] for r in report["steps"].values()) else 1


def main_no_gpu() -> int:
    print("make gpu-check: no CUDA GPU here (torch.cuda.is_available() is False), so there is nothing to "
          "build, test or time on a GPU. Run it on a machine with an NVIDIA GPU and a CUDA build of torch; "
          "on this machine `make test` runs the CPU and Triton-interpreter tests.", file=sys.stderr)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--quick", action="store_true", help="bench 256^2 and 1024^2 only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step command (default 1800)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/gpu-<device>.json)")
    parser.add_argument("--log-dir", type=Path, default=None, help="folder for the steps' full logs")
    parser.add_argument("--perf", action="store_true", help="the short-lease mode (make gpu-check-perf)")
    parser.add_argument("--budget", type=float, default=360.0, help="--perf: seconds for the whole run (default 360)")
    parser.add_argument("--allow-busy", action="store_true", help="--perf: time even while another process holds "
                        "the GPU (the results are then disturbed)")
    parser.add_argument("--dry-run", action="store_true", help="--perf on the CPU: no build, tiny sizes (tests)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="relayops-gpu-check-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.perf or args.dry_run:
        args.perf = True
        return perf_main(args, argv)

    info = gpu_info()
    if info is None:
        return main_no_gpu()
    name = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{name}.json"
    report = {"info": info, "command": "python bench/gpu_check.py " + " ".join(argv),
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
