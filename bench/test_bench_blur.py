"""patch_blur and patch_dct: compiled vs reference vs a copy of the same bytes (read x, write out)."""
import pytest

import relayops
from conftest import DTYPES, IMPLS, compiled_backend, image, per_sample, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ("patch_blur", "patch_dct"))
def test_blur(benchmark, case, op, impl):
    size, dtype_name, device = case
    x = image(size, DTYPES[dtype_name], device)
    tau = per_sample(0.7, device)
    backend = compiled_backend(device) if impl == "compiled" else "reference"
    if op == "patch_blur":
        fn = lambda: relayops.patch_blur(x, tau, backend=backend)  # noqa: E731
    else:
        fn = lambda: relayops.patch_dct(x, backend=backend)  # noqa: E731
    run(benchmark, fn, op=op, size=size, dtype_name=dtype_name, device=device, impl=impl,
        nbytes=2 * x.numel() * x.element_size())


def test_copy(benchmark, case):
    """The memory-bound limit: copy the bytes patch_blur moves."""
    size, dtype_name, device = case
    x = image(size, DTYPES[dtype_name], device)
    out = x.clone()
    run(benchmark, lambda: out.copy_(x), op="copy", size=size, dtype_name=dtype_name, device=device, impl="copy",
        nbytes=2 * x.numel() * x.element_size())
