#!/usr/bin/env python3
"""Offline machine-code report of the GPU kernels (docs/gpu-model.md): no GPU needed.

For every CUDA kernel (read from the fat binary of the built ``relayops/_C_cuda*.so``, so CI pays no
extra compile) and every Triton kernel (compiled here for ``sm_90``/``sm_80`` from the launches the
Triton ops make), per architecture:

* registers, stack and shared memory (``cuobjdump -res-usage``; Triton's dynamic shared memory
  from its metadata), local-memory instructions (``LDL``/``STL``: spills or a stack array),
* the width of each global load and store (``LDG``/``STG`` .8/.16/.32/.64/.128),
* SASS instructions per output element. Loops are found by their backward branches. For a
  kernel whose work is a loop (``KERNELS`` below says so), the count is the body of its hot loop
  (the innermost loop that stores to global memory) divided by the output elements one iteration
  produces; for a straight-line kernel it is the whole kernel body divided by the output elements
  one thread produces. NOPs, the closing self-branch and out-of-line subroutines (slow paths
  reached by ``CALL``) are not counted. A count is static: code skipped by a forward branch is
  counted too, so it is an upper bound of what a thread executes when the body has branches.

``KERNELS`` is the one table of what each kernel computes: its op, and the output elements per
loop iteration or per thread. A kernel missing from it is reported without a per-element count.
Budgets live in ``bench/gpu_budgets.py``; ``tests/test_gpu_model.py`` checks them.

Usage: ``python bench/sass_report.py [--arch 90 --arch 80] [--json out.json] [--markdown out.md]
[--no-triton] [--no-cuda] [--ops patch_dct,...] [--dtypes float32,bfloat16]``. Prints the Markdown
table. cuobjdump is taken from ``RELAYOPS_CUOBJDUMP``, ``PATH``, the CUDA toolkit, or the copy that
ships inside the ``triton`` package.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the kernel table


@dataclasses.dataclass(frozen=True)
class Work:
    """What one kernel does per unit of code: ``per`` is "iteration" (the hot loop's body, for a
    kernel that walks its elements in a loop) or "thread" (the whole body, straight-line code);
    ``elements`` maps the kernel's parameters (CUDA: S and dtype from the template arguments;
    Triton: its constexprs, num_warps and dtype) to output elements per that unit. ``op``: the op
    a CUDA kernel computes (a Triton kernel's op is the call that launched it). ``iterations``:
    loop trips per thread of one launch (Triton loop kernels), for checking ``elements`` against
    the launch."""
    per: str
    elements: Callable[[dict], float]
    why: str
    op: Optional[str] = None
    iterations: Optional[Callable[[dict], float]] = None


def _vec_elems(n: int, itemsize: int) -> int:
    """csrc/include/relayops/patch_kernels.h vec_elems: the largest power of two dividing n whose
    bytes are at most 16."""
    v = 1
    while n % (2 * v) == 0 and 2 * v * itemsize <= 16:
        v *= 2
    return v


def _box_vec(p: dict) -> int:
    """patch_kernels.h box_vec (float accumulation): columns per block-noise thread."""
    itemsize = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}[p["dtype"]]
    v = _vec_elems(p["S"], itemsize)
    limit = 16 if itemsize == 8 else 32
    while v > 1 and p["S"] * v > limit:
        v //= 2
    return v


def _triton_tile(p: dict) -> float:
    return p["TILE"] / (32 * p["num_warps"])


def _triton_band(p: dict, halo: bool = False) -> float:
    """One patch per lane and loop trip; with the block-noise halo (block_noise, or HAS_BLOCK) one
    lane of BLOCK_Q only supplies its neighbour (programs overlap by one patch column)."""
    lanes = p["BLOCK_Q"] - (1 if halo or p.get("HAS_BLOCK", False) else 0)
    return p["S"] ** 2 * lanes / (32 * p["num_warps"])


_PATCH = "one thread per s x s patch, straight-line"
_STRIP = "a thread walks a strip of box_vec columns down a band, s output rows per loop trip"
_TILE = "TILE elements per program over 32 num_warps threads, straight-line"
_BAND = "a lane per patch column walks a band of ROWS patch rows, one patch per trip"
_WALK = ("a lane per patch column walks a band of patch rows, s x s outputs per trip; lane 0 of each warp only "
         "supplies its neighbour's halo (31 of 32 lanes write)")


def _relay_elements(p: dict) -> float:
    """patch_kernels.h relay_warp: s^2 outputs per loop trip on kRelayLanes = 31 of 32 lanes."""
    return p["S"] ** 2 * 31 / 32


def _rows(p: dict) -> float:
    return p["ROWS"]


# The kernel table: (backend, name pattern, parameters the entry needs) -> Work. CUDA patterns
# match the short demangled name (``patch_dct_kernel<4, float>``), Triton patterns the kernel's
# name; the first entry whose pattern matches and whose parameters are present wins.
KERNELS: list[tuple[str, str, frozenset, Work]] = [
    # CUDA, one kernel per op (patch_kernels.h).
    ("cuda", r"^patch_dct_kernel<", frozenset(), Work("thread", lambda p: p["S"] ** 2, _PATCH, "patch_dct")),
    ("cuda", r"^patch_idct_kernel<", frozenset(), Work("thread", lambda p: p["S"] ** 2, _PATCH, "patch_idct")),
    ("cuda", r"^patch_blur_kernel<", frozenset(), Work("thread", lambda p: p["S"] ** 2, _PATCH, "patch_blur")),
    ("cuda", r"^block_noise_kernel<.*, false>$", frozenset(),
     Work("iteration", lambda p: p["S"] * _box_vec(p), _STRIP, "block_noise")),
    ("cuda", r"^block_noise_kernel<.*, true>$", frozenset(),
     Work("iteration", lambda p: p["S"] * _box_vec(p), _STRIP, "block_noise_adjoint")),
    *[("cuda", rf"^{op}_kernel<", frozenset(), Work("iteration", _relay_elements, _WALK, op))
      for op in ("relay_noise", "relay_corrupt", "relay_step_euler", "relay_step_heun", "relay_step_second")],
    # Triton, one kernel per op walking patch rows (one patch per lane and trip).
    ("triton", r"^block_noise_kernel$", frozenset({"BLOCK_Q", "ROWS"}),
     Work("iteration", lambda p: _triton_band(p, halo=True), _BAND, None, _rows)),
    *[("triton", rf"^{name}$", frozenset({"BLOCK_Q", "ROWS"}), Work("iteration", _triton_band, _BAND, None, _rows))
      for name in ("patch_dct_kernel", "patch_blur_kernel", "relay_noise_kernel", "relay_corrupt_kernel",
                   "relay_step_kernel")],
    # The first Triton kernels (one fused relay kernel): [TILE / SP^2, SP, SP] register tiles, one
    # program per TILE elements.
    *[("triton", rf"^{name}$", frozenset({"TILE"}), Work("thread", _triton_tile, _TILE))
      for name in ("transform_kernel", "block_noise_kernel", "relay_kernel")],
]

# CUDA kernels that serve several ops with run-time phases: reported whole (loops, sizes), with
# no per-op count, because which loops run depends on the op.
INTERPRETERS = {r"tile_kernel<": "the tile-phase interpreter: every op, phases chosen at run time"}

# ----------------------------------------------------------------------------- the op matrix

OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise", "relay_corrupt",
       "relay_step_euler", "relay_step_heun", "relay_step_second")
DTYPES = ("float32", "bfloat16")
S = 4


def op_call(op: str, dtype: str, device: str = "cpu", shape=(1, 3, 64, 1024), s: int = S):
    """(function name in relayops.triton.ops, arguments in the op schema's order) of one op call
    at ``shape``: seeded noise drawn in the kernel with the block-noise term (alpha != 0), one
    seed for the batch. The default shape is the benchmarks' kind (sizes divisible by 16, so the
    same integer specialisations) and wide enough (256 patch columns) that every lane of a
    program that walks patch columns has one."""
    import torch
    dt = getattr(torch, dtype)
    b = shape[0]
    img = lambda: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
    vec = lambda v: torch.full((b,), v, dtype=torch.float32, device=device)  # noqa: E731
    d_min, alpha, k, seed, offset = 0.01, 0.5, 1.0, 1234, 0
    if op in ("patch_dct", "patch_idct"):
        return op, (img(), s)
    if op == "patch_blur":
        return op, (img(), vec(0.5), s, d_min)
    if op == "block_noise":
        return op, (img(), s, False)
    if op == "relay_noise":
        return op, (img(), s, alpha, k, seed, offset, None, None, None)
    if op == "relay_corrupt":
        return op, (img(), vec(1.0), vec(0.5), s, d_min, alpha, k, seed, offset, None, None, None)
    if op.startswith("relay_step_"):
        variant = op.removeprefix("relay_step_")
        heun = (img(), img()) if variant == "heun" else (None, None)
        second = (img(), torch.zeros((b, s, s), dtype=torch.float32, device=device)) if variant == "second" \
            else (None, None)
        return "relay_step", (img(), img(), vec(2.0), vec(1.0), vec(0.5), vec(0.4), 0.5, s, d_min, alpha, k, seed,
                              offset, None, None, None, *heun, *second)
    raise ValueError(f"unknown op {op!r}")


def output_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------- SASS


@dataclasses.dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str
    pred: str = ""


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Instructions of each function of ``cuobjdump -sass`` output (one architecture)."""
    funcs: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _INSTR.search(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), (m.group(2) or "").strip()))
    return funcs


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}`` of ``cuobjdump -res-usage``."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line) if "[" not in k}
            current = None
    return out


def branch_target(ins: Instr) -> Optional[int]:
    if ins.op.split(".")[0] != "BRA":
        return None
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def _call_target(ins: Instr) -> Optional[int]:
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def global_width(op: str) -> Optional[tuple[str, int]]:
    """("load"|"store", bits) of a global (or generic) memory access, else None."""
    parts = op.split(".")
    kind = {"LDG": "load", "STG": "store", "LD": "load", "ST": "store"}.get(parts[0])
    if kind is None:
        return None
    mods = set(parts[1:])
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in mods:
            return kind, bits
    return kind, 32


def _widths_of(instrs: list[Instr]) -> tuple[dict, dict]:
    """(load widths, store widths) of the global accesses among ``instrs``: {bits: count}."""
    loads: Counter = Counter()
    stores: Counter = Counter()
    for ins in instrs:
        w = global_width(ins.op)
        if w:
            (loads if w[0] == "load" else stores)[w[1]] += 1
    return dict(sorted(loads.items())), dict(sorted(stores.items()))


@dataclasses.dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    size: int  # instructions in [start, end], NOPs excluded
    stores: int  # global stores in it
    load_widths: dict  # global load width (bits) -> instructions in it
    store_widths: dict
    innermost: bool
    branches: int  # forward branches inside (the count is then an upper bound)


@dataclasses.dataclass
class Code:
    """What the report reads from one function's SASS."""
    body: int  # instructions of the kernel body (NOPs, closing self-branch and subroutines excluded)
    subroutines: int  # instructions after the body: out-of-line slow paths reached by CALL
    calls: int
    forward_branches: int
    local: int  # LDL/STL
    loads: dict[int, int]  # global load width (bits) -> instructions
    stores: dict[int, int]
    generic: int  # LD/ST through generic addresses
    barriers: int
    shuffles: int
    shared: int  # LDS/STS
    mufu: int
    loops: list[Loop]


def analyse(instrs: list[Instr]) -> Code:
    instrs = [i for i in instrs if i.op != "NOP"]
    head = lambda i: i.op.split(".")[0]  # noqa: E731
    # Out-of-line subroutines (slow paths of division, square root...): placed after the last
    # EXIT, from a CALL's target to the next RET. (A CALL to the next instruction inside the body,
    # an sm_80 reconvergence idiom, is no subroutine.) The closing branch to itself is no work.
    last_exit = max((i.addr for i in instrs if head(i) == "EXIT"), default=-1)
    in_sub = set()
    for target in {_call_target(i) for i in instrs if head(i) == "CALL"} - {None}:
        if target <= last_exit:
            continue
        for ins in instrs:
            if ins.addr >= target:
                in_sub.add(ins.addr)
                if head(ins) == "RET":
                    break
    body = [i for i in instrs if i.addr not in in_sub and branch_target(i) != i.addr]
    subs = [i for i in instrs if i.addr in in_sub]
    loads, stores = _widths_of(instrs)
    spans = []
    for ins in body:
        t = branch_target(ins)
        if t is not None and t < ins.addr:
            spans.append((t, ins.addr))
    loops = []
    for start, stop in spans:
        inside = [i for i in body if start <= i.addr <= stop]
        innermost = not any(s2 >= start and e2 <= stop and (s2, e2) != (start, stop) for s2, e2 in spans)
        lw, sw = _widths_of(inside)
        loops.append(Loop(start, stop, len(inside), sum(sw.values()), lw, sw, innermost,
                          sum(1 for i in inside if (t := branch_target(i)) is not None and t > i.addr)))
    return Code(
        body=len(body), subroutines=len(subs), calls=sum(head(i) == "CALL" for i in body),
        forward_branches=sum(1 for i in body if (t := branch_target(i)) is not None and t > i.addr),
        local=sum(head(i) in ("LDL", "STL") for i in instrs), loads=loads, stores=stores,
        generic=sum(head(i) in ("LD", "ST") for i in instrs),
        barriers=sum(head(i) == "BAR" for i in body), shuffles=sum(head(i) == "SHFL" for i in body),
        shared=sum(head(i) in ("LDS", "STS") for i in body), mufu=sum(head(i) == "MUFU" for i in body), loops=loops)


def hot_loop(code: Code) -> Optional[Loop]:
    """The innermost loop that stores to global memory (the largest if there are several)."""
    candidates = [lp for lp in code.loops if lp.innermost and lp.stores]
    return max(candidates, key=lambda lp: lp.size) if candidates else None


# ----------------------------------------------------------------------------- tools


def find_cuobjdump() -> Optional[str]:
    """cuobjdump: RELAYOPS_CUOBJDUMP, PATH, the CUDA toolkit, or the one inside the triton package."""
    env = os.environ.get("RELAYOPS_CUOBJDUMP")
    if env:
        return env
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names (c++filt where present; unchanged otherwise)."""
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_cuda_name(readable: str) -> str:
    """``void ns::(anonymous namespace)::tile_kernel<4, float, float>(args)`` -> ``tile_kernel<4, float, float>``."""
    name = re.sub(r"^void\s+", "", readable.replace("(anonymous namespace)::", ""))
    depth, cut, start = 0, len(name), 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == ":" and depth == 0:
            start = i + 1  # drop the namespaces
        elif ch == "(" and depth == 0:
            cut = i
            break
    return name[start:cut]


# ----------------------------------------------------------------------------- CUDA


def cuda_module() -> Optional[Path]:
    found = sorted(glob.glob(str(ROOT / "relayops" / "_C_cuda*.so")))
    return Path(found[0]) if found else None


_DTYPE_OF = {"float": "float32", "double": "float64", "half_t": "float16", "bfloat16_t": "bfloat16",
             "__half": "float16", "__nv_bfloat16": "bfloat16"}


def cuda_params(name: str) -> dict:
    """Template parameters read from a kernel name: S (first integer argument) and dtype (first
    storage type argument), where present."""
    params: dict = {}
    m = re.search(r"<(.*)>", name)
    if m:
        args = [a.strip() for a in m.group(1).split(",")]
        ints = [int(a) for a in args if re.fullmatch(r"-?\d+", a)]
        if ints:
            params["S"] = ints[0]
        for a in args:
            key = a.split("::")[-1]
            if key in _DTYPE_OF:
                params["dtype"] = _DTYPE_OF[key]
                break
    return params


def cuda_rows(so: Path, arch: int, cuobjdump: str) -> list[dict]:
    sass = parse_sass(_run([cuobjdump, "-sass", "-arch", f"sm_{arch}", str(so)]))
    usage = parse_res_usage(_run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", str(so)]))
    readable = demangle(list(sass))
    rows = []
    for mangled, instrs in sass.items():
        name = short_cuda_name(readable[mangled])
        rows.append(row_for("cuda", arch, name, cuda_params(name), analyse(instrs), usage.get(mangled, {}),
                            shared_dynamic=None))
    return rows


# ----------------------------------------------------------------------------- Triton


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def constexprs(self, dtype: str) -> dict:
        """The launch's constexpr arguments by name, num_warps (Triton's default 4) and dtype."""
        bound = dict(zip([p.name for p in self.kernel.params], self.args))
        bound.update(self.kwargs)
        values = {p.name: bound[p.name] for p in self.kernel.params if p.is_constexpr and p.name in bound}
        return {**values, "num_warps": self.kwargs.get("num_warps", 4), "dtype": dtype}


# A width where a program's patch-column lanes tile the plane (8128 = 64 x 127 patch columns: every
# lane used with or without the one-lane block-noise overlap, for up to 128 lanes): the shape at
# which the kernel table is checked against the launch.
CHECK_SHAPE = (1, 1, 64, 4 * 8128)


def capture_triton_launches(op: str, dtype: str, shape=None) -> tuple[list[Launch], int]:
    """Run the Triton op on CPU tensors with kernel launches recorded instead of run; returns the
    launches and the number of output elements. Needs TRITON_INTERPRET unset."""
    from triton.runtime.jit import JITFunction

    from relayops.triton import ops as triton_ops

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            bound = dict(zip([p.name for p in self.params], args))
            bound.update(kwargs)
            grid = grid(bound)
        launches.append(Launch(self, args, dict(kwargs), tuple(grid)))
        return None

    name, args = op_call(op, dtype) if shape is None else op_call(op, dtype, shape=shape)
    original = JITFunction.run
    JITFunction.run = record
    try:
        getattr(triton_ops, name)(*args)
    finally:
        JITFunction.run = original
    if not launches:
        raise RuntimeError(f"the Triton {op} launched no kernel through JITFunction.run: the report cannot see it")
    return launches, output_elements(args[0].shape)


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch for sm_<arch> exactly as the launch would (argument types,
    16-byte alignment and divisibility specialisations, constexprs, num_warps); returns the
    CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _launch_elements(launch: Launch, n_out: int, dtype: str) -> tuple[Optional[float], Optional[float]]:
    """(what the kernel table claims, what the launch does): output elements per thread (per loop
    trip for loop kernels) = output elements / (threads x trips)."""
    params = launch.constexprs(dtype)
    work = work_of("triton", launch.kernel.fn.__name__, params)
    if work is None:
        return None, None
    trips = work.iterations(params) if work.iterations else 1
    return work.elements(params), n_out / (launch.programs * 32 * params["num_warps"] * trips)


def _triton_op_rows(op: str, dtype: str, archs, cuobjdump: str) -> list[dict]:
    rows = []
    launches, _ = capture_triton_launches(op, dtype)
    wide, n_wide = capture_triton_launches(op, dtype, CHECK_SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for i, launch in enumerate(launches):
                kernel = compile_launch(launch, arch)
                cubin = Path(tmp) / f"{i}.cubin"
                cubin.write_bytes(kernel.asm["cubin"])
                sass = parse_sass(_run([cuobjdump, "-sass", str(cubin)]))
                usage = parse_res_usage(_run([cuobjdump, "-res-usage", str(cubin)]))
                fname = kernel.metadata.name
                params = launch.constexprs(dtype)
                params.setdefault("S", S)
                row = row_for("triton", arch, fname, params, analyse(sass[fname]), usage.get(fname, {}),
                              shared_dynamic=kernel.metadata.shared)
                row["op"] = op
                row["launch_claimed"], row["launch_elements"] = (
                    _launch_elements(wide[i], n_wide, dtype) if i < len(wide) else (None, None))
                rows.append(row)
    return rows


def triton_rows(ops, dtypes, archs, cuobjdump: str, jobs: int = 1) -> list[dict]:
    """Rows of the Triton kernels each op launches, compiled in ``jobs`` processes."""
    tasks = [(op, dtype) for op in ops for dtype in dtypes]
    if jobs <= 1 or len(tasks) <= 1:
        return [r for op, dtype in tasks for r in _triton_op_rows(op, dtype, archs, cuobjdump)]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(tasks)), multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_triton_op_rows, op, dtype, archs, cuobjdump) for op, dtype in tasks]
        return [r for f in futures for r in f.result()]


def triton_rows_subprocess(ops, dtypes, archs, cuobjdump: str, jobs: Optional[int] = None) -> list[dict]:
    """triton_rows in a child process without TRITON_INTERPRET (under the interpreter @triton.jit
    builds nothing compilable), with this checkout first on the path; ``jobs`` compile processes
    (default: one per core)."""
    jobs = jobs or os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--triton-rows", str(out), "--cuobjdump", cuobjdump, "--jobs", str(jobs),
               "--ops", ",".join(ops), "--dtypes", ",".join(dtypes), *sum((["--arch", str(a)] for a in archs), [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("Triton compile failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- rows


def work_of(backend: str, name: str, params: dict) -> Optional[Work]:
    for b, pattern, needs, work in KERNELS:
        if b == backend and re.search(pattern, name) and needs <= set(params):
            return work
    return None


def row_for(backend: str, arch: int, name: str, params: dict, code: Code, usage: dict, shared_dynamic) -> dict:
    row = {
        "backend": backend, "arch": arch, "kernel": name, "op": None, "s": params.get("S"),
        "dtype": params.get("dtype"), "registers": usage.get("REG"), "stack": usage.get("STACK"),
        "shared_static": usage.get("SHARED"), "shared_dynamic": shared_dynamic, "local_instructions": code.local,
        "loads": code.loads, "stores": code.stores, "generic_accesses": code.generic, "body": code.body,
        "subroutines": code.subroutines, "calls": code.calls, "barriers": code.barriers, "shuffles": code.shuffles,
        "shared_accesses": code.shared, "mufu": code.mufu,
        "loops": [dataclasses.asdict(lp) for lp in code.loops],
        "per": None, "elements": None, "counted": None, "counted_loads": None, "counted_stores": None,
        "per_element": None, "upper_bound": None, "note": "",
    }
    interp = next((why for pat, why in INTERPRETERS.items() if re.search(pat, name)), None)
    work = work_of(backend, name, params)
    if interp:
        row["note"] = interp
    elif work is None:
        row["note"] = "not in the kernel table (KERNELS): no per-element count"
    else:
        row["op"] = work.op
        row["per"] = work.per
        try:
            row["elements"] = work.elements(params)
        except KeyError as e:
            row["note"] = f"kernel table needs parameter {e}"
            return row
        if work.per == "iteration":
            loop = hot_loop(code)
            if loop is None:
                row["note"] = "the table says loop, but no innermost loop stores to global memory"
                return row
            row["counted"], row["upper_bound"] = loop.size, loop.branches > 0
            row["counted_loads"], row["counted_stores"] = loop.load_widths, loop.store_widths
        else:
            row["counted"] = code.body
            row["counted_loads"], row["counted_stores"] = code.loads, code.stores
            row["upper_bound"] = bool(code.loops or code.calls or code.forward_branches)
        row["per_element"] = row["counted"] / row["elements"]
    return row


# ----------------------------------------------------------------------------- floors

# bench/floor_kernels.cu: kernel -> (what one loop iteration produces, how many of them)
FLOOR_KERNELS = {
    "floor_philox": ("Philox4x32-10 call", 1),
    "floor_normals_revised": ("elements' eps and eps2, revised scheme", 4),
    "floor_normals_original": ("elements' eps and eps2, original scheme", 4),
    "floor_patch_dct": ("patch_dct elements", 16),
    "floor_copy": ("copied elements", 4),
}


def floors(arch: int = 90) -> list[dict]:
    """Instructions per unit of the minimal sequences of bench/floor_kernels.cu (nvcc -O3)."""
    nvcc = shutil.which("nvcc")
    cuobjdump = find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError("--floors needs nvcc and cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "floor.cubin"
        _run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", f"-I{ROOT / 'csrc' / 'include'}", "-o", str(cubin),
              str(ROOT / "bench" / "floor_kernels.cu")])
        sass = parse_sass(_run([cuobjdump, "-sass", str(cubin)]))
    out = []
    for name, (unit, per) in FLOOR_KERNELS.items():
        code = analyse(sass[name])
        loop = hot_loop(code)
        ops = Counter(i.op.split(".")[0] for i in sass[name] if i.op != "NOP" and loop.start <= i.addr <= loop.end)
        out.append({"kernel": name, "unit": unit, "loop": loop.size, "per_unit": loop.size / per,
                    "mix": dict(ops.most_common(8))})
    return out


# ----------------------------------------------------------------------------- output


def _widths(d: dict) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in sorted(((int(b), n) for b, n in d.items()), reverse=True)) or "-"


def markdown(rows: list[dict]) -> str:
    head = ("| backend | arch | kernel | op | s | dtype | regs | stack | smem | local | LDG | STG | body | loops | "
            "hot loop | elems | instr/elem | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        hot = max((lp["size"] for lp in r["loops"] if lp["innermost"] and lp["stores"]), default=None)
        smem = r["shared_static"] if r["shared_dynamic"] is None else r["shared_dynamic"]
        per = "-" if r["per_element"] is None else f"{r['per_element']:.1f}" + ("*" if r["upper_bound"] else "")
        elems = "-" if r["elements"] is None else f"{r['elements']:g}/{'it' if r['per'] == 'iteration' else 'thr'}"
        lines.append(
            f"| {r['backend']} | sm_{r['arch']} | `{r['kernel']}` | {r['op'] or '-'} | {r['s'] or '-'} | "
            f"{r['dtype'] or '-'} | {r['registers']} | {r['stack']} | {smem} | {r['local_instructions']} | "
            f"{_widths(r['loads'])} | {_widths(r['stores'])} | {r['body']} | {len(r['loops'])} | "
            f"{hot if hot is not None else '-'} | {elems} | {per} | {r['note']} |")
    lines.append("")
    lines.append("instr/elem: SASS instructions per output element; * = the counted code has branches, loops or "
                 "calls, so the static count bounds the executed one from above. LDG/STG: count x width in bits.")
    return "\n".join(lines)


def collect(archs=(90, 80), ops=OPS, dtypes=DTYPES, cuda=True, triton=True, cuda_binary=None,
            jobs=None) -> list[dict]:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit, RELAYOPS_CUOBJDUMP, or the triton package)")
    rows: list[dict] = []
    if cuda:
        so = Path(cuda_binary) if cuda_binary else cuda_module()
        if so is None:
            raise RuntimeError("relayops/_C_cuda*.so is not built (python setup.py build_ext --inplace with nvcc)")
        for arch in archs:
            rows += cuda_rows(so, arch, cuobjdump)
    if triton:
        rows += triton_rows_subprocess(ops, dtypes, archs, cuobjdump, jobs)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="SM architecture (repeatable; default 90 and 80)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--cuda-binary", help="the CUDA kernels from this .so or cubin (default relayops/_C_cuda*.so)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--markdown", help="write the Markdown table here")
    ap.add_argument("--floors", action="store_true", help="count the minimal sequences of bench/floor_kernels.cu")
    ap.add_argument("--triton-rows", help=argparse.SUPPRESS)  # child process: Triton rows as JSON
    ap.add_argument("--cuobjdump", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=0, help="Triton compile processes (default: one per core)")
    a = ap.parse_args(argv)
    archs = a.arch or [90, 80]
    ops = [o for o in a.ops.split(",") if o]
    dtypes = [d for d in a.dtypes.split(",") if d]
    if a.floors:
        for f in floors(archs[0]):
            mix = ", ".join(f"{k} {v}" for k, v in f["mix"].items())
            print(f"{f['kernel']}: loop {f['loop']} instructions, {f['per_unit']:.2f} per {f['unit']} ({mix})")
        return 0
    if a.triton_rows:
        Path(a.triton_rows).write_text(json.dumps(triton_rows(ops, dtypes, archs, a.cuobjdump, a.jobs)))
        return 0
    rows = collect(archs, ops, dtypes, cuda=not a.no_cuda, triton=not a.no_triton, cuda_binary=a.cuda_binary,
                   jobs=a.jobs or None)
    table = markdown(rows)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
