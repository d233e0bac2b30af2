"""What only the compiled kernels (csrc/) have: the CUDA kernels' thread blocks (tile.h) run on
the CPU by emulation, on shapes that exercise their tiles, halos and wraparound (and on the GPU
where there is one), rows wider than one SIMD batch, and the build of the CUDA module. Every op
case, gradient, error, opcheck and torch.compile check runs on the compiled backends in the shared
matrix (test_backends.py); each instruction-set path of the CPU kernels is tested in test_cpu_isa.py.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import relayops
import relayops.ops._compiled as compiled  # ImportError here means: run `python setup.py build_ext --inplace`

import test_backends as matrix
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


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' tiles. Tiles are about 32 x 64 pixels (32 x 32 for float64), multiples of s:
# these shapes have H = W = s (the noise window wraps around the whole image more than once),
# images smaller than a tile, H != W, tiles that do not divide H or W, several tiles whose halos
# cross tile borders and wrap around both edges, B and C > 1, and s from 1 to 16.
TILE_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 3, 3, 3), (1, 2, 16, 16, 16), (2, 2, 10, 15, 5), (1, 1, 40, 72, 4),
               (1, 1, 4, 136, 4), (1, 1, 39, 69, 3), (2, 1, 48, 96, 8), (1, 1, 64, 80, 16), (1, 2, 36, 66, 2)]

_TILE_TARGETS = ["emulated"] + (["cuda"] if torch.cuda.is_available() and "cuda" in relayops.available_backends()
                                else [])


@pytest.fixture(params=_TILE_TARGETS)
def tile_target(request, monkeypatch):
    """(backend, device) running the CUDA kernels' tile phases: the "cpu" backend emulating the
    thread blocks (relayops.ops._compiled.CPU_EMULATE_CUDA_TILES), or "cuda" on a GPU."""
    if request.param == "cuda":
        yield "cuda", "cuda"
        return
    calls = []
    run = compiled._C.run

    def spy(*args):
        calls.append(args[-1])
        return run(*args)

    monkeypatch.setattr(compiled, "CPU_EMULATE_CUDA_TILES", True)
    monkeypatch.setattr(compiled._C, "run", spy)
    yield "cpu", "cpu"
    assert calls and all(calls), "the cpu backend did not run the tile emulation"


@pytest.mark.parametrize("dtype", matrix.DTYPES, ids=str)
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=matrix._shape_id)
@pytest.mark.parametrize("name", list(matrix.CASES))
def test_tiles_values(tile_target, name, shape, dtype):
    """Every case of the shared matrix against the float64 reference."""
    inputs, exact = matrix.make_inputs(shape, dtype, tile_target[1])
    matrix.check_case(name, tile_target, inputs, exact, shape[4], dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("channels_last", "strided"))
@pytest.mark.parametrize("name", list(matrix.CASES))
def test_tiles_layouts(tile_target, name, layout, dtype):
    """channels_last and strided inputs on several tiles (the tiles' loads are then not contiguous)."""
    inputs, exact = matrix.make_inputs((2, 3, 40, 72, 4), dtype, tile_target[1], seed=1)
    inputs = {n: matrix.relayout(v, layout) if n in matrix.IMAGES else v for n, v in inputs.items()}
    out = matrix.check_case(name, tile_target, inputs, exact, 4, dtype)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=matrix._shape_id)
@pytest.mark.parametrize("name", ("block_noise", "relay_noise_given"))
def test_tiles_adjoint_block_noise(tile_target, name, shape):
    """Gradients w.r.t. g and eps2 run the adjoint box sum (its window on the other side of the
    tile): against the reference's autograd in float64."""
    backend, device = tile_target
    call, names = matrix.CASES[name]
    s = shape[4]
    inputs, exact = matrix.make_inputs(shape, torch.float64, device, seed=3)
    weight = torch.randn(shape[:4], generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    got = matrix._gradients(lambda t, _s, be: call(t, s, be), inputs, names, backend, weight)
    want = matrix._gradients(lambda t, _s, be: call(t, s, be), exact, names, "reference", weight)
    for n in names:
        assert_close(got[n], want[n], atol=1e-10 * scale_of(want[n]), what=f"{name}: gradient w.r.t. {n}")


@pytest.mark.parametrize("name", matrix.SEEDED_LIST)
def test_tiles_per_sample_seeds(tile_target, name):
    """A sample's noise with per-sample seeds is, bit for bit, its noise drawn alone."""
    matrix.test_per_sample_seeds_draw_what_each_sample_draws_alone(tile_target, name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("per_sample", (False, True), ids=("int-seed", "per-sample-seeds"))
@pytest.mark.parametrize("name", ("relay_noise", "relay_corrupt", "relay_step_heun"))
def test_seeded_noise_wide_rows(name, per_sample, dtype):
    """Rows wider than one SIMD batch of Philox counters (64 on AVX-512) plus a scalar tail (76 = 64 + 12)."""
    x = torch.randn(2, 2, 8, 76, generator=torch.Generator().manual_seed(7), dtype=dtype)
    _check(_noise_calls(4)[name], x, PER_SAMPLE_SEEDS if per_sample else 2**63 + 1)


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
