"""The compiled CPU backend (relayops._C, csrc/) against the reference backend (issue 3).

float32/float64 must match the reference within 1e-5 / 1e-10; float16/bfloat16 may be at most
2x as far from a float64 reference as the same-precision reference is. The reference itself is
tested against SciPy in tests/test_reference_*.py.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import relayops
import relayops.ops._compiled as compiled  # ImportError here means: run `python setup.py build_ext --inplace`

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (B, C, H, W, s): H = W = s, C = 1 / 4 / 16, non-square, s = 2, 3 (run-time s), 4, 8, 16.
SHAPES = [(1, 1, 4, 4, 4), (2, 3, 8, 12, 4), (1, 4, 16, 8, 8), (3, 16, 6, 4, 2), (2, 1, 9, 6, 3), (1, 2, 16, 32, 16)]


def _params(b, dtype, gen):
    """Per-sample sigma, sigma_next < sigma, tau, tau_next < tau, as [B] tensors (the public API's dtype)."""
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    sigma = (0.2 + torch.rand(b, generator=gen, dtype=torch.float64)).to(pdt)
    tau = (0.1 + 2 * torch.rand(b, generator=gen, dtype=torch.float64)).to(pdt)
    return sigma, 0.6 * sigma, tau, 0.5 * tau


def _inputs(shape, dtype, seed=0):
    b, c, h, w, s = shape
    gen = torch.Generator().manual_seed(seed)
    t = [torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype) for _ in range(6)]
    return t, _params(b, dtype, gen), s


# Each op: a function (tensors, params, s, backend) -> output. Seeds span the 64-bit range.
OPS = {
    "patch_dct": lambda t, p, s, be: relayops.patch_dct(t[0], s, backend=be),
    "patch_idct": lambda t, p, s, be: relayops.patch_idct(t[0], s, backend=be),
    "patch_blur": lambda t, p, s, be: relayops.patch_blur(t[0], p[2], s, backend=be),
    "block_noise": lambda t, p, s, be: relayops.block_noise(t[0], s, backend=be),
    "relay_noise_seeded": lambda t, p, s, be: relayops.relay_noise(t[0], s, seed=2**64 - 3, offset=2**33 + 5, backend=be),
    "relay_noise_given": lambda t, p, s, be: relayops.relay_noise(t[0], s, alpha=0.3, normalize=False, eps=t[1], eps2=t[2], backend=be),
    "relay_corrupt_seeded": lambda t, p, s, be: relayops.relay_corrupt(t[0], p[0], p[2], s, seed=12345, offset=1, backend=be),
    "relay_corrupt_given": lambda t, p, s, be: relayops.relay_corrupt(t[0], p[0], p[2], s, eps=t[1], eps2=t[2], backend=be),
    "euler_seeded": lambda t, p, s, be: relayops.relay_step(t[0], t[1], p[0], p[1], p[2], p[3], s=s, seed=2**63 + 1, offset=4, backend=be),
    "euler_eta0": lambda t, p, s, be: relayops.relay_step(t[0], t[1], p[0], p[1], p[2], p[3], eta=0.0, s=s, backend=be),
    "heun_given": lambda t, p, s, be: relayops.relay_step(t[0], t[1], p[0], p[1], p[2], p[3], s=s, eps=t[2], eps2=t[3],
                                                          x_prop=t[4], x0_hat_prop=t[5], backend=be),
    "heun_seeded_alpha0": lambda t, p, s, be: relayops.relay_step(t[0], t[1], p[0], p[1], p[2], p[3], eta=0.5, s=s, alpha=0.0,
                                                                  seed=7, x_prop=t[4], x0_hat_prop=t[5], backend=be),
}


def _check_close(op, tensors, params, s, dtype):
    out = op(tensors, params, s, "cpu")
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert not torch.isnan(out).any(), "the kernel left an output element unwritten"
    ref = op(tensors, params, s, "reference")
    if dtype in (torch.float32, torch.float64):
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)
        return
    # Half types: compare both with the float64 reference on the same (rounded) inputs.
    exact = op([t.double() for t in tensors], [p.double() for p in params], s, "reference")
    err_cpu = (out.double() - exact).abs().max().item()
    err_ref = (ref.double() - exact).abs().max().item()
    assert err_cpu <= 2 * err_ref + 1e-6, (err_cpu, err_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("name", list(OPS))
def test_matches_reference(name, shape, dtype):
    tensors, params, s = _inputs(shape, dtype)
    _check_close(OPS[name], tensors, params, s, dtype)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    # non-contiguous: every other column of a tensor twice as wide
    wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("channels_last", "strided"))
@pytest.mark.parametrize("name", list(OPS))
def test_layouts(name, layout, dtype):
    """channels_last and strided inputs are read in place and give the same numbers."""
    tensors, params, s = _inputs((2, 3, 8, 12, 4), dtype, seed=1)
    tensors = [_layout(t, layout) for t in tensors]
    assert not tensors[0].is_contiguous()
    _check_close(OPS[name], tensors, params, s, dtype)
    if layout == "channels_last":  # the output keeps the memory format (empty_like)
        assert OPS[name](tensors, params, s, "cpu").is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("s", (2, 3, 4, 8))
@pytest.mark.parametrize("name", [n for n in OPS if "noise" in n or "corrupt" in n or n.startswith(("euler_s", "heun"))])
def test_patchwise_noise_matches_reference(name, s, monkeypatch):
    """The CUDA kernels' per-patch window noise (run on the CPU here) equals the reference's."""
    monkeypatch.setattr(compiled, "CPU_PATCHWISE", True)
    tensors, params, _ = _inputs((2, 3, 2 * s, 3 * s, s), torch.float32, seed=2)
    _check_close(OPS[name], tensors, params, s, torch.float32)


def test_large_patch_falls_back_to_reference():
    x = torch.randn(1, 1, 32, 32)
    tau = torch.tensor([0.4])
    torch.testing.assert_close(relayops.patch_blur(x, tau, 32, backend="cpu"), relayops.patch_blur(x, tau, 32, backend="reference"))


@pytest.mark.parametrize("name", ["patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise_given",
                                  "relay_corrupt_given", "euler_seeded", "heun_given"])
def test_gradients_match_reference(name):
    """Backward formulas (adjoints) against autograd through the plain-PyTorch reference, float64."""
    tensors, params, s = _inputs((2, 2, 8, 8, 4), torch.float64, seed=3)
    grads = {}
    for be in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = OPS[name](leaves, params, s, be)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * weight).sum().backward()
        grads[be] = [None if t.grad is None else t.grad for t in leaves]
    for g_cpu, g_ref in zip(grads["cpu"], grads["reference"]):
        assert (g_cpu is None) == (g_ref is None)
        if g_cpu is not None:
            torch.testing.assert_close(g_cpu, g_ref, atol=1e-10, rtol=0)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(4)
    x, x0, xp, x0p, e1, e2 = (torch.randn(2, 3, 8, 4, generator=gen, dtype=torch.float64) for _ in range(6))
    sig, sig_n, tau, tau_n = _params(2, torch.float64, gen)
    ops = torch.ops.relayops
    return {
        "patch_dct": (ops.patch_dct, (x, 4)),
        "patch_idct": (ops.patch_idct, (x, 2)),
        "patch_blur": (ops.patch_blur, (x, tau, 4, 0.001)),
        "box_sum": (ops.box_sum, (x, 4, False)),
        "box_sum_adjoint": (ops.box_sum, (x, 4, True)),
        "relay_noise_drawn": (ops.relay_noise, (x, 4, 0.15, 0.9, -5, 3, None, None)),
        "relay_noise_given": (ops.relay_noise, (x, 4, 0.15, 0.9, 0, 0, e1, e2)),
        "relay_corrupt": (ops.relay_corrupt, (x, sig, tau, 4, 0.001, 0.15, 1.0, 0, 0, e1, e2)),
        "relay_step_euler": (ops.relay_step, (x, x0, sig, sig_n, tau, tau_n, 0.2, 4, 0.001, 0.15, 1.0, 11, 2,
                                              None, None, None, None)),
        "relay_step_heun": (ops.relay_step, (x, x0, sig, sig_n, tau, tau_n, 0.2, 4, 0.001, 0.15, 1.0, 0, 0,
                                             e1, e2, xp, x0p)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """A training-corruption-then-sampler-step function compiles as one graph on the compiled ops."""
    gen = torch.Generator().manual_seed(5)
    y, x0 = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2))
    sigma, sigma_next, tau, tau_next = _params(2, torch.float32, gen)

    def f(y, x0, backend):
        xt = relayops.relay_corrupt(y, sigma, tau, seed=1, offset=0, backend=backend)
        xb = relayops.patch_blur(xt, tau_next, backend=backend)
        return relayops.relay_step(xb, x0, sigma, sigma_next, tau, tau_next, seed=1, offset=2, backend=backend)

    torch._dynamo.reset()
    compiled_f = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled_f(y, x0, "cpu"), f(y, x0, "reference"), atol=1e-5, rtol=0)


def test_cuda_module_built_when_nvcc_is_present():
    """With nvcc on PATH (and RELAYOPS_CUDA not 0) the build must have produced relayops._C_cuda."""
    if shutil.which("nvcc") is None or os.environ.get("RELAYOPS_CUDA") == "0":
        pytest.skip("no nvcc on PATH (or RELAYOPS_CUDA=0): the CUDA module is not expected")
    import relayops._C_cuda  # noqa: F401  (fails: rebuild with `python setup.py build_ext --inplace`)
    assert "cuda" in relayops.available_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_matches_reference(name, dtype):
    """The CUDA kernels against the reference on CUDA tensors (runs only with a GPU)."""
    tensors, params, s = _inputs((2, 3, 8, 12, 4), dtype, seed=6)
    tensors = [t.cuda() for t in tensors]
    params = [p.cuda() for p in params]
    out = OPS[name](tensors, params, s, "cuda")
    ref = OPS[name](tensors, params, s, "reference")
    assert not torch.isnan(out).any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:
        exact = OPS[name]([t.double() for t in tensors], [p.double() for p in params], s, "reference")
        assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6


SEEDED = ["relay_noise_seeded", "relay_corrupt_seeded", "euler_seeded", "heun_seeded_alpha0"]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", SEEDED)
def test_seeded_noise_wide_rows(name, dtype):
    """Rows wider than one SIMD batch of Philox counters (64 on AVX-512) plus a scalar tail (76 = 64 + 12)."""
    tensors, params, s = _inputs((2, 2, 8, 76, 4), dtype, seed=7)
    _check_close(OPS[name], tensors, params, s, dtype)


_ISA_SCRIPT = """
import torch, relayops
x = torch.randn(2, 3, 8, 76)  # AVX2: 2 batches of 32 counters + a tail of 12
for seed, offset in ((5, 0), (2**64 - 1, 2**40 + 3)):
    a = relayops.relay_noise(x, seed=seed, offset=offset, backend="cpu")
    b = relayops.relay_noise(x, seed=seed, offset=offset, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
print("ok")
"""


@pytest.mark.parametrize("isa", ("scalar", "avx2"))
def test_seeded_noise_other_philox_paths(isa):
    """The scalar and AVX2 Philox row loops (the AVX-512 one runs in the other tests where the CPU has it)."""
    import subprocess
    import sys
    env = dict(os.environ, RELAYOPS_CPU_PHILOX=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
