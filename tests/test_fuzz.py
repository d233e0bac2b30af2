"""Property-based fuzzing (hypothesis) of every op on every kernel backend against the float64
reference (the reference itself is tested against SciPy and analytic results elsewhere).

Drawn: the case (every op, and its variants of tests/test_backends.py: drawn or given noise,
int, list and tensor seeds, Euler and Heun steps), batch, channels, patch size (1 to 16, the
kernels' limit, 1 to 8 under the Triton interpreter in CI; above 16 the reference runs,
tests/test_backends.py checks that), patches per side, dtype, a memory layout per image input
(contiguous, channels_last, strided, transposed, storage offset, strided batch), the input values
and per-sample parameters (a drawn generator seed) and the per-sample seeds. Values and
tolerances are tests/test_backends.py's (``check_case``, ``check_gradients``); gradients for the
differentiable cases.

Non-finite input (the documented policy, docs/spec.md "Non-finite input"): NaN and +-Inf in an
image-valued input never raise on any kernel backend; the output is non-finite exactly where the float64
reference's is, and equal to it elsewhere.

In CI every test runs a fixed, derandomized set of ``RELAYOPS_FUZZ_EXAMPLES`` examples (default
10). ``make fuzz`` runs many more with random seeds and prints the examples tried per test.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compare import assert_close, scale_of
from test_backends import (CASES, GRAD_CASES, IMAGES, KERNEL_TARGETS, LAYOUTS, _target_id, check_case, check_gradients,
                           make_inputs, relayout, takes_float64)
from relayops._validate import signed64

# The Triton interpreter computes with NumPy, which warns about arithmetic on NaN and Inf.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

EXAMPLES = int(os.environ.get("RELAYOPS_FUZZ_EXAMPLES", "10"))
LONG = os.environ.get("RELAYOPS_FUZZ_LONG") == "1"   # make fuzz: random, not derandomized
FUZZ = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)

OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "relay_noise", "relay_corrupt", "relay_step")
CASES_OF = {op: [n for n in CASES if n.startswith(op + "_") or n == op] for op in OPS}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The Triton interpreter runs one program at a time: small images there.
MAX_PATCHES = {"triton": 2}
PATCH_SIZES = (1, 2, 3, 4, 5, 8, 16)
# Under the Triton interpreter a call costs about s^2 interpreted patch operations (the patch
# loops are unrolled), s = 16 four times s = 8: CI draws s <= 8 there. Triton at s = 16 runs in
# CI in tests/test_backends.py (every case, and the limit control), from the same kernel source
# as s = 8 with another constant; `make fuzz` draws it here too, as does a GPU.
INTERPRETED_PATCH_SIZES = PATCH_SIZES if LONG else PATCH_SIZES[:-1]


@st.composite
def op_inputs(draw, op, target, dtypes=DTYPES):
    backend, device = target
    name = draw(st.sampled_from(CASES_OF[op]))
    interpreted = backend == "triton" and device == "cpu"
    s = draw(st.sampled_from(INTERPRETED_PATCH_SIZES if interpreted else PATCH_SIZES))
    most = MAX_PATCHES.get(backend, 3) if s < 16 else 1
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 3)), s * draw(st.integers(1, most)),
             s * draw(st.integers(1, most)), s)
    dtype = draw(st.sampled_from(dtypes))
    inputs, exact = make_inputs(shape, dtype, device, seed=draw(st.integers(0, 2**31 - 1)))
    inputs = {n: relayout(v, draw(st.sampled_from(LAYOUTS))) if n in IMAGES else v for n, v in inputs.items()}
    seeds = draw(st.lists(st.integers(0, 2**64 - 1), min_size=shape[0], max_size=shape[0]))
    per_sample = dict(seed_list=seeds, seed_tensor=torch.tensor([signed64(v) for v in seeds], dtype=torch.int64,
                                                                device=device))
    return name, shape, dtype, inputs | per_sample, exact | per_sample


@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_fuzz_values(op, target, data):
    name, shape, dtype, inputs, exact = data.draw(op_inputs(op, target))
    check_case(name, target, inputs, exact, shape[4], dtype)


@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
@FUZZ
@given(name=st.sampled_from(GRAD_CASES), b=st.integers(1, 2), c=st.integers(1, 2), s=st.sampled_from((2, 3, 4)),
       hp=st.integers(1, 2), wp=st.integers(1, 2), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_fuzz_gradients(target, name, b, c, s, hp, wp, layout, seed):
    check_gradients(name, target, (b, c, s * hp, s * wp, s), seed=seed, layout=layout)


# --- non-finite input -----------------------------------------------------------------------------

def _poison(t: torch.Tensor, positions, values) -> torch.Tensor:
    """A copy of ``t`` (same layout) with ``values`` at the row-major ``positions`` (mod its size)."""
    t = t.clone()
    for p, v in zip(positions, values):
        t[tuple(int(i) for i in torch.unravel_index(torch.tensor(p % t.numel()), t.shape))] = v
    return t


def check_non_finite(name, target, inputs, exact, s, dtype, poison):
    """``poison`` = {image input: (flat positions, NaN/Inf values)}: no error; the output is
    non-finite exactly where the float64 reference's is, and within check_case's float tolerance
    elsewhere. Whether a non-finite element is NaN or +-Inf may differ: Inf - Inf depends on the
    order of the sums."""
    backend, _ = target
    call = CASES[name][0]
    for n, (positions, values) in poison.items():
        inputs = inputs | {n: _poison(inputs[n], positions, values)}
        exact = exact | {n: _poison(exact[n], positions, values)}
    out = call(inputs, s, backend)
    expected = call(exact, s, "reference")
    bad_out, bad_exp = ~torch.isfinite(out), ~torch.isfinite(expected)
    assert torch.equal(bad_out.cpu(), bad_exp.cpu()), (
        f"{name} on {backend}: non-finite at {int(bad_out.sum())} elements, the reference at {int(bad_exp.sum())}")
    fin = ~bad_exp
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out[fin], expected[fin], atol=tol * scale_of(expected[fin]), what=f"{name} on {backend}")


NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
@pytest.mark.parametrize("name", list(CASES))
def test_non_finite_inputs_propagate_and_never_raise(name, target):
    """Every case on every kernel backend with NaN, +Inf and -Inf in each image-valued input (at
    positions of its own, in different patches, so that a value spreading too far is seen)."""
    backend, device = target
    dtype = torch.float64 if takes_float64(backend) else torch.float32
    inputs, exact = make_inputs((2, 2, 16, 16, 4), dtype, device, seed=11)
    poison = {n: ([37 * i + 5, 37 * i + 300, 37 * i + 700], NON_FINITE) for i, n in enumerate(IMAGES)}
    check_non_finite(name, target, inputs, exact, 4, dtype, poison)


@pytest.mark.parametrize("target", KERNEL_TARGETS, ids=_target_id)
@FUZZ
@given(data=st.data())
def test_fuzz_non_finite(target, data):
    op = data.draw(st.sampled_from(OPS))
    dtypes = (torch.float64,) if takes_float64(target[0]) else (torch.float32,)
    name, shape, dtype, inputs, exact = data.draw(op_inputs(op, target, dtypes))
    if shape[0] == 0:
        return
    poison = {}
    for n in data.draw(st.lists(st.sampled_from(IMAGES), min_size=1, max_size=3, unique=True)):
        k = data.draw(st.integers(1, 3))
        poison[n] = (data.draw(st.lists(st.integers(0, 10**6), min_size=k, max_size=k)),
                     data.draw(st.lists(st.sampled_from(NON_FINITE), min_size=k, max_size=k)))
    check_non_finite(name, target, inputs, exact, shape[4], dtype, poison)
