"""Matryoshka diffusion (SPEC 11): the NestedUNet, the joint loss, the trainer's progressive
schedule and exact resume, and the joint sampler on a Gaussian oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relayops.sampling import mdm_sample
from relayops.training import TrainConfig, Trainer, load_checkpoint, load_denoiser
from relayops.training import trainer as trainer_module
from relayops.training.losses import mdm_train_loss
from relayops.training.nested_unet import MDMDenoiser, NestedUNet, NestedUNetConfig

DT = torch.float64
RES = [4, 8, 16]
TINY = dict(model_channels=8, channel_mult=[1, 2, 2, 2], num_blocks=1, attn_resolutions=[4])


def direct_alpha_sigma(t: float, r: int, reference: int) -> tuple[float, float]:
    """SPEC 11 by hand: logsnr = clip(-2 ln tan(pi t / 2), -15, 15) + 2 ln(reference / r)."""
    lam = min(15.0, max(-15.0, -2 * math.log(math.tan(math.pi * t / 2)))) + 2 * math.log(reference / r)
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def block_mean(a: np.ndarray, r: int) -> np.ndarray:
    b, c, d, _ = a.shape
    return a.reshape(b, c, r, d // r, r, d // r).mean(axis=(3, 5))


def tiny_net(seed: int = 0, randomize: bool = False) -> NestedUNet:
    torch.manual_seed(seed)
    net = NestedUNet(NestedUNetConfig(resolutions=RES, **TINY))
    if randomize:  # the output convolutions start at zero; give every weight a value
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.2)
    return net


# --- the nested network -----------------------------------------------------------------------

def test_nested_unet_shapes_and_levels():
    net = tiny_net()
    zs = [torch.randn(2, 3, r, r) for r in RES]
    for k in (1, 2, 3):
        outs = net(zs[:k], torch.zeros(2))
        assert [tuple(o.shape) for o in outs] == [(2, 3, r, r) for r in RES[:k]]
    # each level holds the next lower one (the same module), with its own input and output layers
    assert net.level(16) is net.outer and net.level(8) is net.outer.inner and net.level(4) is net.outer.inner.inner
    assert net.level(4).inner is None and net.level(4).mid is not None
    layers = {id(net.level(r).conv_in) for r in RES} | {id(net.level(r).conv_out) for r in RES}
    assert len(layers) == 6


def test_nested_unet_parameter_sharing():
    net = tiny_net(randomize=True)
    names = {id(p): n for n, p in net.named_parameters()}
    in_level = {r: {id(p) for p in net.level(r).parameters()} for r in RES}
    assert in_level[4] < in_level[8] < in_level[16] == {id(p) for p in net.outer.parameters()}
    # With the lowest two resolutions only the level of 8 (holding that of 4) and the embedding run.
    zs = [torch.randn(2, 3, r, r, requires_grad=True) for r in RES]
    sum(o.square().sum() for o in net(zs[:2], torch.full((2,), 0.3))).backward()
    for p in net.parameters():
        used = id(p) in in_level[8] or names[id(p)].startswith("embed.")
        assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == used, names[id(p)]
    # With all three, information flows both ways: the 4x4 output sees the 16x16 input and back.
    net.zero_grad()
    outs = net(zs, torch.full((2,), 0.3))
    g16 = torch.autograd.grad(outs[0].sum(), zs[2], retain_graph=True)[0]
    g4 = torch.autograd.grad(outs[2].sum(), zs[0])[0]
    assert bool(g16.abs().sum() > 0) and bool(g4.abs().sum() > 0)


def test_nested_unet_errors():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"zs\[1\] must be \[B, 3, 8, 8\]"):
        net([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 16, 16)], torch.zeros(1))
    with pytest.raises(ValueError, match="lowest 1..3"):
        net([], torch.zeros(1))
    with pytest.raises(ValueError, match="power-of-two multiple"):
        NestedUNet(NestedUNetConfig(resolutions=[12, 16], **TINY))
    with pytest.raises(ValueError, match="ascending"):
        NestedUNet(NestedUNetConfig(resolutions=[16, 8], **TINY))
    with pytest.raises(ValueError, match="at least 3"):
        NestedUNet(NestedUNetConfig(resolutions=RES, model_channels=8, channel_mult=[1, 2]))
    with pytest.raises(ValueError, match="num_blocks has 2 entries"):
        NestedUNet(NestedUNetConfig(resolutions=RES, model_channels=8, channel_mult=[1, 2, 2], num_blocks=[1, 2]))


def test_denoiser_at_init_is_alpha_z():
    # The output convolutions start at zero (v = 0), so x_hat^r = alpha_t^r z^r on r's own schedule.
    den = MDMDenoiser(tiny_net(), schedule="shifted", reference=16)
    zs = [torch.randn(3, 3, r, r, dtype=DT) for r in RES]
    t = torch.tensor([0.1, 0.5, 0.93], dtype=DT)
    outs = den(zs, t)
    for z, out, r in zip(zs, outs, RES):
        assert out.dtype == DT
        a = torch.tensor([direct_alpha_sigma(float(tb), r, 16)[0] for tb in t], dtype=DT)
        torch.testing.assert_close(out, a[:, None, None, None] * z, rtol=1e-6, atol=1e-7)


# --- the joint loss -----------------------------------------------------------------------------

class Spy:
    """An MDMDenoiser stand-in: records (zs, t) and predicts the clean images plus a constant."""

    resolutions, schedule, reference = RES, "shifted", 16

    def __init__(self, y):
        self.y, self.calls = y, []

    def __call__(self, zs, t, class_labels=None):
        self.calls.append(([z.detach().clone() for z in zs], t.detach().clone()))
        return [torch.from_numpy(block_mean(self.y.numpy(), z.shape[-1]) + 0.1 * (k + 1)).float()
                for k, z in enumerate(zs)]


@pytest.mark.parametrize("weighting", ["v", "x"])
def test_mdm_train_loss_matches_a_direct_computation(weighting):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(512, 1, 16, 16, generator=g, dtype=DT) * 2 - 1
    spy = Spy(y)
    weights = [0.5, 1.0, 2.0]
    loss = mdm_train_loss(spy, y.float(), seeds=torch.arange(512) + 7, weights=weights, weighting=weighting)
    (zs, t), = spy.calls
    t = t.double().numpy()
    assert t.min() > 0 and t.max() < 1 and abs(t.mean() - 0.5) < 4 * math.sqrt(1 / 12 / 512)
    expected = np.zeros(512)
    noises = []
    for k, (z, r) in enumerate(zip(zs, RES)):
        a_s = np.array([direct_alpha_sigma(tb, r, 16) for tb in t])
        a, s = a_s[:, :1, None, None], a_s[:, 1:, None, None]
        # the state is alpha avgpool_r(y) + sigma eps with standard normal eps (recovered here)
        eps = (z.double().numpy() - a * block_mean(y.numpy(), r)) / s
        assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02, (r, eps.mean(), eps.std())
        noises.append(eps.reshape(512, -1)[:, 0])
        err = (0.1 * (k + 1)) ** 2
        expected += weights[k] * (err / s[:, 0, 0, 0] ** 2 if weighting == "v" else err)
    # the resolutions draw independent noises
    assert abs(np.corrcoef(noises)[np.triu_indices(3, 1)]).max() < 0.2
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=2e-5)


def test_each_sample_and_resolution_keeps_its_noise():
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    full, low, alone = Spy(y), Spy(y), Spy(y[1:2])
    seeds = torch.tensor([5, 6, 7])
    mdm_train_loss(full, y, seeds=seeds)
    mdm_train_loss(low, y, seeds=seeds, num_resolutions=2)
    mdm_train_loss(alone, y[1:2], seeds=seeds[1:2])
    assert len(low.calls[0][0]) == 2
    for k in range(2):  # the progressive phases see the same noise at the lower resolutions
        assert torch.equal(full.calls[0][0][k], low.calls[0][0][k])
    for k in range(3):  # a sample's noise does not depend on its batch
        assert torch.equal(full.calls[0][0][k][1:2], alone.calls[0][0][k])
    with pytest.raises(ValueError, match="crops at the model's highest resolution"):
        mdm_train_loss(full, y[..., :8, :8], seeds=seeds)


# --- the trainer: loss, progressive schedule, exact resume ----------------------------------------

def mdm_config(tmp_path, **kw):
    base = dict(stage="mdm", data="builtin", out=str(tmp_path / "run"), resolution=16, mdm_resolutions=RES,
                steps=4, batch_size=8, lr=2e-3, warmup=2, save_every=0, progress=False, device="cpu",
                model=dict(TINY))
    base.update(kw)
    return TrainConfig(**base)


def per_resolution_losses(trainer) -> list[float]:
    """Each resolution's loss (one-hot weights) of the current weights on fixed data and noise."""
    with torch.no_grad():
        y, _, _ = trainer._batch(0)
        out = []
        for k in range(len(RES)):
            w = [float(i == k) for i in range(len(RES))]
            out.append(float(np.mean([mdm_train_loss(trainer.denoiser, y, seeds=torch.arange(len(y)) + 100 * j,
                                                     weights=w) for j in range(6)])))
        return out


def test_a_few_steps_lower_the_loss_at_every_resolution(tmp_path):
    trainer = Trainer(mdm_config(tmp_path, steps=40, warmup=5, lr=3e-3), resume=False)
    before = per_resolution_losses(trainer)
    trainer.run()
    after = per_resolution_losses(trainer)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)


def test_progressive_schedule_switches_at_the_configured_steps(tmp_path, monkeypatch):
    seen = []
    real = trainer_module.mdm_train_loss

    def spy(*args, **kw):
        seen.append(kw["num_resolutions"])
        return real(*args, **kw)

    monkeypatch.setattr(trainer_module, "mdm_train_loss", spy)
    trainer = Trainer(mdm_config(tmp_path, steps=2, progressive=[2, 4]), resume=False)
    net = trainer.unet
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    prefix = {4: "outer.inner.inner.", 8: "outer.inner.", 16: "outer."}
    for steps, r in ((2, 4), (4, 8), (6, 16)):
        trainer.cfg.steps = steps
        trainer.run()
        # the last step used the level of r (holding the lower ones) and the embedding, nothing else
        for n, p in net.named_parameters():
            used = n.startswith(prefix[r]) or n.startswith("embed.")
            assert (p.grad is not None) == used, (steps, n)
            if not used:
                assert torch.equal(p, init[n]), (steps, n)
    assert seen == [1, 1, 2, 2, 3, 3]
    assert [trainer.cfg.active_resolutions(s) for s in (0, 1, 2, 3, 4, 100)] == [1, 1, 2, 2, 3, 3]


def test_stop_and_resume_across_a_switch_equals_an_unbroken_run(tmp_path):
    kw = dict(progressive=[2, 4], model=dict(TINY, dropout=0.1), steps=6)
    Trainer(mdm_config(tmp_path, out=str(tmp_path / "a"), **kw), resume=False).run()
    Trainer(mdm_config(tmp_path, out=str(tmp_path / "b"), **dict(kw, steps=3)), resume=False).run()
    resumed = Trainer(mdm_config(tmp_path, out=str(tmp_path / "b"), **kw), resume=True)
    assert resumed.step == 3
    resumed.run()
    a, rec_a = load_checkpoint(tmp_path / "a")
    b, rec_b = load_checkpoint(tmp_path / "b")
    assert rec_a["step"] == rec_b["step"] == 6 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    den, rec = load_denoiser(tmp_path / "b", "mdm")
    assert isinstance(den, MDMDenoiser) and den.resolutions == RES and rec["unet"]["resolutions"] == RES


def test_mdm_config_errors(tmp_path):
    for kw, match in [(dict(resolution=8), "highest resolution 16"),
                      (dict(progressive=[3]), "2 increasing steps"),
                      (dict(progressive=[4, 4]), "2 increasing steps"),
                      (dict(mdm_weights=[1, 1]), "one weight per resolution"),
                      (dict(mdm_weighting="eps"), "mdm_weighting"),
                      (dict(parameterization="vpred"), "predicts v"),
                      (dict(stage="base", resolution=8, progressive=[2]), "option of the mdm stage")]:
        with pytest.raises(ValueError, match=match):
            mdm_config(tmp_path, **kw).validate()


# --- the joint sampler on a Gaussian oracle -------------------------------------------------------
# x ~ N(0, Sigma) on 8x8 single-channel images (Sigma a smooth squared-exponential field plus a 1%
# nugget), resolutions 2, 4, 8 with the schedules shifted against reference 8. The joint
# observation Z = [alpha_r P_r x + sigma_r eps_r]_r is linear-Gaussian, so the optimal joint
# denoiser is linear and closed-form: x_hat^r = P_r Sigma A^T (A Sigma A^T + S)^-1 Z with
# A = [alpha_r P_r], S = diag(sigma_r^2) (P_r: block means, built here with Kronecker products).
# The sampler with this denoiser is a linear map of its start and step noises, so the covariance
# of its output is propagated exactly (SPEC 11's update in matrix form); the chains must match that,
# and that must be close to P_r Sigma P_r^T at every resolution.

G_RES, G_REF, G_H = [2, 4, 8], 8, 8


def _sigma() -> torch.Tensor:
    ij = torch.stack(torch.meshgrid(torch.arange(G_H), torch.arange(G_H), indexing="ij"), -1).reshape(-1, 2).to(DT)
    d2 = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    return 0.25 * torch.exp(-d2 / (2 * 1.5**2)) + 0.0025 * torch.eye(G_H * G_H, dtype=DT)


G_SIGMA = _sigma()


def pool_matrix(r: int) -> torch.Tensor:
    """P_r with vec(avgpool_r(x)) = P_r vec(x) for row-major 8x8 images: kron(A, A), A[i, j] = 1/k on blocks."""
    k = G_H // r
    a = torch.kron(torch.eye(r, dtype=DT), torch.full((1, k), 1.0 / k, dtype=DT))
    return torch.kron(a, a)


POOLS = [pool_matrix(r) for r in G_RES]
SIZES = [r * r for r in G_RES]


def oracle_matrix(t: float) -> torch.Tensor:
    """H(t) with the stacked predictions [x_hat^r] = H(t) Z (Z the stacked noisy images)."""
    a_s = [direct_alpha_sigma(t, r, G_REF) for r in G_RES]
    a = torch.cat([al * p for (al, _), p in zip(a_s, POOLS)])
    s = torch.cat([torch.full((n,), sg**2, dtype=DT) for (_, sg), n in zip(a_s, SIZES)])
    k = G_SIGMA @ a.T @ torch.linalg.inv(a @ G_SIGMA @ a.T + torch.diag(s))
    return torch.cat([p @ k for p in POOLS])


class GaussianOracle:
    resolutions = G_RES

    def __init__(self):
        self.cache = {}

    def __call__(self, zs, t):
        tv = float(t[0])
        assert bool((t == tv).all())
        if tv not in self.cache:
            self.cache[tv] = oracle_matrix(tv)
        z = torch.cat([x.reshape(x.shape[0], -1) for x in zs], 1)
        out = z @ self.cache[tv].T
        return [o.reshape(x.shape) for o, x in zip(out.split(SIZES, 1), zs)]


def exact_output_cov(num_steps: int, eta: float) -> torch.Tensor:
    """Covariance of the stacked outputs of the discrete sampler (its update in matrix form)."""
    ts = [1 - i / num_steps for i in range(num_steps + 1)]
    cov = torch.eye(sum(SIZES), dtype=DT)
    for i in range(num_steps):
        h = oracle_matrix(ts[i])
        if i == num_steps - 1:
            return h @ cov @ h.T
        cols = {name: [] for name in ("a", "s", "an", "g", "c")}
        for r, n in zip(G_RES, SIZES):
            (a, s), (an, sn) = direct_alpha_sigma(ts[i], r, G_REF), direct_alpha_sigma(ts[i + 1], r, G_REF)
            c = eta * sn / s * math.sqrt(max(0.0, 1 - a**2 / an**2))
            for name, v in zip(cols, (a, s, an, math.sqrt(sn**2 - c**2), c)):
                cols[name].append(torch.full((n,), v, dtype=DT))
        a, s, an, g, c = (torch.cat(cols[name]) for name in cols)
        # z' = an x_hat + g (z - a x_hat) / s + c n, x_hat = H z
        m = an[:, None] * h + (g / s)[:, None] * (torch.eye(len(a), dtype=DT) - a[:, None] * h)
        cov = m @ cov @ m.T + torch.diag(c**2)


def rel(c: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.norm(c - target) / torch.linalg.norm(target))


def rms_sampling_err(c: torch.Tensor, n: int) -> float:
    """rms of ||S_n - C||_F / ||C||_F for S_n the empirical covariance of n draws of N(0, C)."""
    return math.sqrt(float((c**2 + torch.outer(c.diag(), c.diag())).sum()) / n) / float(torch.linalg.norm(c))


def test_joint_sampler_discretisation_error_halves_with_the_steps():
    # DDIM/DDPM steps on the uniform time grid are first order: the exact error of the output
    # covariance (all resolutions) halves when the number of steps doubles, toward zero.
    for eta in (0.0, 1.0):
        errors = []
        for num_steps in (50, 100, 200):
            exact, start, worst = exact_output_cov(num_steps, eta), 0, 0.0
            for p, size in zip(POOLS, SIZES):
                worst = max(worst, rel(exact[start:start + size, start:start + size], p @ G_SIGMA @ p.T))
                start += size
            errors.append(worst)
        assert all(1.8 < a / b < 2.2 for a, b in zip(errors, errors[1:])), (eta, errors)
        assert errors[-1] < 0.025, (eta, errors)


# exact errors at 100 steps: 0.036 (eta 0) and 0.045 (eta 1), largest over the resolutions
@pytest.mark.parametrize("eta, num_steps, bias_bound", [(0.0, 100, 0.037), (1.0, 100, 0.046)])
def test_joint_sampler_reproduces_the_gaussian_at_every_resolution(eta, num_steps, bias_bound):
    n = 4000
    outs = mdm_sample(GaussianOracle(), n, channels=1, num_steps=num_steps, eta=eta, reference=G_REF, seed=3,
                      dtype=DT)
    exact = exact_output_cov(num_steps, eta)
    start = 0
    for x, p, size in zip(outs, POOLS, SIZES):
        target = p @ G_SIGMA @ p.T
        c_exact = exact[start:start + size, start:start + size]
        start += size
        v = x.reshape(n, -1)
        c_emp = v.T @ v / n
        numbers = dict(resolution=x.shape[-1], bias=rel(c_exact, target), vs_exact=rel(c_emp, c_exact),
                       vs_data=rel(c_emp, target), rms=rms_sampling_err(target, n))
        assert numbers["bias"] <= bias_bound, numbers                       # the algorithm (discretisation)
        assert numbers["vs_exact"] <= 1.5 * rms_sampling_err(c_exact, n), numbers  # the implementation
        assert numbers["vs_data"] <= numbers["bias"] + 1.5 * numbers["rms"], numbers


def test_joint_sampler_noise_and_errors():
    oracle = GaussianOracle()
    a = mdm_sample(oracle, 3, channels=1, num_steps=4, eta=1.0, reference=G_REF, seed=[10, 11, 12], dtype=DT)
    b = mdm_sample(oracle, 1, channels=1, num_steps=4, eta=1.0, reference=G_REF, seed=[11], dtype=DT)
    for x, y in zip(a, b):  # per-sample seeds: an image regenerates alone
        torch.testing.assert_close(x[1:2], y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="eta"):
        mdm_sample(oracle, 1, channels=1, eta=1.5)
    with pytest.raises(ValueError, match="ascending"):
        mdm_sample(oracle, 1, [8, 4], channels=1)
    with pytest.raises(ValueError, match="num_steps"):
        mdm_sample(oracle, 1, channels=1, num_steps=0)


# --- the command line ---------------------------------------------------------------------------

def test_cli_trains_and_samples_mdm(tmp_path, capsys):
    from PIL import Image
    from test_cli import run_error, write_images

    from relayops.cli import main

    write_images(tmp_path / "data", 3, 24)
    run = str(tmp_path / "mdm")
    tiny = ["--channels", "8", "--channel-mult", "1,2,2,2", "--batch-size", "4", "--warmup", "1", "--no-progress"]
    assert main(["train", "--stage", "mdm", "--data", str(tmp_path / "data"), "--resolutions", "4,8,16",
                 "--progressive", "1,2", "--steps", "3", "--sample-every", "3", "--out", run, *tiny]) == 0
    assert "trained mdm stage to step 3" in capsys.readouterr().out
    assert Image.open(tmp_path / "mdm" / "samples_000003.png").size == (4 * 18 + 2,) * 2  # 16 images of 16x16
    _, record = load_checkpoint(run, "mdm")
    assert record["train"]["progressive"] == [1, 2] and record["train"]["resolution"] == 16
    out = tmp_path / "samples"
    assert main(["sample", "--mdm", run, "--num", "2", "--mdm-steps", "3", "--all-resolutions", "--out", str(out),
                 "--no-progress"]) == 0
    assert "wrote 2 images of 16x16" in capsys.readouterr().out
    assert Image.open(out / "000001.png").size == (16, 16)
    assert all((out / name).exists() for name in ("grid.png", "grid_4.png", "grid_8.png"))

    assert "belong to the relay pipeline" in run_error(capsys, ["sample", "--mdm", run, "--relay", run])
    assert "give --base" in run_error(capsys, ["sample", "--num", "1"])
    assert "'mdm' stage model" in run_error(capsys, ["sample", "--base", run])
    assert "option of --stage mdm" in run_error(capsys, ["train", "--stage", "base", "--progressive", "5"])
    assert "power-of-two multiple" in run_error(capsys, ["train", "--stage", "mdm", "--resolutions", "12,16",
                                                         "--out", str(tmp_path / "bad"), *tiny])
