"""relay_step, Euler (reads x, x0_hat) and Heun (also x', x0_hat'), noise drawn in the kernel."""
import pytest

import relayops
from conftest import DTYPES, IMPLS, compiled_backend, image, per_sample, run, skip_slow_reference


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ("relay_step_euler", "relay_step_heun"))
def test_step(benchmark, case, op, impl):
    size, dtype_name, device = case
    skip_slow_reference(op, size, impl)
    dtype = DTYPES[dtype_name]
    x, x0, xp, x0p = (image(size, dtype, device, seed=i) for i in range(4))
    sigma, sigma_next = per_sample(0.5, device), per_sample(0.4, device)
    tau, tau_next = per_sample(0.9, device), per_sample(0.7, device)
    backend = compiled_backend(device) if impl == "compiled" else "reference"
    heun = op == "relay_step_heun"
    extra = dict(x_prop=xp, x0_hat_prop=x0p) if heun else {}

    def fn():
        return relayops.relay_step(x, x0, sigma, sigma_next, tau, tau_next, seed=3, offset=1, backend=backend, **extra)

    nbytes = (5 if heun else 3) * x.numel() * x.element_size()
    run(benchmark, fn, op=op, size=size, dtype_name=dtype_name, device=device, impl=impl, nbytes=nbytes)
