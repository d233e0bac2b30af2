"""The training loop: AdamW, warm-up, gradient clipping, EMA, bf16 autocast, DDP, exact resume.

``train(TrainConfig(...))`` trains one stage (base, relay, or a Matryoshka "mdm" model) and writes
``<out>/checkpoint.safetensors`` (+ .json)
and, every ``sample_every`` steps, a PNG grid of samples from the EMA weights. Run it under
``torchrun --nproc_per_node=N`` for DistributedDataParallel (gloo on CPU, nccl on GPU, each
process on ``cuda:LOCAL_RANK``); the global batch is split over the ranks.

Randomness. The data order is one permutation per epoch, a pure function of ``(seed, epoch)``;
step k takes the next ``batch_size`` indices of it (the global batch) and rank r the r-th
contiguous slice. A sample's crop is a function of ``(seed, epoch, dataset index)`` and its
label dropout, noise level and noise of ``(seed, step, position in the global batch)`` (per-sample
Philox seeds, see ``losses``). So N processes see together exactly the samples, crops and noise
that one process with the same global batch sees, and their averaged gradient is the one
process's gradient up to the order of float additions. Only dropout draws from per-rank torch
generators (the CPU one, and the CUDA one on a GPU), whose states the checkpoints save.
Restarting from a checkpoint at step k therefore reproduces the weights of an unbroken run with
the same seed and number of processes, bit for bit where the kernels are deterministic: on the
CPU (tested), and on a GPU with ``deterministic`` (tested on an H100 with one process).

Host synchronisation: a training step queues its work on the device without waiting for it;
the loss is read back only every ``log_every`` steps.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import schedules
from .._optional import progress_bar
from . import checkpoint as ckpt
from .data import CropDataset, area_downsample, load_images, save_grid
from .losses import (LABEL_OFFSET, edm_base_loss, linear_relay_loss, mdm_train_loss, relay_loss, sample_uniforms,
                     vpred_loss)
from .nested_unet import MDMDenoiser, NestedUNet, NestedUNetConfig
from .unet import EDMPrecond, UNet, UNetConfig, VPredPrecond

STAGES = ("base", "relay", "mdm")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint)."""
    stage: str = "base"                # "base" (low resolution), "relay" (super-resolution) or "mdm"
    data: str = "builtin"              # "builtin" or a folder of PNG/JPEG images
    out: str = "runs/train"
    resolution: int = 16               # training crop size (the relay stage may sample larger; mdm: the highest)
    patch: int = 4                     # s: relay patch size / super-resolution factor
    crop_scale: list = field(default_factory=lambda: [1.0, 2.0])
    steps: int = 1000
    time_limit: float = 0.0            # seconds: stop early (at a step boundary) when spent; 0: no limit
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
    vpred_reference: int = 64         # reference resolution of the shifted schedules (v-prediction and mdm)
    multiscale: bool = False
    # Matryoshka diffusion (stage "mdm", SPEC 11): a NestedUNet over these resolutions (ascending)
    mdm_resolutions: list = field(default_factory=lambda: [16, 32, 64])
    mdm_weights: list = field(default_factory=list)   # loss weight per resolution (default 1 each)
    mdm_weighting: str = "v"           # "v": per resolution the v-prediction error; "x": the x error
    mdm_schedule: str = "shifted"      # "cosine", "shifted" or "interpolated" (relayops.multires)
    progressive: list = field(default_factory=list)   # the step at which each higher resolution joins
    # class conditioning
    class_cond: bool = False
    label_dropout: float = 0.1
    # bookkeeping
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    progress: bool = True
    progress_position: int = 0         # tqdm line (several runs side by side)
    device: str = "auto"               # auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK), cuda:i
    deterministic: bool = False        # deterministic kernels only (see _make_deterministic)
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
        if self.stage == "mdm":
            self._validate_mdm()
        elif self.progressive:
            raise ValueError("progressive is an option of the mdm stage")
        mult = 2 ** (len(self.model.get("channel_mult", UNetConfig().channel_mult)) - 1)
        if self.stage != "mdm" and self.resolution % mult:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {mult} "
                             f"(the UNet halves it {int(math.log2(mult))} times)")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if not self.time_limit >= 0:
            raise ValueError(f"time_limit must be >= 0 seconds (0: no limit), got {self.time_limit}")

    def _validate_mdm(self) -> None:
        if self.parameterization != "edm" or self.multiscale:
            raise ValueError("the mdm stage predicts v with its own joint loss; parameterization and multiscale "
                             "are base-stage options")
        self.unet_config().validate()   # the resolutions and the levels of the NestedUNet
        res = list(self.mdm_resolutions)
        if self.resolution != res[-1]:
            raise ValueError(f"the mdm stage trains on crops at its highest resolution {res[-1]}; "
                             f"resolution is {self.resolution}")
        if self.mdm_weights and len(self.mdm_weights) != len(res):
            raise ValueError(f"mdm_weights needs one weight per resolution {res}, got {self.mdm_weights}")
        if self.mdm_weighting not in ("x", "v"):
            raise ValueError(f"mdm_weighting must be 'x' or 'v', got {self.mdm_weighting!r}")
        if self.mdm_schedule not in ("cosine", "shifted", "interpolated"):
            raise ValueError(f"mdm_schedule must be 'cosine', 'shifted' or 'interpolated', got {self.mdm_schedule!r}")
        p = list(self.progressive)
        if p and (len(p) != len(res) - 1 or p[0] < 1 or any(b <= a for a, b in zip(p, p[1:]))):
            raise ValueError(f"progressive needs {len(res) - 1} increasing steps >= 1 (when each of the resolutions "
                             f"{res[1:]} joins), got {p}")

    def active_resolutions(self, step: int) -> int:
        """How many resolutions (the lowest ones) the mdm stage trains at ``step``: the
        progressive schedule adds the next one at each of its steps."""
        return 1 + sum(step >= p for p in self.progressive) if self.progressive else len(self.mdm_resolutions)

    def unet_config(self, num_classes: int = 0) -> UNetConfig | NestedUNetConfig:
        if self.stage == "mdm":
            cfg = NestedUNetConfig.from_dict({"resolutions": list(self.mdm_resolutions), **self.model})
        else:
            cfg = UNetConfig.from_dict({"resolution": self.resolution, **self.model})
        cfg.num_classes = num_classes if self.class_cond else 0
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Fields that may change between a run and its resumption (nothing that alters the math).
RESUMABLE_CHANGES = {"steps", "time_limit", "out", "save_every", "sample_every", "log_every", "progress",
                     "progress_position", "device", "backend", "deterministic"}


def build_denoiser(unet: UNet, parameterization: str = "edm"):
    """Wrap a UNet (or a DDP-wrapped one) into the sampler contract ``denoiser(x, sigma[, labels])``."""
    return VPredPrecond(unet) if parameterization == "vpred" else EDMPrecond(unet)


def _stage_denoiser(net, cfg: TrainConfig):
    """The training wrapper of a stage's network: the mdm stage's joint denoiser, else build_denoiser's."""
    if cfg.stage == "mdm":
        return MDMDenoiser(net, cfg.mdm_schedule, cfg.vpred_reference)
    return build_denoiser(net, cfg.parameterization)


def load_denoiser(path, expected_stage: str | None = None, *, ema: bool = True, device="cpu"):
    """``(denoiser, record)`` from a checkpoint: the EMA (default) or raw weights, in eval mode.

    A checkpoint converted from an EDM/RDM release (a record with ``network``) gives
    :class:`relayops.models.EDMPrecond`, called the same way (it holds one set of weights)."""
    tensors, record = ckpt.load_checkpoint(path, expected_stage)
    prefix = "ema." if ema else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "network" in record:
        from ..models import network_from_record

        if not state:
            raise RuntimeError(f"checkpoint {str(path)!r} holds one network (converted from "
                               f"{record.get('source', {}).get('file')!r}) under 'ema.'; it has no raw weights")
        return network_from_record(record, state, str(path)).to(device), record
    train_cfg = TrainConfig.from_dict(record["train"])
    unet = _build_network(train_cfg.stage, record["unet"])
    try:
        unet.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {str(path)!r} does not match its own architecture record: {e}") from None
    denoiser = _stage_denoiser(unet, train_cfg).to(device).eval()
    return denoiser, record


def _build_network(stage: str, config) -> UNet | NestedUNet:
    """The network of a stage from its architecture (a config object or its dict)."""
    if stage == "mdm":
        return NestedUNet(config if isinstance(config, NestedUNetConfig) else NestedUNetConfig.from_dict(config))
    return UNet(config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """The device of this process: "auto" is CUDA if available, else the CPU; a CUDA device
    without an index is ``cuda:LOCAL_RANK`` (one GPU per process under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is None:
        if local_rank >= count:
            raise ValueError(f"process LOCAL_RANK={local_rank} has no GPU of its own: {count} CUDA devices are "
                             f"visible; run at most {count} processes per node")
        return torch.device("cuda", local_rank)
    if world > 1:
        raise ValueError(f"device {name!r} would put all {world} processes on one GPU; use --device cuda "
                         f"(each process takes cuda:LOCAL_RANK)")
    if device.index >= count:
        raise ValueError(f"device {name!r} does not exist: {count} CUDA devices are visible")
    return device


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set) the process
    group is initialised, also for a single process, so that one process takes the same path
    (DDP, gathered checkpoint) as many: NCCL for a CUDA device, gloo otherwise. Call after
    ``torch.cuda.set_device``."""
    world = _env_int("WORLD_SIZE", 1)
    launched = world > 1 or ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)
    if launched and not dist.is_initialized():
        if device.type == "cuda":
            # Bind the group to this rank's GPU (where the installed torch can) so that every
            # collective, all_gather_object included, runs there and NCCL connects eagerly.
            kwargs = {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters \
                else {}
            dist.init_process_group("nccl", **kwargs)
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _make_deterministic() -> None:
    """Deterministic kernels only, process-wide: an op without a deterministic implementation
    raises instead of running. cuBLAS reads its workspace setting when CUDA starts, so this must
    run first (the Trainer does it before anything touches CUDA)."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn("deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set; cuBLAS "
                          "may not be deterministic (set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting)",
                          stacklevel=3)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _math_attention():
    """The attention blocks' scaled_dot_product_attention restricted to its math backend (the
    fused GPU backends' backward passes need not be deterministic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (a bijection; arithmetic wraps modulo 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, step: int, batch_size: int, positions) -> np.ndarray:
    """Per-sample Philox seeds (uint64) of the samples at ``positions`` of the global batch of
    ``step``: distinct for every sample of a run, and independent of how the batch is split."""
    n = np.uint64(step) * np.uint64(batch_size) + np.asarray(positions, dtype=np.uint64)
    base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    return _splitmix64(n + base)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


class Trainer:
    """One training run. ``Trainer(cfg).run()``; see :func:`train`."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = True):
        cfg.validate()
        self.cfg = cfg
        if cfg.deterministic:
            _make_deterministic()
        # Each process takes its own GPU before anything (NCCL, a collective, a CUDA tensor)
        # touches CUDA; otherwise every rank would work on cuda:0.
        self.device = _device(cfg.device, _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world = _distributed(self.device)
        self.distributed = dist.is_initialized()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.world} processes")
        images, labels, class_names = load_images(cfg.data)
        self.class_names = class_names
        self.dataset = CropDataset(images, cfg.resolution, labels=labels, crop_scale=tuple(cfg.crop_scale),
                                   seed=cfg.seed)
        self.local_batch = cfg.batch_size // self.world
        self.steps_per_epoch = len(self.dataset) // cfg.batch_size   # the last partial batch is dropped
        self._order_epoch, self._order = None, None
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than an epoch of {len(self.dataset)} samples")

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.unet_config = cfg.unet_config(len(class_names))
        self.unet = _build_network(cfg.stage, self.unet_config).to(self.device)
        self.ema = _build_network(cfg.stage, self.unet_config).to(self.device).eval()
        self.ema.load_state_dict(self.unet.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Dropout draws from torch's global generators: one stream per rank (saved in checkpoints).
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)
        self.step = 0
        self.out = Path(cfg.out)
        if resume and (self.out / ckpt.WEIGHTS_NAME).exists():
            self._resume()
        net = self.unet
        if self.distributed:
            # The progressive schedule leaves the higher resolutions' layers unused at first.
            net = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(cfg.progressive))
        self.denoiser = _stage_denoiser(net, cfg)
        self.ema_denoiser = _stage_denoiser(self.ema, cfg)
        self.relay_grid = None
        if cfg.stage == "relay" and cfg.relay_mode == "linear":
            self.relay_grid = schedules.relay_sigmas(cfg.linear_steps, cfg.sigma_trunc, dtype=torch.float32,
                                                     device=self.device)

    # --- checkpoints -------------------------------------------------------------------------

    def _record(self) -> dict:
        return {"stage": self.cfg.stage, "step": self.step, "world_size": self.world,
                "train": asdict(self.cfg), "unet": self.unet_config.to_dict(), "class_names": self.class_names}

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This rank's dropout generator states (everything else random is keyed by the step)."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return {k: v.cpu() for k, v in states.items()}

    def save(self) -> None:
        """Rank 0 writes the checkpoint (every rank's generator states gathered into it)."""
        states = self._rng_states()
        if self.distributed:
            # A collective: every rank calls save(). Under NCCL it runs on the current CUDA
            # device, which __init__ set to this rank's GPU.
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
            for name, state in rank_states.items():
                tensors[f"rng.{r}.{name}"] = state
        ckpt.save_checkpoint(self.out, tensors, self._record())

    def _resume(self) -> None:
        try:
            tensors, record = ckpt.load_checkpoint(self.out, expected_stage=self.cfg.stage)
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"{e} (to start over in this directory, use --retrain)") from None
        old = type(self.cfg).from_dict(record["train"])
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
        # Checkpoints of earlier versions numbered the states: .1 was the CPU one, .2 the CUDA one.
        cpu_state = tensors.get(f"rng.{self.rank}.cpu", tensors.get(f"rng.{self.rank}.1"))
        cuda_state = tensors.get(f"rng.{self.rank}.cuda", tensors.get(f"rng.{self.rank}.2"))
        if cpu_state is None:
            raise RuntimeError(f"checkpoint {str(self.out)!r} has no generator state for rank {self.rank}")
        torch.set_rng_state(cpu_state)
        if self.device.type == "cuda" and cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        self.step = int(record["step"])

    # --- the loop ----------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset order of one epoch: a pure function of (seed, epoch)."""
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.dataset))

    def global_batch_indices(self, step: int) -> np.ndarray:
        """The dataset indices of the global batch of ``step`` (all ranks together), in order.
        The epoch's permutation is computed once per epoch, not per step."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        b = self.cfg.batch_size
        return self._order[pos * b:(pos + 1) * b]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is queued without waiting for the GPU.
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's part of the global batch of ``step``: ``(images, labels, per-sample seeds)``,
        a pure function of (seed, step) and the rank's slice of the global batch."""
        epoch = step // self.steps_per_epoch
        lo = self.rank * self.local_batch
        positions = np.arange(lo, lo + self.local_batch)
        y, labels = self.dataset.batch(self.global_batch_indices(step)[positions], epoch)
        seeds = torch.from_numpy(sample_seeds(self.cfg.seed, step, self.cfg.batch_size, positions).view(np.int64))
        return self._to_device(y), self._to_device(labels), self._to_device(seeds)

    def _training_labels(self, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor | None:
        """The labels the network sees: None without class conditioning; else some replaced by the
        "no label" token (classifier-free guidance needs an unconditional model too)."""
        if not self.cfg.class_cond:
            return None
        drop = sample_uniforms(seeds, labels, 1, LABEL_OFFSET, self.cfg.backend)[:, 0] < self.cfg.label_dropout
        return torch.where(drop, torch.full_like(labels, self.unet_config.num_classes), labels)

    def _loss(self, y: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The stage's loss on this rank's batch (the mean over its samples); sample b's
        randomness comes from ``seeds[b]``."""
        cfg = self.cfg
        labels = self._training_labels(labels, seeds)
        if cfg.stage == "mdm":
            k = cfg.active_resolutions(self.step)
            return mdm_train_loss(self.denoiser, y, labels, seeds=seeds, num_resolutions=k,
                                  weights=cfg.mdm_weights[:k] or None, weighting=cfg.mdm_weighting,
                                  backend=cfg.backend)
        if cfg.stage == "relay" and cfg.relay_mode == "linear":
            return linear_relay_loss(self.denoiser, y, labels, seeds=seeds, s=cfg.patch, sigmas=self.relay_grid,
                                     backend=cfg.backend)
        if cfg.stage == "relay":
            return relay_loss(self.denoiser, y, labels, seeds=seeds, s=cfg.patch, alpha=cfg.alpha,
                              normalize=cfg.normalize, L=cfg.L, sigma_b_max=cfg.sigma_b_max, backend=cfg.backend)
        if cfg.parameterization == "vpred":
            return vpred_loss(self.denoiser, y, labels, seeds=seeds, reference=cfg.vpred_reference,
                              multiscale=cfg.multiscale, backend=cfg.backend)
        return edm_base_loss(self.denoiser, y, labels, seeds=seeds, backend=cfg.backend)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Short warm-up of the decay so early EMA weights are not dominated by the initialisation.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.ema.buffers(), self.unet.buffers()):
            e.copy_(b)

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the rank-local loss as a 0-d tensor on the device
        (reading it, e.g. ``float(loss)``, waits for the step to finish)."""
        cfg = self.cfg
        self.unet.train()
        y, labels, seeds = self._batch(self.step)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(cfg, self.step)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext())
        attention = _math_attention() if cfg.deterministic else contextlib.nullcontext()
        with attention:
            with autocast:
                loss = self._loss(y, labels, seeds)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self._update_ema()
        return loss.detach()

    def sample_grid(self, num: int = 16) -> Path | None:
        """A PNG grid from the EMA weights (needs relayops.sampling); the relay stage starts
        from area-downsampled training crops; the mdm stage shows the highest resolution it trains."""
        from .. import sampling

        cfg = self.cfg
        with torch.no_grad():
            if cfg.stage == "mdm":
                res = cfg.mdm_resolutions[:cfg.active_resolutions(self.step)]
                x = sampling.mdm_sample(self.ema_denoiser, num, res, channels=3, schedule=cfg.mdm_schedule,
                                        reference=cfg.vpred_reference, seed=0, device=self.device)[-1]
            elif cfg.stage == "base":
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

    def _out_of_time(self, started: float) -> bool:
        """Whether ``cfg.time_limit`` is spent; every rank takes rank 0's answer, so all stop at
        the same step."""
        if not self.cfg.time_limit:
            return False
        spent = torch.tensor([float(time.monotonic() - started >= self.cfg.time_limit)], device=self.device)
        if self.distributed:
            dist.broadcast(spent, 0)
        return bool(spent.item())

    def run(self) -> dict:
        """Train until ``cfg.steps``, or until ``cfg.time_limit`` seconds are spent (checked
        every ``log_every`` steps); returns ``{"step", "loss"}`` (this rank's mean loss over the
        last log window). The losses are summed on the device and read back every ``log_every``
        steps only."""
        cfg = self.cfg
        bar = progress_bar(cfg.progress and self.rank == 0, total=None if cfg.time_limit else cfg.steps,
                           initial=self.step, desc=f"train {cfg.stage}", file=sys.stderr, dynamic_ncols=True,
                           position=cfg.progress_position)
        window, count, last, first = None, 0, float("nan"), self.step
        started = time.monotonic()
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                window = loss if window is None else window + loss
                count += 1
                bar.update(1)
                if count >= cfg.log_every or self.step == cfg.steps:
                    last = float(window) / count   # the only read-back of the loss
                    bar.set_postfix(loss=f"{last:.4f}")
                    window, count = None, 0
                    if self._out_of_time(started):
                        break
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
