"""Instructions per op call on a 1 x 1 x 4 x 4 input, counted by valgrind's callgrind: the cases
of bench/test_bench_host.py, counted instead of timed. Instruction counts do not depend on the
host's load (wall times on a shared machine vary by 30% and more), so they compare two trees of
the code exactly; they do not weigh cache misses or the cost of waking threads.

Run (valgrind installed; about a minute per op, most of it importing torch under valgrind):
``python bench/host_instructions.py [op ...]`` (default: every case). Each op runs in its own
process under ``valgrind --tool=callgrind``, with collection on only inside the calls of the
loop it counts (the loop drives the calls through ``itertools.starmap``, whose C function
``starmap_next`` callgrind toggles on); the printed number is instructions per call. The op
uses the compiled CPU backend at one thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CALLS = 500  # counted calls per op (the counts repeat exactly); first calls (set-up) run before, uncounted


def _count(op: str, calls: int) -> None:
    """In the child under valgrind: the op's calls, collection on inside starmap_next only."""
    import torch
    torch.set_num_threads(1)
    from test_bench_host import _cases
    fn = _cases()[op]
    for _ in range(200):  # first-call set-up out of the count, as in the benchmark
        fn()

    def call():  # the output is freed inside the counted call, as in the benchmark's loop
        fn()

    collections.deque(itertools.starmap(call, itertools.repeat((), calls)), maxlen=0)


def instructions_per_call(op: str, calls: int = CALLS) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=starmap_next",
               f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__), "--child", op, str(calls)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            total = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
    if total is None:
        raise RuntimeError(f"no instruction total in callgrind's output for {op}")
    return int(total.group(1)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops", nargs="*", help="cases of bench/test_bench_host.py (default: all)")
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _count(args.ops[0], int(args.ops[1]))
        return
    from test_bench_host import _cases
    for op in args.ops or list(_cases()):
        print(f"{op:14s} {instructions_per_call(op, args.calls):10.0f} instructions per call", flush=True)


if __name__ == "__main__":
    main()
