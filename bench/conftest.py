"""Shared helpers for the relayops benchmarks (pytest-benchmark).

Each benchmark times one implementation of one op at one shape and dtype:
``compiled`` (the csrc/ kernels: backend "cpu" on CPU tensors, "cuda" on CUDA tensors),
``reference`` (plain PyTorch), or a baseline (``copy``: a plain copy moving the same number of
bytes as the op must, the memory-bound limit; ``randn``: torch.randn of the same normals).
``benchmark.extra_info`` records the bytes the op must move, GB/s, the ratio to the copy timed in
the same run, and the speedup over the reference (when the reference ran first in the session).

Run: ``pytest bench --benchmark-json=bench/results/cpu.json`` then
``python bench/report.py bench/results/cpu.json`` for the Markdown table. The JSON's
``machine_info["relayops"]`` records the machine (``relayops._machine.machine_info``: CPU model
and flags, torch and relayops versions, commit) and the table ends with it. Threads: torch's
default, or ``RELAYOPS_BENCH_THREADS``. The reference is skipped for the noise and step ops at
1024^2 (tens of seconds and GBs of temporaries per call) unless ``RELAYOPS_BENCH_FULL=1``.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from relayops import _machine


B, C = 8, 3
SIZES = (64, 256, 1024)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FULL = os.environ.get("RELAYOPS_BENCH_FULL") == "1"

if os.environ.get("RELAYOPS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["RELAYOPS_BENCH_THREADS"]))

# Medians (seconds) of the runs so far: key (op, size, dtype, device, impl).
MEDIANS: dict[tuple, float] = {}
_COPY_TIMES: dict[tuple, float] = {}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["relayops"] = _machine.machine_info()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compiled_backend(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def image(size: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, size, size, generator=gen).to(device=device, dtype=dtype)


def per_sample(value: float, device: str) -> torch.Tensor:
    return torch.full((B,), value, dtype=torch.float32, device=device)


def rounds_for(size: int, impl: str) -> int:
    """Few rounds where one call is slow (the reference at large sizes)."""
    if impl == "reference":
        return {64: 20, 256: 5, 1024: 2}[size]
    return {64: 100, 256: 30, 1024: 5}[size]


def copy_time(nbytes: int, device: str, repeats: int = 15) -> float:
    """Median time of ``dst.copy_(src)`` moving ``nbytes`` (read + write), measured once per session."""
    key = (nbytes, device)
    if key not in _COPY_TIMES:
        n = max(1, nbytes // 8)  # float32 elements: half the bytes read, half written
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        times = []
        for _ in range(repeats + 2):
            sync(device)
            t0 = time.perf_counter()
            dst.copy_(src)
            sync(device)
            times.append(time.perf_counter() - t0)
        _COPY_TIMES[key] = statistics.median(times[2:])
    return _COPY_TIMES[key]


def run(benchmark, fn, *, op: str, size: int, dtype_name: str, device: str, impl: str, nbytes: int):
    """Time ``fn`` and record bytes, GB/s, ratio to a copy of the same bytes, speedup over the reference."""
    def call():
        out = fn()
        sync(device)
        return out

    call()  # warm-up (and first-call allocations) outside the timing
    benchmark.pedantic(call, rounds=rounds_for(size, impl), iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    MEDIANS[(op, size, dtype_name, device, impl)] = median
    info = benchmark.extra_info
    info.update(op=op, size=size, dtype=dtype_name, device=device, impl=impl, threads=torch.get_num_threads(),
                shape=[B, C, size, size], bytes=nbytes, gbps=nbytes / median / 1e9)
    info["copy_s"] = copy_time(nbytes, device)
    info["ratio_to_copy"] = median / info["copy_s"]
    ref = MEDIANS.get((op, size, dtype_name, device, "reference"))
    if ref is not None:
        info["speedup_over_reference"] = ref / median


def skip_slow_reference(op: str, size: int, impl: str) -> None:
    if impl == "reference" and size >= 1024 and not FULL:
        pytest.skip(f"reference {op} at {size}^2 is skipped without RELAYOPS_BENCH_FULL=1")


# The implementations, reference first so that the compiled run can report its speedup.
IMPLS = ("reference", "compiled")


def params():
    """(size, dtype name, device) combinations every benchmark sweeps."""
    return [(s, d, dev) for dev in DEVICES for s in SIZES for d in DTYPES]


def param_ids(p):
    size, dtype_name, device = p
    return f"{device}-{dtype_name}-{size}"


@pytest.fixture(params=params(), ids=param_ids)
def case(request):
    return request.param


__all__ = ["B", "C", "DTYPES", "IMPLS", "MEDIANS", "compiled_backend", "copy_time", "image", "per_sample", "run",
           "skip_slow_reference"]
