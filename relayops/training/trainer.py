"""The training loop: AdamW, warm-up, gradient clipping, EMA, bf16 autocast, DDP, exact resume.

``train(TrainConfig(...))`` trains one stage and writes ``<out>/checkpoint.safetensors`` (+ .json)
and, every ``sample_every`` steps, a PNG grid of samples from the EMA weights. Run it under
``torchrun --nproc_per_node=N`` for DistributedDataParallel (gloo on CPU, nccl on GPU); the
global batch is split over the ranks.

Exact resume: everything random is either a pure function of ``(seed, epoch, index)`` (the data
crops, the sampler's order) or comes from generators whose states are saved per rank (the
loss noise, dropout). Restarting from a checkpoint at step k therefore reproduces the weights
of an unbroken run with the same seed.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .. import schedules
from . import checkpoint as ckpt
from .data import CropDataset, area_downsample, load_images, save_grid
from .losses import edm_base_loss, linear_relay_loss, relay_loss, vpred_loss
from .unet import EDMPrecond, UNet, UNetConfig, VPredPrecond

STAGES = ("base", "relay")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint)."""
    stage: str = "base"                # "base" (low resolution) or "relay" (super-resolution)
    data: str = "builtin"              # "builtin" or a folder of PNG/JPEG images
    out: str = "runs/train"
    resolution: int = 16               # training crop size (the relay stage may sample larger)
    patch: int = 4                     # s: relay patch size / super-resolution factor
    crop_scale: list = field(default_factory=lambda: [1.0, 2.0])
    steps: int = 1000
    batch_size: int = 32               # global (split over distributed ranks)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    seed: int = 0
    # relay stage (SPEC 5, 6)
    relay_mode: str = "blur"           # "blur" (RDM, SPEC 6) or "linear" (CogView3, SPEC 10)
    alpha: float = 0.15
    normalize: bool = True
    L: float = 0.93
    sigma_b_max: float = 3.0
    linear_steps: int = 18             # grid size for the linear relay's noise levels
    sigma_trunc: float = 0.9
    # base stage alternatives (SPEC 11)
    parameterization: str = "edm"      # "edm" or "vpred" (shifted cosine schedule)
    vpred_reference: int = 64
    multiscale: bool = False
    # class conditioning
    class_cond: bool = False
    label_dropout: float = 0.1
    # bookkeeping
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    progress: bool = True
    progress_position: int = 0         # tqdm line (several runs side by side)
    device: str = "auto"
    backend: str | None = None          # relayops op backend for the corruption
    model: dict = field(default_factory=dict)  # UNetConfig fields

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.relay_mode not in ("blur", "linear"):
            raise ValueError(f"relay_mode must be 'blur' or 'linear', got {self.relay_mode!r}")
        if self.parameterization not in ("edm", "vpred"):
            raise ValueError(f"parameterization must be 'edm' or 'vpred', got {self.parameterization!r}")
        if self.stage == "relay" and self.parameterization != "edm":
            raise ValueError("the relay stage trains an EDM denoiser; v-prediction is a base-stage option")
        if self.multiscale and self.parameterization != "vpred":
            raise ValueError("the multiscale loss needs parameterization='vpred'")
        if self.resolution < 1 or self.patch < 1:
            raise ValueError("resolution and patch must be positive")
        if self.stage == "relay" and self.resolution % self.patch:
            raise ValueError(f"resolution {self.resolution} is not divisible by the patch size {self.patch}")
        mult = 2 ** (len(self.model.get("channel_mult", UNetConfig().channel_mult)) - 1)
        if self.resolution % mult:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {mult} "
                             f"(the UNet halves it {int(math.log2(mult))} times)")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")

    def unet_config(self, num_classes: int = 0) -> UNetConfig:
        cfg = UNetConfig.from_dict({"resolution": self.resolution, **self.model})
        cfg.num_classes = num_classes if self.class_cond else 0
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Fields that may change between a run and its resumption (nothing that alters the math).
RESUMABLE_CHANGES = {"steps", "out", "save_every", "sample_every", "log_every", "progress", "progress_position",
                     "device", "backend"}


def build_denoiser(unet: UNet, parameterization: str = "edm"):
    """Wrap a UNet (or a DDP-wrapped one) into the sampler contract ``denoiser(x, sigma[, labels])``."""
    return VPredPrecond(unet) if parameterization == "vpred" else EDMPrecond(unet)


def load_denoiser(path, expected_stage: str | None = None, *, ema: bool = True, device="cpu"):
    """``(denoiser, record)`` from a checkpoint: the EMA (default) or raw weights, in eval mode."""
    tensors, record = ckpt.load_checkpoint(path, expected_stage)
    unet = UNet(UNetConfig.from_dict(record["unet"]))
    prefix = "ema." if ema else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        unet.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {str(path)!r} does not match its own architecture record: {e}") from None
    denoiser = build_denoiser(unet, record["train"].get("parameterization", "edm")).to(device).eval()
    return denoiser, record


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


class Trainer:
    """One training run. ``Trainer(cfg).run()``; see :func:`train`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world = _distributed()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} processes")
        self.device = _device(cfg.device, self.rank)
        images, labels, class_names = load_images(cfg.data)
        self.class_names = class_names
        self.dataset = CropDataset(images, cfg.resolution, labels=labels, crop_scale=tuple(cfg.crop_scale),
                                   seed=cfg.seed)
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.local_batch = cfg.batch_size // self.world
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than an epoch of {len(self.dataset)} samples")

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.unet_config = cfg.unet_config(len(class_names))
        self.unet = UNet(self.unet_config).to(self.device)
        self.ema = UNet(self.unet_config).to(self.device).eval()
        self.ema.load_state_dict(self.unet.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Per-rank streams: loss noise (self.gen) and dropout (torch's global generator).
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.rank)
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)
        self.step = 0
        self.out = Path(cfg.out)
        if resume and (self.out / ckpt.WEIGHTS_NAME).exists():
            self._resume()
        net = self.unet
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.denoiser = build_denoiser(net, cfg.parameterization)
        self.ema_denoiser = build_denoiser(self.ema, cfg.parameterization)
        self.relay_grid = None
        if cfg.stage == "relay" and cfg.relay_mode == "linear":
            self.relay_grid = schedules.relay_sigmas(cfg.linear_steps, cfg.sigma_trunc, dtype=torch.float32)

    # --- checkpoints -------------------------------------------------------------------------

    def _record(self) -> dict:
        return {"stage": self.cfg.stage, "step": self.step, "world_size": self.world,
                "train": asdict(self.cfg), "unet": self.unet_config.to_dict(), "class_names": self.class_names}

    def _rng_states(self) -> list[torch.Tensor]:
        states = [self.gen.get_state(), torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return [s.cpu() for s in states]

    def save(self) -> None:
        """Rank 0 writes the checkpoint (every rank's generator states gathered into it)."""
        states = self._rng_states()
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self.unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, p in enumerate(self.unet.parameters()):
            for name, value in self.opt.state.get(p, {}).items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(value)
        for r, rank_states in enumerate(gathered):
            for j, s in enumerate(rank_states):
                tensors[f"rng.{r}.{j}"] = s
        ckpt.save_checkpoint(self.out, tensors, self._record())

    def _resume(self) -> None:
        try:
            tensors, record = ckpt.load_checkpoint(self.out, expected_stage=self.cfg.stage)
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"{e} (to start over in this directory, use --retrain)") from None
        old = TrainConfig.from_dict(record["train"])
        changed = sorted(k for k, v in asdict(self.cfg).items()
                         if k not in RESUMABLE_CHANGES and getattr(old, k) != v)
        if changed:
            raise ValueError(f"cannot resume {str(self.out)!r}: its run used different settings for {changed}; "
                             f"use a new --out directory, or --retrain to start over")
        if record["world_size"] != self.world:
            raise ValueError(f"cannot resume exactly: the checkpoint was written by {record['world_size']} "
                             f"processes, this run has {self.world}")
        def sub(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.unet.load_state_dict(sub("model."))
        self.ema.load_state_dict(sub("ema."))
        params = list(self.unet.parameters())
        opt_state = {}
        for k, v in sub("opt.").items():
            i, name = k.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        for i, st in opt_state.items():
            self.opt.state[params[i]] = st
        self.gen.set_state(tensors[f"rng.{self.rank}.0"])
        torch.set_rng_state(tensors[f"rng.{self.rank}.1"])
        if self.device.type == "cuda" and f"rng.{self.rank}.2" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.{self.rank}.2"], self.device)
        self.step = int(record["step"])

    # --- the loop ----------------------------------------------------------------------------

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch for a global step: a pure function of (seed, step)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[pos * self.local_batch:(pos + 1) * self.local_batch]
        y, labels = self.dataset.batch(indices, epoch)
        return y.to(self.device), labels.to(self.device)

    def _loss(self, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.class_cond:
            # Classifier-free guidance needs an unconditional model too: drop some labels.
            drop = torch.rand(labels.shape, generator=self.gen, device=self.device) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.unet_config.num_classes), labels)
        else:
            labels = None
        if cfg.stage == "relay" and cfg.relay_mode == "linear":
            return linear_relay_loss(self.denoiser, y, labels, generator=self.gen, s=cfg.patch, sigmas=self.relay_grid)
        if cfg.stage == "relay":
            return relay_loss(self.denoiser, y, labels, generator=self.gen, s=cfg.patch, alpha=cfg.alpha,
                              normalize=cfg.normalize, L=cfg.L, sigma_b_max=cfg.sigma_b_max, backend=cfg.backend)
        if cfg.parameterization == "vpred":
            return vpred_loss(self.denoiser, y, labels, generator=self.gen, reference=cfg.vpred_reference,
                              multiscale=cfg.multiscale)
        return edm_base_loss(self.denoiser, y, labels, generator=self.gen)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Short warm-up of the decay so early EMA weights are not dominated by the initialisation.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.unet.buffers()):
            e.copy_(b)

    def train_step(self) -> float:
        """One optimisation step; returns the (rank-local) loss."""
        cfg = self.cfg
        self.unet.train()
        y, labels = self._batch(self.step)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(cfg, self.step)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext())
        with autocast:
            loss = self._loss(y, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self._update_ema()
        return float(loss.detach())

    def sample_grid(self, num: int = 16) -> Path | None:
        """A PNG grid from the EMA weights (needs relayops.sampling); the relay stage starts
        from area-downsampled training crops."""
        from .. import sampling

        cfg = self.cfg
        with torch.no_grad():
            if cfg.stage == "base":
                x = sampling.edm_sample(self.ema_denoiser, (num, 3, cfg.resolution, cfg.resolution), seed=0,
                                        device=self.device)
            else:
                y, _ = self.dataset.batch(range(num), epoch=0)
                x_lr = area_downsample(y.to(self.device), cfg.patch)
                if cfg.relay_mode == "linear":
                    x = sampling.linear_relay_sample(self.ema_denoiser, torch.nn.functional.interpolate(
                        x_lr, scale_factor=cfg.patch, mode="nearest"), t_relay=self.relay_grid.numel() - 1,
                        sigmas=self.relay_grid, seed=0)
                else:
                    x = sampling.relay_sample(self.ema_denoiser, x_lr, cfg.patch, alpha=cfg.alpha, L=cfg.L,
                                              sigma_b_max=cfg.sigma_b_max, normalize=cfg.normalize, seed=0)
        path = self.out / f"samples_{self.step:06d}.png"
        save_grid(x, path)
        return path

    def run(self) -> dict:
        """Train until ``cfg.steps``; returns ``{"step", "loss"}`` (mean loss of the last log window)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        show = cfg.progress and self.rank == 0
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.stage}", disable=not show,
                   file=sys.stderr, dynamic_ncols=True, position=cfg.progress_position)
        window, last, first = [], float("nan"), self.step
        try:
            while self.step < cfg.steps:
                window.append(self.train_step())
                bar.update(1)
                if len(window) >= cfg.log_every or self.step == cfg.steps:
                    last = sum(window) / len(window)
                    bar.set_postfix(loss=f"{last:.4f}")
                    window = []
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.rank == 0:
                    self.sample_grid()
        finally:
            bar.close()
        if self.step > first or not (self.out / ckpt.WEIGHTS_NAME).exists():
            self.save()
        return {"step": self.step, "loss": last}


def train(cfg: TrainConfig, *, resume: bool = True) -> dict:
    """Train one stage (see :class:`Trainer`); returns ``{"step", "loss"}``."""
    return Trainer(cfg, resume=resume).run()
