"""relayops.diffusers: the scheduler against relayops' samplers, the pipeline against
`relayops sample`, save/load round trips, a diffusers UNet2DModel as a relay denoiser, the
`relayops convert --to diffusers` export, and the core's independence from diffusers.

Everything is tiny (8x8 to 32x32 images, a few steps) to keep the file fast."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from edm_pickle import PersistentRecord, module_src, persistent_dump
from relayops import cli, sampling, solvers
from relayops.cli import main
from relayops.diffusers import RelayDenoiser, RelayDiffusionPipeline, RelayScheduler
from relayops.models import EDMPrecond

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny: a second thread's synchronisation costs more than it saves
    (on a busy machine, seconds per call instead of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet2d(resolution=8, num_class_embeds=None, seed=0) -> UNet2DModel:
    """A random diffusers UNet2DModel (its zero-initialised layers drawn too, so it is not trivial)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return unet.eval()


@pytest.fixture(scope="module")
def unet_denoiser():
    return RelayDenoiser.from_unet2d(tiny_unet2d(8)).eval()


def toy_denoiser(x, sigma, class_labels=None):
    """A cheap nonlinear stand-in for a network (sigma: a float, a 0-d or a [B] tensor)."""
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return 0.9 * torch.tanh(x / (1 + sig**2).sqrt()) + 0.05 * torch.roll(x, 1, -1)


def low_res(b=2, size=2, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the scheduler in a hand-written diffusers-style loop ----------------------------------------

def diffusers_loop(model, scheduler: RelayScheduler, latents, class_labels=None):
    """The loop diffusers' documentation writes for any scheduler."""
    for t in scheduler.timesteps:
        model_output = model(scheduler.scale_model_input(latents, t), t, class_labels)
        latents = scheduler.step(model_output, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("eta", [0.0, 0.2])
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_relay_scheduler_loop_equals_relay_sample(solver, eta):
    x_lr = low_res()
    settings = dict(num_steps=20, eta=eta, alpha=0.2, L=1.0, sigma_b_max=2.0, normalize=False)
    want = sampling.relay_sample(toy_denoiser, x_lr, 4, solver=solver, seed=[5, 9], offset=7, **settings)
    scheduler = RelayScheduler(solver=solver, s=4, **settings)
    scheduler.set_timesteps()
    latents = scheduler.relay_start(x_lr, seed=[5, 9], offset=7)
    got = diffusers_loop(toy_denoiser, scheduler, latents)
    assert len(scheduler.timesteps) == solvers.CALLS_PER_STEP[solver] * (scheduler.num_inference_steps - 1) + 1
    assert scheduler.order == solvers.CALLS_PER_STEP[solver]
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same solver code: the same bits
    assert got.shape == (2, 3, 8, 8) and not torch.equal(got, latents)


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_each_relay_scheduler_step_is_one_fused_relay_step(monkeypatch, solver):
    calls = []
    original = sampling.relay_step
    monkeypatch.setattr(sampling, "relay_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    scheduler = RelayScheduler(solver=solver, num_steps=20)
    scheduler.set_timesteps()
    latents = scheduler.relay_start(low_res(), seed=0)
    per_step = []
    for t in scheduler.timesteps:
        before = len(calls)
        latents = scheduler.step(toy_denoiser(latents, t), t, latents).prev_sample
        per_step.append(len(calls) - before)
    assert per_step == [1] * (len(per_step) - 1) + [0]  # the last step returns the model's x0_hat


def test_relay_scheduler_with_a_torch_generator_equals_relay_sample():
    x_lr = low_res()
    want = sampling.relay_sample(toy_denoiser, x_lr, 4, num_steps=20, solver="rdm-heun",
                                 seed=torch.Generator().manual_seed(3))
    scheduler = RelayScheduler(solver="rdm-heun", num_steps=20)
    scheduler.set_timesteps()
    latents = scheduler.relay_start(x_lr, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(diffusers_loop(toy_denoiser, scheduler, latents), want, rtol=0, atol=0)


@pytest.mark.parametrize("solver,options", [("edm-heun", dict(S_churn=20.0, S_min=0.05, S_max=50.0, S_noise=1.003)),
                                            ("edm-2m", dict(sde_scale=0.05)), ("edm-2m", {})])
def test_base_scheduler_loop_equals_edm_sample(solver, options):
    want = sampling.edm_sample(toy_denoiser, (2, 3, 8, 8), num_steps=6, solver=solver, seed=[1, 2], offset=3,
                               **options)
    scheduler = RelayScheduler(solver=solver, num_steps=6, **options)
    scheduler.set_timesteps()
    latents = scheduler.noise_start((2, 3, 8, 8), seed=[1, 2], offset=3)
    assert latents.std() > 10  # sigma_max 80 times white noise
    torch.testing.assert_close(diffusers_loop(toy_denoiser, scheduler, latents), want, rtol=0, atol=0)
    if options.get("S_churn"):  # churn raises the levels the model is called at above the grid's (below S_max)
        assert not set(scheduler.timesteps.tolist()) <= set(scheduler.sigmas.tolist())


def test_a_loop_from_its_own_start_state():
    """diffusers' usual start, randn times init_noise_sigma, without relay_start/noise_start: the
    steps take the state given (deterministic edm-2m: the solver generator from that state)."""
    scheduler = RelayScheduler(solver="edm-2m", num_steps=5)
    scheduler.set_timesteps()
    start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    got = diffusers_loop(toy_denoiser, scheduler, start)
    want = sampling.answer_calls(sampling.edm_calls(start, scheduler.grid, "edm-2m", 0), toy_denoiser)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scheduler_step_outputs_and_contract_errors():
    scheduler = RelayScheduler(solver="relay-2m", num_steps=20, eta=0.0)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.relay_start(low_res())
    scheduler.set_timesteps(sigmas=[0.8, 0.5, 0.2])
    assert scheduler.sigmas.tolist() == [0.8, 0.5, 0.2, 0.0] and scheduler.timesteps.tolist() == [0.8, 0.5, 0.2]
    assert scheduler.init_noise_sigma == 0.8
    with pytest.raises(ValueError, match="noise_start is for a base stage"):
        scheduler.noise_start((1, 3, 8, 8))
    x = scheduler.relay_start(low_res())
    x0 = toy_denoiser(x, 0.8)
    with pytest.raises(ValueError, match=r"expects timestep 0.8"):
        scheduler.step(x0, 0.5, x)
    out = scheduler.step(x0, scheduler.timesteps[0], x)
    assert out.pred_original_sample is not None and torch.equal(out.pred_original_sample, x0)
    assert scheduler.step_index == 1
    prev, pred = scheduler.step(toy_denoiser(out.prev_sample, 0.5), 0.5, out.prev_sample, return_dict=False)
    last = scheduler.step(toy_denoiser(prev, 0.2), 0.2, prev)
    assert torch.equal(last.prev_sample, last.pred_original_sample)  # the last step returns x0_hat
    with pytest.raises(RuntimeError, match="has ended"):
        scheduler.step(x0, 0.2, x)
    with pytest.raises(ValueError, match="unknown solver"):
        RelayScheduler(solver="dpm++")
    with pytest.raises(ValueError, match="relay_start is for a relay stage"):
        base = RelayScheduler(solver="edm-2m")
        base.set_timesteps(4)
        base.relay_start(low_res())


def test_scheduler_config_round_trip(tmp_path):
    scheduler = RelayScheduler(solver="rdm-heun", num_steps=30, s=2, eta=0.1, alpha=0.3, normalize=False,
                               L=1.05, sigma_b_max=2.0, sigma_trunc=0.8, rho=9.0)
    scheduler.save_pretrained(tmp_path)
    again = RelayScheduler.from_pretrained(tmp_path)
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(again.config) == public(scheduler.config)
    scheduler.set_timesteps()
    again.set_timesteps()
    assert torch.equal(again.timesteps, scheduler.timesteps)
    switched = RelayScheduler.from_config(scheduler.config, solver="relay-2m")
    assert switched.config.solver == "relay-2m" and switched.config.alpha == 0.3


# --- RelayDenoiser ------------------------------------------------------------------------------------

def test_unet2d_denoiser_is_edm_preconditioned():
    """x0_hat = c_skip x + c_out F(c_in x, ln(sigma)/4), with EDM's coefficients written out here."""
    unet = tiny_unet2d(8, num_class_embeds=4)
    den = RelayDenoiser.from_unet2d(unet).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.7, 40.0])
    labels = torch.tensor([0, 3, 1])
    sd = 0.5
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()

    def col(v):
        return v[:, None, None, None]

    with torch.no_grad():
        want = col(c_skip) * x + col(c_out) * unet(col(c_in) * x, sigma.log() / 4, class_labels=labels).sample
        torch.testing.assert_close(den(x, sigma, labels), want, rtol=1e-5, atol=1e-5)
    assert den.net.net.unet is unet and (den.resolution, den.channels, den.num_classes) == (8, 3, 4)


def test_denoiser_save_load_round_trip(tmp_path, unet_denoiser):
    unet_denoiser.save_pretrained(tmp_path / "unet2d")
    assert (tmp_path / "unet2d" / "diffusion_pytorch_model.safetensors").exists()
    released = EDMPrecond(img_resolution=8, img_channels=3, label_dim=5, model_channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[4]).eval()
    released.record = {"network": {"kwargs": dict(img_resolution=8, img_channels=3, label_dim=5, model_channels=16,
                                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])}}
    edm = RelayDenoiser.from_network(released)
    edm.save_pretrained(tmp_path / "edm")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for den, folder in ((unet_denoiser, "unet2d"), (edm, "edm")):
            again = RelayDenoiser.from_pretrained(tmp_path / folder).eval()
            assert torch.equal(again(x, 0.3), den(x, 0.3))
        assert torch.equal(edm(x, 0.3, torch.tensor([1, 4])), released(x, 0.3, torch.tensor([1, 4])))
    with pytest.raises(ValueError, match="network must be one of"):
        RelayDenoiser(network="mystery", network_config={})
    with pytest.raises(ValueError, match="outside the limit"):  # a hostile config is refused before building
        RelayDenoiser(network="edm", network_config=dict(released.record["network"]["kwargs"], model_channels=10**6))


def test_random_unet2d_works_as_a_relay_denoiser_in_the_pipeline(tmp_path, unet_denoiser):
    """A relay-only pipeline (super-resolution of given images) over a random UNet2DModel."""
    scheduler = RelayScheduler(solver="relay-2m", num_steps=20)
    pipe = RelayDiffusionPipeline(unet_denoiser, scheduler)
    x_lr = low_res()
    out = pipe(image=x_lr, seed=[4, 5], output_type="pt").images
    want = sampling.relay_sample(unet_denoiser, x_lr, 4, num_steps=20, solver="relay-2m", seed=[4, 5], offset=0)
    torch.testing.assert_close(out, (want.clamp(-1, 1) + 1) / 2, rtol=1e-6, atol=1e-6)
    pipe.save_pretrained(tmp_path / "sr")
    again = RelayDiffusionPipeline.from_pretrained(tmp_path / "sr")
    torch.testing.assert_close(again(image=x_lr, seed=[4, 5], output_type="pt").images, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass the low-resolution images"):
        pipe(batch_size=2)


# --- the pipeline against `relayops sample` -----------------------------------------------------------

BASE_KW = dict(img_resolution=8, img_channels=3, label_dim=5, model_type="DhariwalUNet", model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=0, dropout=0.0)
RELAY_KW = dict(BASE_KW, img_resolution=32)
BLUR_LOSS = dict(up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3.0, min_scale=0.001)


def random_released(kwargs, seed):
    torch.manual_seed(seed)
    net = EDMPrecond(**kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-format base (EDM's .pkl with EDMLoss) and relay (RDM's BlurLoss) pair."""
    root = tmp_path_factory.mktemp("released")
    marker = root / "code-ran"
    persistent_dump(random_released(BASE_KW, 0), root / "first.pkl", init_kwargs=BASE_KW, marker=marker,
                    extra={"loss_fn": PersistentRecord("EDMLoss", module_src(marker), P_mean=-1.2)})
    persistent_dump(random_released(RELAY_KW, 1), root / "second.pkl", init_kwargs=RELAY_KW, marker=marker,
                    extra={"loss_fn": PersistentRecord("BlurLoss", module_src(marker), **BLUR_LOSS)})
    yield root
    assert not marker.exists(), "code from a checkpoint ran"


def pngs(folder, seeds):
    return np.stack([np.asarray(Image.open(folder / f"{s:06d}.png")) for s in seeds])


@pytest.mark.parametrize("options", [[], ["--preset", "imagenet256", "--no-enhance"]],
                         ids=["defaults", "authors-preset"])
def test_pipeline_images_equal_relayops_sample(tmp_path, released, options, capsys):
    """The command line's default solvers (edm-2m, relay-2m), and the authors' preset (edm-heun
    with churn, rdm-heun with guidance 3.5, a float64 state). The PNGs `relayops sample` writes are
    compared for the first; the float images of every stage, against the RelayPipeline that
    `relayops sample` builds (its own code, cli._build_stages), for both."""
    stages = ["--base", str(released / "first.pkl"), "--relay", str(released / "second.pkl"), "--base-steps", "3",
              "--relay-steps", "12"]
    export = [o for o in options if o != "--no-enhance"]
    assert main(["convert", "--to", "diffusers", str(tmp_path / "pipe"), *stages, *export]) == 0
    assert "wrote a RelayDiffusionPipeline (2 stages: 3x8 -> x4" in capsys.readouterr().out
    if not options:
        assert main(["sample", *stages, "--num", "2", "--seed", "10", "--class", "3", "--out", str(tmp_path / "png"),
                     "--no-progress"]) == 0

    pipe = RelayDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert [type(st.scheduler).__name__ for st in pipe.stages] == ["RelayScheduler"] * 2
    out = pipe(batch_size=2, class_labels=3, seed=10, output_type="pt", output_stages=True)
    assert out.images.shape == (2, 3, 32, 32)
    if not options:
        got = np.rint(out.images.permute(0, 2, 3, 1).numpy() * 255)
        assert np.abs(got - pngs(tmp_path / "png", [10, 11])).max() <= 1  # the same 8 bits, up to float rounding

    # the float images of every stage, against relayops' own pipeline built by the command line's code
    args = cli.build_parser().parse_args(["sample", *stages, *options])
    built = cli._build_stages(args, torch.device("cpu"))
    with torch.no_grad():
        ref = sampling.RelayPipeline(built["stages"], dtype=built["dtype"])(2, seed=10,
                                                                          class_labels=torch.full((2,), 3))
    assert len(out.images_per_stage) == len(ref) == 2
    for mine, theirs in zip(out.images_per_stage, ref):
        torch.testing.assert_close(mine, ((theirs.float().clamp(-1, 1) + 1) / 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.images, out.images_per_stage[-1], rtol=0, atol=0)


def test_pipeline_call_options(tmp_path, released):
    assert main(["convert", "--to", "diffusers", str(tmp_path / "pipe"), "--base", str(released / "first.pkl"),
                 "--relay", str(released / "second.pkl"), "--base-steps", "3", "--relay-steps", "12"]) == 0
    files = sorted(str(p.relative_to(tmp_path / "pipe")) for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert files == sorted(f"{prefix}{name}" for prefix in ("", "base/") for name in (
        "denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors", "model_index.json",
        "scheduler/scheduler_config.json"))  # safetensors and JSON only, the base stage in base/
    pipe = RelayDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.state_dtype == "float32" and pipe.base.base is None
    one = pipe(batch_size=1, class_labels=[2], seed=[21], output_type="np").images
    two = pipe(batch_size=2, class_labels=[1, 2], seed=[20, 21], output_type="np").images
    assert one.shape == (1, 32, 32, 3) and one.dtype == np.float32
    np.testing.assert_allclose(two[1:], one, rtol=0, atol=1e-6)  # per-sample seeds: an image regenerated alone

    seen = []

    def callback(p, i, t, kwargs):
        seen.append((p.stage_index, i, float(t)))
        return {"latents": kwargs["latents"]}

    a = pipe(batch_size=1, seed=5, solver=["edm-heun", "rdm-heun"], num_inference_steps=[2, 12], output_type="pt",
             callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])
    base_calls = 3  # edm-heun on 2 steps
    assert [s for s, _, _ in seen].count(0) == base_calls and seen[base_calls][:2] == (1, 0)
    g = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    g2 = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(g, g2) and not torch.equal(g, a.images)
    with pytest.raises(ValueError, match="2 stages"):
        pipe(num_inference_steps=[1, 2, 3])
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latent")
    with pytest.raises(ValueError, match="class indices"):
        pipe(batch_size=2, class_labels=[1, 2, 3])


def test_convert_to_diffusers_from_relayops_training_runs(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    tiny = ["--channels", "8", "--channel-mult", "1,2", "--batch-size", "2", "--warmup", "1", "--steps", "1",
            "--no-progress", "--data", str(data)]
    assert main(["train", "--stage", "base", "--resolution", "8", "--out", str(tmp_path / "base"), *tiny]) == 0
    assert main(["train", "--stage", "relay", "--resolution", "16", "--out", str(tmp_path / "relay"), *tiny]) == 0
    stages = ["--base", str(tmp_path / "base"), "--relay", str(tmp_path / "relay"), "--base-steps", "3",
              "--relay-steps", "12"]
    assert main(["convert", "--to", "diffusers", str(tmp_path / "pipe"), *stages]) == 0
    assert main(["sample", *stages, "--num", "2", "--out", str(tmp_path / "png"), "--no-progress"]) == 0
    pipe = RelayDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.denoiser.config.network == "unet" and pipe.scheduler.config.solver == "relay-2m"
    got = np.stack([np.asarray(im) for im in pipe(batch_size=2, seed=0).images])
    assert got.shape == (2, 32, 32, 3)
    assert np.abs(got.astype(int) - pngs(tmp_path / "png", [0, 1]).astype(int)).max() <= 1


def test_convert_to_diffusers_errors(tmp_path, released, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        return err

    assert "takes one path" in error(["convert", "--to", "diffusers", "a", "b", "--base", "x"])
    assert "belong to 'relayops convert --to diffusers OUT'" in error(
        ["convert", str(released / "first.pkl"), str(tmp_path / "c"), "--base", "x"])
    assert "give --base" in error(["convert", "--to", "diffusers", str(tmp_path / "d")])
    assert "--module apply to" in error(["convert", "--to", "diffusers", str(tmp_path / "d"), "--module", "net",
                                         "--base", str(released / "first.pkl")])


# --- the core does not need diffusers -----------------------------------------------------------------

def test_import_relayops_does_not_import_diffusers_and_the_integration_names_its_extra():
    code = ("import sys, relayops, relayops.sampling, relayops.models, relayops.training, relayops.cli\n"
            "relayops.cli.build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'huggingface_hub'))\n"
            "assert not bad, bad\n"
            "sys.modules['diffusers'] = None  # as if it were not installed\n"
            "try:\n    import relayops.diffusers\nexcept ImportError as e:\n    print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "relayops.diffusers needs the [diffusers] extra: pip install 'relayops[diffusers]'" in out.stdout


def test_denoiser_levels_match_the_samplers_calls():
    """denoiser_levels (the scheduler's timesteps) lists exactly the levels the samplers call at."""
    grid = sampling.relay_grid(sampling.relay_settings(None, num_steps=30))
    for solver in solvers.SOLVERS:
        seen = []
        sampling.relay_sample(lambda x, sigma: seen.append(float(sigma[0])) or x, low_res(1), 4, sigmas=grid,
                              solver=solver, dtype=torch.float64)
        assert seen == pytest.approx(sampling.denoiser_levels(grid, solver), rel=1e-15, abs=0), solver
    assert math.isclose(sampling.edm_churn(10.0, 4, 1.0, 0.0, 20.0), 12.5)


# --- docs/diffusers.md --------------------------------------------------------------------------------

def test_the_docs_examples_run(tmp_path, monkeypatch, capsys):
    """The page's command and Python blocks, verbatim, on tiny stand-ins for the released files
    (written the way EDM and RDM pickle them; 8x8 base, 8 -> 32 relay, 1000 classes)."""
    import re
    import shlex

    text = (ROOT / "docs" / "diffusers.md").read_text()
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    base_kw, relay_kw = dict(BASE_KW, label_dim=1000), dict(RELAY_KW, label_dim=1000)
    persistent_dump(random_released(base_kw, 0), tmp_path / "imagenet64.pkl", init_kwargs=base_kw, marker=marker,
                    extra={"loss_fn": PersistentRecord("EDMLoss", module_src(marker), P_mean=-1.2)})
    persistent_dump(random_released(relay_kw, 1), tmp_path / "imagenet_second_stage.pt", init_kwargs=relay_kw,
                    marker=marker, fmt="pt", extra={"step": 1000})
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for line in block.splitlines() if line.startswith("relayops ")]
    assert len(commands) == 1
    assert main(shlex.split(commands[0])[1:]) == 0
    scope: dict = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
        exec(compile(block, f"docs/diffusers.md example {i}", "exec"), scope)
    assert [Image.open(tmp_path / f"rdm-{b}.png").size for b in range(4)] == [(32, 32)] * 4
    assert scope["latents"].shape == (2, 3, 32, 32) and torch.isfinite(scope["latents"]).all()
    assert scope["images"].shape == (8, 3, 16, 16) and math.isfinite(scope["loss"].item())
    assert (tmp_path / "runs" / "unet2d-relay" / "model_index.json").exists()
    assert not marker.exists()
