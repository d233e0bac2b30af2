"""Markdown table of bench/test_bench_isa.py's JSON: the CPU kernels per instruction-set path,
fastest round of each benchmark, with the machine (``lscpu`` model name and SIMD flags), torch
version and commit. Run it on the machine that produced the JSON.

    python bench/isa_table.py bench/results/cpu_isa.json
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import torch

OPS = ("patch_blur", "relay_noise", "relay_step_euler", "relay_step_heun")
SIMD_FLAGS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "asimd", "sve")


def machine() -> str:
    """lscpu's model name, CPU count and which SIMD flags the CPU reports."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    has = ", ".join(f for f in SIMD_FLAGS if f in flags)
    lacks = ", ".join(f for f in SIMD_FLAGS if f not in flags)
    return (f"`lscpu` model name \"{fields.get('Model name', '?')}\", {fields.get('CPU(s)', '?')} CPUs, "
            f"{fields.get('Architecture', platform.machine())}; SIMD flags present: {has or 'none'}; "
            f"absent: {lacks or 'none'}")


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def load(path: str) -> dict:
    """{(op, isa): (fastest round in s, bytes, threads)} from the JSON."""
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "isa_op" in info:
            rows[(info["isa_op"], info["isa"])] = (bench["stats"]["min"], info["bytes"], info["threads"])
    return rows


def table(rows: dict) -> str:
    ms = {key: v[0] * 1e3 for key, v in rows.items()}
    copy_ms, copy_bytes, threads = rows[("copy", "-")]
    copy_ms *= 1e3
    dram_s, dram_bytes, _ = rows[("dram_copy", "-")]
    dram_gbps = dram_bytes / dram_s / 1e9
    randn = ms[("randn", "-")]
    lines = [
        f"Threads: {threads}. Fastest of the rounds (ms). Shape 8x3x256x256 float32.",
        "",
        "| reference | ms | GB/s |",
        "|---|---|---|",
        f"| copy of the 8x3x256x256 tensor (`copy_`, 2 x 6.3 MB moved) | {copy_ms:.3g} | "
        f"{copy_bytes / copy_ms / 1e6:.1f} |",
        f"| copy of a 256 MiB tensor (`copy_`, 512 MiB moved: DRAM) | {dram_s * 1e3:.3g} | {dram_gbps:.1f} |",
        f"| `torch.randn` of 2 x 8x3x256x256 normals | {randn:.3g} | - |",
    ]
    if ("relay_step_euler", "reference backend") in ms:
        lines.append(f"| reference backend's Euler `relay_step` | {ms[('relay_step_euler', 'reference backend')]:.3g} "
                     "| - |")
    lines += ["", "| path | `patch_blur` ms | / copy (same size) | / copy at DRAM speed | its kernel alone ms | / copy "
              "(same size) | `relay_noise` ms | / `torch.randn` | Euler `relay_step` ms | Heun `relay_step` ms "
              "| Heun / Euler |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for isa in ("portable", "avx2", "avx512"):
        if ("patch_blur", isa) not in ms:
            continue
        blur, noise = ms[("patch_blur", isa)], ms[("relay_noise", isa)]
        euler, heun = ms[("relay_step_euler", isa)], ms[("relay_step_heun", isa)]
        blur_dram = rows[("patch_blur", isa)][1] / dram_gbps / 1e6  # ms to move its bytes at DRAM speed
        kernel = ms.get(("patch_blur_kernel", isa), float("nan"))
        lines.append(f"| {isa} | {blur:.3g} | {blur / copy_ms:.2f} | {blur / blur_dram:.2f} | {kernel:.3g} | "
                     f"{kernel / copy_ms:.2f} | {noise:.3g} | {noise / randn:.2f} | {euler:.3g} | {heun:.3g} | "
                     f"{heun / euler:.2f} |")
    return "\n".join(lines)


def width_table(rows: dict) -> str:
    """patch_blur's compiled forward per image width (the same number of elements), per path."""
    shapes = sorted({op[len("blur_kernel_"):] for op, _ in rows if op.startswith("blur_kernel_")},
                    key=lambda s: int(s.split("x")[-1]))
    if not shapes:
        return ""
    lines = ["", "`patch_blur`'s kernel alone (ms) by image shape, the same number of elements:", "",
             "| path | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for isa in ("portable", "avx2", "avx512"):
        if (f"blur_kernel_{shapes[0]}", isa) in rows:
            lines.append(f"| {isa} | " + " | ".join(f"{rows[(f'blur_kernel_{s}', isa)][0] * 1e3:.3g}" for s in shapes)
                         + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python bench/isa_table.py RESULTS.json")
    print(f"Machine: {machine()}. torch {torch.__version__}, commit {commit()}.\n")
    rows = load(argv[0])
    print(table(rows))
    print(width_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
