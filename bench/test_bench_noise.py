"""relay_noise (drawn in the kernel), block_noise and relay_corrupt; baseline torch.randn of the
same number of normals (two per pixel)."""
import pytest
import torch

import relayops
from conftest import DTYPES, IMPLS, compiled_backend, image, per_sample, run, skip_slow_reference


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ("relay_noise", "block_noise", "relay_corrupt"))
def test_noise(benchmark, case, op, impl):
    size, dtype_name, device = case
    skip_slow_reference(op, size, impl)
    x = image(size, DTYPES[dtype_name], device)
    sigma, tau = per_sample(0.5, device), per_sample(0.7, device)
    backend = compiled_backend(device) if impl == "compiled" else "reference"
    item = x.numel() * x.element_size()
    if op == "relay_noise":  # writes out only
        fn, nbytes = (lambda: relayops.relay_noise(x, seed=1, backend=backend)), item
    elif op == "block_noise":  # reads g, writes out
        fn, nbytes = (lambda: relayops.block_noise(x, backend=backend)), 2 * item
    else:  # reads y, writes out
        fn, nbytes = (lambda: relayops.relay_corrupt(x, sigma, tau, seed=1, backend=backend)), 2 * item
    run(benchmark, fn, op=op, size=size, dtype_name=dtype_name, device=device, impl=impl, nbytes=nbytes)


def test_randn(benchmark, case):
    """torch.randn drawing the normals relay_noise draws (2 per pixel), in the output dtype."""
    size, dtype_name, device = case
    dtype = DTYPES[dtype_name]
    shape = (2, 8, 3, size, size)
    nbytes = torch.empty(shape, dtype=dtype, device="meta").numel() * torch.finfo(dtype).bits // 8
    run(benchmark, lambda: torch.randn(shape, dtype=dtype, device=device), op="randn", size=size,
        dtype_name=dtype_name, device=device, impl="randn", nbytes=nbytes)
