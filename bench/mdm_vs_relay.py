"""Matryoshka diffusion against the relay cascade on the same data (docs/mdm.md).

    .venv/bin/python bench/mdm_vs_relay.py --out runs/mdm_vs_relay --steps 600

Both generate 32x32 images of scikit-image's photographs (the builtin data), trained on the same
crops (side 1x to 3x the 32x32 image, resized, so both see the same pixel scale):

- relay cascade: a 16x16 EDM base model, then a 16 -> 32 relay model (s = 2), two networks;
- MDM: one NestedUNet over 8, 16 and 32, trained progressively (8 alone, then 16, then 32).

Each network trains for ``--steps`` steps of batch ``--batch``, the three side by side in their
own processes with ``--threads`` intra-op threads each (``train_s``: each one's wall-clock time).
Measures, on ``--num`` samples against ``--num`` held-out crops (the two held-out photographs):
the log-spectral distance of the *mean* radially averaged power spectra, per frequency band
(``relayops.training.metrics``), and the same distance between training crops and the held-out
crops (the floor: two sets of real crops). Writes ``metrics.json`` and ``compare.png`` (rows:
MDM, relay cascade, held-out crops, MDM's 8x8 and 16x16 outputs; 2x zoom) to ``--out``;
checkpoints are reused.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's relayops

import torch  # noqa: E402

from relayops import sampling  # noqa: E402
from relayops.training import TrainConfig, load_denoiser, save_grid, train  # noqa: E402
from relayops.training.data import CropDataset, builtin_images  # noqa: E402
from relayops.training.metrics import radial_power_spectrum  # noqa: E402

SIZE = 32
CROP_SCALE = [1.0, 3.0]
BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def configs(out: Path, steps: int, batch: int, seed: int) -> dict[str, TrainConfig]:
    common = dict(data="builtin", seed=seed, lr=1e-3, ema_decay=0.995, warmup=100, progress=False, device="cpu",
                  save_every=500, steps=steps, batch_size=batch)
    third = steps // 3
    return {
        "base": TrainConfig(stage="base", out=str(out / "base"), resolution=16,
                            crop_scale=[c * SIZE / 16 for c in CROP_SCALE],
                            model=dict(model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8]),
                            **common),
        "relay": TrainConfig(stage="relay", out=str(out / "relay"), resolution=SIZE, patch=2, crop_scale=CROP_SCALE,
                             model=dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1), **common),
        "mdm": TrainConfig(stage="mdm", out=str(out / "mdm"), resolution=SIZE, mdm_resolutions=[8, 16, SIZE],
                           progressive=[third, 2 * third], crop_scale=CROP_SCALE,
                           model=dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=[1, 1, 2],
                                      attn_resolutions=[8]), **common),
    }


def train_timed(cfg: TrainConfig, threads: int) -> None:
    """Train one network (in its own process) and record its wall-clock time beside the checkpoint."""
    torch.set_num_threads(threads)
    t0 = time.time()
    train(cfg)
    (Path(cfg.out) / "train_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")


def mean_spectrum_lsd(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """RMS over the radii of each band of ``10 log10(mean P_x / mean P_ref)`` (ring 0 left out)."""
    freq, px = radial_power_spectrum(x)
    _, pr = radial_power_spectrum(ref)
    db = 10 * torch.log10(px.mean(0) / pr.mean(0))
    out = {}
    for lo, hi in BANDS:
        sel = (freq >= lo) & (freq < hi)
        sel[0] = False
        out[f"{lo:.2f}-{hi:.2f}"] = round(float(torch.sqrt((db[sel] ** 2).mean())), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mdm_vs_relay")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on a small, busy CPU more threads can be far slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfgs = configs(out, args.steps, args.batch, args.seed)
    result = {"command": "python bench/mdm_vs_relay.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
              "train_s": {}, "params": {}}
    # The three networks train side by side, one process each (as relayops demo trains its two stages).
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=train_timed, args=(cfg, args.threads)) for cfg in cfgs.values()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"a training process exited with code {proc.exitcode}")
    for name, cfg in cfgs.items():
        result["train_s"][name] = float((Path(cfg.out) / "train_seconds.txt").read_text())
    nets = {name: load_denoiser(cfg.out, cfg.stage)[0] for name, cfg in cfgs.items()}
    result["params"] = {name: sum(q.numel() for q in d.parameters()) for name, d in nets.items()}

    seeds = [args.seed + b for b in range(args.num)]
    with torch.no_grad():
        t0 = time.time()
        mdm_all = sampling.mdm_sample(nets["mdm"], args.num, num_steps=50, seed=seeds)
        mdm = mdm_all[-1].clamp(-1, 1)
        t1 = time.time()
        relay_opts = dict(alpha=cfgs["relay"].alpha, L=cfgs["relay"].L, sigma_b_max=cfgs["relay"].sigma_b_max,
                          normalize=cfgs["relay"].normalize)
        cascade = sampling.RelayPipeline(
            [sampling.BaseStage(nets["base"], resolution=16, channels=3, num_steps=18),
             sampling.RelayStage(nets["relay"], s=2, num_steps=60, options=relay_opts)])(args.num, seed=args.seed)
        relay = cascade[-1].clamp(-1, 1)
        t2 = time.time()
    result["sample_s"] = {"mdm (50 steps)": round(t1 - t0, 1), "relay (18 Heun + 60-grid relay)": round(t2 - t1, 1)}

    held = CropDataset(builtin_images("heldout"), SIZE, crop_scale=tuple(CROP_SCALE), flip=False,
                       seed=args.seed + 1).batch(range(args.num))[0]
    seen = CropDataset(builtin_images("train"), SIZE, crop_scale=tuple(CROP_SCALE), flip=False,
                       seed=args.seed + 2).batch(range(args.num))[0]
    result["lsd_of_mean_spectrum_db_vs_heldout"] = {
        "mdm": mean_spectrum_lsd(mdm, held), "relay": mean_spectrum_lsd(relay, held),
        "training crops (floor)": mean_spectrum_lsd(seen, held)}
    result["pixel_std"] = {"mdm": round(float(mdm.std()), 3), "relay": round(float(relay.std()), 3),
                           "heldout": round(float(held.std()), 3)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    k = 12
    up = [sampling.nearest_upsample(x[:k].clamp(-1, 1), SIZE // x.shape[-1]) for x in mdm_all[:-1]]
    rows = torch.cat([mdm[:k], relay[:k], held[:k], *up])
    save_grid(sampling.nearest_upsample(rows, 2), out / "compare.png", nrow=k)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
