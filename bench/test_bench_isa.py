"""The CPU kernels on each instruction-set path in one run (relayops.set_cpu_isa forces each one
this CPU has), next to the memory-bound and library references measured in the same run.

Shape 8x3x256x256 float32 (the targets' shape), threads from RELAYOPS_BENCH_THREADS (default
torch's). Per path: ``patch_blur`` (the public op, and its compiled forward alone: what the op
layer of checks, dispatcher and autograd wrapper adds is the difference), ``relay_noise`` (normals
drawn in the kernel), Euler and Heun ``relay_step`` (noise drawn in the kernel). References:
``copy`` of the 8x3x256x256 tensor (the same size as the ops' tensors: warm in the 32 MiB L3 of
the machine measured), ``dram_copy`` of a 256 MiB tensor (far larger than any cache: DRAM
bandwidth), ``torch.randn`` of as many normals as ``relay_noise`` draws (two per pixel), and the
reference backend's Euler ``relay_step``.
Rounds: ``RELAYOPS_BENCH_ROUNDS`` (default 20); bench/isa_table.py reports the fastest round of
each (other processes on a shared machine only ever add time). The JSON also records each
benchmark's minor page faults per call (``page_faults_per_call``): fresh output pages taken from
the OS cost time that varies from run to run.

Run (one command, under 3 minutes on 2 cores), then the table::

    RELAYOPS_BENCH_THREADS=2 python -m pytest bench/test_bench_isa.py -q \\
        --benchmark-json=bench/results/cpu_isa.json && python bench/isa_table.py bench/results/cpu_isa.json
"""
from __future__ import annotations

import os
import resource

import pytest
import torch

import relayops

compiled = pytest.importorskip("relayops.ops._compiled", reason="relayops._C is not built")

ROUNDS = int(os.environ.get("RELAYOPS_BENCH_ROUNDS", "20"))
SHAPE = (8, 3, 256, 256)
ISAS = compiled.CPU_ISAS[:compiled.CPU_ISAS.index(compiled.best_cpu_isa()) + 1]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(benchmark, fn, *, op: str, isa: str, nbytes: int, rounds: int = ROUNDS):
    fn()  # warm-up: first-call allocations outside the timing
    before = _minor_faults()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    # page faults per call: a fresh output the allocator takes from new pages costs about 2 us
    # per 4 KiB page on the machine measured, so they explain run-to-run differences
    faults = (_minor_faults() - before) / (rounds + 1)
    benchmark.extra_info.update(isa_op=op, isa=isa, threads=torch.get_num_threads(), bytes=nbytes,
                                shape=list(SHAPE), page_faults_per_call=round(faults, 1))


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x, x0, xp, x0p = (torch.randn(SHAPE, generator=gen) for _ in range(4))
    b = SHAPE[0]
    return x, x0, xp, x0p, torch.full((b,), 0.5), torch.full((b,), 0.4), torch.full((b,), 0.9), torch.full((b,), 0.7)


def _op_call(op: str, backend: str):
    x, x0, xp, x0p, sigma, sigma_next, tau, tau_next = _inputs()
    item = x.numel() * x.element_size()
    if op == "patch_blur":  # reads x, writes out
        return (lambda: relayops.patch_blur(x, tau, backend=backend)), 2 * item
    if op == "patch_blur_kernel":  # the compiled forward alone: no checks, no dispatcher, no autograd wrapper
        return (lambda: compiled.patch_blur(x, tau, 4, 0.001)), 2 * item
    if op == "relay_noise":  # writes out
        return (lambda: relayops.relay_noise(x, seed=1, backend=backend)), item
    extra = dict(x_prop=xp, x0_hat_prop=x0p) if op == "relay_step_heun" else {}
    return (lambda: relayops.relay_step(x, x0, sigma, sigma_next, tau, tau_next, seed=3, offset=1, backend=backend,
                                        **extra)), (5 if extra else 3) * item


@pytest.fixture
def forced_isa(request):
    before = compiled.cpu_isa()
    yield lambda isa: compiled.set_cpu_isa(isa)
    compiled.set_cpu_isa(before)


@pytest.mark.parametrize("op", (
    "patch_blur", "patch_blur_kernel", "relay_noise", "relay_step_euler", "relay_step_heun"))
@pytest.mark.parametrize("isa", ISAS)
def test_op_on_path(benchmark, forced_isa, isa, op):
    assert forced_isa(isa) == isa
    fn, nbytes = _op_call(op, "cpu")
    _time(benchmark, fn, op=op, isa=isa, nbytes=nbytes)


def test_reference_euler_step(benchmark):
    fn, nbytes = _op_call("relay_step_euler", "reference")
    _time(benchmark, fn, op="relay_step_euler", isa="reference backend", nbytes=nbytes, rounds=3)


@pytest.mark.parametrize("mib", (None, 256), ids=("same-size", "256MiB"))
def test_copy(benchmark, mib):
    """dst.copy_(src): the 8x3x256x256 float32 tensor, or a 256 MiB one (DRAM bandwidth)."""
    n = mib * 2**20 // 4 if mib else torch.Size(SHAPE).numel()
    src = torch.randn(n)
    dst = torch.empty_like(src)
    _time(benchmark, lambda: dst.copy_(src), op="dram_copy" if mib else "copy", isa="-", nbytes=2 * 4 * n,
          rounds=ROUNDS if not mib else 10)


def test_randn(benchmark):
    """torch.randn of the normals relay_noise draws (two per pixel)."""
    shape = (2, *SHAPE)
    _time(benchmark, lambda: torch.randn(shape), op="randn", isa="-", nbytes=4 * torch.Size(shape).numel())


WIDTH_SHAPES = ((32, 3, 128, 128), (8, 3, 256, 256), (2, 3, 512, 512))  # the same number of elements


@pytest.mark.parametrize("shape", WIDTH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("isa", ISAS)
def test_blur_kernel_by_width(benchmark, forced_isa, isa, shape):
    """patch_blur's compiled forward on images of different widths and the same size: a patch row
    is s rows of W values each, so narrow images give short row streams (prefetching matters)."""
    assert forced_isa(isa) == isa
    x = torch.randn(shape)
    tau = torch.full((shape[0],), 0.9)
    _time(benchmark, lambda: compiled.patch_blur(x, tau, 4, 0.001), op="blur_kernel_" + "x".join(map(str, shape)),
          isa=isa, nbytes=2 * x.numel() * x.element_size())
