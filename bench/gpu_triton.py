"""GPU benchmark of the Triton backend against the compiled CUDA backend and the reference.

    python bench/gpu_triton.py                       # default sweep, Markdown table on stdout
    python bench/gpu_triton.py --sizes 256 1024 --batches 8 64 --dtype bfloat16 --json out.json

For every op and shape ``[B, C, H, W]`` (H = W from ``--sizes``, B from ``--batches``) it times
the op with ``triton.testing.do_bench`` (median; do_bench clears the L2 cache before every
repetition, so each run reads from DRAM) and reports the bytes the op must move (each image-sized
input read once and the output written once; per-sample vectors are negligible), the achieved
GB/s, and that speed as a fraction of a device-to-device ``copy_`` moving the same number of bytes
in the same run (the memory-bound limit). Backends: triton, cuda (when the compiled CUDA backend
is built) and reference. Needs a CUDA GPU: without one it exits with a message (Triton's CPU
interpreter is a correctness tool, not something to time).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def op_cases(b: int, c: int, size: int, s: int, dtype, device, backward: bool = False):
    """``{name: (images moved, call(backend))}`` for one shape; inputs made once, outside timing.
    With ``backward``, also forward + backward (gradient of the image) of patch_blur and
    relay_corrupt: 4 images moved (read x, write out; read the output's gradient, write x's)."""
    import relayops

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (b, c, size, size)
    x, x0_hat, x_prop, x0_prop = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    sigma = torch.linspace(0.5, 2.0, b, device=device)
    sigma_next = sigma * 0.7
    tau = torch.linspace(0.1, 1.5, b, device=device)
    tau_next = tau * 0.7
    cases = {
        "patch_dct": (2, lambda be: relayops.patch_dct(x, s, backend=be)),
        "patch_blur": (2, lambda be: relayops.patch_blur(x, tau, s, backend=be)),
        "block_noise": (2, lambda be: relayops.block_noise(x, s, backend=be)),
        "relay_noise": (1, lambda be: relayops.relay_noise(x, s, seed=1, offset=2, backend=be)),
        "relay_corrupt": (2, lambda be: relayops.relay_corrupt(x, sigma, tau, s, seed=1, offset=2, backend=be)),
        "relay_step": (3, lambda be: relayops.relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, s=s, seed=1,
                                                         offset=2, backend=be)),
        "relay_step_heun": (5, lambda be: relayops.relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, s=s,
                                                              seed=1, offset=2, x_prop=x_prop, x0_hat_prop=x0_prop,
                                                              backend=be)),
    }
    if backward:
        x_grad = x.detach().clone().requires_grad_(True)
        grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)

        def fwd_bwd(op):
            return lambda be: torch.autograd.grad(op(x_grad, be), x_grad, grad_out)

        cases["patch_blur_fwd_bwd"] = (4, fwd_bwd(lambda v, be: relayops.patch_blur(v, tau, s, backend=be)))
        cases["relay_corrupt_fwd_bwd"] = (4, fwd_bwd(lambda v, be: relayops.relay_corrupt(
            v, sigma, tau, s, seed=1, offset=2, backend=be)))
    return cases


def timed(bench, fn):
    """Milliseconds for ``fn`` (after one untimed call, which also runs Triton's autotuning),
    or None if it runs out of memory."""
    try:
        fn()
        return bench(fn)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def run(sizes, batches, channels, s, dtype, ops, backends, device, bench, backward=False):
    """Benchmark rows: one dict per (op, shape)."""
    rows = []
    elt = torch.empty((), dtype=dtype).element_size()
    for size in sizes:
        for b in batches:
            cases = op_cases(b, channels, size, s, dtype, device, backward)
            numel = b * channels * size * size
            for name in ops:
                images, call = cases[name]
                nbytes = images * numel * elt
                # a copy reads and writes its buffer: copying nbytes / 2 moves nbytes
                src = torch.empty(max(1, nbytes // 2 // elt), dtype=dtype, device=device)
                dst = torch.empty_like(src)
                row = {"op": name, "shape": [b, channels, size, size], "s": s, "dtype": str(dtype).split(".")[-1],
                       "bytes": nbytes, "copy_ms": timed(bench, functools.partial(dst.copy_, src))}
                del src, dst
                for be in backends:
                    row[f"{be}_ms"] = timed(bench, lambda: call(be))
                rows.append(row)
                print(f"  {name} {row['shape']}: " + ", ".join(
                    f"{be} {_fmt(row[f'{be}_ms'])} ms" for be in ("copy",) + tuple(backends)), file=sys.stderr)
            del cases
    return rows


def _fmt(v, spec=".3f"):
    return "OOM" if v is None else format(v, spec)


def _gbs(nbytes, ms):
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def markdown(rows, backends) -> str:
    """The results as a Markdown table (ms: median per call; % of copy: achieved / copy GB/s)."""
    head = ["op", "dtype", "B x C x H x W", "MB moved", "copy GB/s"]
    for be in backends:
        head += [f"{be} ms", f"{be} GB/s"]
        if be != "reference":
            head.append(f"{be} % of copy")
    if "reference" in backends:
        head += [f"{be} speedup vs reference" for be in backends if be != "reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nbytes = r["bytes"]
        cells = [r["op"], r["dtype"], " x ".join(map(str, r["shape"])), f"{nbytes / 1e6:.1f}",
                 _fmt(_gbs(nbytes, r["copy_ms"]), ".0f")]
        for be in backends:
            ms = r[f"{be}_ms"]
            cells += [_fmt(ms), _fmt(_gbs(nbytes, ms), ".0f")]
            if be != "reference":
                ok = ms is not None and r["copy_ms"] is not None
                cells.append(f"{100 * r['copy_ms'] / ms:.0f}%" if ok else "-")
        if "reference" in backends:
            ref = r["reference_ms"]
            for be in backends:
                if be != "reference":
                    ms = r[f"{be}_ms"]
                    cells.append(f"{ref / ms:.1f}x" if ref is not None and ms is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="H = W values")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="batch sizes B")
    parser.add_argument("--channels", type=int, default=3, help="C")
    parser.add_argument("--s", type=int, default=4, help="patch size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ops", nargs="+", default=None, help="subset of ops (default: all)")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward of patch_blur and "
                                                                    "relay_corrupt")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--compile-only", action="store_true",
                        help="call every case once and time nothing: fills Triton's kernel cache for a later run")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "run the Triton interpreter tests instead: TRITON_INTERPRET=1 pytest tests/test_triton.py")
    import triton
    import triton.testing

    import relayops

    available = relayops.available_backends()
    if "triton" not in available:
        sys.exit("the triton backend is not available here (pip install triton)")
    backends = ["triton"] + (["cuda"] if "cuda" in available else [])
    if not args.no_reference:
        backends.append("reference")
    all_ops = list(op_cases(1, 1, args.s, args.s, torch.float32, "cuda", args.backward))
    ops = args.ops or all_ops
    unknown = set(ops) - set(all_ops)
    if unknown:
        sys.exit(f"unknown ops {sorted(unknown)}; choose from {all_ops}")

    def bench(fn):
        if args.compile_only:
            torch.cuda.synchronize()
            return 0.0
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows = run(args.sizes, args.batches, args.channels, args.s, DTYPES[args.dtype], ops, backends, "cuda", bench,
               args.backward)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"dtype {args.dtype}, s = {args.s}; do_bench median with L2 flush\n")
    print(markdown(rows, backends))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
