"""Soak: many calls of every op (every case of tests/test_backends.py: mixed shapes, dtypes, seeds,
backends) in one process; the resident memory must not grow beyond a small bound.

    python tests/soak.py --calls 10000       # `make soak`: 10,000 calls of every op

The memory is measured after a warm-up (a tenth of the calls: caches, kernel compilation, the
allocator's pools) and at the end. Under the Triton interpreter (no GPU) Triton takes every 25th
call only: it is about a hundred times slower than the other backends there.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_backends import CASES, TARGETS, make_inputs, takes_float64  # noqa: E402

OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise", "relay_corrupt", "relay_step")
SHAPES = [(1, 1, 4, 4, 4), (2, 3, 8, 12, 4), (3, 2, 6, 6, 3), (1, 4, 16, 8, 8), (2, 1, 4, 8, 2)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(calls_per_op: int, seed: int = 0, targets=TARGETS) -> dict:
    """``calls_per_op`` calls of each op; returns call counts and the RSS after warm-up and at the end."""
    rng = random.Random(seed)
    cases = {op: [n for n in CASES if n.startswith(op + "_") or n == op] for op in OPS}
    inputs = {}
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for t in targets:
                inputs[shape, dtype, t] = make_inputs(shape, dtype, t[1], seed=rng.randrange(1000))[0]
    counts = {}
    warm = max(1, calls_per_op // 10)
    rss = {}
    for i in range(calls_per_op):
        if i == warm:
            gc.collect()
            rss["after_warmup"] = rss_bytes()
        for op in OPS:
            name = rng.choice(cases[op])
            options = [t for t in targets if not (INTERPRETED and t[0] == "triton" and i % 25)]
            target = rng.choice(options)
            dtype = rng.choice((torch.float32, torch.bfloat16) + ((torch.float64,) if takes_float64(target[0]) else ()))
            shape = rng.choice(SHAPES)
            out = CASES[name][0](inputs[shape, dtype, target], shape[4], target[0])
            assert out.shape == shape[:4] and bool(torch.isfinite(out).all()), (name, target, shape, dtype)
            counts[op, target[0]] = counts.get((op, target[0]), 0) + 1
    gc.collect()
    rss["end"] = rss_bytes()
    rss.setdefault("after_warmup", rss["end"])
    return {"counts": counts, **rss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10000, help="calls of each op")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth-mib", type=float, default=32.0)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    r = soak(args.calls, args.seed)
    growth = (r["end"] - r["after_warmup"]) / 2**20
    for (op, backend), n in sorted(r["counts"].items()):
        print(f"{op:14s} {backend:10s} {n:7d} calls")
    print(f"{sum(r['counts'].values())} calls in {time.monotonic() - t0:.0f} s; "
          f"RSS {r['after_warmup'] / 2**20:.1f} MiB "
          f"after warm-up, {r['end'] / 2**20:.1f} MiB at the end (growth {growth:+.1f} MiB, bound "
          f"{args.max_growth_mib} MiB)")
    if growth > args.max_growth_mib:
        print("FAILED: memory grew beyond the bound")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
