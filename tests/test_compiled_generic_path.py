"""The portable (non-AVX-512) CPU blur path, forced with RELAYOPS_CPU_BLUR=generic.

The choice is made once per process when relayops._C first blurs, so the check runs in a
subprocess; on a machine without AVX-512 it is the path every other test exercises anyway.
"""
import os
import subprocess
import sys

import pytest

import relayops

CHECK = r"""
import torch, relayops
torch.manual_seed(0)
worst = 0.0
for s in (2, 4, 8):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 3e-2)):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 3, 2 * s, 3 * s, dtype=torch.float64)
            tau = torch.tensor([0.3, 2.0], dtype=torch.float64)
            eps, eps2 = torch.randn_like(x), torch.randn_like(x)
            xi = x.to(dtype).to(memory_format=memory_format)
            args = [(relayops.patch_blur, (xi, tau.to(torch.float32 if dtype != torch.float64 else dtype), s), {}),
                    (relayops.relay_corrupt, (xi, 0.5, 0.7, s), dict(eps=eps.to(dtype), eps2=eps2.to(dtype)))]
            for fn, a, kw in args:
                got = fn(*a, backend="cpu", **kw).double()
                ref = fn(x, *a[1:], backend="reference", **{k: v.double() for k, v in kw.items()})
                err = float((got - ref).abs().max())
                assert err <= tol * max(1.0, float(ref.abs().max())), (fn.__name__, s, dtype, memory_format, err)
print("generic path ok")
"""


@pytest.mark.skipif("cpu" not in relayops.available_backends(), reason="relayops._C is not built")
def test_generic_blur_path_matches_reference():
    env = dict(os.environ, RELAYOPS_CPU_BLUR="generic", RELAYOPS_NAN_FILL="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "generic path ok" in done.stdout
