"""The samplers' own cost with per-sample seeds against one int seed (a denoiser that costs nothing).

Per-sample seeds (a list of B ints: what ``RelayPipeline``, ``relayops sample`` and the demo use)
are drawn inside the kernels like an int seed, so the two should cost the same per step:

* ``relay_sample``: 8 images 64x64 -> 256x256 (s = 4), float32, Heun with eta = 0.2 (two fused
  ``relay_step`` calls per step), the denoiser returns its input;
* ``RelayPipeline``: an EDM base stage at 64x64 and one relay stage to 256x256, the same trivial
  denoisers, against the same stages called with one int seed.

``benchmark.extra_info`` holds ``per_step_s`` (time per sampler step) and ``seeds``.
"""
import pytest
import torch

from conftest import DEVICES, sync
from relayops.sampling import BaseStage, RelayPipeline, RelayStage, edm_sample, relay_sample

B, C, LOW, S = 8, 3, 64, 4
RELAY_GRID = [0.9, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.0]  # 8 steps, the last returns x0_hat
BASE_STEPS = 4
SEEDS = {"int": 1234, "per_sample": [1234 + b for b in range(B)]}


def no_cost(x, sigma):
    return x


def _record(benchmark, fn, device, **info):
    def call():
        out = fn()
        sync(device)
        return out

    call()  # warm-up: first-call allocations and the op registrations' lazy set-up
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(device=device, threads=torch.get_num_threads(), **info)
    benchmark.extra_info["per_step_s"] = benchmark.stats.stats.median / info["steps"]


@pytest.mark.parametrize("seeds", list(SEEDS))
@pytest.mark.parametrize("device", DEVICES)
def test_relay_sample(benchmark, device, seeds):
    x_lr = torch.randn(B, C, LOW, LOW, generator=torch.Generator().manual_seed(0)).to(device)
    fn = lambda: relay_sample(no_cost, x_lr, S, sigmas=RELAY_GRID, eta=0.2, heun=True,  # noqa: E731
                              seed=SEEDS[seeds])
    _record(benchmark, fn, device, sampler="relay_sample", seeds=seeds, steps=len(RELAY_GRID) - 1,
            shape=[B, C, LOW * S, LOW * S])


@pytest.mark.parametrize("seeds", list(SEEDS))
@pytest.mark.parametrize("device", DEVICES)
def test_pipeline(benchmark, device, seeds):
    """The pipeline (per-sample seeds seed, seed + 1, ...) or the same two stages with one int seed."""
    if seeds == "per_sample":
        pipe = RelayPipeline([BaseStage(no_cost, resolution=LOW, channels=C, num_steps=BASE_STEPS),
                              RelayStage(no_cost, s=S, options=dict(sigmas=RELAY_GRID))], device=device)
        fn = lambda: pipe(B, seed=SEEDS["int"], progress=False)[-1]  # noqa: E731
    else:
        def fn():
            x = edm_sample(no_cost, (B, C, LOW, LOW), num_steps=BASE_STEPS, seed=SEEDS["int"], device=device)
            return relay_sample(no_cost, x, S, sigmas=RELAY_GRID, seed=SEEDS["int"], offset=1 << 32)
    _record(benchmark, fn, device, sampler="RelayPipeline", seeds=seeds, steps=BASE_STEPS + len(RELAY_GRID) - 1,
            shape=[B, C, LOW * S, LOW * S])
