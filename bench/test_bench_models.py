"""One relay-stage sampler step with the full-size RDM ImageNet 256 network: network against relay ops.

The relay stage of the released ImageNet 256 model (``RDM_CONFIGS["imagenet256-relay"]``: ADM,
256 x [1, 1, 2, 2, 4, 4], 553.8M parameters) with random weights, batch 1, 256x256, class 207.
One step of the authors' sampler (``relay_sample`` with the ``imagenet256`` preset, guidance 3.5)
is: the denoiser with and without the label at the state (two network passes), one fused
``relay_step`` (the Euler proposal), the two passes again at the proposal, and the fused Heun
``relay_step``. ``test_relay_stage_step`` times that step and splits it; ``benchmark.extra_info``
holds ``network_s`` (the four passes and the two guidance combinations), ``relay_ops_s`` (the two
``relay_step`` calls), their ``ratio`` (relay ops / network) and ``per_pass_s``.
``test_relay_step_alone`` times one fused Heun ``relay_step`` with more rounds.

Devices: the CPU (float32), and the GPU when there is one (float32 and bfloat16 activations).
Rounds: ``RELAYOPS_BENCH_MODEL_ROUNDS`` (default 2 on the CPU, where one pass takes seconds; 10
on a GPU). The step benchmark is marked ``slow`` (about 3.5 minutes and 2.2 GB on 2 CPU cores).
Run: ``pytest bench/test_bench_models.py --benchmark-json=bench/results/models_cpu.json``.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from conftest import DEVICES, sync
from relayops import relay_step, schedules
from relayops.models import RDM_CONFIGS, EDMPrecond

RES, S, CLASS, CFG = 256, 4, 207, 3.5
SIGMA, SIGMA_NEXT = 0.5, 0.45   # a step inside the preset's grid (below sigma_trunc 0.9)
PRESET = schedules.imagenet256
CASES = [("cpu", "float32")] + [("cuda", d) for d in ("float32", "bfloat16") if "cuda" in DEVICES]


def rounds(device: str) -> int:
    return int(os.environ.get("RELAYOPS_BENCH_MODEL_ROUNDS", "2" if device == "cpu" else "10"))


@pytest.fixture(scope="module")
def network():
    """The full-size relay network, random weights (built once; about 8 s and 2.2 GB on the CPU)."""
    torch.manual_seed(0)
    return EDMPrecond(**RDM_CONFIGS["imagenet256-relay"]).eval().requires_grad_(False)


def _step_args(device):
    tau, tau_next = (schedules.tau_from_sigma(v, PRESET.L_sample, PRESET.sigma_b_max) for v in (SIGMA, SIGMA_NEXT))
    return dict(sigma=SIGMA, sigma_next=SIGMA_NEXT, tau=tau, tau_next=tau_next, eta=PRESET.eta, s=S,
                alpha=PRESET.alpha, normalize=PRESET.normalize, seed=[1234])


def _place(network, device, dtype_name):
    net = network.to(device)
    net.activation_dtype = torch.bfloat16 if dtype_name == "bfloat16" else None
    return net


@pytest.mark.slow  # minutes on a CPU: `pytest bench -m "not slow"` leaves it out
@pytest.mark.parametrize("device,dtype_name", CASES, ids=[f"{d}-{t}" for d, t in CASES])
def test_relay_stage_step(benchmark, network, device, dtype_name):
    net = _place(network, device, dtype_name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, RES, RES, generator=g).to(device)
    labels = torch.tensor([CLASS], device=device)
    kw = _step_args(device)
    split = {"network": [], "ops": []}

    def denoise(state, sigma):
        sig = torch.full((1,), sigma, device=device)
        cond, uncond = net(state, sig, labels), net(state, sig, None)
        return CFG * cond - (CFG - 1) * uncond

    def step():
        with torch.no_grad():
            t0 = time.perf_counter()
            x0_hat = denoise(x, SIGMA)
            sync(device)
            t1 = time.perf_counter()
            x_prop = relay_step(x, x0_hat, offset=1, **kw)
            sync(device)
            t2 = time.perf_counter()
            x0_prop = denoise(x_prop, SIGMA_NEXT)
            sync(device)
            t3 = time.perf_counter()
            out = relay_step(x, x0_hat, offset=2, x_prop=x_prop, x0_hat_prop=x0_prop, **kw)
            sync(device)
            t4 = time.perf_counter()
        split["network"].append((t1 - t0) + (t3 - t2))
        split["ops"].append((t2 - t1) + (t4 - t3))
        return out

    step()  # warm-up: first-call allocations, kernel selection
    split = {"network": [], "ops": []}
    benchmark.pedantic(step, rounds=rounds(device), iterations=1, warmup_rounds=0)
    network_s, ops_s = statistics.median(split["network"]), statistics.median(split["ops"])
    benchmark.extra_info.update(device=device, dtype=dtype_name, threads=torch.get_num_threads(), batch=1,
                                resolution=RES, parameters_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                                network_s=network_s, relay_ops_s=ops_s, ratio=ops_s / network_s,
                                per_pass_s=network_s / 4)


@pytest.mark.parametrize("device", DEVICES)
def test_relay_step_alone(benchmark, device):
    g = torch.Generator().manual_seed(2)
    x, x0, xp, x0p = (torch.randn(1, 3, RES, RES, generator=g).to(device) for _ in range(4))
    kw = _step_args(device)

    def call():
        out = relay_step(x, x0, offset=2, x_prop=xp, x0_hat_prop=x0p, **kw)
        sync(device)
        return out

    call()
    benchmark.pedantic(call, rounds=50, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(device=device, threads=torch.get_num_threads(), batch=1, resolution=RES)
