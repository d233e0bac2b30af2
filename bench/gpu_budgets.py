"""The offline budgets of the GPU kernels: the one place they are written.

docs/gpu-model.md derives the floors and shows this table (``python bench/gpu_budgets.py``
prints it; tests/test_gpu_model.py checks that the page matches). tests/test_gpu_model.py measures
every kernel with bench/sass_report.py at sm_90 and fails when an enforced budget is exceeded.
All counts are SASS instructions per output element, float32, s = 4.
"""
from __future__ import annotations

ARCH = 90
DTYPE = "float32"
S = 4

# The instruction floor of each op's maths (docs/gpu-model.md, "Instruction floors"), with the
# revised random numbers (one Philox call per pair of elements, four normals).
FLOORS = {
    "patch_dct": 7.5,
    "patch_idct": 7.5,
    "patch_blur": 15.0,
    "block_noise": 7.5,
    "relay_noise": 68.0,
    "relay_corrupt": 83.0,
    "relay_step_euler": 84.5,
    "relay_step_heun": 88.5,
    "relay_step_second": 93.5,
}

# The fused noise ops may take this multiple of their floor.
NOISE_SLACK = 1.3

# CUDA: instructions per output element at most. The transforms have fixed targets; the noise
# ops NOISE_SLACK times their floor.
CUDA_INSTRUCTIONS = {
    "patch_dct": 16.0,
    "patch_idct": 16.0,
    "patch_blur": 24.0,
    "block_noise": 20.0,
    **{op: round(NOISE_SLACK * FLOORS[op], 1) for op in
       ("relay_noise", "relay_corrupt", "relay_step_euler", "relay_step_heun", "relay_step_second")},
}

# Triton: within this factor of the CUDA kernel's measured count (of the CUDA budget while the
# CUDA kernel is pending), and at most this many registers.
TRITON_RATIO = 1.5
TRITON_MAX_REGISTERS = 128

# Every kernel: no local-memory instructions (spills), and the image traffic in 128-bit accesses
# (float32, s = 4): every global store of the counted code 128 bits wide, and enough 128-bit loads
# to read each image input once.
MAX_LOCAL_INSTRUCTIONS = 0
WIDE_BITS = 128

# Image-sized inputs each op reads per output element (the outputs are one image).
IMAGE_INPUTS = {
    "patch_dct": 1, "patch_idct": 1, "patch_blur": 1, "block_noise": 1, "relay_noise": 0, "relay_corrupt": 1,
    "relay_step_euler": 2, "relay_step_heun": 4, "relay_step_second": 3,
}

# PENDING: budgets reported but not enforced, because the op's specialised kernel has not landed
# on this branch yet (main's kernels exceed them). When a new kernel merges, remove its
# (backend, op) pairs here; from then on the test fails whenever the kernel misses its budget.
PENDING: set[tuple[str, str]] = set()

OPS = tuple(FLOORS)
BACKENDS = ("cuda", "triton")


def instruction_budget(backend: str, op: str, cuda_measured: float | None = None) -> float:
    """Instructions per element ``op`` may take on ``backend``; Triton's follows the CUDA kernel's
    measured count where there is an enforced one."""
    if backend == "cuda":
        return CUDA_INSTRUCTIONS[op]
    base = cuda_measured if cuda_measured is not None and ("cuda", op) not in PENDING else CUDA_INSTRUCTIONS[op]
    return round(TRITON_RATIO * base, 1)


def markdown() -> str:
    """The budget table of docs/gpu-model.md."""
    lines = ["| op | floor | CUDA budget | Triton budget | status (CUDA / Triton) |", "|---|---|---|---|---|"]
    for op in OPS:
        status = " / ".join("pending" if (b, op) in PENDING else "enforced" for b in BACKENDS)
        lines.append(f"| {op} | {FLOORS[op]:g} | {CUDA_INSTRUCTIONS[op]:g} | "
                     f"{TRITON_RATIO:g} x CUDA (<= {instruction_budget('triton', op):g}) | {status} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
