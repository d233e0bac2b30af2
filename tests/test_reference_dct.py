"""Patch DCT and patch-wise blurring (SPEC 1, 2) against SciPy, in float64."""
import numpy as np
import pytest
import torch

import relayops
import scipy_reference as ref

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in relayops.available_backends()]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("s", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 8, 16), (1, 1, 8, 8), (3, 2, 16, 8)])
def test_patch_dct_matches_scipy(backend, s, shape):
    x = torch.randn(shape, dtype=torch.float64)
    u = relayops.patch_dct(x, s, backend=backend)
    np.testing.assert_allclose(u.numpy(), ref.patch_dct(x.numpy(), s), atol=1e-12, rtol=0)
    back = relayops.patch_idct(u, s, backend=backend)
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_patch_idct_matches_scipy(backend, s):
    u = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    x = relayops.patch_idct(u, s, backend=backend)
    np.testing.assert_allclose(x.numpy(), ref.patch_idct(u.numpy(), s), atol=1e-12, rtol=0)


def test_dct_matrix_is_scipy_dct_along_one_axis():
    from scipy.fft import dct
    for s in (1, 2, 3, 4, 8):
        m = relayops.reference.dct_matrix(s).numpy()
        np.testing.assert_allclose(m, dct(np.eye(s), type=2, norm="ortho", axis=0), atol=1e-14)
        np.testing.assert_allclose(m @ m.T, np.eye(s), atol=1e-14)


def test_float32_close_to_float64(backend):
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    u32 = relayops.patch_dct(x.float(), 4, backend=backend)
    assert u32.dtype == torch.float32
    np.testing.assert_allclose(u32.double().numpy(), ref.patch_dct(x.numpy(), 4), atol=1e-5)


def test_blur_response_formula_and_shape():
    tau = torch.tensor([[0.0, 0.3], [1.0, 4.5]], dtype=torch.float64)
    d = relayops.blur_response(tau, s=4)
    assert d.shape == (2, 2, 4, 4) and d.dtype == torch.float64
    for idx in np.ndindex(2, 2):
        np.testing.assert_allclose(d[idx].numpy(), ref.response(float(tau[idx]), 4), rtol=1e-14)
    assert torch.all(d[..., 0, 0] == 1.0)
    assert torch.all(relayops.blur_response(0.0, s=8) == 1.0)
    # d_min is the floor reached for infinite time
    np.testing.assert_allclose(relayops.blur_response(1e6, s=4, d_min=0.01)[1:, 1:].numpy(), 0.01)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_patch_blur_matches_dct_domain(backend, s):
    x = torch.randn(3, 2, 16, 24, dtype=torch.float64)
    taus = torch.tensor([0.0, 0.37, 2.5], dtype=torch.float64)
    out = relayops.patch_blur(x, taus, s, backend=backend)
    np.testing.assert_allclose(out.numpy(), ref.patch_blur(x.numpy(), taus.numpy(), s), atol=1e-12)
    # a scalar tau is the same as a constant per-sample tau
    out_scalar = relayops.patch_blur(x, 0.37, s, backend=backend)
    np.testing.assert_allclose(out_scalar.numpy(), ref.patch_blur(x.numpy(), [0.37] * 3, s), atol=1e-12)


def test_patch_blur_identity_and_means(backend):
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(relayops.patch_blur(x, 0.0, backend=backend), x, atol=1e-13, rtol=0)
    y = relayops.patch_blur(x, torch.tensor([0.8, 50.0], dtype=torch.float64), backend=backend)
    mean = lambda t: t.reshape(2, 3, 2, 4, 3, 4).mean(dim=(3, 5))  # noqa: E731
    torch.testing.assert_close(mean(y), mean(x), atol=1e-13, rtol=0)
    # a very long dissipation leaves (nearly) the patch mean: only d_min of the rest survives
    flat = mean(x).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert (y[1] - flat[1]).abs().max() <= 0.001 * (x[1] - flat[1]).abs().max() * 4 + 1e-12


def test_patch_blur_is_self_adjoint(backend):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tau = torch.tensor([0.2, 1.3], dtype=torch.float64)
    lhs = (relayops.patch_blur(x, tau, backend=backend) * y).sum()
    rhs = (x * relayops.patch_blur(y, tau, backend=backend)).sum()
    assert abs(float(lhs - rhs)) < 1e-11


def test_patch_blur_gradcheck(backend):
    x = torch.randn(2, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.3, 1.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: relayops.patch_blur(t, tau, backend=backend), (x,))
    g = torch.randn_like(x)
    (relayops.patch_blur(x, tau, backend=backend) * g).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref.patch_blur(g.numpy(), tau.numpy(), 4), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype(backend, dtype):
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    out = relayops.patch_blur(x.to(dtype), 0.5, backend=backend)
    assert out.dtype == dtype
    exact = ref.patch_blur(x.to(dtype).double().numpy(), [0.5], 4)
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(out.double().numpy(), exact, atol=4 * eps * float(x.abs().max()))


def test_channels_last_and_noncontiguous(backend):
    x = torch.randn(2, 3, 8, 16, dtype=torch.float64)
    expect = ref.patch_blur(x.numpy(), [0.4, 0.9], 4)
    tau = torch.tensor([0.4, 0.9], dtype=torch.float64)
    cl = relayops.patch_blur(x.to(memory_format=torch.channels_last), tau, backend=backend)
    np.testing.assert_allclose(cl.numpy(), expect, atol=1e-12)
    wide = torch.randn(2, 3, 8, 32, dtype=torch.float64)[..., ::2]
    np.testing.assert_allclose(relayops.patch_blur(wide, tau, backend=backend).numpy(),
                               ref.patch_blur(wide.numpy(), [0.4, 0.9], 4), atol=1e-12)
