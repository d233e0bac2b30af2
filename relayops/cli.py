"""The ``relayops`` command line (also ``python -m relayops``).

    relayops train --stage base --data builtin --resolution 16 --steps 2000 --out runs/base
    relayops train --stage relay --data photos/ --resolution 64 --patch 4 --out runs/relay
    relayops sample --base runs/base --relay runs/relay --num 16 --out runs/samples
    relayops distill --teacher runs/relay --out runs/distill --rounds 2   # 16 -> 8 -> 4 relay steps
    relayops sample --base runs/base --relay runs/distill/round2 --out runs/samples4
    relayops train --stage mdm --resolutions 16,32,64 --progressive 2000,4000 --out runs/mdm
    relayops sample --mdm runs/mdm --num 16 --out runs/mdm-samples   # Matryoshka diffusion (docs/mdm.md)
    relayops convert imagenet_second_stage.pt runs/rdm-relay   # a released EDM/RDM network, read safely
    relayops convert --to diffusers runs/rdm-pipe --base runs/rdm-base --relay runs/rdm-relay  # docs/diffusers.md
    relayops sample --base runs/rdm-base --relay runs/rdm-relay --preset imagenet256 --class 207
    relayops demo                       # the main job: both stages, samples and metrics
    relayops spectrum ...               # DCT SNR spectra (relayops.analysis)
    relayops evaluate runs/samples --ref ref.npz   # FID, sFID, precision/recall, KID (docs/evaluation.md)
    relayops bench                      # the benchmarks (pytest bench)

User errors (bad options, missing data, wrong or corrupt checkpoints) print one line,
``relayops: error: ...``, and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ._optional import EXTRAS

# (relayops.models.safe_pickle's UnsafeCheckpointError, a refused checkpoint, is a ValueError.)
USER_ERRORS = (ValueError, RuntimeError, FileNotFoundError, NotADirectoryError, TypeError)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, with a clear message otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _comma_list(convert, what: str):
    """An argparse type: comma-separated values, each read by ``convert``."""
    def parse(text: str) -> list:
        try:
            return [convert(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


_int_list = _comma_list(int, "integers")
_float_list = _comma_list(float, "numbers")


def _level_list(text: str) -> list[float]:
    """An argparse type: comma-separated noise levels > 0, sorted, without repeats."""
    levels = sorted(set(_float_list(text)))
    if not levels or not all(0 < v < float("inf") for v in levels):
        raise argparse.ArgumentTypeError(f"expected noise levels > 0, got {text!r}")
    return levels


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (UNet)")
    g.add_argument("--channels", type=_positive_int, default=64, help="base channel count (default 64)")
    g.add_argument("--channel-mult", type=_int_list, default=[1, 2, 2], metavar="M1,M2,...",
                   help="channel multiplier per level; each level after the first halves the size (default 1,2,2)")
    g.add_argument("--num-blocks", type=_positive_int, default=1, help="residual blocks per level (default 1)")
    g.add_argument("--attn", type=_int_list, default=[], metavar="R1,R2,...",
                   help="feature resolutions with self-attention (default none; the bottleneck always has one)")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--class-cond", action="store_true",
                   help="condition on the class = first-level subfolder of --data (10%% label dropout for guidance)")


def _add_mdm_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mdm stage (Matryoshka diffusion, SPEC 11)")
    g.add_argument("--resolutions", type=_int_list, default=[16, 32, 64], metavar="R1,R2,...",
                   help="the nested resolutions, ascending, each a power-of-two multiple of the one below "
                        "(default 16,32,64); the model's --channel-mult levels start at the highest")
    g.add_argument("--progressive", type=_int_list, default=[], metavar="S2,S3,...",
                   help="progressive training: the lowest resolution alone, then each higher one joins at these "
                        "steps (one step per higher resolution; default: all from the start)")
    g.add_argument("--mdm-weights", type=_float_list, default=[], metavar="W1,W2,...",
                   help="loss weight per resolution (default 1 each)")
    g.add_argument("--mdm-weighting", choices=["v", "x"], default="v",
                   help="per resolution, the v-prediction error (v, default) or the x-prediction error (x)")
    g.add_argument("--schedule", choices=["cosine", "shifted", "interpolated"], default="shifted",
                   help="each resolution's log-SNR schedule (default shifted)")
    g.add_argument("--schedule-reference", type=_positive_int, default=64,
                   help="reference resolution of the shifted schedule (default 64)")


def _mdm_train_fields(args) -> dict:
    """The TrainConfig fields of the mdm stage (the crop is the highest resolution)."""
    if args.stage != "mdm":
        if args.progressive:
            raise ValueError("--progressive is an option of --stage mdm")
        return {}
    return dict(resolution=args.resolution or max(args.resolutions), mdm_resolutions=args.resolutions,
                progressive=args.progressive, mdm_weights=args.mdm_weights, mdm_weighting=args.mdm_weighting,
                mdm_schedule=args.schedule, vpred_reference=args.schedule_reference)


def _build_train(sub) -> None:
    p = sub.add_parser("train", help="train a base or relay stage, or a Matryoshka (mdm) model",
                       description="Train one stage of a relay diffusion model. Resumes from --out if a "
                                   "checkpoint is there (exactly), unless --retrain.")
    p.add_argument("--stage", choices=["base", "relay", "mdm"], required=True,
                   help="base: plain EDM at low resolution; relay: super-resolution by --patch (SPEC 6); "
                        "mdm: Matryoshka diffusion, one NestedUNet over --resolutions (SPEC 11)")
    p.add_argument("--data", default="builtin", help="a folder of PNG/JPEG images, or 'builtin' "
                   "(scikit-image's photographs, no download) (default builtin)")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="training crop size (default 16 for base, 64 for relay, the highest --resolutions for mdm)")
    p.add_argument("--patch", type=_positive_int, default=4, help="relay patch size s = upscaling factor (default 4)")
    p.add_argument("--out", default=None, help="run directory (default runs/<stage>)")
    p.add_argument("--steps", type=_nonneg_int, default=2000)
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop early when this run has trained for SECONDS (checked every --log-every steps; "
                        "the checkpoint records the step reached)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=_nonneg_int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the network")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--crop-scale", type=float, nargs=2, default=[1.0, 2.0], metavar=("MIN", "MAX"),
                   help="random crop side as a multiple of the resolution, before resizing (default 1 2)")
    g = p.add_argument_group("relay stage")
    g.add_argument("--relay-mode", choices=["blur", "linear"], default="blur",
                   help="blur: RDM's patch blur + block noise (SPEC 6); linear: CogView3's linear relay (SPEC 10)")
    g.add_argument("--alpha", type=float, default=0.15, help="block-noise weight (SPEC 3)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="relay noise without 1/sqrt(1 + alpha^2) (the authors' code)")
    g.add_argument("--L", type=float, default=0.93, help="prob length of the u <-> sigma map (SPEC 5)")
    g.add_argument("--sigma-b-max", type=float, default=3.0, help="maximum blur strength (SPEC 5)")
    g = p.add_argument_group("base stage alternatives")
    g.add_argument("--vpred", action="store_true",
                   help="v-prediction with the resolution-shifted cosine schedule (SPEC 11)")
    g.add_argument("--multiscale", action="store_true", help="with --vpred: the multiscale loss (SPEC 11)")
    _add_mdm_train_args(p)
    _add_model_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=_nonneg_int, default=500)
    g.add_argument("--sample-every", type=_nonneg_int, default=0, help="write a PNG grid of samples every N steps")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:1 ... (under torchrun, cuda means cuda:LOCAL_RANK)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms, cuDNN deterministic, "
                        "CUBLAS_WORKSPACE_CONFIG, math attention): reproducible GPU runs, somewhat slower")
    g.add_argument("--retrain", action="store_true", help="ignore an existing checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .training import TrainConfig, train

    resolution = args.resolution or (16 if args.stage == "base" else 64)
    if args.stage == "relay" and resolution % args.patch:
        raise ValueError(f"--resolution {resolution} is not divisible by --patch {args.patch}")
    model = dict(model_channels=args.channels, channel_mult=args.channel_mult, num_blocks=args.num_blocks,
                 attn_resolutions=args.attn, dropout=args.dropout)
    kwargs = {"resolution": resolution, **_mdm_train_fields(args)}
    cfg = TrainConfig(stage=args.stage, data=args.data, out=args.out or f"runs/{args.stage}", patch=args.patch,
                      crop_scale=list(args.crop_scale), steps=args.steps, time_limit=args.time_limit or 0.0,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, ema_decay=args.ema_decay, bf16=args.bf16, seed=args.seed,
                      relay_mode=args.relay_mode, alpha=args.alpha, normalize=args.normalize, L=args.L,
                      sigma_b_max=args.sigma_b_max, parameterization="vpred" if args.vpred else "edm",
                      multiscale=args.multiscale, class_cond=args.class_cond, save_every=args.save_every,
                      sample_every=args.sample_every, progress=args.progress, device=args.device,
                      deterministic=args.deterministic, model=model, **kwargs)
    try:
        result = train(cfg, resume=not args.retrain)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {cfg.stage} stage to step {result['step']} (loss {result['loss']:.4f}): "
              f"{Path(cfg.out) / 'checkpoint.safetensors'}")
    return 0


def _build_distill(sub) -> None:
    from .training.distill import DistillConfig

    d = DistillConfig(teacher="")
    p = sub.add_parser("distill", help="progressive distillation of a relay stage (fewer sampling steps)",
                       description="CogView3's relay distillation: each round trains a student, started from the "
                                   "teacher's weights, to do in one deterministic relay step what the teacher does in "
                                   "two, halving the steps (16 -> 8 -> 4 ...). Round k writes OUT/round<k>; "
                                   "'relayops sample --relay OUT/round<k>' samples with its own grid. Works for the "
                                   "blurring relay and the linear relay (--relay-mode linear models).")
    p.add_argument("--teacher", required=True, help="relay-stage checkpoint (a relayops run, or a distilled student "
                   "to continue from)")
    p.add_argument("--out", required=True, help="output folder (round1, round2, ... and metrics.json)")
    p.add_argument("--rounds", type=_positive_int, required=True, help="halvings of the step count")
    p.add_argument("--teacher-steps", type=_positive_int, default=None,
                   help="the teacher's deterministic relay steps (blur relay: Karras grid from --sigma-start to "
                        "--sigma-min, default 16; linear relay: levels of its training grid, default all); "
                        "must be divisible by 2^rounds")
    p.add_argument("--sigma-start", type=float, default=None, help="first noise level (default: the teacher's "
                   "sigma_trunc, 0.9)")
    p.add_argument("--sigma-min", type=float, default=d.sigma_min, help=f"default {d.sigma_min}")
    p.add_argument("--cfg", type=float, nargs="+", default=None, metavar="W",
                   help="distil classifier-free guidance: one weight W, or a range W_MIN W_MAX the student learns "
                        "to take as an input (class-conditional teachers)")
    p.add_argument("--steps", type=_nonneg_int, default=d.steps, help=f"training steps per round (default {d.steps})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"default {d.lr}")
    p.add_argument("--warmup", type=_nonneg_int, default=d.warmup)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--eval", dest="num_eval", type=_nonneg_int, default=0, metavar="N",
                   help="compare teacher and students on N held-out crops: OUT/metrics.json (default 0: off)")
    p.add_argument("--eval-resolution", type=_positive_int, default=d.eval_resolution)
    p.add_argument("--device", default="auto")
    p.add_argument("--retrain", action="store_true", help="ignore existing round checkpoints in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args) -> int:
    from .training.distill import DistillConfig, distill, format_comparison

    if args.cfg is not None and len(args.cfg) not in (1, 2):
        raise ValueError(f"--cfg takes one weight or a range W_MIN W_MAX, got {len(args.cfg)} values")
    guidance = None if args.cfg is None else [args.cfg[0], args.cfg[-1]]
    cfg = DistillConfig(teacher=args.teacher, out=args.out, rounds=args.rounds, teacher_steps=args.teacher_steps,
                        sigma_start=args.sigma_start, sigma_min=args.sigma_min, guidance=guidance, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                        seed=args.seed, device=args.device, progress=args.progress, num_eval=args.num_eval,
                        eval_resolution=args.eval_resolution)
    dirs = distill(cfg, resume=not args.retrain,
                   command="relayops " + " ".join(shlex.quote(a) for a in args.argv))
    if args.num_eval:
        import json

        print(format_comparison(json.loads((Path(args.out) / "metrics.json").read_text())))
    print(f"distilled {len(dirs)} round(s); final student: {dirs[-1]}")
    return 0


def _add_solver_arg(p: argparse.ArgumentParser, preset_note: str = "") -> None:
    """--solver NAME (repeatable): the sampler of the base stage or of the relay stages, the stage
    told by the name; the choices and their network calls per step in the help."""
    from .solvers import CALLS_PER_STEP, EDM_SOLVERS, SOLVERS

    def name(n, note=""):
        calls = CALLS_PER_STEP[n]
        return f"{n} ({note}{calls} network call{'s' if calls > 1 else ''} per step)"

    base = [name("edm-2m", "default, "), name("edm-3m"), name("edm-heun", "EDM's sampler, ")]
    relay = [name("relay-2m", "default, "), name("relay-3m"), name("relay-2s"), name("rdm-euler"),
             name("rdm-heun", "RDM's sampler, ")]
    p.add_argument("--solver", action="append", default=[], choices=[*EDM_SOLVERS, *SOLVERS], metavar="NAME",
                   help=f"the sampler of a stage, by name; repeat for both stages. Base stage: {', '.join(base)}. "
                        f"Relay stages: {', '.join(relay)}. At their default steps the defaults are as accurate as "
                        f"EDM's and RDM's samplers at theirs, with fewer calls (docs/solvers.md){preset_note}")


def _stage_solvers(names: list, authors: bool) -> tuple[str, str]:
    """(base solver, relay solver) from the --solver names, at most one per stage. Defaults:
    edm-2m and relay-2m, or the authors' edm-heun and rdm-heun where ``authors`` (a preset)."""
    from .solvers import EDM_SOLVERS, SOLVERS

    picked = []
    for stage, valid, default in (("base", EDM_SOLVERS, "edm-heun" if authors else "edm-2m"),
                                  ("relay", SOLVERS, "rdm-heun" if authors else "relay-2m")):
        given = sorted({n for n in names if n in valid})
        if len(given) > 1:
            raise ValueError(f"--solver: one solver per stage; the {stage} stage got {' and '.join(given)}")
        picked.append(given[0] if given else default)
    return picked[0], picked[1]


def _add_stage_args(p: argparse.ArgumentParser, what: str) -> None:
    """The pipeline's checkpoints and sampler settings (relayops sample; relayops convert --to
    diffusers); ``what`` says what the settings are for in the help texts."""
    from .sampling import PIPELINE_PRESETS
    from .solvers import CLI_STEPS

    p.add_argument("--base", default=None, help="base-stage checkpoint (run directory or .safetensors; a released "
                   ".pkl/.pt is read safely)")
    p.add_argument("--relay", action="append", default=[], help="relay-stage checkpoint (repeat for more stages)")
    p.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default=None,
                   help="the RDM authors' sampler settings for their released models: base-stage EDM sampler, "
                        "relay preset and guidance, float64 state, their PNG enhancement "
                        "(relayops.sampling.PIPELINE_PRESETS); the options below override it")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight of the relay stages (default: the preset's; else none); "
                        "for a student distilled with guidance, its guidance input (one call per step)")
    p.add_argument("--base-cfg", type=float, default=None, help="guidance weight of the base stage (default none)")
    _add_solver_arg(p, "; with --preset: edm-heun and rdm-heun, the authors' settings")
    p.add_argument("--base-steps", type=_positive_int, default=None,
                   help=f"EDM sampler steps (default: the preset's, else {CLI_STEPS['edm-2m']} with edm-2m, "
                        f"{CLI_STEPS['edm-3m']} with edm-3m, {CLI_STEPS['edm-heun']} with edm-heun)")
    p.add_argument("--relay-steps", type=_positive_int, default=None,
                   help="relay Karras grid size before truncation (default: the preset's, else "
                        f"{CLI_STEPS['relay-2m']} with relay-2m, relay-3m and relay-2s: 14 steps below sigma 0.9, "
                        f"{CLI_STEPS['rdm-heun']} with rdm-heun and rdm-euler: 21 steps); a distilled relay student "
                        "always samples on its own grid")
    p.add_argument("--eta", type=float, default=None, help="relay sampler stochasticity (default: the preset's, "
                   "else 0.2)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help=f"sampler state dtype{' ' + what if what else ''} (default: the preset's float64, "
                        "else float32)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")


def _build_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images with a base stage and relay stages",
                       description="Run the multi-stage pipeline: the base checkpoint's EDM sampler, then "
                                   "each --relay checkpoint's relay sampler, in order. Checkpoints are relayops "
                                   "runs or networks converted by 'relayops convert'.")
    _add_stage_args(p, "")
    p.add_argument("--class", dest="class_idx", type=_nonneg_int, default=None,
                   help="class index for class-conditional models (default for converted EDM/RDM networks: "
                        "class (seed + b) mod label_dim, as the authors' script; relayops models: no label)")
    p.add_argument("--num", type=_positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--out", default="runs/samples", help="output folder (default runs/samples)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="image b uses seed + b")
    p.add_argument("--network-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run converted EDM/RDM networks in this dtype (default float32)")
    p.add_argument("--no-enhance", dest="enhance", action="store_false",
                   help="save the raw images, without the preset's PIL enhancement")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    _add_mdm_sample_args(p)
    p.set_defaults(func=_cmd_sample)


def _add_mdm_sample_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Matryoshka diffusion (instead of --base and --relay)")
    g.add_argument("--mdm", default=None, help="an mdm-stage checkpoint: all resolutions sampled jointly (SPEC 11)")
    g.add_argument("--mdm-steps", type=_positive_int, default=50,
                   help="joint sampler steps (default 50); --eta sets its stochasticity (default 0 here: DDIM)")
    g.add_argument("--all-resolutions", action="store_true",
                   help="also write grid_R.png for each lower resolution R")


def _cmd_sample_mdm(args) -> int:
    """``relayops sample --mdm CKPT``: the joint sampler; image b uses the per-sample seed seed + b."""
    import torch

    from . import sampling
    from .training import load_denoiser, save_grid
    from .training.data import save_png

    pipeline_only = {"--base": args.base, "--relay": args.relay, "--preset": args.preset, "--cfg": args.cfg,
                     "--base-cfg": args.base_cfg, "--base-steps": args.base_steps, "--relay-steps": args.relay_steps,
                     "--network-dtype": args.network_dtype, "--solver": args.solver}
    given = [k for k, v in pipeline_only.items() if v]
    if given:
        raise ValueError(f"{', '.join(given)} belong to the relay pipeline; with --mdm use --mdm-steps and --eta")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    denoiser, rec = load_denoiser(args.mdm, "mdm", ema=not args.raw, device=device)
    num_classes = int(rec["unet"].get("num_classes", 0))
    labels = None
    if args.class_idx is not None:
        if not args.class_idx < num_classes:
            raise ValueError(f"--class {args.class_idx}: the model has {num_classes} classes")
        labels = torch.full((args.num,), args.class_idx, dtype=torch.long, device=device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    with torch.no_grad():
        images = sampling.mdm_sample(denoiser, args.num, channels=int(rec["unet"]["in_channels"]),
                                     num_steps=args.mdm_steps, eta=0.0 if args.eta is None else args.eta,
                                     seed=[args.seed + b for b in range(args.num)], class_labels=labels,
                                     dtype=dtype, device=device, progress=args.progress)
    images = [x.float().cpu().clamp(-1, 1) for x in images]
    out = Path(args.out)
    top = images[-1]
    save_grid(top, out / "grid.png")
    for b in range(top.shape[0]):
        save_png(top[b], out / f"{args.seed + b:06d}.png")
    if args.all_resolutions:
        for x in images[:-1]:
            save_grid(x, out / f"grid_{x.shape[-1]}.png")
    print(f"wrote {top.shape[0]} images of {top.shape[-1]}x{top.shape[-2]} and grid.png"
          + (" (and grid_R.png per lower resolution)" if args.all_resolutions else "") + f" to {out}")
    return 0


def _stage_geometry(rec: dict) -> tuple[int, int, int]:
    """(resolution, channels, number of classes) of a checkpoint's network."""
    if "network" in rec:
        kw = rec["network"]["kwargs"]
        return int(kw["img_resolution"]), int(kw["img_channels"]), int(kw.get("label_dim", 0))
    return int(rec["train"]["resolution"]), int(rec["unet"]["in_channels"]), int(rec["unet"].get("num_classes", 0))


def _relay_options(path: str, rec: dict) -> tuple[int, dict]:
    """(s, relay_sample options) recorded by a relay checkpoint; a clear error where it has none."""
    t = rec["train"]
    if t.get("relay_mode", "blur") != "blur":
        raise ValueError(f"checkpoint {path!r} is a linear-relay model; the pipeline runs blur relay stages")
    needed = ("patch", "alpha", "L", "sigma_b_max", "normalize")
    missing = [k for k in needed if k not in t]
    if missing:
        raise ValueError(f"checkpoint {path!r} does not record its relay settings ({', '.join(missing)}); "
                         "pass --preset")
    return int(t["patch"]), dict(alpha=t["alpha"], L=t["L"], sigma_b_max=t["sigma_b_max"], normalize=t["normalize"])


def _clip_to_network(options: dict, denoiser, sigma_min: float, sigma_max: float) -> dict:
    """The authors' samplers keep the grid inside a network's supported levels (EDMPrecond's
    sigma_min/sigma_max; 0 and inf unless the network says otherwise)."""
    lo, hi = getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None)
    if lo is not None and hi is not None and (lo > 0 or hi < float("inf")):
        options = dict(options, sigma_min=max(options.get("sigma_min", sigma_min), float(lo)),
                       sigma_max=min(options.get("sigma_max", sigma_max), float(hi)))
    return options


def _load_stage(path: str, stage: str, *, ema: bool, device, net_dtype=None):
    """``(denoiser, record)`` of a stage: a relayops checkpoint (a run or a converted network), or
    a released EDM/RDM ``.pkl``/``.pt`` read safely in memory (relayops.models.read_checkpoint)."""
    if Path(path).suffix in (".pkl", ".pt", ".pth"):
        from .models import network_from_record, read_checkpoint

        if not ema:
            raise ValueError(f"--raw takes a relayops checkpoint; for {path!r}, convert its 'net' network with "
                             "'relayops convert --module net'")
        _, refs, record = read_checkpoint(path, stage=stage)
        denoiser = network_from_record(record, {k: ref.load() for k, ref in refs.items()}, path).to(device)
    else:
        from .training import load_denoiser

        denoiser, record = load_denoiser(path, stage, ema=ema, device=device)
    if net_dtype is not None:
        if "network" not in record:
            raise ValueError(f"--network-dtype applies to converted EDM/RDM networks; {path!r} is a relayops UNet")
        denoiser.to(net_dtype)
        denoiser.activation_dtype = net_dtype
    return denoiser, record


def _build_stages(args, device) -> dict:
    """The pipeline of the --base and --relay checkpoints with the sampler settings of the
    options, as ``relayops sample`` runs it: ``stages`` (for sampling.RelayPipeline), their
    checkpoint ``records``, ``classes`` (classes per conditional stage), ``edm_conditional``
    (a converted conditional EDM/RDM network among them), the ``preset``, the state ``dtype`` and
    the solvers and steps chosen."""
    import torch

    from . import sampling, schedules
    from .solvers import CLI_STEPS, SOLVERS

    if args.base is None:
        raise ValueError("give --base (and --relay stages)")
    preset = sampling.get_pipeline_preset(args.preset) if args.preset else None
    base_solver, relay_solver = _stage_solvers(args.solver, authors=preset is not None)
    net_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        getattr(args, "network_dtype", None) or "float32"]

    def load(path, stage):
        return _load_stage(path, stage, ema=not args.raw, device=device, net_dtype=net_dtype)

    base, base_rec = load(args.base, "base")
    resolution, channels, num_classes = _stage_geometry(base_rec)
    base_opts = dict(preset.base) if preset else {}
    base_steps = args.base_steps or base_opts.get("num_steps", CLI_STEPS[base_solver])
    base_opts.pop("num_steps", None)
    base_opts["solver"] = base_solver
    if args.base_cfg is not None:
        base_opts["cfg"] = args.base_cfg
    stages = [sampling.BaseStage(base, resolution=resolution, channels=channels, num_steps=base_steps,
                                 options=_clip_to_network(base_opts, base, 0.002, 80.0))]
    records = [base_rec]
    classes = {"base": num_classes}
    edm_conditional = "network" in base_rec and num_classes > 0
    for path in args.relay:
        relay, rec = load(path, "relay")
        records.append(rec)
        classes[path] = _stage_geometry(rec)[2]
        edm_conditional |= "network" in rec and classes[path] > 0
        if "distill" in rec:  # a distilled student samples on its own grid, one call per step
            from .training.distill import pipeline_stage

            if any(n in SOLVERS for n in args.solver):
                raise ValueError(f"{path!r} is a distilled student, which samples with its own steps: "
                                 "--solver does not apply to it")
            stages.append(pipeline_stage(path, relay, rec, guidance=args.cfg, relay_steps=args.relay_steps,
                                         eta=args.eta))
            continue
        opts = {"solver": relay_solver} if args.eta is None else {"solver": relay_solver, "eta": args.eta}
        cfg = args.cfg if args.cfg is not None else (preset.relay_cfg if preset else None)
        if cfg is not None:
            opts["cfg"] = cfg
        if preset:
            relay_preset = schedules.get_preset(preset.relay)
            s, steps = relay_preset.s, args.relay_steps
            opts = _clip_to_network(opts, relay, relay_preset.sigma_min, relay_preset.sigma_max)
        else:
            s, recorded = _relay_options(path, rec)
            relay_preset, steps = None, args.relay_steps or CLI_STEPS[relay_solver]
            opts = _clip_to_network({"eta": 0.2, **recorded, **opts}, relay, 0.008, 80.0)
        stages.append(sampling.RelayStage(relay, s=s, num_steps=steps, preset=relay_preset, options=opts))
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype] if args.dtype else (
        preset.dtype if preset else torch.float32)
    return dict(stages=stages, records=records, classes=classes, edm_conditional=edm_conditional, preset=preset,
                dtype=dtype, base_solver=base_solver, relay_solver=relay_solver, base_steps=base_steps)


def _cmd_sample(args) -> int:
    if args.mdm is not None:
        return _cmd_sample_mdm(args)
    if args.base is None:
        raise ValueError("give --base (and --relay stages), or --mdm for a Matryoshka model")
    import torch

    from . import sampling
    from .training import save_grid
    from .training.data import save_png

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    built = _build_stages(args, device)
    stages, classes, edm_conditional, preset = (built[k] for k in ("stages", "classes", "edm_conditional", "preset"))
    base_solver, relay_solver, base_steps = (built[k] for k in ("base_solver", "relay_solver", "base_steps"))

    conditional = {k: n for k, n in classes.items() if n > 0}
    labels = None
    if args.class_idx is not None:
        if not conditional:
            raise ValueError("--class was given, but no stage is class-conditional")
        too_big = {k: n for k, n in conditional.items() if args.class_idx >= n}
        if too_big:
            raise ValueError(f"--class {args.class_idx} is out of range for {too_big} classes")
        labels = torch.full((args.num,), args.class_idx, dtype=torch.long, device=device)
    elif edm_conditional:  # the authors' script: class (seed + b) mod label_dim
        if len(set(conditional.values())) != 1:
            raise ValueError(f"the stages have different numbers of classes {conditional}; pass --class")
        n = next(iter(conditional.values()))
        labels = torch.tensor([(args.seed + b) % n for b in range(args.num)], dtype=torch.long, device=device)

    with torch.no_grad():
        images = sampling.RelayPipeline(stages, dtype=built["dtype"], device=device)(
            args.num, seed=args.seed, class_labels=labels, progress=args.progress)[-1]
    images = images.float().cpu().clamp(-1, 1)
    enhance = preset.enhance if (preset and args.enhance) else ()
    out = Path(args.out)
    save_grid(images, out / "grid.png", enhance=enhance)
    for b in range(images.shape[0]):
        save_png(images[b], out / f"{args.seed + b:06d}.png", enhance=enhance)
    relay_note = f"; relay stages: {relay_solver}" if args.relay else ""
    print(f"wrote {images.shape[0]} images of {images.shape[-1]}x{images.shape[-2]} and grid.png to {out} "
          f"(base stage: {base_solver}, {base_steps} steps{relay_note})")
    return 0


def _build_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a released EDM/RDM checkpoint (.pkl/.pt) without running its code, "
                                       "or a pipeline to a diffusers pipeline folder",
                       description="relayops convert SRC DEST: read an EDM network snapshot (.pkl) or an RDM "
                                   "training state (.pt) with a restricted unpickler (an allowlist of tensor, "
                                   "container and EDM persistence names; the pickled source code is never run) and "
                                   "write DEST/checkpoint.safetensors + checkpoint.json for 'relayops sample'. "
                                   "relayops convert --to diffusers OUT --base B --relay R: write the pipeline that "
                                   "'relayops sample' would run with these checkpoints (relayops runs, converted "
                                   "or released networks, read the same safe way) and sampler options as a diffusers "
                                   "pipeline folder for relayops.diffusers.RelayDiffusionPipeline.from_pretrained(OUT) "
                                   "(the [diffusers] extra; docs/diffusers.md).")
    p.add_argument("src", nargs="?", default=None, help="the released file (.pkl or .pt); with --to diffusers: OUT")
    p.add_argument("dest", nargs="?", default=None, help="output directory")
    p.add_argument("--to", choices=["relayops", "diffusers"], default="relayops",
                   help="relayops: a relayops checkpoint (default); diffusers: a diffusers pipeline folder")
    p.add_argument("--module", default="ema", help="which network of the file (default ema; RDM's .pt also has net)")
    p.add_argument("--stage", choices=["base", "relay"], default=None,
                   help="record the stage (default: from the file's loss when it has one, else either)")
    p.add_argument("--max-bytes", type=_positive_int, default=None,
                   help="the most bytes the file's storages (and, separately, its tensors) may take "
                        "(default: twice the file size plus 1 MiB)")
    g = p.add_argument_group("--to diffusers: the pipeline, as for relayops sample")
    _add_stage_args(g, "saved in the pipeline")
    p.set_defaults(func=_cmd_convert)


# The options of `relayops convert --to diffusers` only, with their defaults.
_PIPELINE_OPTIONS = {"--base": None, "--relay": [], "--preset": None, "--cfg": None, "--base-cfg": None,
                     "--solver": [], "--base-steps": None, "--relay-steps": None, "--eta": None, "--dtype": None,
                     "--raw": False}


def _cmd_convert(args) -> int:
    given = [k for k, default in _PIPELINE_OPTIONS.items() if getattr(args, k[2:].replace("-", "_")) != default]
    if args.to == "diffusers":
        return _cmd_convert_diffusers(args)
    if given:
        raise ValueError(f"{', '.join(given)} belong to 'relayops convert --to diffusers OUT'")
    if args.src is None or args.dest is None:
        raise ValueError("give SRC and DEST (or --to diffusers OUT --base B --relay R)")
    from .models import convert
    from .training import read_record

    path = convert(args.src, args.dest, module=args.module, stage=args.stage, max_bytes=args.max_bytes)
    rec = read_record(path)
    kw = rec["network"]["kwargs"]
    print(f"converted {args.src} ({args.module}: EDMPrecond {kw.get('model_type', 'DhariwalUNet')} "
          f"{kw['img_resolution']}x{kw['img_resolution']}, label_dim {kw.get('label_dim', 0)}, "
          f"stage {rec['stage'] or 'not recorded'}) to {path}")
    return 0


def _cmd_convert_diffusers(args) -> int:
    """``relayops convert --to diffusers OUT``: the pipeline of ``relayops sample`` as a diffusers folder."""
    if args.src is None or args.dest is not None:
        raise ValueError("--to diffusers takes one path, the output folder OUT")
    misplaced = [k for k, v in (("--module", args.module != "ema"), ("--stage", args.stage is not None),
                                ("--max-bytes", args.max_bytes is not None)) if v]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} apply to 'relayops convert SRC DEST'")
    import torch

    from .diffusers import pipeline_from_stages

    built = _build_stages(args, torch.device("cpu"))
    pipe = pipeline_from_stages(built["stages"], built["dtype"], built["records"])
    pipe.save_pretrained(args.src)
    sizes = " -> ".join(f"{st.denoiser.channels}x{st.denoiser.resolution}" if st.base is None
                        else f"x{st.scheduler.config.s}" for st in pipe.stages)
    print(f"wrote a RelayDiffusionPipeline ({len(pipe.stages)} stages: {sizes}; base stage {built['base_solver']}"
          + (f", relay stages {built['relay_solver']}" if args.relay else "") + f") to {args.src}")
    return 0


def _build_demo(sub) -> None:
    from .solvers import CLI_STEPS
    from .training.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the main job: train both stages on builtin photos, sample, measure",
                       description="Train a 16x16 base model and a 16 -> 64 relay model (s = 4) on scikit-image's "
                                   "photographs (the two side by side, --train-seconds each, or exactly "
                                   "--base-steps/--relay-steps steps), then write samples.png, sr_compare.png, "
                                   "sr_tradeoff.png and metrics.json to --out. A second run reuses the checkpoints.")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--data", default=d.data, help="'builtin' or a folder of PNG/JPEG images (default builtin)")
    p.add_argument("--retrain", action="store_true", help="train from scratch even if checkpoints exist")
    p.add_argument("--seed", type=_nonneg_int, default=d.seed)
    p.add_argument("--train-seconds", type=_positive_float, default=d.train_seconds,
                   help=f"training time per stage when its step count is not given (default {d.train_seconds:g})")
    p.add_argument("--base-steps", type=_nonneg_int, default=None,
                   help="train the base stage for exactly this many steps (reproducible; default: --train-seconds)")
    p.add_argument("--relay-steps", type=_nonneg_int, default=None,
                   help="train the relay stage for exactly this many steps (reproducible; default: --train-seconds)")
    p.add_argument("--num-samples", type=_positive_int, default=d.num_samples)
    p.add_argument("--num-eval", type=_positive_int, default=d.num_eval, help="held-out crops for metrics.json")
    p.add_argument("--sweep-levels", type=_level_list, default=d.sweep_levels, metavar="SIGMAS",
                   help="relay start levels (truncation) of the super-resolution sweep, comma-separated "
                        f"(default {','.join(f'{v:g}' for v in d.sweep_levels)}); sr_compare.png shows the lowest "
                        "and the highest")
    _add_solver_arg(p)
    p.add_argument("--base-sample-steps", type=_positive_int, default=None,
                   help=f"EDM sampler steps of the base stage (default {CLI_STEPS['edm-2m']} with edm-2m, "
                        f"{CLI_STEPS['edm-3m']} with edm-3m, {CLI_STEPS['edm-heun']} with edm-heun)")
    p.add_argument("--relay-sample-steps", type=_positive_int, default=None,
                   help=f"relay Karras grid size before truncation (default {CLI_STEPS['relay-2m']} with relay-2m, "
                        f"relay-3m and relay-2s, {CLI_STEPS['rdm-heun']} with rdm-heun and rdm-euler)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .solvers import CLI_STEPS
    from .training.demo import DemoConfig, format_metrics, run_demo

    base_solver, relay_solver = _stage_solvers(args.solver, authors=False)
    cfg = DemoConfig(out=args.out, data=args.data, retrain=args.retrain, seed=args.seed,
                     train_seconds=args.train_seconds, base_steps=args.base_steps, relay_steps=args.relay_steps,
                     num_samples=args.num_samples, num_eval=args.num_eval, sweep_levels=args.sweep_levels,
                     base_solver=base_solver, base_sample_steps=args.base_sample_steps or CLI_STEPS[base_solver],
                     relay_solver=relay_solver,
                     relay_sample_steps=args.relay_sample_steps or CLI_STEPS[relay_solver],
                     progress=args.progress, device=args.device)
    metrics = run_demo(cfg, command="relayops " + " ".join(shlex.quote(a) for a in args.argv))
    out = Path(cfg.out)
    print(format_metrics(metrics))
    print(f"wrote {out / 'samples.png'}, {out / 'sr_compare.png'}, {out / 'sr_tradeoff.png'}, {out / 'metrics.json'} "
          f"in {metrics['seconds']['total_s']:.0f} s")
    return 0


def _build_spectrum(sub) -> None:
    from .analysis import DEFAULT_IMAGES

    p = sub.add_parser("spectrum", help="SNR per DCT frequency of images under noise (SPEC 12)",
                       description="SNR per DCT frequency (SPEC 12) of photographs under high-resolution white "
                                   "noise, upsampled low-resolution white noise and block noise; writes "
                                   "PREFIX.png and PREFIX.json.")
    p.add_argument("--images", nargs="*", default=None,
                   help=f"image files or scikit-image sample names (default: {' '.join(DEFAULT_IMAGES)})")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level (default 0.5)")
    p.add_argument("--s", type=_positive_int, default=4, help="block size = resolution ratio (default 4)")
    p.add_argument("--resolution", type=_positive_int, default=256, help="high resolution (default 256)")
    p.add_argument("--draws", type=_positive_int, default=8, help="noise draws per image (default 8)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", default="spectrum", help="output prefix: writes PREFIX.png and PREFIX.json")
    p.set_defaults(func=_cmd_spectrum)


def _cmd_spectrum(args) -> int:
    from . import analysis

    images = analysis.load_images(args.images, args.resolution)
    result = analysis.snr_spectrum(images, sigma=args.sigma, s=args.s, resolution=args.resolution,
                                   draws=args.draws, seed=args.seed)
    png, js = analysis.write_spectrum(result, args.out)
    low_band = analysis.low_band_snr_db(result)
    print(f"wrote {png} and {js}; mean SNR (dB) below 1/(2s) of the band: "
          + ", ".join(f"{k} {v:.2f}" for k, v in low_band.items()))
    return 0


def _build_evaluate(sub) -> None:
    from .evaluate import METRICS

    p = sub.add_parser("evaluate", help="FID, sFID, precision/recall and KID of images against a reference",
                       description="Inception features of IMAGES (a folder of PNG/JPEG files, a .zip of them, an "
                                   ".npz of ADM's arr_0 images, or an .npz of statistics or features), their "
                                   "statistics saved with --save, and the metrics against --ref (the same kinds "
                                   "of input). Needs the [eval] extra (docs/evaluation.md).")
    p.add_argument("images", help="the images (or statistics file) to measure")
    p.add_argument("--ref", default=None, help="the reference: images or a statistics .npz (ours, ADM's reference "
                                               "batches, EDM's statistics, RDM's activations)")
    p.add_argument("--save", default=None, metavar="NPZ", help="write the statistics and features of IMAGES here")
    p.add_argument("--stats-only", action="store_true",
                   help="--save without the features (8 KB an image): no precision/recall or KID from that file")
    p.add_argument("--metrics", type=_comma_list(str, "metric names"), default=list(METRICS), metavar="M1,M2,...",
                   help=f"any of {','.join(METRICS)} (default all; pr = precision and recall)")
    p.add_argument("--batch", type=_positive_int, default=64, help="images per network call (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto: cuda where available)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import json
    import time

    from . import evaluate

    if args.ref is None and args.save is None:
        raise ValueError("nothing to do: give --ref REF to compare with, --save NPZ to keep the statistics, or both")
    unknown = set(args.metrics) - set(evaluate.METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {','.join(evaluate.METRICS)}")
    options = dict(batch_size=args.batch, device=args.device, progress=args.progress)
    t0 = time.time()
    stats = evaluate.statistics_of(args.images, **options)
    seconds = {"images_s": round(time.time() - t0, 1)}
    if args.save:
        path = evaluate.save_statistics(stats, args.save, features=not args.stats_only)
        print(f"wrote {path} ({stats.num_images} images)")
    if args.ref is None:
        return 0
    t0 = time.time()
    result = evaluate.evaluate(stats, args.ref, metrics=args.metrics, **options)
    seconds["reference_and_metrics_s"] = round(time.time() - t0, 1)
    print(f"{args.images}: {result['num_samples']} images; reference {args.ref}: "
          f"{result['num_reference'] if result['num_reference'] is not None else 'an unrecorded number of'} images")
    for name, key in (("FID", "fid"), ("sFID", "sfid"), ("precision", "precision"), ("recall", "recall")):
        if result[key] is not None:
            print(f"  {name:<10} {result[key]:.4f}")
    if result["kid"] is not None:
        print(f"  {'KID':<10} {result['kid']:.6f} +- {result['kid_stderr']:.6f} (standard error)")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "reference": args.ref, **result,
                                               "seconds": seconds}, indent=2) + "\n")
    return 0


def _cmd_bench(args) -> int:
    root = Path(__file__).resolve().parent.parent
    bench = root / "bench"
    if not bench.is_dir():
        raise FileNotFoundError(f"no bench/ folder next to the package ({bench}): the benchmarks ship with the "
                                "source checkout; run this from a clone of the repository")
    return subprocess.call([sys.executable, "-m", "pytest", "bench", *args.rest], cwd=root)


PASSTHROUGH = {"bench": _cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayops", description="Relay diffusion: train, sample, convert, "
                                     "demo, spectrum analysis, evaluation and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _build_train(sub)
    _build_sample(sub)
    _build_distill(sub)
    _build_convert(sub)
    _build_demo(sub)
    _build_spectrum(sub)
    _build_evaluate(sub)
    p = sub.add_parser("bench", help="run the benchmarks (python -m pytest bench [ARGS])", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="extra pytest arguments")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        # These hand every later argument to another program (pytest), options included,
        # which argparse.REMAINDER would not do for a leading "--option".
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=PASSTHROUGH[argv[0]])
    else:
        args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("relayops: interrupted (the last saved checkpoint is intact)", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        parser.exit(2, f"relayops {args.command}: error: {e}\n")
    except ImportError as e:
        if e.name not in EXTRAS:  # a missing extra is the user's to install; any other ImportError is a bug
            raise
        parser.exit(2, f"relayops {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
