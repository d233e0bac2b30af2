"""Host overhead per op call: a 1 x 1 x 4 x 4 input, so the time is the Python and dispatch path
(checks, per-sample conversion, backend choice, the call into the kernel) and not the kernel.

Each benchmark times one call of a public op on the compiled CPU backend (``torch.add`` of the
same tensors as the floor of any op call); ``benchmark.extra_info`` holds the thread count, the
median in microseconds, the target for the op (``target_us``, docs/design.md) and
``cpu_us``: the median of the calling thread's CPU time per call (``time.thread_time``), which a
loaded host inflates less than wall time. Run:
``pytest bench/test_bench_host.py --benchmark-json=bench/results/host_cpu.json``.
``bench/host_instructions.py`` counts the instructions per call of the same cases (no load
changes those); the results are in docs/cpu-performance.md, "Host overhead per call".
"""
import statistics
import time

import pytest
import torch

import relayops

TARGET_US = {"patch_blur": 25.0, "relay_noise": 25.0, "relay_step": 40.0}


def _cases():
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    backend = "cpu" if "cpu" in relayops.available_backends() else "reference"
    return {
        "torch_add": lambda: torch.add(x, x0),
        "patch_dct": lambda: relayops.patch_dct(x, backend=backend),
        "patch_blur": lambda: relayops.patch_blur(x, 0.5, backend=backend),
        "block_noise": lambda: relayops.block_noise(x, backend=backend),
        "relay_noise": lambda: relayops.relay_noise(x, seed=1, backend=backend),
        "relay_corrupt": lambda: relayops.relay_corrupt(x, 0.8, 0.5, seed=1, backend=backend),
        "relay_step": lambda: relayops.relay_step(x, x0, 1.0, 0.7, 0.5, 0.3, seed=1, backend=backend),
    }


def thread_time_us(fn, calls: int = 500, repeats: int = 7) -> float:
    """Median over ``repeats`` of the CPU time of this thread per call, in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        times.append((time.thread_time() - start) / calls * 1e6)
    return statistics.median(times)


@pytest.mark.parametrize("op", list(_cases()))
def test_host_overhead(benchmark, op):
    fn = _cases()[op]
    for _ in range(200):  # first-call set-up (backend modules, registrations) out of the timing
        fn()
    benchmark.pedantic(fn, rounds=100, iterations=10, warmup_rounds=5)
    benchmark.extra_info.update(threads=torch.get_num_threads(), shape=[1, 1, 4, 4],
                                median_us=benchmark.stats.stats.median * 1e6, cpu_us=thread_time_us(fn),
                                target_us=TARGET_US.get(op))
