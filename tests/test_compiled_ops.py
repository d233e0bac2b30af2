"""What only the compiled kernels (csrc/) have: the CUDA kernels' per-patch window noise run on
the CPU, the Philox row loops of each instruction set, rows wider than one SIMD batch, and the
build of the CUDA module. Every op case, gradient, error, opcheck and torch.compile check runs
on the compiled backends in the shared matrix (test_backends.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import relayops
import relayops.ops._compiled as compiled  # ImportError here means: run `python setup.py build_ext --inplace`

from compare import assert_close, scale_of

PER_SAMPLE_SEEDS = [2**64 - 1, 5]


def _noise_calls(s: int):
    """Seeded noise through each op that draws it, for a batch of 2 with patch size s:
    ``call(x, backend, seed)`` with an int seed or per-sample seeds."""
    gen = torch.Generator().manual_seed(s)
    sigma, tau = (0.2 + torch.rand(2, generator=gen, dtype=torch.float64) for _ in range(2))

    def params(x):
        return sigma.to(x.dtype), tau.to(x.dtype)

    return {
        "relay_noise": lambda x, be, seed: relayops.relay_noise(x, s, seed=seed, offset=2**33 + 5, backend=be),
        "relay_corrupt": lambda x, be, seed: relayops.relay_corrupt(x, *params(x), s, seed=seed, offset=1, backend=be),
        "relay_step_heun": lambda x, be, seed: relayops.relay_step(
            x, x.flip(-1), params(x)[0], 0.5 * params(x)[0], params(x)[1], 0.5 * params(x)[1], s=s, seed=seed,
            offset=4, x_prop=0.5 * x, x0_hat_prop=x.flip(-2), backend=be),
    }


def _check(call, x, seed):
    """The cpu backend against the float64 reference on the same inputs."""
    ref = call(x.double(), "reference", seed)
    tol = 1e-5 if x.dtype == torch.float32 else 1e-10
    assert_close(call(x, "cpu", seed), ref, atol=tol * scale_of(ref))


@pytest.mark.parametrize("s", (2, 3, 4, 8))
@pytest.mark.parametrize("per_sample", (False, True), ids=("int-seed", "per-sample-seeds"))
@pytest.mark.parametrize("name", ("relay_noise", "relay_corrupt", "relay_step_heun"))
def test_patchwise_noise_matches_reference(name, per_sample, s, monkeypatch):
    """The CUDA kernels' per-patch window noise (patch_noise_window, run on the CPU here) equals the reference's."""
    monkeypatch.setattr(compiled, "CPU_PATCHWISE", True)
    x = torch.randn(2, 3, 2 * s, 3 * s, generator=torch.Generator().manual_seed(2))
    _check(_noise_calls(s)[name], x, PER_SAMPLE_SEEDS if per_sample else 12345)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("per_sample", (False, True), ids=("int-seed", "per-sample-seeds"))
@pytest.mark.parametrize("name", ("relay_noise", "relay_corrupt", "relay_step_heun"))
def test_seeded_noise_wide_rows(name, per_sample, dtype):
    """Rows wider than one SIMD batch of Philox counters (64 on AVX-512) plus a scalar tail (76 = 64 + 12)."""
    x = torch.randn(2, 2, 8, 76, generator=torch.Generator().manual_seed(7), dtype=dtype)
    _check(_noise_calls(4)[name], x, PER_SAMPLE_SEEDS if per_sample else 2**63 + 1)


_ISA_SCRIPT = """
import torch, relayops
x = torch.randn(2, 3, 8, 76)  # AVX2: 2 batches of 32 counters + a tail of 12
for seed, offset in ((5, 0), (2**64 - 1, 2**40 + 3), ([7, 2**64 - 2], 9)):
    a = relayops.relay_noise(x, seed=seed, offset=offset, backend="cpu")
    b = relayops.relay_noise(x, seed=seed, offset=offset, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
print("ok")
"""


@pytest.mark.parametrize("isa", ("scalar", "avx2"))
def test_seeded_noise_other_philox_paths(isa):
    """The scalar and AVX2 Philox row loops (the best one the CPU has runs in the other tests)."""
    env = dict(os.environ, RELAYOPS_CPU_PHILOX=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_codes_come_from_the_compiled_module():
    """Op-mode and dtype codes are the C++ enums exposed by relayops._C, not a copy: every mode
    is named after an op of the contract, and every storage dtype maps to the enum of its name."""
    from relayops.ops._library import OPS

    assert set(compiled.Mode.__members__) <= set(OPS) and compiled.Mode is relayops._C.Mode
    assert {str(dt).removeprefix("torch."): code.name for dt, code in compiled.DTYPE_CODES.items()} == {
        name: name for name in ("float32", "float64", "float16", "bfloat16")}


def test_cuda_module_built_when_nvcc_is_present():
    """With nvcc on PATH (and RELAYOPS_CUDA not 0) the build must have produced relayops._C_cuda."""
    if shutil.which("nvcc") is None or os.environ.get("RELAYOPS_CUDA") == "0":
        pytest.skip("no nvcc on PATH (or RELAYOPS_CUDA=0): the CUDA module is not expected")
    import relayops._C_cuda  # noqa: F401  (fails: rebuild with `python setup.py build_ext --inplace`)
    assert "cuda" in relayops.available_backends()
