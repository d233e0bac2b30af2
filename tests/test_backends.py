"""One test matrix for every backend: values, per-sample seeds, gradients, errors, opcheck, compile.

Comparisons (values, layouts, large shapes, gradients) run every op case on every kernel
backend available here (fixture ``kernel_target``): the compiled "cpu" backend and Triton (under
TRITON_INTERPRET=1, on CPU tensors) on a machine without a GPU; on a GPU also "cuda" and Triton
on CUDA tensors. Each is compared with the float64 reference (itself tested against SciPy and
analytic results in tests/test_reference_*.py, so it is not compared with itself here) on the
same rounded inputs: float64 within 1e-10, float32 within 1e-5 of the output's scale,
float16/bfloat16 at most twice as far from it as the reference run in the same precision.
Gradients are compared with PyTorch's autograd through the float64 reference. Fresh kernel
outputs are NaN-filled under test, so a skipped element fails. Patch sizes above the kernels'
limit (16) run the reference: a separate test checks that the reference is what runs there.

Properties every backend must have, the reference included (fixture ``target``): per-sample
seeds, identical errors, torch.compile; opcheck on the kernel backends.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import relayops
from relayops._validate import signed64

from compare import assert_close, scale_of


def _targets():
    """(backend, device) pairs that run here."""
    available = relayops.available_backends()
    out = [("reference", "cpu")]
    if "cpu" in available:
        out.append(("cpu", "cpu"))
    if "triton" in available and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        out.append(("reference", "cuda"))
        out += [(b, "cuda") for b in ("cuda", "triton") if b in available]
    return out


def takes_float64(backend: str) -> bool:
    return backend != "triton"


TARGETS = _targets()
FLOAT64_TARGETS = [t for t in TARGETS if takes_float64(t[0])]
KERNEL_TARGETS = [t for t in TARGETS if t[0] != "reference"]  # the custom-op backends


def _target_id(t):
    return f"{t[0]}-{t[1]}"


@pytest.fixture(params=TARGETS, ids=_target_id)
def target(request):
    return request.param


@pytest.fixture(params=KERNEL_TARGETS, ids=_target_id)
def kernel_target(request):
    """The backends whose values are compared with the reference (not the reference itself)."""
    return request.param


IMAGES = ("x", "x0", "xp", "x0p", "eps", "eps2", "x0b")
PARAMS = ("sigma", "sigma_next", "tau", "tau_next")


def make_inputs(shape, dtype, device, seed=0):
    """Image-shaped normals, per-sample parameters, a per-sample ``[B, s, s]`` correction factor
    (second-order relay_step) and per-sample seeds (a list and an int64 tensor of the same
    values): (as the backend gets them, float64 copies of the same rounded values for the
    reference)."""
    b, c, h, w, s = shape
    gen = torch.Generator().manual_seed(seed)
    images = {n: torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype) for n in IMAGES}
    sigma = 0.2 + torch.rand(b, generator=gen, dtype=torch.float64)
    tau = 0.1 + 2 * torch.rand(b, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    correction = torch.randn(b, s, s, generator=gen, dtype=torch.float64)
    params = {n: v.to(acc) for n, v in dict(sigma=sigma, sigma_next=0.6 * sigma, tau=tau, tau_next=0.5 * tau,
                                            correction=correction).items()}
    seeds = seed_list(b)
    seed_args = dict(seed_list=seeds, seed_tensor=torch.tensor([signed64(v) for v in seeds], dtype=torch.int64,
                                                               device=device))
    inputs = {n: v.to(device) for n, v in (images | params).items()} | seed_args
    exact = {n: v.to(device, torch.float64) for n, v in (images | params).items()} | seed_args
    return inputs, exact


def seed_list(b: int) -> list[int]:
    """Per-sample seeds spanning the 64-bit range."""
    return [2**64 - 1 - 7919 * i if i % 2 == 0 else 12345 + 2**40 * i for i in range(b)]


def _step(t, s, be, **kw):
    return relayops.relay_step(t["x"], t["x0"], t["sigma"], t["sigma_next"], t["tau"], t["tau_next"], s=s,
                               backend=be, **kw)


# Each case: (call(inputs, s, backend) -> output, the inputs it is differentiable in on every backend).
CASES = {
    "patch_dct": (lambda t, s, be: relayops.patch_dct(t["x"], s, backend=be), ("x",)),
    "patch_idct": (lambda t, s, be: relayops.patch_idct(t["x"], s, backend=be), ("x",)),
    "patch_blur": (lambda t, s, be: relayops.patch_blur(t["x"], t["tau"], s, backend=be), ("x", "tau")),
    "patch_blur_float_tau": (lambda t, s, be: relayops.patch_blur(t["x"], 0.7, s, d_min=0.01, backend=be), ("x",)),
    "block_noise": (lambda t, s, be: relayops.block_noise(t["x"], s, backend=be), ("x",)),
    "relay_noise_seed": (lambda t, s, be: relayops.relay_noise(t["x"], s, seed=2**64 - 3, offset=2**33 + 5,
                                                               backend=be), ()),
    "relay_noise_seed_list": (lambda t, s, be: relayops.relay_noise(t["x"], s, seed=t["seed_list"], offset=7,
                                                                    backend=be), ()),
    "relay_noise_seed_tensor": (lambda t, s, be: relayops.relay_noise(t["x"], s, normalize=False, seed=t["seed_tensor"],
                                                                      offset=2**40 + 3, backend=be), ()),
    "relay_noise_given": (lambda t, s, be: relayops.relay_noise(t["x"], s, alpha=0.3, normalize=False, eps=t["eps"],
                                                                eps2=t["eps2"], backend=be), ("eps", "eps2")),
    "relay_noise_given_alpha0": (lambda t, s, be: relayops.relay_noise(t["x"], s, alpha=0.0, eps=t["eps"],
                                                                       backend=be), ("eps",)),
    "relay_corrupt_seed": (lambda t, s, be: relayops.relay_corrupt(t["x"], t["sigma"], t["tau"], s, seed=12345,
                                                                   offset=1, backend=be), ("x", "sigma", "tau")),
    "relay_corrupt_seed_list": (lambda t, s, be: relayops.relay_corrupt(
        t["x"], t["sigma"], t["tau"], s, seed=t["seed_list"], offset=3, backend=be), ("x", "sigma", "tau")),
    "relay_corrupt_given": (lambda t, s, be: relayops.relay_corrupt(
        t["x"], t["sigma"], t["tau"], s, eps=t["eps"], eps2=t["eps2"], backend=be),
        ("x", "sigma", "tau", "eps", "eps2")),
    "relay_step_euler_seed": (lambda t, s, be: _step(t, s, be, seed=2**63 + 1, offset=4), ("x", "x0")),
    "relay_step_euler_seed_list": (lambda t, s, be: _step(t, s, be, seed=t["seed_list"], offset=6), ("x", "x0")),
    "relay_step_eta0": (lambda t, s, be: _step(t, s, be, eta=0.0), ("x", "x0")),
    "relay_step_heun_given": (lambda t, s, be: _step(t, s, be, eps=t["eps"], eps2=t["eps2"], x_prop=t["xp"],
                                                     x0_hat_prop=t["x0p"]), ("x", "x0", "xp", "x0p", "eps", "eps2")),
    "relay_step_heun_seed_tensor_alpha0": (lambda t, s, be: _step(
        t, s, be, eta=0.5, alpha=0.0, seed=t["seed_tensor"], offset=9, x_prop=t["xp"], x0_hat_prop=t["x0p"]),
        ("x", "x0", "xp", "x0p")),
    # second order (docs/spec.md 8.1): x0_hat_b and the per-sample correction factor E (drawn noise with
    # per-sample seeds and one [s, s] factor for the batch: the relay-2s/2m sampler test on every backend)
    "relay_step_second_given": (lambda t, s, be: _step(t, s, be, eps=t["eps"], eps2=t["eps2"], x0_hat_b=t["x0b"],
                                                       correction=t["correction"]), ("x", "x0", "x0b")),
}

# (B, C, H, W, s): B = 1, C = 1, H = W = s, non-square, C = 4 and 16, s = 2, 3 (not a power of
# two), 4, 8, 16 (the kernels' limit), an empty batch. Above the limit the reference runs:
# test_patch_sizes_above_the_limit_run_the_reference.
SHAPES = [(1, 1, 4, 4, 4), (2, 3, 8, 12, 4), (1, 4, 16, 8, 8), (3, 16, 6, 4, 2), (2, 1, 9, 6, 3),
          (1, 2, 16, 32, 16), (0, 2, 8, 8, 4)]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape_id(shape):
    return "x".join(map(str, shape[:4])) + f"-s{shape[4]}"


def check_case(name, target, inputs, exact, s, dtype):
    """Run case ``name`` on ``target`` and compare it with the float64 reference."""
    backend, _ = target
    call = CASES[name][0]
    if dtype == torch.float64 and not takes_float64(backend):
        with pytest.raises(TypeError, match=f"the '{backend}' backend supports float32, float16, bfloat16 tensors"):
            call(inputs, s, backend)
        return
    out = call(inputs, s, backend)
    assert out.dtype == dtype and out.shape == inputs["x"].shape and out.device == inputs["x"].device
    expected = call(exact, s, "reference")
    if dtype == torch.float64:
        assert_close(out, expected, atol=1e-10 * scale_of(expected), what=f"{name} on {backend}")
    elif dtype == torch.float32:
        assert_close(out, expected, atol=1e-5 * scale_of(expected), what=f"{name} on {backend}")
    else:  # half storage: at most twice the error of the same-precision reference
        err_ref = (call(inputs, s, "reference").double() - expected).abs().max().item() if out.numel() else 0.0
        assert_close(out, expected, atol=2 * err_ref + 1e-6, what=f"{name} on {backend} in {dtype}")
    return out


def _value_matrix():
    """(target, shape, dtype) of test_values: every shape in every dtype on every kernel backend,
    except float16 and bfloat16 at s = 8 and 16 under the Triton interpreter. There every dtype
    computes in float32 (the storage dtype enters in the loads and stores only, whose code is the
    same for every power-of-two s) and a call costs seconds per s x s unrolled patch: float32 runs
    every s, float16 and bfloat16 run s = 2, 3 and 4 (vector and element-by-element loads and
    stores, tails, several samples and channels, the empty batch). On a GPU Triton runs them all."""
    for target in KERNEL_TARGETS:
        for shape in SHAPES:
            for dtype in DTYPES:
                if target == ("triton", "cpu") and dtype in (torch.float16, torch.bfloat16) and shape[4] > 4:
                    continue
                yield pytest.param(target, shape, dtype, id=f"{_target_id(target)}-{_shape_id(shape)}-{dtype}")


@pytest.mark.parametrize("target, shape, dtype", list(_value_matrix()))
@pytest.mark.parametrize("name", list(CASES))
def test_values(target, name, shape, dtype):
    inputs, exact = make_inputs(shape, dtype, target[1])
    check_case(name, target, inputs, exact, shape[4], dtype)


OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise", "relay_corrupt", "relay_step")


def _op_of(name: str) -> str:
    """The op a case of CASES calls."""
    return max((o for o in OPS if name.startswith(o)), key=len)


CASES_OF_OP = {op: [n for n in CASES if _op_of(n) == op] for op in OPS}


def _python_calls(fn):
    """``fn()`` and the code objects of every Python function it called."""
    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add(frame.f_code)
    sys.setprofile(profile)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, called


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
def test_patch_sizes_above_the_limit_run_the_reference(target, name):
    """s = 32 on a kernel backend runs relayops.reference's function of the op and gives its
    output exactly."""
    backend, device = target
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    reference_code = getattr(relayops.reference, _op_of(name)).__code__
    inputs, _ = make_inputs((1, 1, 32, 64, 32), dtype, device)
    out, called = _python_calls(lambda: CASES[name][0](inputs, 32, backend))
    assert reference_code in called, f"{name} on {backend}: s = 32 did not run the reference"
    assert torch.equal(out, CASES[name][0](inputs, 32, "reference"))


def _refuse(*args, **kwargs):
    raise AssertionError("the reference function ran")


@pytest.mark.parametrize("name", [CASES_OF_OP[op][0] for op in OPS])
@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
def test_patch_size_at_the_limit_runs_the_kernel(target, name, monkeypatch):
    """The control: s = 16 runs the kernel, not relayops.reference's function of the op (its code
    is replaced by one that fails). The choice is made once per op, for all its cases (the
    op's forward in relayops/ops/_library.py), so one case per op is enough; under the Triton
    interpreter each s = 16 call costs seconds."""
    backend, device = target
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    monkeypatch.setattr(getattr(relayops.reference, _op_of(name)), "__code__", _refuse.__code__)
    inputs, exact = make_inputs((1, 2, 16, 32, 16), dtype, device)
    out = CASES[name][0](inputs, 16, backend)
    assert out.shape == inputs["x"].shape and bool(torch.isfinite(out).all()), f"{name} on {backend}"


LAYOUTS = ("contiguous", "channels_last", "strided", "transposed", "offset", "batch_strided")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (4-D) in another memory layout; other tensors unchanged."""
    if t.dim() != 4 or layout == "contiguous":
        return t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H and W swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":  # a view starting 7 elements into its storage
        flat = torch.full((t.numel() + 7,), float("nan"), dtype=t.dtype, device=t.device)
        flat[7:] = t.reshape(-1)
        return flat[7:].view(t.shape)
    if layout == "batch_strided":  # every other sample and channel of a larger tensor
        big = torch.full((2 * t.shape[0], 2 * t.shape[1], *t.shape[2:]), float("nan"), dtype=t.dtype,
                         device=t.device)
        big[::2, ::2] = t
        return big[::2, ::2]
    assert layout == "strided", layout
    wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)  # every other column
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("channels_last", "strided"))
@pytest.mark.parametrize("name", list(CASES))
def test_layouts(kernel_target, name, layout, dtype):
    """channels_last and strided inputs give the same numbers; outputs keep channels_last."""
    inputs, exact = make_inputs((2, 3, 8, 12, 4), dtype, kernel_target[1], seed=1)
    inputs = {n: relayout(v, layout) if n in IMAGES else v for n, v in inputs.items()}
    assert not inputs["x"].is_contiguous()
    out = check_case(name, kernel_target, inputs, exact, 4, dtype)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


SEEDED_LIST = ("relay_noise_seed_list", "relay_noise_seed_tensor", "relay_corrupt_seed_list",
               "relay_step_euler_seed_list", "relay_step_heun_seed_tensor_alpha0")


@pytest.mark.parametrize("name", SEEDED_LIST)
def test_per_sample_seeds_draw_what_each_sample_draws_alone(target, name):
    """With per-sample seeds, sample b's output equals the call on sample b alone with the int
    seed seeds[b] (a batch of one at the same offset), bit for bit, on every backend."""
    backend, device = target
    inputs, _ = make_inputs((3, 2, 8, 12, 4), torch.float32, device, seed=2)
    call = CASES[name][0]
    batch = call(inputs, 4, backend)
    for b, seed in enumerate(inputs["seed_list"]):
        alone = {n: v[b:b + 1] for n, v in inputs.items() if n in IMAGES + PARAMS}
        alone.update(seed_list=seed, seed_tensor=seed)
        assert torch.equal(call(alone, 4, backend), batch[b:b + 1]), f"{name}: sample {b} differs from its draw alone"


# Shapes spanning many tiles and threads; not under the Triton interpreter, which runs one
# program at a time (its tiles are covered by the small shapes above, with masked last tiles).
LARGE_TARGETS = [t for t in KERNEL_TARGETS if t != ("triton", "cpu")]
LARGE_CASES = ("patch_blur", "block_noise", "relay_noise_seed_tensor", "relay_corrupt_seed_list",
               "relay_step_heun_given", "relay_step_second_given")


@pytest.mark.parametrize("s", (2, 4, 8))
@pytest.mark.parametrize("name", LARGE_CASES)
@pytest.mark.parametrize("target", LARGE_TARGETS, ids=_target_id)
def test_large_shapes(target, name, s):
    inputs, exact = make_inputs((4, 3, 96, 160, s), torch.float32, target[1], seed=8)
    check_case(name, target, inputs, exact, s, torch.float32)


# ----------------------------------------------------------------------------------------------
# Gradients: the same on every backend, against autograd through the float64 reference.

GRAD_CASES = [name for name, (_, grads) in CASES.items() if grads]


def _gradients(call, inputs, names, backend, weight):
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
    out = call(inputs | leaves, 4, backend)
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), [leaves[n] for n in names])
    return dict(zip(names, grads))


def check_gradients(name, target, shape, seed=3, layout="contiguous"):
    """Case ``name``'s gradients on ``target`` against autograd through the float64 reference:
    float64 within 1e-10, float32 (Triton) within 1e-5 of the scale (5e-5 for parameters)."""
    backend, device = target
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    call, names = CASES[name]
    s = shape[4]
    inputs, exact = make_inputs(shape, dtype, device, seed=seed)
    inputs = {n: relayout(v, layout) if n in IMAGES else v for n, v in inputs.items()}
    weight = torch.randn(shape[:4], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    got = _gradients(lambda t, _s, be: call(t, s, be), inputs, names, backend, weight)
    want = _gradients(lambda t, _s, be: call(t, s, be), exact, names, "reference", weight)
    for n in names:
        tol = (1e-10 if dtype == torch.float64 else 5e-5 if n in PARAMS else 1e-5) * scale_of(want[n])
        assert_close(got[n], want[n], atol=tol, what=f"{name} on {backend}: gradient w.r.t. {n}")


@pytest.mark.parametrize("shape", [(2, 3, 8, 12, 4), (1, 1, 16, 16, 8)], ids=_shape_id)
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients(kernel_target, name, shape):
    """Every kernel backend's gradients w.r.t. images, given noise and the per-sample parameters
    the op is differentiable in (tau of patch_blur, sigma and tau of relay_corrupt) equal the
    reference's autograd."""
    check_gradients(name, kernel_target, shape)


@pytest.mark.parametrize("name", GRAD_CASES)
@pytest.mark.parametrize("target", FLOAT64_TARGETS, ids=_target_id)
def test_gradcheck_float64(target, name):
    """Finite differences agree with the backward formulas of every backend that takes float64."""
    backend, device = target
    call, names = CASES[name]
    inputs, _ = make_inputs((2, 1, 4, 8, 4), torch.float64, device, seed=5)
    leaves = [inputs[n].clone().requires_grad_(True) for n in names]

    def f(*values):
        return call(inputs | dict(zip(names, values)), 4, backend)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


NAMESPACES = {"cpu": "relayops", "cuda": "relayops", "triton": "relayops_triton"}


def test_relay_step_parameters_raise_the_same_error_everywhere(target):
    backend, device = target
    inputs, _ = make_inputs((2, 1, 4, 8, 4), torch.float32, device)
    for p in PARAMS:
        leaf = inputs | {p: inputs[p].clone().requires_grad_(True)}
        with pytest.raises(NotImplementedError, match="relay_step is not differentiable with respect to sigma"):
            CASES["relay_step_euler_seed"][0](leaf, 4, backend)
    with torch.no_grad():  # nothing to differentiate: no error
        leaf = inputs | {"sigma": inputs["sigma"].clone().requires_grad_(True)}
        CASES["relay_step_euler_seed"][0](leaf, 4, backend)
    namespace = NAMESPACES.get(backend)
    if namespace is not None:  # a direct op call gets as far as backward, which raises the same error
        tau = inputs["tau"].clone().requires_grad_(True)
        out = getattr(torch.ops, namespace).relay_step(
            inputs["x"], inputs["x0"], inputs["sigma"], inputs["sigma_next"], tau, inputs["tau_next"], 0.2, 4, 0.001,
            0.15, 1.0, 3, 0, None, None, None, None, None, None, None)
        with pytest.raises(NotImplementedError, match="relay_step is not differentiable with respect to sigma"):
            out.sum().backward()


def test_relay_step_correction_factor_raises_the_same_error_everywhere(target):
    """The second-order step's correction factor E is a sampler constant: asking for its gradient
    raises NotImplementedError on every backend (public op up front, direct op call in backward)."""
    backend, device = target
    inputs, _ = make_inputs((2, 1, 4, 8, 4), torch.float32, device)
    leaf = inputs | {"correction": inputs["correction"].clone().requires_grad_(True)}
    with pytest.raises(NotImplementedError, match="relay_step is not differentiable with respect to correction"):
        CASES["relay_step_second_given"][0](leaf, 4, backend)
    namespace = NAMESPACES.get(backend)
    if namespace is not None:
        t = inputs
        out = getattr(torch.ops, namespace).relay_step(
            t["x"], t["x0"], t["sigma"], t["sigma_next"], t["tau"], t["tau_next"], 0.2, 4, 0.001, 0.15, 1.0, 3, 0,
            None, None, None, None, None, t["x0b"], leaf["correction"])
        with pytest.raises(NotImplementedError, match="relay_step is not differentiable with respect to correction"):
            out.sum().backward()


# ----------------------------------------------------------------------------------------------
# Errors: bad input raises the public ops' error on every backend, and when a custom op is
# called directly (torch.ops.<namespace>.<op>) with the same bad arguments.


def _bad_calls(device):
    """(public call, direct op call or None, exception type, message pattern)."""
    x = torch.zeros(2, 3, 8, 8, device=device)
    tau = torch.ones(2, device=device)
    e_ok, e_bad = torch.zeros(2, 4, 4, device=device), torch.zeros(2, 2, 4, device=device)
    e_int = torch.zeros(4, 4, dtype=torch.int64, device=device)

    def step_op(ops, x0_hat=x, eta=0.2, x_prop=None, x0_hat_prop=None, x0_hat_b=None, correction=None):
        return ops.relay_step(x, x0_hat, tau, tau, tau, tau, eta, 4, 0.001, 0.15, 1.0, 0, 0, None, None, None, x_prop,
                              x0_hat_prop, x0_hat_b, correction)

    return [
        (lambda be: relayops.patch_blur(x[0], 0.5, backend=be),
         lambda ops: ops.patch_blur(x[0], tau, 4, 0.001), ValueError, r"x must be 4-D"),
        (lambda be: relayops.patch_dct(x[..., :6], backend=be),
         lambda ops: ops.patch_dct(x[..., :6], 4), ValueError, r"x has H x W = 8 x 6; both must be multiples"),
        (lambda be: relayops.patch_blur(x.int(), 0.5, backend=be),
         lambda ops: ops.patch_blur(x.int(), tau, 4, 0.001), TypeError, r"x must have a floating dtype"),
        (lambda be: relayops.patch_blur(x, torch.ones(3, device=device), backend=be),
         lambda ops: ops.patch_blur(x, torch.ones(3, device=device), 4, 0.001), ValueError,
         r"tau must be a float or a tensor of shape \[B\] = \[2\]"),
        (lambda be: relayops.patch_blur(x, 0.5, d_min=2.0, backend=be),
         lambda ops: ops.patch_blur(x, tau, 4, 2.0), ValueError, r"d_min must be <= 1"),
        (lambda be: relayops.relay_noise(x, seed=[1, 2, 3], backend=be), None, ValueError,
         r"seed is a list of 3 seeds; per-sample seeds need one per sample \(B = 2\)"),
        (lambda be: relayops.relay_noise(x, seed=torch.ones(2, device=device), backend=be),
         lambda ops: ops.relay_noise(x, 4, 0.15, 1.0, 0, 0, torch.ones(2, device=device), None, None), TypeError,
         r"seed must be an int, a list of B ints or an int64 \[B\] tensor .*got dtype torch.float32"),
        (lambda be: relayops.relay_noise(x, seed=torch.ones(3, dtype=torch.int64, device=device), backend=be),
         lambda ops: ops.relay_noise(x, 4, 0.15, 1.0, 0, 0, torch.ones(3, dtype=torch.int64, device=device), None,
                                     None), ValueError, r"seed must be a tensor of shape \[B\] = \[2\]"),
        (lambda be: relayops.relay_noise(x, seed=[1, -1], backend=be), None, ValueError,
         r"every per-sample seed must be an int in \[0, 2\*\*64\)"),
        (lambda be: relayops.relay_noise(x, eps=x, backend=be),
         lambda ops: ops.relay_noise(x, 4, 0.15, 1.0, 0, 0, None, x, None), ValueError, r"eps was given without eps2"),
        (lambda be: relayops.relay_corrupt(x, 1.0, 0.5, eps=x, eps2=x[:1], backend=be),
         lambda ops: ops.relay_corrupt(x, tau, tau, 4, 0.001, 0.15, 1.0, 0, 0, None, x, x[:1]), ValueError,
         r"eps2 has shape \(1, 3, 8, 8\); it must match the image's"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, eta=1.0, backend=be),
         lambda ops: step_op(ops, eta=1.0), ValueError, r"eta must be < 1"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x_prop=x, backend=be),
         lambda ops: step_op(ops, x_prop=x), ValueError, r"x_prop and x0_hat_prop go together"),
        (lambda be: relayops.relay_step(x, x.double(), 1.0, 0.5, 0.5, 0.2, backend=be),
         lambda ops: step_op(ops, x0_hat=x.double()), TypeError, r"x0_hat has dtype torch.float64; it must match"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x0_hat_b=x, backend=be),
         lambda ops: step_op(ops, x0_hat_b=x), ValueError, r"x0_hat_b and correction go together"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x0_hat_b=x, correction=e_bad, backend=be),
         lambda ops: step_op(ops, x0_hat_b=x, correction=e_bad), ValueError,
         r"correction must have shape \[B, s, s\] = \[2, 4, 4\], got \(2, 2, 4\)"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x0_hat_b=x, correction=e_int, backend=be),
         lambda ops: step_op(ops, x0_hat_b=x, correction=e_int.expand(2, 4, 4)), TypeError,
         r"correction must be a floating tensor"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x0_hat_b=x[:1], correction=e_ok, backend=be),
         lambda ops: step_op(ops, x0_hat_b=x[:1], correction=e_ok), ValueError,
         r"x0_hat_b has shape \(1, 3, 8, 8\); it must match"),
        (lambda be: relayops.relay_step(x, x, 1.0, 0.5, 0.5, 0.2, x_prop=x, x0_hat_prop=x, x0_hat_b=x, correction=e_ok,
                                        backend=be),
         lambda ops: step_op(ops, x_prop=x, x0_hat_prop=x, x0_hat_b=x, correction=e_ok), ValueError,
         r"the Heun step .* and the second-order step .* exclude"),
    ]


def test_errors_are_the_same_on_every_backend(target):
    backend, device = target
    namespace = NAMESPACES.get(backend)
    ops = getattr(torch.ops, namespace) if namespace else None
    for public, direct, error, pattern in _bad_calls(device):
        with pytest.raises(error, match=pattern):
            public(backend)
        if ops is not None and direct is not None:
            with pytest.raises(error, match=pattern):
                direct(ops)


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck on every registered op of every namespace, and torch.compile.

def _opcheck_args(device, dtype):
    gen = torch.Generator().manual_seed(6)
    x, x0, xp, x0p, e1, e2 = (torch.randn(2, 3, 8, 4, generator=gen, dtype=torch.float64).to(device, dtype)
                              for _ in range(6))
    p = (torch.rand(4, 2, generator=gen, dtype=torch.float64) + 0.2).to(device, dtype)
    sig, sig_n, tau, tau_n = p[0], 0.5 * p[0], p[1], 0.5 * p[1]
    seeds = torch.tensor([3, -5], dtype=torch.int64, device=device)
    corr = (torch.rand(2, 4, 4, generator=gen, dtype=torch.float64) - 0.5).to(device, dtype)
    return {  # case: (op, arguments, indices of the [B] parameters to differentiate)
        "patch_dct": ("patch_dct", (x, 4), ()), "patch_idct": ("patch_idct", (x, 2), ()),
        "patch_blur": ("patch_blur", (x, tau, 4, 0.001), (1,)),
        "block_noise": ("block_noise", (x, 4, False), ()), "block_noise_adjoint": ("block_noise", (x, 4, True), ()),
        "relay_noise_drawn": ("relay_noise", (x, 4, 0.15, 0.9, -5, 3, None, None, None), ()),
        "relay_noise_seeds": ("relay_noise", (x, 4, 0.15, 0.9, 0, 3, seeds, None, None), ()),
        "relay_noise_given": ("relay_noise", (x, 4, 0.15, 0.9, 0, 0, None, e1, e2), ()),
        "relay_corrupt_seeds": ("relay_corrupt", (x, sig, tau, 4, 0.001, 0.15, 1.0, 0, 1, seeds, None, None), (1, 2)),
        "relay_corrupt_given": ("relay_corrupt", (x, sig, tau, 4, 0.001, 0.15, 1.0, 0, 0, None, e1, e2), (1, 2)),
        "relay_step_euler": ("relay_step", (x, x0, sig, sig_n, tau, tau_n, 0.2, 4, 0.001, 0.15, 1.0, 11, 2, None,
                                            None, None, None, None, None, None), ()),
        "relay_step_heun": ("relay_step", (x, x0, sig, sig_n, tau, tau_n, 0.2, 4, 0.001, 0.15, 1.0, 0, 0, None, e1,
                                           e2, xp, x0p, None, None), ()),
        "relay_step_second": ("relay_step", (x, x0, sig, sig_n, tau, tau_n, 0.2, 4, 0.001, 0.15, 1.0, 0, 0, seeds,
                                             None, None, None, None, xp, corr), ()),
    }


OPCHECK_CASES = list(_opcheck_args("cpu", torch.float64))


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
def test_opcheck(target, case):
    """torch.library.opcheck (schema, fake implementation, autograd registration, AOT dispatch) on
    every op of every kernel backend's namespace (the reference is plain PyTorch, no custom op)."""
    backend, device = target
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    name, args, params = _opcheck_args(device, dtype)[case]
    args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and (a.dim() == 4 or i in params)
                 else a for i, a in enumerate(args))
    torch.library.opcheck(getattr(getattr(torch.ops, NAMESPACES[backend]), name), args)


def test_torch_compile_fullgraph(target):
    """Training corruption (per-sample seeds), blur and a sampler step compile as one graph, forward
    and backward, and give the eager numbers."""
    backend, device = target
    inputs, _ = make_inputs((2, 3, 8, 8, 4), torch.float32, device, seed=7)
    seeds = inputs["seed_tensor"]

    def f(y, x0, sigma, tau):
        xt = relayops.relay_corrupt(y, sigma, tau, seed=seeds, offset=0, backend=backend)
        xb = relayops.patch_blur(xt, tau * 0.5, backend=backend)
        return relayops.relay_step(xb, x0, 1.0, 0.6, 0.9, 0.4, seed=seeds, offset=2, backend=backend)

    def loss_and_grads(fn):
        y, sigma, tau = (inputs[n].clone().requires_grad_(True) for n in ("x", "sigma", "tau"))
        out = fn(y, inputs["x0"], sigma, tau)
        return [out] + list(torch.autograd.grad((out * inputs["eps"]).sum(), (y, sigma, tau)))

    torch._dynamo.reset()
    eager = loss_and_grads(f)
    # The reference is plain PyTorch: aot_eager traces it as one graph without inductor's code
    # generation for its einsums (half a minute on 2 cores, and not this library's code).
    compiled = loss_and_grads(torch.compile(f, fullgraph=True, backend="aot_eager" if backend == "reference"
                                            else "inductor"))
    for what, a, b in zip(("output", "grad y", "grad sigma", "grad tau"), compiled, eager):
        assert_close(a, b, atol=1e-5 * scale_of(b), what=f"compiled {what} on {backend}")
