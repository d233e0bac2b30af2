"""The reference trainer: UNet preconditioning, losses, data, metrics, checkpoints, the loop."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from relayops import patch_blur, schedules
from relayops.training import (EDMPrecond, TrainConfig, Trainer, UNet, UNetConfig, VPredPrecond, area_downsample,
                               edm_base_loss, linear_relay_loss, load_checkpoint, relay_loss, save_checkpoint,
                               vpred_loss)
from relayops.training.data import CropDataset, folder_images
from relayops.training.metrics import log_spectral_distance, psnr, radial_power_spectrum
from relayops.training.trainer import _device

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1)


def tiny_config(tmp_path, **kw):
    # On the CPU also where a GPU is present: these tests check the CPU's bit-exact behaviour.
    base = dict(stage="base", data="builtin", out=str(tmp_path / "run"), resolution=8, steps=4, batch_size=8,
                lr=2e-3, warmup=2, save_every=0, progress=False, device="cpu", model=dict(TINY))
    base.update(kw)
    return TrainConfig(**base)


# --- network and preconditioning ----------------------------------------------------------------

def test_unet_shapes_and_class_conditioning():
    net = UNet(UNetConfig(resolution=16, model_channels=8, channel_mult=[1, 2, 2], attn_resolutions=[8],
                          num_classes=3))
    x = torch.randn(2, 3, 16, 24)  # non-square, and not the nominal resolution
    c = torch.zeros(2)
    assert net(x, c).shape == x.shape
    assert net(x, c, torch.tensor([0, 2])).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 3, 18, 16), torch.zeros(1))


def test_edm_precond_at_init_is_c_skip():
    # The output convolution starts at zero (F = 0), so D(x; sigma) = c_skip x with
    # c_skip = sigma_d^2 / (sigma^2 + sigma_d^2) (SPEC 6), computed here by hand.
    d = EDMPrecond(UNet(UNetConfig(**TINY)))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    expected = x * (0.25 / (sigma.double() ** 2 + 0.25))[:, None, None, None]
    torch.testing.assert_close(d(x, sigma), expected, rtol=1e-6, atol=1e-7)


def test_vpred_precond_at_init_matches_vp_scaling():
    # With v = 0: x0 = alpha z = alpha^2 x = x / (1 + sigma^2).
    d = VPredPrecond(UNet(UNetConfig(**TINY)))
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.3, 3.0])
    torch.testing.assert_close(d(x, sigma), x / (1 + sigma**2)[:, None, None, None], rtol=1e-5, atol=1e-6)


# --- losses ---------------------------------------------------------------------------------------

class Spy:
    """A denoiser that records its inputs and returns a fixed prediction."""

    def __init__(self, y):
        self.y, self.calls = y, []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return self.y


def test_base_loss_noise_levels_and_weight():
    y = torch.zeros(4000, 1, 4, 4)
    spy = Spy(y + 0.1)
    loss = edm_base_loss(spy, y, generator=torch.Generator().manual_seed(0))
    x, sigma = spy.calls[0]
    logs = sigma.double().log()
    assert abs(float(logs.mean()) - schedules.P_MEAN) < 0.06 and abs(float(logs.std()) - schedules.P_STD) < 0.05
    z = x / sigma[:, None, None, None]
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    # Constant error 0.1: loss = 0.01 * mean(lambda(sigma)), lambda by hand.
    lam = (sigma.double() ** 2 + 0.25) / (0.25 * sigma.double() ** 2)
    assert float(loss) == pytest.approx(0.01 * float(lam.mean()), rel=1e-5)


def test_relay_loss_corruption_matches_spec6():
    torch.manual_seed(0)
    y = torch.randn(512, 3, 8, 8)
    spy = Spy(y)
    relay_loss(spy, y, generator=torch.Generator().manual_seed(1), s=4, alpha=0.15, normalize=True)
    x, sigma = spy.calls[0]
    assert float(sigma.min()) >= 0.0075 * (1 - 1e-5)
    assert float(sigma.max()) <= schedules.sigma_from_u(1.0) * (1 + 1e-5)
    # x - patch_blur(y, tau(u(sigma))) is sigma times unit-variance relay noise.
    tau = schedules.tau_from_sigma(sigma.double()).float()
    noise = (x - patch_blur(y, tau, 4, backend="reference")) / sigma[:, None, None, None]
    assert abs(float(noise.std()) - 1) < 0.02


def test_linear_relay_loss_state_is_on_the_linear_path():
    torch.manual_seed(0)
    y = torch.randn(256, 3, 8, 8)
    sigmas = schedules.relay_sigmas(18, 0.9, dtype=torch.float32)
    t_relay = sigmas.numel() - 1
    spy = Spy(y)
    linear_relay_loss(spy, y, generator=torch.Generator().manual_seed(2), s=4, sigmas=sigmas)
    x, sigma = spy.calls[0]
    z_lr = area_downsample(y, 4).repeat_interleave(4, -2).repeat_interleave(4, -1)
    # sigma = sigmas[T_r - t] identifies t; then x - A_t(y) must be sigma * N(0, 1).
    idx = torch.tensor([int((sigmas - s).abs().argmin()) for s in sigma])
    assert bool((idx < t_relay).all())
    t = (t_relay - idx).float()[:, None, None, None]
    residual = (x - ((1 - t / t_relay) * y + t / t_relay * z_lr)) / sigma[:, None, None, None]
    assert abs(float(residual.std()) - 1) < 0.03


@pytest.mark.parametrize("multiscale", [False, True])
def test_vpred_loss_is_zero_for_the_true_v(multiscale):
    y = torch.randn(6, 3, 64, 64)

    class Oracle:
        def predict_v(self, z, logsnr, class_labels=None):
            alpha, sigma = (c[:, None, None, None] for c in schedules.alpha_sigma_from_logsnr(logsnr))
            return (alpha * z - y) / sigma   # from x = alpha z - sigma v (SPEC 11)

    loss = vpred_loss(Oracle(), y, generator=torch.Generator().manual_seed(0), reference=64, multiscale=multiscale)
    assert float(loss) < 1e-8
    # A wrong prediction is penalised.
    class Wrong(Oracle):
        def predict_v(self, z, logsnr, class_labels=None):
            return super().predict_v(z, logsnr) + 0.1
    assert float(vpred_loss(Wrong(), y, generator=torch.Generator().manual_seed(0), multiscale=multiscale)) > 1e-4


class VSpy:
    """A v-prediction denoiser that records its inputs."""

    def __init__(self):
        self.calls = []

    def predict_v(self, z, logsnr, class_labels=None):
        self.calls.append((z.detach().clone(), logsnr.detach().clone()))
        return torch.zeros_like(z)


@pytest.mark.parametrize("kind", ["base", "relay", "linear", "vpred"])
def test_each_sample_is_corrupted_by_its_own_seed_alone(kind):
    # What DDP relies on: sample b's noise level and noise depend on (y_b, seeds_b) only, not on
    # the rest of the batch or the sample's place in it.
    torch.manual_seed(0)
    y = torch.rand(4, 3, 8, 8) * 2 - 1
    sigmas = schedules.relay_sigmas(18, 0.9, dtype=torch.float32)

    def inputs(idx, seeds):
        spy = VSpy() if kind == "vpred" else Spy(None)
        spy.y = y[idx]
        loss = {"base": lambda: edm_base_loss(spy, y[idx], seeds=seeds),
                "relay": lambda: relay_loss(spy, y[idx], seeds=seeds, s=4),
                "linear": lambda: linear_relay_loss(spy, y[idx], seeds=seeds, s=4, sigmas=sigmas),
                "vpred": lambda: vpred_loss(spy, y[idx], seeds=seeds)}[kind]
        loss()
        return spy.calls[0]

    seeds = torch.tensor([11, 2**40 + 3, 5, 2**63 - 1])
    x_all, level_all = inputs([0, 1, 2, 3], seeds)
    x_part, level_part = inputs([3, 1], seeds[[3, 1]])
    torch.testing.assert_close(x_part, x_all[[3, 1]], rtol=0, atol=0)
    torch.testing.assert_close(level_part, level_all[[3, 1]], rtol=0, atol=0)
    # A list of ints is the same seeds; another seed gives another draw.
    x_list, _ = inputs([0, 1, 2, 3], seeds.tolist())
    assert torch.equal(x_list, x_all)
    x_other, level_other = inputs([0, 1, 2, 3], seeds + 1)
    assert not torch.equal(x_other[0], x_all[0]) and not torch.equal(level_other, level_all)


def test_loss_randomness_arguments():
    y = torch.zeros(2, 3, 8, 8)
    spy = Spy(y)
    with pytest.raises(ValueError, match="exactly one source of randomness"):
        edm_base_loss(spy, y)
    with pytest.raises(ValueError, match="exactly one source of randomness"):
        edm_base_loss(spy, y, generator=torch.Generator(), seeds=[1, 2])
    with pytest.raises(TypeError, match="per-sample seeds"):
        edm_base_loss(spy, y, seeds=7)
    with pytest.raises(ValueError, match="one per sample"):
        edm_base_loss(spy, y, seeds=[1, 2, 3])


# --- data -------------------------------------------------------------------------------------

def test_crops_are_deterministic_and_in_range():
    images = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)]
    ds = CropDataset(images, 16, crop_scale=(1.0, 2.0), seed=5)
    a, _ = ds.sample(3, epoch=2)
    b, _ = ds.sample(3, epoch=2)
    c, _ = ds.sample(3, epoch=3)
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def write_png(path, h, w, seed=0):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_loading_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        folder_images(tmp_path / "empty")
    write_png(tmp_path / "d" / "cats" / "a.png", 20, 30)
    write_png(tmp_path / "d" / "dogs" / "b.PNG", 24, 24)
    images, labels, names = folder_images(tmp_path / "d")
    assert [tuple(i.shape) for i in images] == [(3, 20, 30), (3, 24, 24)]
    assert labels == [0, 1] and names == ["cats", "dogs"]
    with pytest.raises(ValueError, match="smaller than the resolution 32"):
        CropDataset(images, 32)
    (tmp_path / "d" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        folder_images(tmp_path / "d")


# --- metrics ------------------------------------------------------------------------------------

def test_psnr_by_hand():
    ref = torch.zeros(2, 3, 8, 8)
    x = ref + torch.tensor([0.2, 0.02])[:, None, None, None]   # errors 0.1 and 0.01 on the [0, 1] scale
    torch.testing.assert_close(psnr(x, ref), torch.tensor([20.0, 40.0], dtype=torch.float64))


def test_radial_spectrum_peak_and_lsd_of_a_scaled_image():
    n = 32
    grid = torch.arange(n, dtype=torch.float64)
    img = torch.cos(math.pi * (2 * grid + 1) * 5 / (2 * n))[None, :].expand(n, n)   # DCT-II basis k = 5
    freq, spec = radial_power_spectrum(img[None, None].repeat(1, 3, 1, 1))
    assert int(spec[0].argmax()) == 5 and float(freq[5]) == 5 / n
    torch.manual_seed(0)
    ref = torch.randn(4, 3, n, n) * 0.3
    # Scaling by a multiplies the power by a^2 at every frequency: LSD = |20 log10 a| in every band.
    lsd = log_spectral_distance(0.5 * ref, ref, [(0.0, 0.5), (0.5, 1.0)])
    assert len(lsd) == 2
    for v in lsd.values():
        assert v == pytest.approx(abs(20 * math.log10(0.5)), rel=1e-9)
    assert all(v < 1e-9 for v in log_spectral_distance(ref, ref, [(0.0, 1.0)]).values())


# --- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_errors(tmp_path, monkeypatch):
    d = tmp_path / "c"
    save_checkpoint(d, {"a": torch.arange(3.0)}, {"train": {"stage": "base"}, "step": 1})
    tensors, record = load_checkpoint(d, "base")
    assert torch.equal(tensors["a"], torch.arange(3.0)) and record["step"] == 1
    with pytest.raises(ValueError, match="'base' stage model; a 'relay'"):
        load_checkpoint(d, "relay")

    # A failure while writing leaves the old checkpoint intact and no temporary file behind.
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save", boom)  # what save_checkpoint serialises with
    with pytest.raises(OSError):
        save_checkpoint(d, {"a": torch.zeros(3)}, {"train": {"stage": "base"}, "step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    assert load_checkpoint(d)[1]["step"] == 1

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(bad)
    truncated = tmp_path / "t" / "checkpoint.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes((d / "checkpoint.safetensors").read_bytes()[:-4])
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(truncated)


# --- the loop -------------------------------------------------------------------------------------

def _fixed_loss(trainer, seed=123):
    """The loss of the current weights on fixed data and fixed noise (four draws)."""
    with torch.no_grad():
        y, labels, _ = trainer._batch(0)
        seeds = [torch.arange(len(y)) + seed + 100 * k for k in range(4)]
        return float(torch.stack([trainer._loss(y, labels, s) for s in seeds]).mean())


@pytest.mark.parametrize("stage", ["base", "relay"])
def test_a_few_steps_lower_the_loss(tmp_path, stage):
    cfg = tiny_config(tmp_path, stage=stage, steps=40, warmup=5, lr=3e-3)
    trainer = Trainer(cfg, resume=False)
    before = _fixed_loss(trainer)
    trainer.run()
    after = _fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("kw", [dict(stage="relay", model=dict(TINY, dropout=0.1), class_cond=False),
                                dict(stage="base", class_cond=True, bf16=True)])
def test_stop_and_resume_equals_an_unbroken_run(tmp_path, kw):
    unbroken = tiny_config(tmp_path, out=str(tmp_path / "a"), steps=6, **kw)
    Trainer(unbroken, resume=False).run()
    first = tiny_config(tmp_path, out=str(tmp_path / "b"), steps=3, **kw)
    Trainer(first, resume=False).run()
    second = tiny_config(tmp_path, out=str(tmp_path / "b"), steps=6, **kw)
    resumed = Trainer(second, resume=True)
    assert resumed.step == 3
    resumed.run()
    a, rec_a = load_checkpoint(tmp_path / "a")
    b, rec_b = load_checkpoint(tmp_path / "b")
    assert rec_a["step"] == rec_b["step"] == 6
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_data_order_is_one_permutation_per_epoch(tmp_path, monkeypatch):
    # 1024 samples per epoch and a global batch of 100: 10 steps per epoch, 24 samples left out.
    cfg = tiny_config(tmp_path, batch_size=100)
    trainer = Trainer(cfg, resume=False)
    assert trainer.steps_per_epoch == 10
    computed = []
    order = trainer._epoch_order
    monkeypatch.setattr(trainer, "_epoch_order", lambda epoch: computed.append(epoch) or order(epoch))
    epochs = [np.concatenate([trainer.global_batch_indices(k) for k in range(10 * e, 10 * e + 10)]) for e in (0, 1)]
    assert computed == [0, 1]   # once per epoch, not per step
    for idx in epochs:
        assert len(idx) == 1000 and len(set(idx.tolist())) == 1000 and 0 <= idx.min() and idx.max() < 1024
    assert not np.array_equal(epochs[0], epochs[1])
    # A fresh trainer (a resumed run) starting in mid-epoch sees the same batches.
    fresh = Trainer(cfg, resume=False)
    assert np.array_equal(fresh.global_batch_indices(13), epochs[1][300:400])
    assert np.array_equal(fresh.global_batch_indices(2), epochs[0][200:300])


def test_the_loss_stays_on_the_device_between_log_steps(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, steps=6, log_every=4), resume=False)
    returned = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda: returned.append(step()) or returned[-1])
    result = trainer.run()
    assert len(returned) == 6
    for loss in returned:
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
        assert loss.device == trainer.device
    # Log windows: steps 1-4, then 5-6 (the run's end); the result is the last window's mean.
    assert result["loss"] == pytest.approx((float(returned[4]) + float(returned[5])) / 2, rel=1e-6)


def test_deterministic_attention_uses_the_math_kernel(tmp_path, restore_determinism):
    # SDPA's fused kernels are switched off inside a deterministic step (and only there).
    seen = []

    def record_sdpa_flags(module, args):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))

    for deterministic in (True, False):
        trainer = Trainer(tiny_config(tmp_path, steps=1, deterministic=deterministic), resume=False)
        trainer.unet.mid[1].register_forward_pre_hook(record_sdpa_flags)   # the bottleneck's attention
        trainer.train_step()
    assert seen == [(False, False), (True, True)]


def test_resume_refuses_changed_settings(tmp_path):
    Trainer(tiny_config(tmp_path, steps=1), resume=False).run()
    with pytest.raises(ValueError, match=r"different settings for \['lr'\]"):
        Trainer(tiny_config(tmp_path, steps=2, lr=1e-4), resume=True)
    with pytest.raises(ValueError, match="'base' stage model"):
        Trainer(tiny_config(tmp_path, stage="relay", steps=2), resume=True)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        tiny_config(tmp_path, stage="relay", resolution=10).validate()
    with pytest.raises(ValueError, match="stage must be one of"):
        tiny_config(tmp_path, stage="middle").validate()
    with pytest.raises(ValueError, match="multiscale loss needs"):
        tiny_config(tmp_path, multiscale=True).validate()
    with pytest.raises(ValueError, match="time_limit must be >= 0"):
        tiny_config(tmp_path, time_limit=-1.0).validate()


def test_time_limit_stops_at_a_log_step_and_records_it(tmp_path):
    # A limit already spent after the first log window: training stops there, saves, and the
    # checkpoint says which step it reached; without the limit the same run goes to `steps`.
    cfg = tiny_config(tmp_path, steps=1000, log_every=3, time_limit=1e-9)
    assert Trainer(cfg).run()["step"] == 3
    assert load_checkpoint(cfg.out)[1]["step"] == 3
    more = tiny_config(tmp_path, steps=5, log_every=3)
    assert Trainer(more).run()["step"] == 5             # the limit may change on resume: it alters no math


def test_builtin_test_split_is_the_unseen_bottom_quarter():
    from relayops.training.data import BUILTIN_TEST_FRACTION, BUILTIN_TRAIN, builtin_images, skimage_image

    train_split, test_split = builtin_images("train"), builtin_images("test")
    assert len(train_split) == len(test_split) == len(BUILTIN_TRAIN)
    for name, top, bottom in zip(BUILTIN_TRAIN, train_split, test_split):
        whole = skimage_image(name)
        assert top.shape[-2] + bottom.shape[-2] == whole.shape[-2]
        assert abs(bottom.shape[-2] - BUILTIN_TEST_FRACTION * whole.shape[-2]) <= 1
        assert torch.equal(torch.cat([top, bottom], dim=-2), whole)   # disjoint rows, nothing lost
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_images("validation")


# --- distributed --------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _subprocess_env(**extra) -> dict:
    # The subprocesses must import this checkout's relayops, not another installed copy.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


class InputSpy:
    """Records what a trainer feeds its denoiser, and every step's loss."""

    def __init__(self, trainer):
        self.inner, self.calls, self.losses = trainer.denoiser, [], []
        trainer.denoiser = self
        step = trainer.train_step

        def record():
            loss = step()
            self.losses.append(float(loss))
            return loss
        trainer.train_step = record

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), class_labels.clone()))
        return self.inner(x, sigma, class_labels)


# Relay stage (block noise, per-sample blur), class labels with dropout, no network dropout
# (dropout is the one per-rank random stream), a checkpoint written mid-run (a collective);
# gloo on the CPU also where GPUs are present.
DDP_CONFIG = dict(stage="relay", resolution=8, steps=3, batch_size=8, warmup=1, class_cond=True, label_dropout=0.3,
                  save_every=2, progress=False, device="cpu", model=dict(TINY))

WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_training import InputSpy
from relayops.training import TrainConfig, Trainer
trainer = Trainer(TrainConfig(out=sys.argv[1], **json.loads(sys.argv[2])), resume=False)
spy = InputSpy(trainer)
trainer.run()
torch.save({"world": dist.get_world_size(), "state": trainer.unet.state_dict(), "calls": spy.calls,
            "losses": spy.losses}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_train_like_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out),
           json.dumps(DDP_CONFIG), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    tensors, record = load_checkpoint(out)
    assert record["step"] == 3 and record["world_size"] == 2

    # The same run in this process, alone, with the same global batch of 8.
    one = Trainer(TrainConfig(out=str(tmp_path / "one"), **DDP_CONFIG), resume=False)
    spy = InputSpy(one)
    one.run()

    # Each step the two ranks see different halves of the one process's batch: the same crops,
    # label dropout, noise levels and noise, sample for sample.
    assert len(r0["calls"]) == len(r1["calls"]) == len(spy.calls) == 3
    labels = []
    for c0, c1, c in zip(r0["calls"], r1["calls"], spy.calls):
        assert c0[0].shape[0] == c1[0].shape[0] == 4
        assert not torch.equal(c0[0], c1[0])
        for i in range(3):
            torch.testing.assert_close(torch.cat([c0[i], c1[i]]), c[i])
        labels.append(c[2])
    labels = torch.cat(labels)
    assert 0 < int((labels == 1).sum()) < len(labels)   # some labels dropped (to the "no label" token 1)

    # Both ranks hold the same weights, and rank 0 saved them.
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
        assert torch.equal(v, tensors[f"model.{k}"]), k
    # DDP averages the ranks' gradients: every step's loss is the mean of the ranks' losses.
    np.testing.assert_allclose((np.array(r0["losses"]) + np.array(r1["losses"])) / 2, spy.losses, rtol=1e-5)
    # The trained networks compute the same function up to float summation order (measured: about
    # 5e-6 relative). Not compared weight by weight: Adam turns summation-order noise in gradients
    # that are zero in exact arithmetic (e.g. a conv bias followed by a one-channel-per-group
    # GroupNorm, which the output does not depend on) into lr-sized steps.
    ddp_net = UNet(UNetConfig(resolution=8, num_classes=1, **TINY))
    ddp_net.load_state_dict(r0["state"])
    g = torch.Generator().manual_seed(5)
    x, c_noise, lab = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, generator=g), torch.arange(16) % 2
    with torch.no_grad():
        expected, got = one.unet(x, c_noise, lab), ddp_net(x, c_noise, lab)
    assert float(expected.abs().max()) > 0.05   # the network has moved from its zero output at initialisation
    assert float((got - expected).norm() / expected.norm()) < 3e-5


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _device("cuda")
    # Two visible GPUs (device_count is all _device asks of them).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _device("auto", local_rank=1, world=2) == torch.device("cuda", 1)
    assert _device("cuda", local_rank=0, world=2) == torch.device("cuda", 0)
    assert _device("cuda:1") == torch.device("cuda", 1)
    assert _device("cpu", local_rank=1, world=2) == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 has no GPU of its own: 2 CUDA devices"):
        _device("cuda", local_rank=2, world=3)
    with pytest.raises(ValueError, match="all 2 processes on one GPU"):
        _device("cuda:1", local_rank=0, world=2)
    with pytest.raises(ValueError, match="'cuda:5' does not exist"):
        _device("cuda:5")


@pytest.mark.gpu
def test_torchrun_nccl_checkpoint_and_deterministic_resume_on_gpu(tmp_path):
    # One process per GPU (at most two). Under torchrun even one process goes through NCCL, DDP
    # and the gathered checkpoint. With --deterministic, 2 + 2 steps must equal 4 steps.
    n = min(2, torch.cuda.device_count())

    def launch(out, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "relayops", "train", "--stage", "relay", "--data", "builtin", "--resolution", "16",
               "--steps", str(steps), "--batch-size", "8", "--channels", "8", "--channel-mult", "1,2",
               "--attn", "8", "--dropout", "0.1", "--warmup", "1", "--save-every", "1", "--device", "cuda",
               "--deterministic", "--no-progress", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_subprocess_env(), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    launch(tmp_path / "a", 4)
    launch(tmp_path / "b", 2)
    launch(tmp_path / "b", 4)
    a, _ = load_checkpoint(tmp_path / "a")
    b, rec_b = load_checkpoint(tmp_path / "b")
    assert rec_b["step"] == 4 and rec_b["world_size"] == n and rec_b["train"]["deterministic"]
    assert all(f"rng.{r}.cuda" in b for r in range(n))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
def test_train_step_does_not_wait_for_the_gpu(tmp_path):
    cfg = tiny_config(tmp_path, stage="relay", resolution=16, steps=10, class_cond=True, device="cuda",
                      model=dict(TINY, attn_resolutions=[8], dropout=0.1))
    trainer = Trainer(cfg, resume=False)
    trainer.train_step()   # first step: lazy initialisations may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")   # any synchronising call raises
    try:
        losses = [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(float(v)) for v in losses)


@pytest.mark.parametrize("kw", [dict(stage="base", parameterization="vpred", multiscale=True),
                                dict(stage="relay", relay_mode="linear"),
                                dict(stage="relay")])
def test_every_objective_trains_and_writes_a_sample_grid(tmp_path, kw):
    cfg = tiny_config(tmp_path, steps=2, sample_every=2, **kw)
    result = Trainer(cfg, resume=False).run()
    assert result["step"] == 2 and math.isfinite(result["loss"])
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples_000002.png").size[0] > 8
