"""The timing of ``make gpu-check-perf`` (``bench/gpu_check.py --perf``): kernels without host dispatch.

    python bench/gpu_perf.py --json out.json                 # on a GPU: the default rows
    python bench/gpu_perf.py --dry-run --json out.json       # CPU tensors, tiny sizes: the code path only

Every op row times the registered op (``torch.ops.relayops.*`` for cuda, ``relayops_triton`` for
triton) with prepared arguments (per-sample parameters already ``[B]`` tensors in the
accumulation dtype, so the call launches the op's kernel and nothing else), captured in one CUDA
graph and replayed: the time is the GPU's, with no host dispatch in it. One graph holds calls on
several input sets, enough distinct bytes to exceed twice the L2 cache, so every call reads
from DRAM. In the same run and the same way: a device copy of the same bytes (the memory-bound
floor), ``torch.randn`` of the normals a noise op draws, and ``torch.compile`` of the reference
op (the anchors); ``<backend>_eager_ms`` is the public op called in a plain loop (host dispatch
included). Then a relay sampler step (``relayops.sampling.relay_sampler_step``, Heun, eta 0.2,
per-sample seeds, 8 images 64 -> 256, a denoiser that costs nothing) replayed from a CUDA graph,
against the sum of its kernels' durations from ``torch.profiler`` and the eager step.

``--deadline`` (seconds) stops starting new rows once passed; skipped rows say so.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
NAMESPACES = {"cuda": "relayops", "cpu": "relayops", "triton": "relayops_triton"}
# images moved per call (each image-sized input read once, the output written once), normals drawn per element
OPS = {"patch_dct": (2, 0), "patch_idct": (2, 0), "patch_blur": (2, 0), "block_noise": (2, 0),
       "relay_noise": (1, 2), "relay_corrupt": (2, 2), "relay_step": (3, 2), "relay_step_heun": (5, 2)}


def op_call(op: str, backend: str, x, s: int = 4, public: bool = False):
    """``(kernel_call, public_call)`` for ``op`` on inputs shaped like x (made here, outside timing)."""
    import relayops
    from relayops._validate import acc_dtype

    b, device = x.shape[0], x.device
    acc = acc_dtype(x.dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    x0, xp, x0p = (torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype) for _ in range(3))
    sigma = torch.linspace(0.5, 2.0, b, device=device, dtype=acc)
    tau = torch.linspace(0.1, 1.5, b, device=device, dtype=acc)
    sigma_n, tau_n = sigma * 0.7, tau * 0.7
    ops = getattr(torch.ops, NAMESPACES[backend])
    alpha, k, eta, d_min, seed, offset = 0.15, 1 / math.sqrt(1 + 0.15 ** 2), 0.2, 0.001, 1, 2
    none7 = (None,) * 7
    kernel = {
        "patch_dct": lambda: ops.patch_dct(x, s),
        "patch_idct": lambda: ops.patch_idct(x, s),
        "patch_blur": lambda: ops.patch_blur(x, tau, s, d_min),
        "block_noise": lambda: ops.block_noise(x, s, False),
        "relay_noise": lambda: ops.relay_noise(x, s, alpha, k, seed, offset, None, None, None),
        "relay_corrupt": lambda: ops.relay_corrupt(x, sigma, tau, s, d_min, alpha, k, seed, offset, None, None, None),
        "relay_step": lambda: ops.relay_step(x, x0, sigma, sigma_n, tau, tau_n, eta, s, d_min, alpha, k, seed,
                                             offset, *none7),
        "relay_step_heun": lambda: ops.relay_step(x, x0, sigma, sigma_n, tau, tau_n, eta, s, d_min, alpha, k, seed,
                                                  offset, None, None, None, xp, x0p, None, None),
    }[op]
    be = backend
    eager = {
        "patch_dct": lambda: relayops.patch_dct(x, s, backend=be),
        "patch_idct": lambda: relayops.patch_idct(x, s, backend=be),
        "patch_blur": lambda: relayops.patch_blur(x, tau, s, backend=be),
        "block_noise": lambda: relayops.block_noise(x, s, backend=be),
        "relay_noise": lambda: relayops.relay_noise(x, s, seed=seed, offset=offset, backend=be),
        "relay_corrupt": lambda: relayops.relay_corrupt(x, sigma, tau, s, seed=seed, offset=offset, backend=be),
        "relay_step": lambda: relayops.relay_step(x, x0, sigma, sigma_n, tau, tau_n, s=s, seed=seed, offset=offset,
                                                  backend=be),
        "relay_step_heun": lambda: relayops.relay_step(x, x0, sigma, sigma_n, tau, tau_n, s=s, seed=seed,
                                                       offset=offset, x_prop=xp, x0_hat_prop=x0p, backend=be),
    }[op]
    return kernel, eager


def reference_call(op: str, x, s: int = 4):
    """``torch.compile`` of the reference op on x (float32 math for half types, as the kernels)."""
    from relayops import reference
    from relayops._validate import acc_dtype

    b, device = x.shape[0], x.device
    acc = acc_dtype(x.dtype)
    x0 = torch.randn_like(x)
    sigma = torch.linspace(0.5, 2.0, b, device=device, dtype=acc)
    tau = torch.linspace(0.1, 1.5, b, device=device, dtype=acc)
    alpha, k = 0.15, 1 / math.sqrt(1 + 0.15 ** 2)
    fn = {
        "patch_dct": lambda: reference.patch_dct(x, s),
        "patch_idct": lambda: reference.patch_idct(x, s),
        "patch_blur": lambda: reference.patch_blur(x, tau, s, 0.001),
        "block_noise": lambda: reference.block_noise(x, s, False),
        "relay_noise": lambda: reference.relay_noise(x, s, alpha, k, 1, 2, None, None, None),
        "relay_corrupt": lambda: reference.relay_corrupt(x, sigma, tau, s, 0.001, alpha, k, 1, 2, None, None, None),
        "relay_step": lambda: reference.relay_step(x, x0, sigma, sigma * 0.7, tau, tau * 0.7, 0.2, s, 0.001, alpha,
                                                   k, 1, 2, *(None,) * 7),
    }.get(op)
    return None if fn is None else torch.compile(fn)


def l2_bytes(device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 1 << 20


def input_sets(shape, dtype, device, bytes_per_call: int, cap: int = 16) -> list[torch.Tensor]:
    """Distinct inputs, together at least twice the L2 cache (at most ``cap``)."""
    n = max(1, min(cap, math.ceil(2 * l2_bytes(device) / max(1, bytes_per_call))))
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(n)]


def graph_ms(calls, device, replays: int = 10) -> float:
    """Milliseconds per call of the callables ``calls`` (run once each, in order): on a GPU
    captured in one CUDA graph and replayed ``replays`` times (median), on a CPU (the dry run)
    timed in a loop."""
    for fn in calls:
        fn()  # compiles, autotunes, allocates: out of the capture
    if device.type != "cuda":
        times = []
        for _ in range(replays):
            start = time.perf_counter()
            for fn in calls:
                fn()
            times.append((time.perf_counter() - start) * 1e3 / len(calls))
        return statistics.median(times)
    torch.cuda.synchronize()
    graph, keep = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        for fn in calls:
            keep.append(fn())  # outputs kept: each call writes its own memory
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph, keep
    return statistics.median(times)


def loop_ms(fn, device, calls: int = 20) -> float:
    """Milliseconds per call of ``fn`` called in a plain loop (host dispatch included)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def op_rows(sizes, batch, channels, dtypes, backends, device, deadline: float, s: int = 4, reference=True,
            ops=tuple(OPS)):
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        elt = torch.empty((), dtype=dtype).element_size()
        for size in sizes:
            shape = (batch, channels, size, size)
            numel = math.prod(shape)
            for op in ops:
                images, normals = OPS[op]
                row = {"op": op, "dtype": dtype_name, "shape": list(shape), "bytes": images * numel * elt}
                rows.append(row)
                if time.monotonic() > deadline:
                    row["skipped"] = "time budget"
                    continue
                xs = input_sets(shape, dtype, device, row["bytes"])
                half = row["bytes"] // 2 // elt
                srcs = [torch.randn(half, device=device).to(dtype) for _ in xs]  # read half the bytes, write half
                dsts = [torch.empty_like(v) for v in srcs]
                row["copy_ms"] = graph_ms([lambda a=a, b=b: b.copy_(a) for a, b in zip(srcs, dsts)], device)
                if normals:
                    n = normals * numel
                    row["randn_ms"] = graph_ms([lambda: torch.randn(n, device=device, dtype=dtype)] * len(xs), device)
                for backend in backends:
                    try:
                        calls = [op_call(op, backend, x, s) for x in xs]
                        row[f"{backend}_ms"] = graph_ms([c[0] for c in calls], device)
                        row[f"{backend}_eager_ms"] = loop_ms(calls[0][1], device)
                    except Exception as e:  # a row that fails says why; the others still run
                        row[f"{backend}_error"] = f"{type(e).__name__}: {e}"[:300]
                if reference and time.monotonic() < deadline:
                    try:
                        fns = [reference_call(op, x, s) for x in xs[:1]]
                        if fns[0] is not None:
                            row["compiled_reference_ms"] = graph_ms(fns * len(xs), device)
                    except Exception as e:
                        row["compiled_reference_error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)
    return rows


def sampler_row(device, backend: str, low: int, batch: int = 8, channels: int = 3, s: int = 4) -> dict:
    """A Heun relay sampler step for ``batch`` images ``low`` -> ``low * s``: graph replay, its
    kernels' durations (profiler), the eager step."""
    from relayops.sampling import relay_sampler_step

    size = low * s
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen, device=device)
    seeds = torch.arange(1234, 1234 + batch, device=device)
    levels = [torch.full((batch,), v, device=device) for v in (0.9, 0.7, 0.5, 0.35)]

    def step():
        return relay_sampler_step(lambda v, sigma: v, x, *levels, seeds=seeds, offset=3, heun=True, eta=0.2, s=s,
                                  backend=backend)

    row = {"sampler": "relay_sampler_step", "heun": True, "shape": [batch, channels, size, size],
           "backend": backend, "graph_ms": graph_ms([step], device), "eager_ms": loop_ms(step, device)}
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        row["kernels"] = len(kernels)
        row["kernels_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        row["graph_over_kernels"] = row["graph_ms"] / row["kernels_ms"] if row["kernels_ms"] else None
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--backends", nargs="+", default=None, help="default: cuda and triton (dry run: cpu)")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds; no new row starts after this")
    parser.add_argument("--no-reference", action="store_true", help="skip torch.compile of the reference ops")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors, tiny sizes, no reference compile: exercises the code path without a GPU")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import relayops
    if args.dry_run:
        device = torch.device("cpu")
        args.sizes, args.batch = [min(n, 8) for n in args.sizes][:1], min(args.batch, 2)
        backends = args.backends or ["cpu"]
        low = 2
    elif not torch.cuda.is_available():
        print("gpu_perf: no CUDA GPU here; use --dry-run to exercise the code path on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        backends = args.backends or [b for b in ("cuda", "triton") if b in relayops.available_backends()]
        low = 64
    deadline = time.monotonic() + args.deadline
    try:  # first: it is the row with a target
        sampler = sampler_row(device, backends[0], low)
    except Exception as e:  # say why, and time the ops all the same
        sampler = {"sampler": "relay_sampler_step", "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(sampler), flush=True)
    result = {"device": str(device), "backends": backends, "sampler": sampler,
              "rows": op_rows(args.sizes, args.batch, args.channels, args.dtypes, backends, device, deadline,
                              reference=not (args.no_reference or args.dry_run), ops=args.ops)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
