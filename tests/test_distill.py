"""Progressive relay distillation (docs/spec.md section 10.2).

The Gaussian oracle of test_sampling_gaussian (8x8 single-channel images, s = 4, linear
denoisers) gives exact references: the teacher's two deterministic steps written as matrices
straight from SPEC 8 / SPEC 10, and the student's x0 target obtained by solving the student's
one-step equation ``x2 = A_{i+2}(x0) + r (x - A_i(x0))`` for x0 with a dense linear solve. The
code computes the target differently (per-frequency weights of the teacher's two predictions),
so agreement checks the derivation as well as the code. A tiny trained model then checks that
one round of training does what distillation is for.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import test_sampling_gaussian as oracle
from relayops import schedules
from relayops.sampling import linear_relay_sample
from relayops.training import TrainConfig, area_downsample, train
from relayops.training.distill import (DistillConfig, Distiller, RelayPath, _round_configs, distillation_loss,
                                       distillation_target, guided_x0, load_student, teacher_path)

DT = torch.float64
EYE, SIGMA, N_PIX, H, S = oracle.EYE, oracle.SIGMA, oracle.N_PIX, oracle.H, oracle.S
# A second prior for the unconditional branch of guidance (any other linear denoiser would do).
SIGMA_UNCOND = 0.6 * SIGMA + 0.05 * EYE


def blur_path(n: int) -> RelayPath:
    """The oracle's relay path (L 0.93, sigma_B_max 3, alpha 0.15), Karras grid 0.9 -> 0.008, rho 7."""
    levels = schedules.karras_sigmas(n, 0.008, 0.9, 7.0).tolist() + [0.0]
    return RelayPath("blur", levels, s=S, alpha=oracle.ALPHA, normalize=True, L=oracle.L_PATH,
                     sigma_b_max=oracle.SIGMA_B_MAX)


def posterior(prior: torch.Tensor, degrade: torch.Tensor, sigma: float) -> torch.Tensor:
    """``E[x0 | x]`` for ``x = degrade x0 + sigma eps``, x0 ~ N(0, prior): the linear optimal denoiser."""
    return prior @ degrade.T @ torch.linalg.inv(degrade @ prior @ degrade.T + sigma**2 * EYE)


class MatrixDenoiser:
    """``denoiser(x, sigma[, labels])`` applying ``matrix(sigma_b, conditional)`` to each sample
    (per-sample noise levels); ``labels is None`` selects the unconditional matrix."""

    def __init__(self, matrix):
        self.matrix = functools.lru_cache(maxsize=None)(matrix)

    def __call__(self, x, sigma, labels="cond"):
        rows = [self.matrix(float(sigma[b]), labels is not None) @ x[b].reshape(-1) for b in range(x.shape[0])]
        return torch.stack(rows).reshape(x.shape)


def blur_teacher(path: RelayPath) -> MatrixDenoiser:
    tau = dict(zip(path.sigmas, path.times()))
    return MatrixDenoiser(lambda sig, cond: posterior(SIGMA if cond else SIGMA_UNCOND,
                                                      oracle.blur_matrix(tau[sig]), sig))


def random_states(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, H, H, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --- the target against the matrix form ------------------------------------------------------

@pytest.mark.parametrize("guided", [False, True])
def test_blur_target_equals_the_solved_student_step(guided):
    """Per sample (mixed student steps, the last one included, and per-sample w): teacher
    Euler steps x1 = r1 x + (B1 - r1 B0) W0 x, x2 = r2 x1 + (B2 - r2 B1) W1 x1 (SPEC 8, eta 0);
    the target solves (B2 - r1 r2 B0) x0 = x2 - r1 r2 x."""
    path = blur_path(8)
    den = blur_teacher(path)
    i = torch.tensor([0, 2, 4, 6, 6, 0])
    w = torch.tensor([1.0, 2.5, 4.0, 1.5, 3.0, 2.0], dtype=DT) if guided else None
    x = random_states(len(i), 0)
    got = distillation_target(lambda z, sig: guided_x0(den, z, sig, "cond" if guided else None, w), x, i, path)
    tau = path.times()
    for b, lvl in enumerate(i.tolist()):
        s0, s1, s2 = path.sigmas[lvl:lvl + 3]
        b0, b1, b2 = (oracle.blur_matrix(tau[lvl + k]) for k in range(3))

        def w_at(sig):
            cond = den.matrix(sig, True)
            return cond if w is None else w[b] * cond - (w[b] - 1) * den.matrix(sig, False)
        v = x[b].reshape(-1)
        r1, r2 = s1 / s0, s2 / s1
        x1 = r1 * v + (b1 - r1 * b0) @ w_at(s0) @ v
        x2 = r2 * x1 + (b2 - r2 * b1) @ w_at(s1) @ x1
        want = torch.linalg.solve(b2 - r1 * r2 * b0, x2 - r1 * r2 * v)
        torch.testing.assert_close(got[b].reshape(-1), want, rtol=0, atol=1e-10)


def linear_setup(num_steps: int):
    """The linear relay (SPEC 10) on the oracle: z_L = P z0 (2x2 average pooling, upsampled);
    ``A_t = a_t I + (t/T) P`` with a_t = 1 - t/T; the teacher is the posterior of z0 given z alone."""
    q = oracle.pool_matrix()
    p = (q.T * 4) @ q
    path = teacher_path(dict(relay_mode="linear", linear_steps=18, sigma_trunc=0.9, patch=4), num_steps)
    t_of = dict(zip(path.sigmas, path.ts))
    T = path.t_relay

    def degrade(sig):
        return (1 - t_of[sig] / T) * EYE + (t_of[sig] / T) * p
    return path, p, t_of, MatrixDenoiser(lambda sig, cond: posterior(SIGMA, degrade(sig), sig))


def test_linear_target_equals_the_solved_student_step():
    path, p, t_of, den = linear_setup(6)
    assert path.num_steps == 6 and path.t_relay == 7 and path.ts[0] == 7 and path.ts[-1] == 0
    i = torch.tensor([0, 2, 4, 4])
    z = random_states(len(i), 1)
    z_lr = (random_states(len(i), 2).reshape(len(i), -1) @ p.T).reshape(z.shape)
    got = distillation_target(lambda x, sig: den(x, sig), z, i, path, z_lr)
    T = path.t_relay
    for b, lvl in enumerate(i.tolist()):
        s0, s1, s2 = path.sigmas[lvl:lvl + 3]
        t0, t1, t2 = (t_of[v] for v in (s0, s1, s2))
        zl, v = z_lr[b].reshape(-1), z[b].reshape(-1)

        def A(t, x0):
            return (1 - t / T) * x0 + (t / T) * zl
        xa = den.matrix(s0, True) @ v
        z1 = A(t1, xa) + (s1 / s0) * (v - A(t0, xa))
        xb = den.matrix(s1, True) @ z1
        z2 = A(t2, xb) + (s2 / s1) * (z1 - A(t1, xb))
        r = s2 / s0
        want = (z2 - r * v - ((t2 - r * t0) / T) * zl) / ((1 - t2 / T) - r * (1 - t0 / T))
        torch.testing.assert_close(got[b].reshape(-1), want, rtol=0, atol=1e-10)


def test_target_weights_are_a_convex_combination():
    """docs/spec.md 10.2: Wa, Wb >= 0 and Wa + Wb = 1 at every frequency (no amplification)."""
    for path in (blur_path(16), linear_setup(6)[0]):
        wa, wb = path.target_weights()
        assert bool((wa >= 0).all() and (wb > 0).all())
        torch.testing.assert_close(wa + wb, torch.ones_like(wa), rtol=0, atol=1e-12)
        torch.testing.assert_close(wb[-1], torch.ones_like(wb[-1]))  # the last step: the teacher's final x0


# --- a distilled linear student reproduces the teacher ----------------------------------------

@pytest.mark.parametrize("mode", ["blur", "linear"])
def test_fitted_linear_student_reproduces_the_teacher(mode):
    """Fit a linear student to the code's targets by least squares (the exact minimiser of the
    distillation loss over linear students), then sample: the student's N/2 steps on the coarse
    grid give the teacher's N steps, every state, to float64 rounding."""
    if mode == "blur":
        path, extra = blur_path(4), 0
        den = blur_teacher(path)
    else:
        path, p, _, den = linear_setup(4)
        extra = N_PIX  # the target also depends on z_L: the student sees [z, z_L]
    n = 3 * (N_PIX + extra)
    states = random_states(n, 3)
    z_lr = None if mode == "blur" else (random_states(n, 4).reshape(n, -1) @ p.T).reshape(states.shape)
    student_maps = {}
    for lvl in range(0, path.num_steps, 2):
        target = distillation_target(lambda x, sig: den(x, sig), states, torch.full((n,), lvl), path, z_lr)
        inputs = states.reshape(n, -1) if mode == "blur" else torch.cat([states.reshape(n, -1), z_lr.reshape(n, -1)], 1)
        student_maps[path.sigmas[lvl]] = (torch.linalg.pinv(inputs) @ target.reshape(n, -1)).T  # z_L has rank 16

    if mode == "blur":
        def student(x, sigma):
            return (x.reshape(x.shape[0], -1) @ student_maps[float(sigma[0])].T).reshape(x.shape)
        x_lr = random_states(5, 5)[:, :, :H // S, :H // S] * 0.5
        teacher_out = path.sample(den, x_lr, seed=7, dtype=DT)
        student_out = path.coarsen().sample(student, x_lr, seed=7, dtype=DT)
    else:
        # The oracle's z_L is the 2x2-pooled image upsampled (its own low resolution), given directly.
        z_l = z_lr[:5]

        def student(x, sigma):
            m = student_maps[float(sigma[0])]
            return (torch.cat([x.reshape(x.shape[0], -1), z_l.reshape(5, -1)], 1) @ m.T).reshape(x.shape)

        def run(grid, d):
            return linear_relay_sample(d, z_l, t_relay=grid.t_relay, sigmas=list(grid.sigmas), ts=list(grid.ts),
                                       seed=7, dtype=DT)
        teacher_out, student_out = run(path, den), run(path.coarsen(), student)
    torch.testing.assert_close(student_out, teacher_out, rtol=0, atol=1e-9)
    assert float(teacher_out.abs().max()) > 0.1  # a real image, not zeros


# --- grids, configuration and errors -----------------------------------------------------------

def test_paths_and_rounds_configuration(tmp_path):
    p = blur_path(16)
    assert [q.num_steps for q in (p, p.coarsen(), p.coarsen().coarsen())] == [16, 8, 4]
    assert p.coarsen().sigmas == p.sigmas[::2] and p.coarsen().sigmas[-1] == 0.0
    assert RelayPath.from_dict(p.to_dict()) == p
    one = teacher_path({"relay_mode": "blur"}, 1)
    assert one.sigmas == (0.9, 0.0)
    with pytest.raises(ValueError, match="cannot be halved"):
        RelayPath("blur", [0.9, 0.5, 0.1, 0.0]).coarsen()
    with pytest.raises(ValueError, match="end in 0"):
        RelayPath("blur", [0.9, 0.5])
    with pytest.raises(ValueError, match="teacher_steps must be in 1..7"):
        teacher_path({"relay_mode": "linear"}, 8)
    with pytest.raises(ValueError, match="rounds must be"):
        DistillConfig(teacher="x", rounds=0).validate()
    with pytest.raises(ValueError, match="guidance must be"):
        DistillConfig(teacher="x", guidance=[0.5, 2.0]).validate()


# --- a tiny trained model ------------------------------------------------------------------

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    train(TrainConfig(stage="relay", data="builtin", out=str(out), resolution=8, patch=4, steps=15, batch_size=8,
                      lr=3e-3, warmup=2, save_every=0, progress=False, device="cpu", model=dict(TINY)))
    return out


def test_one_round_lowers_the_loss_and_the_student_approaches_the_two_step_teacher(tiny_teacher, tmp_path):
    """Teacher grid 0.9 -> 0.2 -> 0 (2 steps), student 0.9 -> 0 (1 step). (With the default last
    level 0.008 the teacher's second call nearly returns its input, and one and two teacher steps
    hardly differ.) Loss and sample distances on a batch and seeds the training never saw."""
    (rc,) = _round_configs(DistillConfig(teacher=str(tiny_teacher), out=str(tmp_path), rounds=1, teacher_steps=2,
                                         sigma_min=0.2, steps=25, batch_size=8, lr=3e-3, warmup=2, device="cpu",
                                         progress=False))
    distiller = Distiller(rc)
    path = distiller.path
    y, _, _ = distiller._batch(0)
    seeds = torch.arange(8, dtype=torch.int64) + 1000   # seeds the training never uses

    def loss():
        with torch.no_grad():
            return float(distillation_loss(distiller.denoiser, distiller.teacher, y, path=path, seeds=seeds))
    before = loss()
    distiller.run()
    after = loss()
    assert after < 0.7 * before, (before, after)

    student, grid, rec = load_student(rc.out)
    assert grid.num_steps == 1 and rec["distill"]["teacher_steps"] == 2
    x_lr = area_downsample(y, 4)
    two = path.sample(distiller.teacher, x_lr, seed=3)
    one_teacher = path.coarsen().sample(distiller.teacher, x_lr, seed=3)
    one_student = grid.sample(student, x_lr, seed=3)
    err_student, err_teacher = (float(((v - two) ** 2).mean()) for v in (one_student, one_teacher))
    assert err_student < 0.7 * err_teacher, (err_student, err_teacher)
    assert math.isfinite(err_student)


# --- guidance input, command line ------------------------------------------------------------

@torch.no_grad()
def test_guidance_embedding_starts_at_zero_and_is_used():
    from relayops.training import EDMPrecond, UNet, UNetConfig

    torch.manual_seed(0)
    teacher = UNet(UNetConfig(**TINY, num_classes=2))
    for v in teacher.parameters():   # a non-trivial network (the zero-initialised layers made non-zero)
        v.add_(0.1 * torch.randn_like(v))
    student = UNet(UNetConfig(**TINY, num_classes=2, guidance=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("guidance_embed.") for k in missing)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    want = EDMPrecond(teacher)(x, sigma, labels)
    for w in (1.0, 4.0):
        torch.testing.assert_close(EDMPrecond(student)(x, sigma, labels, guidance=w), want)
    torch.nn.init.normal_(student.guidance_embed.mlp[-1].weight, std=0.5)
    a, b = (EDMPrecond(student)(x, sigma, labels, guidance=w) for w in (1.0, 4.0))
    assert float((a - b).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="no guidance input"):
        EDMPrecond(teacher)(x, sigma, labels, guidance=2.0)


def test_command_line_distills_with_guidance_and_samples(tmp_path, capsys):
    from test_cli import TINY as CLI_TINY, run_error, write_images

    from relayops.cli import main

    for name in ("a", "b"):
        write_images(tmp_path / "data" / name, 2, 40)
    common = ["--data", str(tmp_path / "data"), "--steps", "2", "--class-cond", *CLI_TINY]
    assert main(["train", "--stage", "base", "--resolution", "8", "--out", str(tmp_path / "base"), *common]) == 0
    assert main(["train", "--stage", "relay", "--resolution", "16", "--out", str(tmp_path / "relay"), *common]) == 0
    out = tmp_path / "distill"
    assert main(["distill", "--teacher", str(tmp_path / "relay"), "--out", str(out), "--rounds", "2",
                 "--teacher-steps", "4", "--steps", "2", "--batch-size", "4", "--cfg", "1", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    assert "final student" in capsys.readouterr().out
    student, grid, rec = load_student(out / "round2", guidance=2.0)
    assert grid.num_steps == 1 and rec["distill"]["guidance"] == [1.0, 3.0] and rec["unet"]["guidance"]
    assert rec["train"]["teacher_guided"] and rec["distill"]["teacher"] == str(out / "round1")
    assert main(["sample", "--base", str(tmp_path / "base"), "--relay", str(out / "round2"), "--num", "2",
                 "--cfg", "2", "--class", "1", "--out", str(tmp_path / "samples"), "--no-progress",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "samples" / "000001.png").exists()
    err = run_error(capsys, ["sample", "--base", str(tmp_path / "base"), "--relay", str(out / "round2"),
                             "--relay-steps", "8", "--out", str(tmp_path / "s2"), "--device", "cpu"])
    assert "its own 1 steps" in err
    err = run_error(capsys, ["sample", "--base", str(tmp_path / "base"), "--relay", str(out / "round2"),
                             "--cfg", "5", "--out", str(tmp_path / "s2"), "--device", "cpu"])
    assert "outside the range" in err
    err = run_error(capsys, ["distill", "--teacher", str(tmp_path / "relay"), "--out", str(tmp_path / "d3"),
                             "--rounds", "3", "--teacher-steps", "4", "--device", "cpu"])
    assert "divisible by 8" in err
    err = run_error(capsys, ["distill", "--teacher", str(tmp_path / "base"), "--out", str(tmp_path / "d4"),
                             "--rounds", "1"])
    assert "relay stage" in err
