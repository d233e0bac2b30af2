"""Every bad input gets a ValueError or TypeError that names the argument."""
import pytest
import torch

import relayops
from relayops._validate import HOST_CHECK_MAX, per_sample

X = torch.zeros(2, 3, 8, 8)


def call(name, **overrides):
    """Call public op ``name`` with valid arguments, some replaced by ``overrides``."""
    base = {
        "patch_dct": dict(x=X), "patch_idct": dict(u=X), "block_noise": dict(g=X),
        "patch_blur": dict(x=X, tau=0.5),
        "relay_noise": dict(like=X, seed=0),
        "relay_corrupt": dict(y=X, sigma=1.0, tau=0.5, seed=0),
        "relay_step": dict(x=X, x0_hat=X, sigma=1.0, sigma_next=0.5, tau=0.5, tau_next=0.2, seed=0),
        "linear_relay_blur": dict(z0=X, z_lr=X, t=1.0, t_relay=4),
        "linear_relay_step": dict(z=X, z0_hat=X, z_lr=X, t=2.0, t_next=1.0, t_relay=4, sigma=1.0, sigma_next=0.5),
    }[name]
    return getattr(relayops, name)(**(base | overrides))


IMAGE_ARG = {"patch_dct": "x", "patch_idct": "u", "block_noise": "g", "patch_blur": "x", "relay_noise": "like",
             "relay_corrupt": "y", "relay_step": "x", "linear_relay_blur": "z0", "linear_relay_step": "z"}
PATCHED = ["patch_dct", "patch_idct", "block_noise", "patch_blur", "relay_noise", "relay_corrupt", "relay_step"]


def test_valid_calls_work():
    for name in IMAGE_ARG:
        assert call(name).shape == X.shape


@pytest.mark.parametrize("name", list(IMAGE_ARG))
@pytest.mark.parametrize("bad_shape", [(3, 8, 8), (1, 2, 3, 8, 8)])
def test_non_4d(name, bad_shape):
    arg = IMAGE_ARG[name]
    with pytest.raises(ValueError, match=rf"{arg} must be 4-D"):
        call(name, **{arg: torch.zeros(bad_shape)})


@pytest.mark.parametrize("name", list(IMAGE_ARG))
def test_integer_dtype(name):
    arg = IMAGE_ARG[name]
    with pytest.raises(TypeError, match=rf"{arg} must have a floating dtype"):
        call(name, **{arg: torch.zeros(2, 3, 8, 8, dtype=torch.int32)})


@pytest.mark.parametrize("name", PATCHED)
@pytest.mark.parametrize("hw", [(8, 6), (10, 8)])
def test_size_not_multiple_of_s(name, hw):
    arg = IMAGE_ARG[name]
    x = torch.zeros(2, 3, *hw)
    extra = {"x0_hat": x} if name == "relay_step" else {}
    with pytest.raises(ValueError, match=rf"{arg} has H x W = {hw[0]} x {hw[1]}.*multiples of the patch size s = 4"):
        call(name, **{arg: x}, **extra)


@pytest.mark.parametrize("name", PATCHED)
def test_bad_patch_size(name):
    with pytest.raises(ValueError, match=r"s \(patch size\) must be an int >= 1"):
        call(name, s=0)
    with pytest.raises(TypeError, match=r"s \(patch size\)"):
        call(name, s=2.0)


@pytest.mark.parametrize("name,param", [
    ("patch_blur", "tau"), ("relay_corrupt", "sigma"), ("relay_corrupt", "tau"), ("relay_step", "sigma"),
    ("relay_step", "sigma_next"), ("relay_step", "tau"), ("relay_step", "tau_next"), ("linear_relay_blur", "t"),
    ("linear_relay_step", "sigma"), ("linear_relay_step", "t"),
])
def test_per_sample_parameters(name, param):
    with pytest.raises(ValueError, match=rf"{param} must be a float or a tensor of shape \[B\] = \[2\]"):
        call(name, **{param: torch.ones(3)})
    with pytest.raises(ValueError, match=rf"{param} must be .*>"):
        call(name, **{param: -0.5})
    with pytest.raises(ValueError, match=rf"{param} must be .*>"):
        call(name, **{param: torch.tensor([0.5, -1.0])})
    with pytest.raises(TypeError, match=rf"{param} must be a float or a floating \[B\] tensor"):
        call(name, **{param: torch.ones(2, dtype=torch.int64)})


@pytest.mark.parametrize("b", [2, HOST_CHECK_MAX + 1], ids=["host-checked", "tensor-checked"])
@pytest.mark.parametrize("bad", [-1.0, float("nan")], ids=["negative", "nan"])
def test_per_sample_values_checked_for_any_batch(b, bad):
    """A few per-sample values are range-checked as Python floats, many with tensor ops: the same
    errors either way, NaN included; a valid vector passes both."""
    x = torch.zeros(b, 1, 4, 4)
    tau = torch.full((b,), 0.5)
    assert per_sample("tau", tau, x) is tau
    tau[b - 1] = bad
    with pytest.raises(ValueError, match=r"tau must be >= 0 everywhere"):
        per_sample("tau", tau, x)
    sigma = torch.full((b,), 0.5)
    sigma[0] = 0.0
    with pytest.raises(ValueError, match=r"sigma must be > 0 everywhere"):
        per_sample("sigma", sigma, x, positive=True)


def test_sigma_must_be_positive_in_step():
    with pytest.raises(ValueError, match=r"sigma_next must be > 0"):
        call("relay_step", sigma_next=0.0)
    with pytest.raises(ValueError, match=r"sigma must be > 0"):
        call("relay_step", sigma=torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("name,other", [("relay_step", "x0_hat"), ("relay_step", "x_prop"),
                                        ("linear_relay_step", "z_lr"), ("linear_relay_blur", "z_lr"),
                                        ("relay_noise", "eps"), ("relay_corrupt", "eps")])
def test_mismatched_tensors(name, other):
    extra = {}
    if other == "x_prop":
        extra = {"x0_hat_prop": X}
    if other == "eps":
        extra = {"eps2": X}
    with pytest.raises(ValueError, match=rf"{other} has shape \(2, 3, 8, 16\); it must match"):
        call(name, **{other: torch.zeros(2, 3, 8, 16)}, **extra)
    with pytest.raises(TypeError, match=rf"{other} has dtype torch.float64; it must match"):
        call(name, **{other: X.double()}, **extra)
    with pytest.raises(ValueError, match=rf"{other} is on meta; it must be on"):
        call(name, **{other: torch.zeros(2, 3, 8, 8, device="meta")}, **extra)


def test_parameter_on_another_device():
    with pytest.raises(ValueError, match=r"tau is on meta; it must be on the image's device"):
        call("patch_blur", tau=torch.ones(2, device="meta"))


def test_noise_keywords():
    with pytest.raises(ValueError, match="eps2 was given without eps"):
        call("relay_noise", eps2=X)
    with pytest.raises(ValueError, match="eps was given without eps2"):
        call("relay_noise", eps=X)
    assert call("relay_noise", eps=X, alpha=0.0).shape == X.shape
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        call("relay_noise", seed=-1)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        call("relay_noise", seed=1.5)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\*\*64\)"):
        call("relay_noise", offset=2**64)
    with pytest.raises(ValueError, match=r"alpha must be >= 0"):
        call("relay_corrupt", alpha=-0.1)
    with pytest.raises(TypeError, match=r"normalize must be a bool"):
        call("relay_noise", normalize=1)


def test_step_keywords():
    with pytest.raises(ValueError, match=r"eta must be < 1"):
        call("relay_step", eta=1.0)
    with pytest.raises(ValueError, match=r"eta must be >= 0"):
        call("relay_step", eta=-0.1)
    with pytest.raises(ValueError, match="x_prop and x0_hat_prop go together"):
        call("relay_step", x_prop=X)
    with pytest.raises(ValueError, match=r"t must lie in \[0, t_relay\]"):
        call("linear_relay_blur", t=5.0)
    with pytest.raises(ValueError, match=r"t_relay must be > 0"):
        call("linear_relay_blur", t_relay=0)


def test_not_a_tensor_and_bad_backend():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        relayops.patch_dct([[1.0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        relayops.patch_dct(X, backend="opencl")
    with pytest.raises(ValueError, match=r"d_min must be <= 1"):
        relayops.patch_blur(X, 0.1, d_min=2.0)
    with pytest.raises(ValueError, match=r"tau must be >= 0"):
        relayops.blur_response(-1.0)
