"""Samplers: exact invariants (SPEC 8, 9, 10), seeds and reproducibility, pipeline, options."""
from __future__ import annotations

import pytest
import torch

import relayops
from relayops import reference, schedules
from relayops.sampling import (BaseStage, RelayPipeline, RelayStage, edm_sample, linear_relay_sample,
                               nearest_upsample, relay_sample, relay_settings)

DT = torch.float64
GRID = schedules.relay_sigmas(40, 0.9, rho=7.0).tolist()  # 14 levels + 0
L_PATH, SIGMA_B_MAX = 0.93, 3.0


class Recorder:
    """A denoiser returning a fixed image (per call: optional function of x) and logging its calls."""

    def __init__(self, x_star):
        self.x_star, self.calls = x_star, []

    def __call__(self, x, sigma, *labels):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype and sigma.device == x.device
        assert bool((sigma == sigma[0]).all())
        self.calls.append((x.clone(), float(sigma[0]), labels))
        return self.x_star.to(x.dtype).clone()


def on_path(x_star, z, sigma, sigma_b_max=SIGMA_B_MAX):
    """The SPEC 8 path point ``patch_blur(x*, tau(u(sigma))) + sigma z``."""
    tau = torch.full((x_star.shape[0],), schedules.tau_from_sigma(sigma, L_PATH, sigma_b_max), dtype=DT)
    return reference.patch_blur(x_star, tau, 4) + sigma * z


def _run_constant(x_star, z, grid, heun, sigma_b_max=SIGMA_B_MAX):
    den = Recorder(x_star)
    out = relay_sample(den, x_start=on_path(x_star, z, grid[0], sigma_b_max), sigmas=grid, eta=0.0, heun=heun,
                       L=L_PATH, sigma_b_max=sigma_b_max, dtype=DT)
    return den, out


def _star_and_z():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 12, generator=g, dtype=DT), torch.randn(2, 3, 8, 12, generator=g, dtype=DT)


def test_relay_invariant_through_the_sampler_euler():
    """SPEC 8: eta = 0 and a denoiser always returning x*: every state the denoiser sees is the
    path point at its sigma with the start's z, and the sampler ends exactly at x*."""
    x_star, z = _star_and_z()
    den, out = _run_constant(x_star, z, GRID, heun=False)
    assert [sig for _, sig, _ in den.calls] == GRID[:-1]
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, on_path(x_star, z, sig), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)  # the last step returns x0_hat itself


def test_relay_invariant_heun():
    """Heun (SPEC 8 and the authors' code: x0_eff = x - sigma (d + d')/2 with d = (x - x0_hat)/sigma)
    keeps the path exactly only without blur. With blur, x0_eff - x* = ((B - I) - (sigma/sigma')
    (B' - I)) x* / 2 is O(step) rather than 0, so the states leave the path by O(step) in all:
    the deviation halves when the number of steps doubles. The end is x* exactly either way."""
    x_star, z = _star_and_z()
    den, out = _run_constant(x_star, z, GRID, heun=True, sigma_b_max=0.0)  # tau = 0: EDM's Heun
    n = len(GRID) - 1
    assert len(den.calls) == 2 * n - 1  # one extra call on every step but the last
    assert sorted({sig for _, sig, _ in den.calls}, reverse=True) == GRID[:-1]
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, on_path(x_star, z, sig, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)

    deviations = []
    for karras_n in (40, 80, 160):  # 14, 28, 57 steps
        grid = schedules.relay_sigmas(karras_n, 0.9, rho=7.0).tolist()
        den, out = _run_constant(x_star, z, grid, heun=True)
        torch.testing.assert_close(out, x_star, rtol=0, atol=0)
        deviations.append(max(float((x - on_path(x_star, z, sig)).abs().max()) for x, sig, _ in den.calls))
    assert 0.4 < deviations[1] / deviations[0] < 0.6 and 0.4 < deviations[2] / deviations[1] < 0.6, deviations


def test_relay_start_from_low_resolution():
    """x_0 = nearest_upsample(x_lr, s) + sigma_0 * relay_noise(seed, offset 0) (SPEC 8)."""
    x_lr = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    den = Recorder(torch.zeros(2, 3, 8, 12, dtype=DT))
    relay_sample(den, x_lr, 4, sigmas=GRID, seed=5, alpha=0.15, normalize=False, dtype=DT)
    up = x_lr.repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(nearest_upsample(x_lr, 4), up)
    expected = up + GRID[0] * relayops.relay_noise(up, 4, 0.15, False, seed=5, offset=0)
    torch.testing.assert_close(den.calls[0][0], expected, rtol=0, atol=1e-12)


def test_relay_final_output_shape_and_dtype():
    x_lr = torch.zeros(3, 1, 4, 2)
    out = relay_sample(lambda x, s: 0.9 * x, x_lr, 2, num_steps=40)
    assert out.shape == (3, 1, 8, 4) and out.dtype == torch.float32
    assert relay_sample(lambda x, s: 0.9 * x, x_lr, 2, num_steps=40, dtype=DT).dtype == DT


def test_edm_constant_denoiser_follows_its_path():
    """Heun with x0_hat = x*: x_{i+1} = x* + (t_{i+1}/t_i)(x_i - x*), so it lands on x* exactly."""
    x_star = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    den = Recorder(x_star)
    out = edm_sample(den, x_star.shape, num_steps=10, seed=3, dtype=DT)
    grid = schedules.karras_sigmas(10, 0.002, 80.0, 7.0).tolist()
    z = (den.calls[0][0] - x_star) / grid[0]
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, x_star + sig * z, rtol=0, atol=1e-11)
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-12)
    # the start is sigma_max times the Philox normals of (seed 3, offset 0)
    eps, _ = reference.draw_normals(x_star, 3, 0)
    torch.testing.assert_close(den.calls[0][0], grid[0] * eps, rtol=0, atol=1e-12)


def test_edm_sde_steps_by_hand():
    """sde_scale (the authors' CelebA-HQ base sampler): from t to t' the step lands at noise
    a = sqrt(t'^2 - g^2) and adds g n, g = sde_scale t', in the Euler and again in the Heun step;
    n = the Philox normals at offsets n_steps + 2 i + 1 and + 2 (SPEC 4), here with x0_hat = x / 2."""
    grid, sde, seed = [2.0, 1.0, 0.5], 0.3, 11
    den = lambda x, s: x / 2  # noqa: E731
    out = edm_sample(den, (2, 1, 4, 4), sigmas=grid, sde_scale=sde, seed=seed, dtype=DT)
    like = torch.zeros(2, 1, 4, 4, dtype=DT)
    normals = lambda off: reference.draw_normals(like, seed, off)[0]  # noqa: E731
    n = len(grid)
    x = grid[0] * normals(0)
    for i, (t, t_n) in enumerate(zip(grid, grid[1:] + [0.0])):
        g = sde * t_n
        h = (t_n**2 - g**2) ** 0.5 - t
        d = (x - x / 2) / t
        x1 = x + h * d + g * normals(n + 2 * i + 1)
        if t_n > 0:
            d1 = (x1 - x1 / 2) / t_n
            x1 = x + h * (d + d1) / 2 + g * normals(n + 2 * i + 2)
        x = x1
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    # sde_scale = 0 is the plain Heun sampler
    plain = edm_sample(den, (2, 1, 4, 4), sigmas=grid, seed=seed, dtype=DT)
    assert torch.equal(edm_sample(den, (2, 1, 4, 4), sigmas=grid, sde_scale=0.0, seed=seed, dtype=DT), plain)
    with pytest.raises(ValueError, match="sde_scale"):
        edm_sample(den, (2, 1, 4, 4), sigmas=grid, sde_scale=1.0)


def test_linear_relay_invariant():
    """SPEC 10 with a denoiser returning z0*: z_t = A_t(z0*) + sigma_t eps at every step, end z0*."""
    g = torch.Generator().manual_seed(3)
    z_star, z_lr = (torch.randn(2, 4, 6, 6, generator=g, dtype=DT) for _ in range(2))
    sigmas = [1.0, 0.6, 0.3, 0.1, 0.0]
    ts = [20.0, 15.0, 9.0, 4.0, 0.0]
    den = Recorder(z_star)
    out = linear_relay_sample(den, z_lr, t_relay=20.0, sigmas=sigmas, ts=ts, seed=4, dtype=DT)
    eps = (den.calls[0][0] - z_lr) / sigmas[0]
    for (x, sig, _), t in zip(den.calls, ts):
        w = t / 20.0
        torch.testing.assert_close(x, (1 - w) * z_star + w * z_lr + sig * eps, rtol=0, atol=1e-12)
    assert len(den.calls) == 4
    torch.testing.assert_close(out, z_star, rtol=0, atol=0)


# --- seeds --------------------------------------------------------------------------------------

def _relay(seed, x_lr, **kw):
    den = lambda x, s: 0.8 * x + 0.1 * s.view(-1, 1, 1, 1)  # noqa: E731
    return relay_sample(den, x_lr, 4, num_steps=40, eta=0.2, seed=seed, dtype=DT, **kw)


def test_relay_reproducible_and_seed_dependent():
    x_lr = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    a, b, c = _relay(7, x_lr), _relay(7, x_lr), _relay(8, x_lr)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("heun", [False, True])
def test_relay_regenerate_one_image_alone(heun):
    x_lr = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    batch = _relay([11, 12, 13], x_lr, heun=heun)
    alone = _relay([12], x_lr[1:2], heun=heun)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-12)
    # a list of one seed and the int seed draw the same Philox stream, in the same kernel
    assert torch.equal(_relay(12, x_lr[1:2], heun=heun), alone)
    others = _relay([21, 12, 23], x_lr, heun=heun)
    torch.testing.assert_close(others[1], batch[1], rtol=0, atol=1e-12)
    assert (others[0] - batch[0]).abs().max() > 1e-3


def test_edm_seeds():
    den = lambda x, s: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    kw = dict(num_steps=8, S_churn=5.0, dtype=DT)
    batch = edm_sample(den, (3, 1, 4, 4), seed=[1, 2, 3], **kw)
    alone = edm_sample(den, (1, 1, 4, 4), seed=[2], **kw)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-12)
    assert torch.equal(edm_sample(den, (3, 1, 4, 4), seed=9, **kw), edm_sample(den, (3, 1, 4, 4), seed=9, **kw))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(edm_sample(den, (2, 1, 4, 4), seed=g1, **kw), edm_sample(den, (2, 1, 4, 4), seed=g2, **kw))


def test_seed_validation():
    x_lr = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="one per sample"):
        relay_sample(lambda x, s: x, x_lr, num_steps=40, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        relay_sample(lambda x, s: x, x_lr, num_steps=40, seed=-1)
    with pytest.raises(ValueError, match="exactly one of x_lr"):
        relay_sample(lambda x, s: x, x_lr, x_start=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="decreasing"):
        relay_sample(lambda x, s: x, x_lr, sigmas=[0.5, 0.7, 0.0])


# --- options ------------------------------------------------------------------------------------

def test_presets_and_overrides():
    p = schedules.get_preset("celebahq256")
    opt = relay_settings("celebahq256")
    assert (opt["num_steps"], opt["rho"], opt["sigma_trunc"], opt["L"], opt["sigma_b_max"], opt["normalize"]) == (
        p.num_grid, p.rho, p.sigma_trunc, p.L_sample, p.sigma_b_max, p.normalize)
    assert relay_settings("celebahq256", eta=0.0)["eta"] == 0.0  # a keyword wins over the preset
    assert relay_settings()["normalize"] is True and relay_settings()["L"] == 0.93
    # the imagenet256 grid has 100 levels above 0: 100 denoiser calls with Euler
    den = Recorder(torch.zeros(1, 1, 4, 4))
    relay_sample(den, torch.zeros(1, 1, 1, 1), preset="imagenet256", heun=False, dtype=DT)
    assert [c[1] for c in den.calls] == schedules.imagenet256.sigmas().tolist()[:-1]


def test_classifier_free_guidance_and_labels():
    """cond = a, uncond = b: x0_hat = w a - (w - 1) b, returned by the last step (eta = 0)."""
    labels = torch.tensor([3, 5])

    def den(x, sigma, class_labels):
        if class_labels is None:
            return torch.full_like(x, -1.0)
        assert torch.equal(class_labels, labels)
        return torch.full_like(x, 2.0)

    out = relay_sample(den, torch.zeros(2, 1, 1, 1), num_steps=40, eta=0.0, cfg=1.5, class_labels=labels)
    torch.testing.assert_close(out, torch.full_like(out, 1.5 * 2.0 - 0.5 * -1.0))
    out = edm_sample(den, (2, 1, 4, 4), num_steps=5, class_labels=labels)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_pipeline_stages_and_regeneration(capsys):
    base_den = lambda x, s: x / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    relay_den = lambda x, s: 0.9 * x  # noqa: E731
    pipe = RelayPipeline([BaseStage(base_den, resolution=2, channels=3, num_steps=6),
                          RelayStage(relay_den, s=4, num_steps=40),
                          RelayStage(relay_den, s=2, num_steps=40, options=dict(heun=False))], dtype=DT)
    outs = pipe(3, seed=10, progress=True)
    assert [tuple(o.shape) for o in outs] == [(3, 3, 2, 2), (3, 3, 8, 8), (3, 3, 16, 16)]
    # progress over the stages: stderr is not a terminal here, so plain lines instead of tqdm's bar
    assert "stages: 3/3 (100%)" in capsys.readouterr().err
    alone = pipe(1, seed=[11], progress=False)
    for o, a in zip(outs, alone):
        torch.testing.assert_close(a[0], o[1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="BaseStage"):
        RelayPipeline([RelayStage(relay_den)])


# --- the product path draws its noise in the kernels ------------------------------------------

@pytest.mark.skipif("cpu" not in relayops.available_backends(), reason="relayops._C is not built")
def test_sampling_never_uses_the_reference_philox(monkeypatch):
    """With per-sample seeds (the pipeline's) or an int seed, every sampler and the pipeline draw
    their noise in the kernels: the int64-emulated reference Philox is never called."""
    import relayops.reference.philox as philox

    def forbidden(*args, **kwargs):
        raise AssertionError("sampling called the reference Philox")

    monkeypatch.setattr(philox, "philox4x32", forbidden)
    den = lambda x, sigma: 0.9 * x  # noqa: E731
    x_lr = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for seed in (3, [3, 4], torch.tensor([3, 4])):
        relay_sample(den, x_lr, 4, num_steps=40, seed=seed)
        edm_sample(den, (2, 3, 8, 8), num_steps=4, seed=seed, S_churn=5.0)
        linear_relay_sample(den, x_lr, t_relay=4.0, sigmas=[1.0, 0.5, 0.0], seed=seed)
    pipe = RelayPipeline([BaseStage(den, resolution=4, num_steps=3), RelayStage(den, s=4, num_steps=30)])
    pipe(2, seed=7, progress=False)
