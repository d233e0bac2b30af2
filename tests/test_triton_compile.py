"""The Triton kernels compile for real GPUs (sm_90, and sm_80) on a machine without one, within
their register budget and without a stack.

The interpreter tests (test_backends.py, test_triton.py) run the kernels' Python semantics; this compiles them
through Triton's real front end and code generator down to cubins (ptxas and cuobjdump ship with
Triton), catching what the interpreter would accept but the compiler would not, and reads each
cubin's resource usage. It runs in a subprocess without TRITON_INTERPRET, because under the
interpreter ``@triton.jit`` builds no compilable function.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"n_planes": "i32", "C": "i32", "Hp": "i32", "Wp": "i32", "n_qblocks": "i32", "plane_start": "i32"}
SCALARS = {"alpha": "fp32", "k": "fp32", "k0": "i32", "k1": "i32", "off0": "i32", "off1": "i32"}
STEP_IMAGES = ["x_ptr", "x0_ptr", "xp_ptr", "x0p_ptr", "x0b_ptr", "eps_ptr", "eps2_ptr"]
STEP_VECTORS = ["factor_ptr", "corr_ptr", "gamma_ptr", "coef_ptr", "sigma_ptr", "sigma_next_ptr"]


def specialisations():
    """(name, kernel, argument types, constexprs): every op kernel at s = 4 float32, other sizes
    and dtypes for the transforms and block noise, every relay_step variant."""
    from relayops.triton import kernels as k

    layout = dict(BLOCK_Q=128, PLANES=1)
    out = []
    for s, dt in ((4, "*fp32"), (2, "*bf16"), (3, "*fp16")):
        out.append((f"patch_dct s={s} {dt}", k.patch_dct_kernel, {"src_ptr": dt, "dst_ptr": dt, **LAYOUT},
                    dict(S=s, INVERSE=s == 2, ROWS=2, **layout)))
        out.append((f"block_noise s={s} {dt}", k.block_noise_kernel, {"g_ptr": dt, "out_ptr": dt, **LAYOUT},
                    dict(S=s, ADJOINT=s == 2, ROWS=8, **layout)))
    out.append(("patch_blur s=4 *fp32", k.patch_blur_kernel,
                {"x_ptr": "*fp32", "factor_ptr": "*fp32", "out_ptr": "*fp32", **LAYOUT}, dict(S=4, ROWS=2, **layout)))
    noise = {"eps_ptr": "*fp32", "eps2_ptr": "*fp32", "seeds_ptr": "*i64", "out_ptr": "*fp32", **LAYOUT, **SCALARS}
    for block in (False, True):
        out.append((f"relay_noise drawn, block {block}, per-sample seeds", k.relay_noise_kernel, noise,
                    dict(S=4, ROWS=8, NOISE=1, HAS_BLOCK=block, PER_SAMPLE_SEEDS=block, **layout)))
    corrupt = {"y_ptr": "*bf16", "eps_ptr": "*bf16", "eps2_ptr": "*bf16", "factor_ptr": "*fp32",
               "sigma_ptr": "*fp32", "seeds_ptr": "*i64", "out_ptr": "*bf16", **LAYOUT, **SCALARS}
    out.append(("relay_corrupt given, bf16", k.relay_corrupt_kernel, corrupt,
                dict(S=4, ROWS=8, NOISE=2, HAS_BLOCK=True, PER_SAMPLE_SEEDS=False, **layout)))
    step = {**{p: "*fp32" for p in STEP_IMAGES + STEP_VECTORS}, "seeds_ptr": "*i64", "out_ptr": "*fp32", **LAYOUT,
            **SCALARS}
    for name, flags in {"euler": {}, "heun": dict(HEUN=True), "second order": dict(SECOND=True)}.items():
        flags = dict(HEUN=False, SECOND=False) | flags
        out.append((f"relay_step {name}, drawn", k.relay_step_kernel, step,
                    dict(S=4, ROWS=8, NOISE=1, HAS_BLOCK=True, PER_SAMPLE_SEEDS=False, **flags, **layout)))
    out.append(("relay_step heun, per-sample seeds, 32 lanes", k.relay_step_kernel, step,
                dict(S=4, ROWS=8, NOISE=1, HAS_BLOCK=True, PER_SAMPLE_SEEDS=True, HEUN=True, SECOND=False,
                     BLOCK_Q=32, PLANES=1)))
    return out


def compile_kernel(kernel, types, constexprs, arch: int):
    """The cubin of one specialisation for ``sm_<arch>``, compiled as a launch would: 4 warps,
    the backend's register cap, pointers 16-byte aligned (as PyTorch allocates them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from relayops.triton.ops import MAX_REGISTERS

    names = kernel.arg_names
    signature = {**types, **{n: "constexpr" for n in constexprs}}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t.startswith("*")}
    warps = max(1, min(4, constexprs["BLOCK_Q"] * constexprs["PLANES"] // 32))
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "maxnreg": MAX_REGISTERS})
    return compiled.asm["cubin"]


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin's kernel, from the cuobjdump inside the Triton package."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(m[1]), int(m[2])


def test_kernels_compile_for_gpu():
    """Every specialisation for sm_90, the fused Heun step for sm_80 too: at most 128 registers and
    no stack (no spills). Nothing is architecture-specific (no tensor cores, no TMA)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # this checkout's kernels, also where the environment has another relayops installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert len(lines) == len(specialisations()) + 1, proc.stdout
    for line in lines:
        regs, stack = map(int, re.search(r"registers (\d+) stack (\d+)", line).groups())
        assert regs <= 128 and stack == 0, line


if __name__ == "__main__":
    runs = [(name, kernel, types, c, 90) for name, kernel, types, c in specialisations()]
    runs += [(name, kernel, types, c, 80) for name, kernel, types, c in specialisations()
             if name == "relay_step heun, drawn"]
    for name, kernel, types, constexprs, arch in runs:
        regs, stack = resource_usage(compile_kernel(kernel, types, constexprs, arch))
        print(f"compiled sm_{arch} {name}: registers {regs} stack {stack}", flush=True)
