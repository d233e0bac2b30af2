"""Turn pytest-benchmark JSON from bench/ into a Markdown table.

    pytest bench --benchmark-json=bench/results/cpu.json
    python bench/report.py [--stat min] bench/results/cpu.json [more.json ...] > table.md

One row per (op, device, dtype, size): median (or, with ``--stat min``, fastest round's) time of the
compiled kernels, the reference and a copy of the same bytes, the compiled kernels' GB/s (bytes the
op must move / median), their time as a multiple of the copy, and their speedup over the reference
(all from the chosen statistic). Each table ends with the machine of every file: CPU model and
AVX-512F, torch version and commit (from results written before bench/conftest.py recorded them:
pytest-benchmark's CPU brand and commit, torch unknown).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from provenance import describe


def load(paths, stat="median", kind="op"):
    """The benchmarks' extra_info with the chosen statistic as "median"; kind: "op" (the op
    benchmarks) or "sampler" (test_bench_sampling.py)."""
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            info = dict(bench.get("extra_info", {}))
            if kind in info:
                info["median"] = bench["stats"][stat]
                rows.append(info)
    return rows


def machine_line(path) -> str:
    """One line naming the machine a results file was measured on."""
    with open(path) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    m = info.get("relayops")
    if m is None:  # results from before conftest.machine(): what pytest-benchmark recorded
        cpu = info.get("cpu", {})
        commit = data.get("commit_info", {})
        m = {"cpu_model": cpu.get("brand_raw", "?"), "avx512f": "avx512f" in cpu.get("flags", []), "torch": "?",
             "commit": commit.get("id"), "dirty": commit.get("dirty")}
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{path}: CPU {m['cpu_model']} ({'with' if m['avx512f'] else 'without'} AVX-512F){gpu}, "
            f"torch {m['torch']}, {describe(m)}")


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def table(rows, stat="median") -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["device"], r["dtype"], r["size"])][r["impl"]] = r
    lines = [
        "| op | device | dtype | B x C x H x W | compiled ms | reference ms | copy ms (same bytes) | compiled GB/s"
        " | compiled / copy | speedup vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"copy": 0, "randn": 1}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 2), k[0], k[1], k[2], k[3])):
        op, device, dtype, size = key
        impls = groups[key]
        main = impls.get("compiled") or impls.get("copy") or impls.get("randn")
        ref = impls.get("reference")
        shape = "x".join(str(v) for v in main["shape"])
        speedup = f"{ref['median'] / main['median']:.1f}x" if ref and "compiled" in impls else "-"
        compiled_ms = ms(impls["compiled"]["median"]) if "compiled" in impls else ms(main["median"])
        lines.append(
            f"| {op} | {device} | {dtype} | {shape} | {compiled_ms}"
            f" | {ms(ref['median']) if ref else '-'} | {ms(main['copy_s'])}"
            f" | {main['bytes'] / main['median'] / 1e9:.1f} | {main['median'] / main['copy_s']:.2f} | {speedup} |")
    threads = sorted({r.get("threads") for r in rows})
    lines.append("")
    what = "Medians" if stat == "median" else "Fastest rounds"
    lines.append(f"Threads: {', '.join(map(str, threads))}. {what} of pytest-benchmark rounds (ms); "
                 "copy = median `dst.copy_(src)` moving the bytes the op must read and write.")
    return "\n".join(lines)


def sampler_table(rows) -> str:
    """Per-sample seeds against one int seed, per sampler step (test_bench_sampling.py)."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["sampler"], r["device"], tuple(r["shape"]))][r["seeds"]] = r
    lines = ["| sampler | device | output B x C x H x W | steps | int seed ms/step | per-sample seeds ms/step"
             " | ratio |",
             "|---|---|---|---|---|---|---|"]
    for (sampler, device, shape), by_seeds in sorted(groups.items()):
        one, each = by_seeds.get("int"), by_seeds.get("per_sample")
        if one is None or each is None:
            continue
        ratio = each["median"] / one["median"]
        lines.append(f"| {sampler} | {device} | {'x'.join(map(str, shape))} | {one['steps']} | "
                     f"{one['median'] / one['steps'] * 1e3:.3g} | {each['median'] / each['steps'] * 1e3:.3g} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def main(argv):
    stat = "median"
    if argv[:1] == ["--stat"]:
        stat, argv = argv[1], argv[2:]
    if not argv or stat not in ("median", "min", "mean"):
        print(__doc__)
        return 2
    ops = load(argv, stat)
    if ops:
        print(table(ops, stat))
    samplers = load(argv, stat, kind="sampler")
    if samplers:
        print("\n" + sampler_table(samplers))
    print("\nMachine: " + "; ".join(machine_line(p) for p in argv) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
