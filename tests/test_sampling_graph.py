"""A relay sampler step is capturable in a CUDA graph: checked on the CPU as far as it goes.

* Under fake CUDA tensors (``FakeTensorMode``: no GPU needed), every operation a step runs is
  recorded: none reads a value back to the host (``.item()``, ``bool(tensor)``: the recorder
  raises on them), and every tensor it makes is on the state's device (no CPU tensor per step,
  so no host-to-device copy inside a graph).
* ``torch.compile(fullgraph=True)`` traces a whole step with ``[B]`` tensor levels into one graph
  (a graph break raises), and the compiled step gives the eager step's values.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import relayops
from relayops.sampling import relay_sample, relay_sampler_step

# Operations that read a tensor's value on the host: a sync on a GPU, not capturable.
HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in relayops.available_backends()]


class Recorder(TorchDispatchMode):
    """Records every operation and the devices of the tensors it returns; a host read raises."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).rsplit(".", 1)[0]
        if name in HOST_READS:
            raise RuntimeError(f"host read in a sampler step: {name}")
        self.calls.append([name, None])
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls[-1][1] = {o.device.type for o in outs if isinstance(o, torch.Tensor)}
        return out


def _toy_denoiser(x, sigma):
    return x / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)  # shrinks towards 0, more at high noise


def _record_step(backend, seeds_kind, heun, denoiser=_toy_denoiser):
    with FakeTensorMode():
        x = torch.empty(8, 3, 32, 32, device="cuda")
        seeds = torch.empty(8, dtype=torch.int64, device="cuda") if seeds_kind == "per_sample" else 1234
        with Recorder() as recorder:
            out = relay_sampler_step(denoiser, x, 0.9, 0.7, 0.5, 0.35, seeds=seeds, offset=3, heun=heun,
                                     backend=backend)
        assert out.device.type == "cuda" and out.shape == x.shape
    return recorder.calls


@pytest.mark.skipif(not GPU_BACKENDS, reason="neither the cuda nor the triton backend is registered here")
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("seeds_kind", ["int", "per_sample"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_stays_on_the_device(backend, seeds_kind, heun):
    calls = _record_step(backend, seeds_kind, heun)
    names = [name for name, _ in calls]
    assert [(n, d) for n, d in calls if d - {"cuda"}] == []  # every tensor made on the state's device
    namespace = "relayops" if backend == "cuda" else "relayops_triton"
    assert names.count(f"{namespace}.relay_step") == (2 if heun else 1)  # one fused kernel per update


@pytest.mark.skipif(not GPU_BACKENDS, reason="neither the cuda nor the triton backend is registered here")
def test_recorder_catches_a_host_read():
    """The check above can fail: a denoiser that reads a value back is caught. (It calls the op
    that ``.item()`` dispatches to: on a machine without CUDA, ``.item()`` of a fake CUDA tensor
    stops at the device guard, before the dispatcher.)"""
    def syncing(x, sigma):
        return x * torch.ops.aten._local_scalar_dense.default(sigma.max())  # a host round trip

    with pytest.raises(RuntimeError, match="host read in a sampler step: aten._local_scalar_dense"):
        _record_step(GPU_BACKENDS[0], "int", False, denoiser=syncing)


@pytest.mark.parametrize("heun", [False, True])
def test_compiled_step_is_one_graph_and_matches_eager(heun):
    torch._dynamo.reset()
    backend = "cpu" if "cpu" in relayops.available_backends() else "reference"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    levels = [torch.tensor([v, v * 1.1]) for v in (0.9, 0.7, 0.5, 0.35)]  # [B] tensors: one graph for every step
    seeds = torch.tensor([11, 12])

    def step(x, sigma, sigma_next, tau, tau_next):
        return relay_sampler_step(_toy_denoiser, x, sigma, sigma_next, tau, tau_next, seeds=seeds, offset=5,
                                  heun=heun, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # raises on a graph break
    with torch.no_grad():
        expected = step(x, *levels)
        torch.testing.assert_close(compiled(x, *levels), expected, rtol=0, atol=0)
        other = [v * 0.5 for v in levels]
        torch.testing.assert_close(compiled(x, *other), step(x, *other), rtol=0, atol=0)


def test_sampler_is_its_steps():
    """relay_sample runs relay_sampler_step: the same result as calling the steps by hand."""
    backend = "cpu" if "cpu" in relayops.available_backends() else "reference"
    x_lr = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    grid, taus = [0.9, 0.5, 0.2, 0.0], [0.6, 0.3, 0.1, 0.0]
    seeds = [3, 4]
    got = relay_sample(_toy_denoiser, x_lr, 4, sigmas=grid, eta=0.2, seed=seeds, L=0.93, sigma_b_max=3.0,
                       backend=backend, offset=7)
    # by hand: the start state, two steps, the final denoise (relay_sample's documented offsets)
    seeds_t = torch.tensor(seeds)
    up = relayops.sampling.nearest_upsample(x_lr, 4)
    x = up + grid[0] * relayops.relay_noise(up, 4, 0.15, True, seed=seeds_t, offset=7, backend=backend)
    taus = [relayops.schedules.tau_from_sigma(v, 0.93, 3.0) for v in grid[:-1]] + [0.0]
    for i in range(2):
        x = relay_sampler_step(_toy_denoiser, x, grid[i], grid[i + 1], taus[i], taus[i + 1], seeds=seeds_t,
                               offset=7 + 2 * i + 1, backend=backend)
    x = _toy_denoiser(x, torch.full((2,), grid[2]))
    torch.testing.assert_close(got, x, rtol=0, atol=0)
