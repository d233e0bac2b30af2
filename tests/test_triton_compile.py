"""The Triton kernels compile for real GPUs (sm_90, and sm_80) on a machine without one.

The interpreter tests (test_backends.py, test_triton.py) run the kernels' Python semantics; this compiles them
through Triton's real front end and code generator down to a cubin (ptxas ships with Triton),
catching what the interpreter would accept but the compiler would not. It runs in a subprocess
without TRITON_INTERPRET, because under the interpreter ``@triton.jit`` builds no compilable
function.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PTRS = ["x_ptr", "x0_ptr", "xp_ptr", "x0p_ptr", "x0b_ptr", "eps_ptr", "eps2_ptr"]
VECTOR_PTRS = ["factor_ptr", "corr_ptr", "gamma_ptr", "coef_ptr", "sigma_ptr", "sigma_next_ptr"]


def compile_kernels(arch: int, only_relay: bool = False) -> list[str]:
    """Compile a representative set of specialisations for ``sm_<arch>``; returns their names."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from relayops.triton import kernels

    target = GPUTarget("cuda", arch, 32)
    done = []

    def build(autotuned, types, constexprs, name):
        signature = {**types, **{k: "constexpr" for k in constexprs}}
        triton.compile(ASTSource(autotuned.fn, signature, constexprs), target=target, options={"num_warps": 4})
        done.append(f"sm_{arch} {name}")

    grid = {"n_patches": "i32", "Hp": "i32", "Wp": "i32"}
    if not only_relay:
        for s, dtype in ((4, "*fp32"), (8, "*bf16"), (3, "*fp16")):
            sp = max(2, triton.next_power_of_2(s))
            build(kernels.transform_kernel, {"src_ptr": dtype, "dst_ptr": dtype, **grid},
                  {"S": s, "SP": sp, "INVERSE": s == 8, "TILE": 512}, f"patch_transform s={s} {dtype}")
        for s in (2, 4):
            build(kernels.block_noise_kernel, {"g_ptr": "*fp32", "out_ptr": "*fp32", **grid},
                  {"S": s, "SP": s, "ADJOINT": s == 2, "TILE": 1024}, f"block_noise s={s}")
    relay = {**{p: "*fp32" for p in IMAGE_PTRS + VECTOR_PTRS}, "seeds_ptr": "*i64", "out_ptr": "*fp32",
             "n_patches": "i32", "C": "i32",
             "Hp": "i32", "Wp": "i32", "alpha": "fp32", "k": "fp32", "k0": "i64", "k1": "i32", "off0": "i32",
             "off1": "i32"}
    modes = {
        "relay_step heun, philox, per-sample seeds": dict(HAS_X=True, HAS_BLUR=True, HEUN=True, SECOND=False,
                                                          NOISE=1, HAS_BLOCK=True, PER_SAMPLE_SEEDS=True),
        "relay_step euler, philox": dict(HAS_X=True, HAS_BLUR=True, HEUN=False, SECOND=False, NOISE=1,
                                         HAS_BLOCK=True, PER_SAMPLE_SEEDS=False),
        "relay_step second order, philox": dict(HAS_X=True, HAS_BLUR=True, HEUN=False, SECOND=True, NOISE=1,
                                                HAS_BLOCK=True, PER_SAMPLE_SEEDS=False),
        "relay_corrupt, given noise": dict(HAS_X=False, HAS_BLUR=True, HEUN=False, SECOND=False, NOISE=2,
                                           HAS_BLOCK=True, PER_SAMPLE_SEEDS=False),
        "relay_noise, alpha 0": dict(HAS_X=False, HAS_BLUR=False, HEUN=False, SECOND=False, NOISE=1,
                                     HAS_BLOCK=False, PER_SAMPLE_SEEDS=False),
    }
    for name, flags in modes.items():
        build(kernels.relay_kernel, relay, {"S": 4, "SP": 4, "TILE": 1024, **flags}, name)
        if only_relay:
            break
    return done


def test_kernels_compile_for_gpu():
    """Every kernel for sm_90; the fused Heun relay kernel (the most involved) for sm_80 too.
    Nothing here is architecture-specific (no tensor cores, no TMA), so one arch covers most."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # this checkout's kernels, also where the environment has another relayops installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("compiled sm_90") == 10 and proc.stdout.count("compiled sm_80") == 1, proc.stdout


if __name__ == "__main__":
    for kernel_name in compile_kernels(90) + compile_kernels(80, only_relay=True):
        print("compiled", kernel_name)
