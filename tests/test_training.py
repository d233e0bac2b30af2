"""The reference trainer: UNet preconditioning, losses, data, metrics, checkpoints, the loop."""
import math

import numpy as np
import pytest
import torch

from relayops import patch_blur, schedules
from relayops.training import (EDMPrecond, TrainConfig, Trainer, UNet, UNetConfig, VPredPrecond, area_downsample,
                               edm_base_loss, linear_relay_loss, load_checkpoint, relay_loss, save_checkpoint,
                               vpred_loss)
from relayops.training import checkpoint as ckpt
from relayops.training.data import CropDataset, folder_images
from relayops.training.metrics import log_spectral_distance, psnr, radial_power_spectrum

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1)


def tiny_config(tmp_path, **kw):
    base = dict(stage="base", data="builtin", out=str(tmp_path / "run"), resolution=8, steps=4, batch_size=8,
                lr=2e-3, warmup=2, save_every=0, progress=False, model=dict(TINY))
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
    monkeypatch.setattr(ckpt, "save_file", boom)
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
    """The loss of the current weights on fixed data and fixed noise."""
    gen, trainer.gen = trainer.gen, torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            y, labels = trainer._batch(0)
            return float(torch.stack([trainer._loss(y, labels) for _ in range(4)]).mean())
    finally:
        trainer.gen = gen


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


# --- distributed --------------------------------------------------------------------------------

WORKER = """
import sys, torch, torch.distributed as dist
from relayops.training import TrainConfig, Trainer
cfg = TrainConfig(stage="relay", out=sys.argv[1], resolution=8, steps=3, batch_size=8, warmup=1,
                  save_every=0, progress=False, model=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1))
trainer = Trainer(cfg, resume=False)
trainer.run()
rank = dist.get_rank()
torch.save({"world": dist.get_world_size(), "state": trainer.unet.state_dict()}, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_process_gloo_run_agrees(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    tensors, record = load_checkpoint(out)
    assert record["step"] == 3 and record["world_size"] == 2
    torch.manual_seed(0)   # the trainer's initialisation (seed 0): the weights must have moved from it
    init = UNet(UNetConfig(resolution=8, **TINY)).state_dict()
    moved = False
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k              # both ranks hold the same weights
        assert torch.equal(v, tensors[f"model.{k}"]), k       # and rank 0 saved them
        moved |= not torch.equal(v, init[k])
    assert moved


@pytest.mark.parametrize("kw", [dict(stage="base", parameterization="vpred", multiscale=True),
                                dict(stage="relay", relay_mode="linear"),
                                dict(stage="relay")])
def test_every_objective_trains_and_writes_a_sample_grid(tmp_path, kw):
    cfg = tiny_config(tmp_path, steps=2, sample_every=2, **kw)
    result = Trainer(cfg, resume=False).run()
    assert result["step"] == 2 and math.isfinite(result["loss"])
    from PIL import Image
    assert Image.open(tmp_path / "run" / "samples_000002.png").size[0] > 8
