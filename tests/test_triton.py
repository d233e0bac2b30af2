"""Triton backend against the reference (float64, itself tested against SciPy) and against the
compiled CPU backend when it is built. Runs on CPU tensors under TRITON_INTERPRET=1 (set by
tests/conftest.py when there is no GPU) and on CUDA tensors where a GPU exists.

Shapes are small and chosen so that the tile of patches (256 elements under the interpreter:
64 patches of 2 x 2, 16 of 4 x 4, 4 of 8 x 8) does not divide the patch grid, so the last
program is masked. Fresh outputs are NaN-filled (RELAYOPS_NAN_FILL=1): a skipped element fails.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import relayops  # noqa: E402
from relayops import reference  # noqa: E402

if "triton" in relayops.available_backends():
    from relayops.triton.kernels import philox_words

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    "triton" not in relayops.available_backends() or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs a GPU or TRITON_INTERPRET=1 (set before relayops is imported)",
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
COMPILED = "cuda" if HAS_CUDA else "cpu"  # the compiled backend for DEVICE

# (B, C, H, W) per patch size: B = 1, C = 1, H = W = s, non-square, masked last tile.
SHAPES = {
    2: [(1, 1, 2, 2), (2, 3, 10, 14)],
    4: [(1, 1, 4, 4), (2, 3, 8, 12), (1, 2, 12, 4)],
    8: [(1, 1, 8, 8), (2, 1, 16, 24)],
}
CASES = [(s, shape) for s, shapes in SHAPES.items() for shape in shapes]
IDS = [f"s{s}-{'x'.join(map(str, shape))}" for s, shape in CASES]


def randn(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def uniform(b, low, high, seed=1):
    """A per-sample ``[B]`` float32 parameter with distinct values in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(b, generator=gen, dtype=torch.float64)).to(DEVICE, torch.float32)


def f64(t):
    return None if t is None else t.to(torch.float64)


def assert_close32(actual, expected64, tol=1e-5, what="result"):
    """A float32 kernel result against the float64 reference, relative to the result's scale."""
    assert actual.dtype == torch.float32 and actual.shape == expected64.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (an element was skipped?)"
    scale = max(1.0, expected64.abs().max().item())
    err = (actual.double() - expected64).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


# ----------------------------------------------------------------------------- Philox


@triton.jit(do_not_specialize=["k0", "k1", "off0", "off1"])
def _words_kernel(e_ptr, out_ptr, n, k0, k1, off0, off1, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    e = tl.load(e_ptr + i, mask=i < n, other=0)
    x0, x1, x2, x3 = philox_words(e, k0, k1, off0, off1)
    tl.store(out_ptr + 4 * i, x0.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=i < n)


def philox_words_triton(e: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """The kernels' Philox words ``[n, 4]`` (int64 holding uint32) at element indices e."""
    out = torch.full((e.numel(), 4), -1, dtype=torch.int64, device=e.device)
    m = 0xFFFFFFFF
    _words_kernel[(1,)](e, out, e.numel(), seed & m, seed >> 32, offset & m, offset >> 32,
                       BLOCK=triton.next_power_of_2(max(2, e.numel())))
    return out


def test_philox_known_answer():
    # Philox4x32-10, counter (0, 0, 0, 0), key (0, 0) (Salmon et al. 2011, Random123 KAT).
    words = philox_words_triton(torch.zeros(1, dtype=torch.int64, device=DEVICE), 0, 0)
    assert [hex(int(w)) for w in words[0]] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("seed, offset", [(0, 0), (12345, 7), (2**64 - 1, 2**40 + 3)])
def test_philox_words_match_reference(seed, offset):
    e = torch.tensor([0, 1, 2, 1000, 2**31 + 5, 2**33 + 17], dtype=torch.int64, device=DEVICE)
    m = 0xFFFFFFFF
    counter = (e & m, e >> 32, torch.full_like(e, offset & m), torch.full_like(e, offset >> 32))
    expected = torch.stack(reference.philox4x32(counter, (seed & m, seed >> 32)), dim=1)
    assert torch.equal(philox_words_triton(e, seed, offset), expected)


# ----------------------------------------------------------------------------- deterministic ops


@pytest.mark.parametrize("s, shape", CASES, ids=IDS)
def test_transforms_and_block_noise_match_reference(s, shape):
    x = randn(shape)
    for op in ("patch_dct", "patch_idct", "block_noise"):
        out = getattr(relayops, op)(x, s, backend="triton")
        assert_close32(out, getattr(reference, op)(f64(x), s), what=op)


@pytest.mark.parametrize("s, shape", CASES, ids=IDS)
def test_patch_blur_per_sample_matches_reference(s, shape):
    x = randn(shape)
    tau = uniform(shape[0], 0.05, 2.0)
    out = relayops.patch_blur(x, tau, s, backend="triton")
    assert_close32(out, reference.patch_blur(f64(x), f64(tau), s, 0.001))
    # a Python float tau is the same per-sample value for every sample
    out = relayops.patch_blur(x, 0.7, s, d_min=0.01, backend="triton")
    assert_close32(out, reference.patch_blur(f64(x), torch.full((shape[0],), 0.7, dtype=torch.float64,
                                                                 device=DEVICE), s, 0.01))


def test_dct_round_trip_and_blur_identity():
    x = randn((2, 3, 8, 12))
    assert_close32(relayops.patch_idct(relayops.patch_dct(x, backend="triton"), backend="triton"), f64(x))
    assert_close32(relayops.patch_blur(x, 0.0, backend="triton"), f64(x))


def test_s_not_power_of_two_and_large_s():
    # s = 3 and 16: the register tile is padded to a power of two and masked.
    for s, shape in ((3, (2, 1, 6, 9)), (16, (1, 1, 16, 32))):
        x = randn(shape)
        assert_close32(relayops.patch_dct(x, s, backend="triton"), reference.patch_dct(f64(x), s))
        assert_close32(relayops.block_noise(x, s, backend="triton"), reference.block_noise(f64(x), s))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_non_contiguous_inputs(layout):
    base = randn((2, 3, 8, 12))
    if layout == "transposed":
        x = randn((2, 3, 12, 8)).transpose(2, 3)
    elif layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    else:
        x = randn((2, 3, 8, 24))[..., ::2]
    assert not x.is_contiguous()
    tau = uniform(2, 0.1, 1.0)
    assert_close32(relayops.patch_blur(x, tau, backend="triton"), reference.patch_blur(f64(x), f64(tau), 4, 0.001))
    assert_close32(relayops.block_noise(x, backend="triton"), reference.block_noise(f64(x), 4))
    eps, eps2 = randn(x.shape, seed=3), randn((2, 3, 12, 8), seed=4).transpose(2, 3)
    out = relayops.relay_corrupt(x, 0.5, tau, eps=eps, eps2=eps2, backend="triton")
    assert_close32(out, reference.relay_corrupt(f64(x), torch.full((2,), 0.5, dtype=torch.float64, device=DEVICE),
                                                f64(tau), 4, 0.001, 0.15, relayops.ops.noise_scale(0.15, True),
                                                None, 0, f64(eps), f64(eps2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    """Half storage, float32 math: error at most 2x that of the same-precision reference."""
    x = randn((2, 3, 8, 16), dtype)
    tau = uniform(2, 0.1, 1.5)
    k = relayops.ops.noise_scale(0.15, True)
    checks = [
        (relayops.patch_blur(x, tau, backend="triton"), reference.patch_blur(x, tau, 4, 0.001),
         reference.patch_blur(f64(x), f64(tau), 4, 0.001)),
        (relayops.patch_dct(x, 8, backend="triton"), reference.patch_dct(x, 8), reference.patch_dct(f64(x), 8)),
        (relayops.block_noise(x, 2, backend="triton"), reference.block_noise(x, 2), reference.block_noise(f64(x), 2)),
        (relayops.relay_corrupt(x, tau * 2, tau, seed=8, backend="triton"),
         reference.relay_corrupt(x, tau * 2, tau, 4, 0.001, 0.15, k, 8, 0, None, None),
         reference.relay_corrupt(f64(x), f64(tau * 2), f64(tau), 4, 0.001, 0.15, k, 8, 0, None, None)),
    ]
    for out, ref_half, ref64 in checks:
        assert out.dtype == dtype
        err = (out.double() - ref64).abs().max().item()
        err_ref = (ref_half.double() - ref64).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, (err, err_ref)


def test_empty_batch():
    x = torch.empty((0, 3, 8, 8), device=DEVICE)
    assert relayops.patch_blur(x, 0.5, backend="triton").shape == x.shape
    assert relayops.relay_noise(x, seed=1, backend="triton").shape == x.shape


def test_unsupported_inputs_are_rejected():
    with pytest.raises(TypeError, match="triton"):
        relayops.patch_blur(randn((1, 1, 4, 4), torch.float64), 0.5, backend="triton")
    with pytest.raises(ValueError, match="triton"):
        relayops.patch_dct(randn((1, 1, 32, 32)), 32, backend="triton")


# ----------------------------------------------------------------------------- noise


def noise_args(alpha, normalize):
    return alpha, relayops.ops.noise_scale(alpha, normalize)


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**63 + 12345, 2**40 + 3)])
@pytest.mark.parametrize("s, shape", [(4, (2, 3, 8, 12)), (2, (1, 1, 2, 2)), (8, (2, 1, 16, 24))],
                         ids=["s4", "s2-tiny", "s8"])
def test_seeded_noise_streams_equal_reference(s, shape, seed, offset):
    """eps (stream 0) and block_noise(eps2) (stream 1) from the kernel's Philox equal the
    reference Philox + Box-Muller in float64 within 1e-5 (SPEC 4)."""
    like = torch.empty(shape, device=DEVICE)
    z0, z1 = reference.philox_normal_pair(shape, seed, offset, DEVICE, torch.float64)
    eps = relayops.relay_noise(like, s, alpha=0.0, normalize=False, seed=seed, offset=offset, backend="triton")
    assert_close32(eps, z0)
    mixed = relayops.relay_noise(like, s, alpha=1.0, normalize=False, seed=seed, offset=offset, backend="triton")
    assert_close32(mixed - eps, reference.block_noise(z1, s), tol=2e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_relay_noise_matches_reference(normalize):
    like = torch.empty((2, 3, 8, 12), device=DEVICE)
    alpha, k = noise_args(0.15, normalize)
    out = relayops.relay_noise(like, alpha=alpha, normalize=normalize, seed=99, offset=5, backend="triton")
    assert_close32(out, reference.relay_noise(f64(like), 4, alpha, k, 99, 5, None, None))
    eps, eps2 = randn(like.shape, seed=5), randn(like.shape, seed=6)
    out = relayops.relay_noise(like, alpha=alpha, normalize=normalize, eps=eps, eps2=eps2, backend="triton")
    assert_close32(out, reference.relay_noise(f64(like), 4, alpha, k, None, 0, f64(eps), f64(eps2)))
    # alpha = 0 needs no eps2
    out = relayops.relay_noise(like, alpha=0.0, eps=eps, backend="triton")
    assert_close32(out, f64(eps))


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "given-noise"])
@pytest.mark.parametrize("s, shape", [(4, (2, 3, 8, 12)), (2, (1, 1, 2, 2)), (8, (2, 1, 16, 24))],
                         ids=["s4", "s2-tiny", "s8"])
def test_relay_corrupt_matches_reference(s, shape, seeded):
    y = randn(shape)
    b = shape[0]
    sigma, tau = uniform(b, 0.01, 3.0, seed=2), uniform(b, 0.0, 2.0, seed=3)
    alpha, k = noise_args(0.15, False)
    eps = eps2 = None
    if not seeded:
        eps, eps2 = randn(shape, seed=7), randn(shape, seed=8)
    out = relayops.relay_corrupt(y, sigma, tau, s, normalize=False, seed=2**64 - 1 if seeded else None, offset=3,
                                 eps=eps, eps2=eps2, backend="triton")
    expected = reference.relay_corrupt(f64(y), f64(sigma), f64(tau), s, 0.001, alpha, k,
                                       2**64 - 1 if seeded else None, 3, f64(eps), f64(eps2))
    assert_close32(out, expected)


STEP_CASES = [(4, (2, 3, 8, 12)), (2, (2, 3, 10, 14)), (8, (1, 1, 8, 8))]


@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize("heun", [False, True], ids=["euler", "heun"])
@pytest.mark.parametrize("s, shape", STEP_CASES, ids=["s4", "s2", "s8-tiny"])
def test_relay_step_matches_reference(s, shape, heun, eta):
    b = shape[0]
    x, x0_hat = randn(shape, seed=10), randn(shape, seed=11)
    sigma, sigma_next = uniform(b, 1.0, 2.0, seed=4), uniform(b, 0.2, 0.9, seed=5)
    tau, tau_next = uniform(b, 0.5, 1.5, seed=6), uniform(b, 0.0, 0.4, seed=7)
    extra = {}
    if heun:
        extra = dict(x_prop=randn(shape, seed=12), x0_hat_prop=randn(shape, seed=13))
    alpha, k = noise_args(0.15, True)
    out = relayops.relay_step(x, x0_hat, sigma, sigma_next, tau, tau_next, eta=eta, s=s, seed=77, offset=2**33,
                              backend="triton", **extra)
    expected = reference.relay_step(f64(x), f64(x0_hat), f64(sigma), f64(sigma_next), f64(tau), f64(tau_next),
                                    eta, s, 0.001, alpha, k, 77, 2**33, None, None,
                                    **{key: f64(v) for key, v in extra.items()})
    assert_close32(out, expected)


def test_relay_step_given_noise_and_half():
    shape = (2, 3, 8, 12)
    x, x0_hat, eps, eps2 = (randn(shape, seed=i) for i in range(20, 24))
    args = (uniform(2, 1.0, 2.0), uniform(2, 0.2, 0.9, seed=3), uniform(2, 0.5, 1.5, seed=4), uniform(2, 0.0, 0.4))
    out = relayops.relay_step(x, x0_hat, *args, eps=eps, eps2=eps2, backend="triton")
    alpha, k = noise_args(0.15, True)
    expected = reference.relay_step(f64(x), f64(x0_hat), *map(f64, args), 0.2, 4, 0.001, alpha, k, None, 0,
                                    f64(eps), f64(eps2))
    assert_close32(out, expected)
    xh, x0h = x.to(torch.bfloat16), x0_hat.to(torch.bfloat16)
    out = relayops.relay_step(xh, x0h, *args, seed=5, backend="triton")
    ref_half = reference.relay_step(xh, x0h, *args, 0.2, 4, 0.001, alpha, k, 5, 0, None, None)
    ref64 = reference.relay_step(f64(xh), f64(x0h), *map(f64, args), 0.2, 4, 0.001, alpha, k, 5, 0, None, None)
    assert out.dtype == torch.bfloat16
    err, err_ref = ((t.double() - ref64).abs().max().item() for t in (out, ref_half))
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


# ----------------------------------------------------------------------------- other backends


@pytest.mark.skipif(COMPILED not in relayops.available_backends(), reason=f"compiled {COMPILED} backend not built")
def test_equal_to_compiled_backend():
    """Against the compiled backend for this device (cpu here, cuda on a GPU): seeded noise too."""
    shape = (2, 3, 8, 16)
    x, x0_hat = randn(shape), randn(shape, seed=1)
    sigma, tau = uniform(2, 0.5, 2.0), uniform(2, 0.1, 1.0, seed=2)
    for backend_call in (
        lambda be: relayops.patch_blur(x, tau, backend=be),
        lambda be: relayops.block_noise(x, 2, backend=be),
        lambda be: relayops.relay_noise(x, 8, seed=2**64 - 2, offset=9, backend=be),
        lambda be: relayops.relay_corrupt(x, sigma, tau, seed=3, backend=be),
        lambda be: relayops.relay_step(x, x0_hat, sigma, sigma * 0.5, tau, tau * 0.5, seed=4, offset=1, backend=be,
                                       x_prop=x0_hat, x0_hat_prop=x),
    ):
        assert_close32(backend_call("triton"), backend_call(COMPILED).double())


# ----------------------------------------------------------------------------- autograd


def test_patch_blur_gradients_match_reference():
    x = randn((2, 3, 8, 12)).requires_grad_()
    tau = uniform(2, 0.1, 1.2).requires_grad_()
    weight = randn((2, 3, 8, 12), seed=9)
    (relayops.patch_blur(x, tau, backend="triton") * weight).sum().backward()
    x64, tau64 = f64(x.detach()).requires_grad_(), f64(tau.detach()).requires_grad_()
    (reference.patch_blur(x64, tau64, 4, 0.001) * f64(weight)).sum().backward()
    assert_close32(x.grad, x64.grad)
    assert_close32(tau.grad, tau64.grad, tol=2e-5)


@pytest.mark.parametrize("op", ["patch_dct", "patch_idct", "block_noise"])
def test_linear_op_gradients_match_reference(op):
    s = 2 if op == "block_noise" else 4
    x = randn((2, 1, 8, 12)).requires_grad_()
    weight = randn((2, 1, 8, 12), seed=9)
    (getattr(relayops, op)(x, s, backend="triton") * weight).sum().backward()
    x64 = f64(x.detach()).requires_grad_()
    (getattr(reference, op)(x64, s) * f64(weight)).sum().backward()
    assert_close32(x.grad, x64.grad)


# Under TRITON_INTERPRET=1, torch's wrap_triton hands back the bare interpreted kernel, which
# cannot run on fake tensors: the fake-tensor and AOT checks (and torch.compile) need a GPU.
OPCHECK_UTILS = (None if HAS_CUDA else ("test_schema", "test_autograd_registration"))


def _opcheck(op, args):
    if OPCHECK_UTILS is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def test_opcheck_registered_ops():
    from relayops.triton import ops

    x = randn((2, 2, 4, 8))
    b = x.shape[0]
    tau, sigma = uniform(b, 0.1, 1.0), uniform(b, 0.5, 2.0, seed=3)
    _opcheck(ops.patch_transform, (x.clone().requires_grad_(), 4, False))
    _opcheck(ops.patch_blur_op, (x.clone().requires_grad_(), tau.clone().requires_grad_(), 4, 0.001))
    _opcheck(ops.block_noise_op, (x.clone().requires_grad_(), 2, False))
    _opcheck(ops.relay_noise_op, (x, 4, 0.15, 1.0, 1, 2, 3, 0, None, None))
    _opcheck(ops.relay_corrupt_op, (x, sigma, tau, 4, 0.001, 0.15, 1.0, 1, 2, 3, 0, None, None))
    _opcheck(ops.relay_step_op, (x, randn(x.shape, seed=1), sigma, sigma * 0.5, tau, tau * 0.5, 0.2, 4, 0.001,
                                 0.15, 1.0, 1, 2, 3, 0, None, None, x * 0.5, x * 0.25))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_torch_compile_fullgraph_through_triton_ops():
    x, x0_hat = randn((2, 3, 16, 16)), randn((2, 3, 16, 16), seed=1)
    sigma, tau = uniform(2, 0.5, 2.0), uniform(2, 0.1, 1.0, seed=2)

    def step(x, x0_hat, sigma, tau):
        y = relayops.patch_blur(x, tau, backend="triton")
        n = relayops.relay_corrupt(y, sigma, tau, seed=3, backend="triton")
        return relayops.relay_step(n, x0_hat, sigma, sigma * 0.5, tau, tau * 0.5, seed=4, offset=1, backend="triton")

    eager = step(x, x0_hat, sigma, tau)
    compiled = torch.compile(step, fullgraph=True)(x, x0_hat, sigma, tau)
    assert_close32(compiled, eager.double())


@pytest.mark.gpu
def test_torch_compile_backward_through_patch_blur():
    x = randn((2, 3, 16, 16)).requires_grad_()
    tau = uniform(2, 0.1, 1.0)
    f = torch.compile(lambda x: (relayops.patch_blur(x, tau, backend="triton") ** 2).sum(), fullgraph=True)
    f(x).backward()
    x64 = f64(x.detach()).requires_grad_()
    (reference.patch_blur(x64, f64(tau), 4, 0.001) ** 2).sum().backward()
    assert_close32(x.grad, x64.grad)


@pytest.mark.gpu
def test_automatic_choice_on_cuda_uses_a_kernel_backend():
    assert relayops.choose_backend(None, torch.device("cuda")) in ("cuda", "triton")


@pytest.mark.gpu
def test_larger_shapes_on_gpu():
    """Shapes that span many tiles of every autotune configuration."""
    x = randn((4, 3, 96, 160))
    tau = uniform(4, 0.1, 2.0)
    for s in (2, 4, 8):
        assert_close32(relayops.patch_blur(x, tau, s, backend="triton"),
                       reference.patch_blur(f64(x), f64(tau), s, 0.001))
        assert_close32(relayops.block_noise(x, s, backend="triton"), reference.block_noise(f64(x), s))
        like = torch.empty_like(x)
        assert_close32(relayops.relay_noise(like, s, seed=2**64 - 5, offset=11, backend="triton"),
                       reference.relay_noise(f64(like), s, 0.15, relayops.ops.noise_scale(0.15, True),
                                             2**64 - 5, 11, None, None))


def _grads(fn, tensors, weight):
    for t in tensors:
        t.grad = None
    (fn(*tensors) * weight).sum().backward()
    return [t.grad for t in tensors]


@pytest.mark.parametrize("heun", [False, True], ids=["euler", "heun"])
def test_relay_step_and_corrupt_gradients_match_reference(heun):
    """Gradients w.r.t. images and supplied noise (the ops are linear in them)."""
    shape = (2, 2, 8, 12)
    sigma, sigma_next = uniform(2, 1.0, 2.0), uniform(2, 0.2, 0.9, seed=3)
    tau, tau_next = uniform(2, 0.5, 1.5, seed=4), uniform(2, 0.0, 0.4, seed=5)
    alpha, k = noise_args(0.15, True)
    weight = randn(shape, seed=30)
    names = ["x", "x0_hat", "eps", "eps2"] + (["x_prop", "x0_hat_prop"] if heun else [])
    inputs32 = [randn(shape, seed=31 + i).requires_grad_() for i in range(len(names))]
    inputs64 = [f64(t.detach()).requires_grad_() for t in inputs32]

    def triton_step(x, x0, eps, eps2, *prop):
        return relayops.relay_step(x, x0, sigma, sigma_next, tau, tau_next, eps=eps, eps2=eps2, backend="triton",
                                   **dict(zip(["x_prop", "x0_hat_prop"], prop)))

    def reference_step(x, x0, eps, eps2, *prop):
        return reference.relay_step(x, x0, *map(f64, (sigma, sigma_next, tau, tau_next)), 0.2, 4, 0.001, alpha, k,
                                    None, 0, eps, eps2, *prop)

    got = _grads(triton_step, inputs32, weight)
    want = _grads(reference_step, inputs64, f64(weight))
    for name, g, g64 in zip(names, got, want):
        assert_close32(g, g64, what=f"grad {name}")

    y, eps, eps2 = inputs32[1], inputs32[2], inputs32[3]
    y64, eps64, eps264 = inputs64[1], inputs64[2], inputs64[3]
    got = _grads(lambda y, e, e2: relayops.relay_corrupt(y, sigma, tau, eps=e, eps2=e2, backend="triton"),
                 [y, eps, eps2], weight)
    want = _grads(lambda y, e, e2: reference.relay_corrupt(y, f64(sigma), f64(tau), 4, 0.001, alpha, k, None, 0, e, e2),
                  [y64, eps64, eps264], f64(weight))
    for g, g64 in zip(got, want):
        assert_close32(g, g64)


def test_parameter_gradients_of_relay_ops_raise():
    x = randn((1, 1, 4, 4))
    sigma = torch.tensor([0.5], device=DEVICE, requires_grad=True)
    out = relayops.relay_corrupt(x, sigma, 0.3, seed=1, backend="triton")
    with pytest.raises(RuntimeError, match="sigma/tau"):
        out.sum().backward()
