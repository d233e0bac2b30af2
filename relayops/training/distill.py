"""Progressive distillation of a relay stage: CogView3's relay distillation (docs/spec.md section 10.2).

A teacher relay model samples with the deterministic relay sampler (eta = 0, Euler steps:
SPEC 8's DDIM-blur step for the RDM blurring relay, SPEC 10's step for the linear relay) on a
grid of N steps. The student starts from the teacher's weights and learns to do in one step what
the teacher does in two: on the grid of every other level (N/2 steps), its x0 prediction at a
level is the x0 that makes its one step land where the teacher's two steps land. Each round
halves the steps (16 -> 8 -> 4 ...); the next round's teacher is this round's student (EMA
weights).

Classifier-free guidance: with a guidance range ``(w_min, w_max)`` every training sample draws
a weight w; the first round's teacher gives ``w cond - (w - 1) uncond`` (two calls), the student
(a UNet with a guidance input, ``UNetConfig.guidance``) learns it in one call, and later rounds'
teachers are guided students called with the same w.

    from relayops.training.distill import DistillConfig, distill
    rounds = distill(DistillConfig(teacher="runs/relay", out="runs/distill", rounds=2))  # 16 -> 8 -> 4 steps
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .. import reference, schedules
from ..ops import linear_relay_blur, linear_relay_step, patch_dct, patch_idct, relay_corrupt, relay_step
from ..sampling import linear_relay_sample, nearest_upsample, relay_sample
from .checkpoint import read_record
from .data import CropDataset, area_downsample, builtin_images, load_images
from .losses import LEVEL_OFFSET, NOISE_OFFSET, resolve_seeds, sample_uniforms, white_noise
from .metrics import log_spectral_distance, psnr
from .trainer import TrainConfig, Trainer, load_denoiser

GUIDANCE_OFFSET = 3  # Philox offset of a sample's guidance weight (the losses use offsets 0-2)
BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


# --- the sampler path and the distillation target --------------------------------------------

@dataclass(frozen=True)
class RelayPath:
    """The deterministic relay sampler's grid: levels ``sigmas`` (decreasing, ending in 0) of
    mode ``"blur"`` (SPEC 8: blur time ``tau(u(sigma))`` with ``L``, ``sigma_b_max``) or
    ``"linear"`` (SPEC 10: relay times ``ts``, from ``t_relay`` down to 0). ``alpha`` and
    ``normalize`` set the blur relay's start noise and training corruption."""
    mode: str
    sigmas: tuple
    s: int = 4
    alpha: float = 0.15
    normalize: bool = True
    L: float = 0.93
    sigma_b_max: float = 3.0
    d_min: float = 0.001
    t_relay: float = 0.0
    ts: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "sigmas", tuple(float(v) for v in self.sigmas))
        object.__setattr__(self, "ts", tuple(float(v) for v in self.ts))
        sig = self.sigmas
        if self.mode not in ("blur", "linear"):
            raise ValueError(f"mode must be 'blur' or 'linear', got {self.mode!r}")
        if len(sig) < 2 or sig[-1] != 0.0 or any(not a > b for a, b in zip(sig, sig[1:])):
            raise ValueError(f"sigmas must decrease strictly and end in 0, got {list(sig)}")
        if self.mode == "linear":
            if len(self.ts) != len(sig):
                raise ValueError(f"ts has {len(self.ts)} times for {len(sig)} levels")
            if self.ts[0] != self.t_relay or self.ts[-1] != 0.0 or any(not a > b for a, b in zip(self.ts, self.ts[1:])):
                raise ValueError(f"ts must decrease strictly from t_relay = {self.t_relay} to 0, got {list(self.ts)}")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def times(self) -> list[float]:
        """Per level: the blur time tau (0 at the last level, as the relay sampler) or the relay time t."""
        if self.mode == "linear":
            return list(self.ts)
        return [schedules.tau_from_sigma(v, self.L, self.sigma_b_max) for v in self.sigmas[:-1]] + [0.0]

    def coarsen(self) -> "RelayPath":
        """Every other level: the student's grid (N/2 steps)."""
        if self.num_steps % 2:
            raise ValueError(f"a grid of {self.num_steps} steps cannot be halved")
        return replace(self, sigmas=self.sigmas[::2], ts=self.ts[::2])

    def responses(self) -> torch.Tensor:
        """``[N + 1, s, s]`` float64: per level, the factor of x0 in the degradation A, per patch-DCT
        frequency: the blur response D(tau) (SPEC 2) or ``1 - t/T_r`` at every frequency."""
        t = torch.tensor(self.times(), dtype=torch.float64)
        if self.mode == "blur":
            return reference.blur_response(t, self.s, self.d_min)
        return (1 - t / self.t_relay)[:, None, None].expand(-1, self.s, self.s).clone()

    def target_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Wa, Wb)``, each ``[N/2, s, s]`` float64: student step j (teacher levels i = 2j, i+1,
        i+2) has the target ``x0* = Wa x0_a + Wb x0_b`` per frequency (docs/spec.md 10.2), with
        ``Wb = (R2 - r2 R1)/(R2 - r1 r2 R0)``, ``Wa = r2 (R1 - r1 R0)/(R2 - r1 r2 R0)``."""
        if self.num_steps % 2:
            raise ValueError(f"a grid of {self.num_steps} steps cannot be halved")
        resp, sig = self.responses(), self.sigmas
        wa, wb = [], []
        for i in range(0, self.num_steps, 2):
            r1, r2 = sig[i + 1] / sig[i], sig[i + 2] / sig[i + 1]
            r0, rm, re = resp[i], resp[i + 1], resp[i + 2]
            den = re - r1 * r2 * r0
            wb.append((re - r2 * rm) / den)
            wa.append(r2 * (rm - r1 * r0) / den)
        return torch.stack(wa), torch.stack(wb)

    def level_tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, times)`` as tensors on like's device in the per-sample parameter dtype."""
        dt = torch.float64 if like.dtype == torch.float64 else torch.float32
        return (torch.tensor(self.sigmas, dtype=dt, device=like.device),
                torch.tensor(self.times(), dtype=dt, device=like.device))

    def corrupt(self, y: torch.Tensor, i: torch.Tensor, seeds: torch.Tensor, z_lr: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        """The forward path at level ``i[b]`` (< N): ``A(y) + sigma n``; blur: relay noise n
        (SPEC 6), linear: white noise and ``A_t`` toward ``z_lr`` (SPEC 10). Noise from ``seeds``."""
        sig, tim = self.level_tensors(y)
        if self.mode == "blur":
            return relay_corrupt(y, sig[i].to(y.dtype), tim[i].to(y.dtype), self.s, self.alpha, self.normalize,
                                 seed=seeds, offset=NOISE_OFFSET, backend=backend)
        noise = white_noise(y, seeds, NOISE_OFFSET, backend)
        return linear_relay_blur(y, z_lr, tim[i], self.t_relay) + sig[i].to(y.dtype)[:, None, None, None] * noise

    def step(self, x: torch.Tensor, x0_hat: torch.Tensor, i: torch.Tensor, z_lr: torch.Tensor | None = None,
             backend: str | None = None) -> torch.Tensor:
        """The deterministic sampler step from level ``i[b]`` to ``i[b] + 1`` (not the last one):
        SPEC 8's DDIM-blur step with eta = 0, or SPEC 10's linear relay step."""
        sig, tim = self.level_tensors(x)
        if self.mode == "blur":
            return relay_step(x, x0_hat, sig[i], sig[i + 1], tim[i], tim[i + 1], eta=0.0, s=self.s, d_min=self.d_min,
                              backend=backend)
        return linear_relay_step(x, x0_hat, z_lr, tim[i], tim[i + 1], self.t_relay, sig[i], sig[i + 1])

    @torch.no_grad()
    def sample(self, denoiser, low: torch.Tensor, *, seed=0, class_labels=None, cfg=None, dtype=torch.float32,
               backend: str | None = None) -> torch.Tensor:
        """The existing samplers on this grid (Euler, eta = 0): :func:`relay_sample` from the low-
        resolution ``low`` ``[B, C, h, w]`` (blur), or :func:`linear_relay_sample` from its nearest
        upsampling (linear). Returns ``[B, C, h s, w s]``."""
        if self.mode == "blur":
            return relay_sample(denoiser, low, self.s, sigmas=list(self.sigmas), eta=0.0, heun=False, alpha=self.alpha,
                                normalize=self.normalize, L=self.L, sigma_b_max=self.sigma_b_max, d_min=self.d_min,
                                seed=seed, class_labels=class_labels, cfg=cfg, dtype=dtype, backend=backend)
        return linear_relay_sample(denoiser, nearest_upsample(low, self.s), t_relay=self.t_relay,
                                   sigmas=list(self.sigmas), ts=list(self.ts), seed=seed, class_labels=class_labels,
                                   cfg=cfg, dtype=dtype, backend=backend)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RelayPath":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def teacher_path(train: dict, num_steps: int | None = None, *, sigma_start: float | None = None,
                 sigma_min: float = 0.008, rho: float = 7.0) -> RelayPath:
    """The teacher's sampling grid from its training settings (a checkpoint's ``record["train"]``).

    Blur relay: the Karras grid of ``num_steps`` levels from ``sigma_start`` (default: the
    settings' sigma_trunc) down to ``sigma_min``, then 0 (``num_steps`` steps; default 16). Linear
    relay: the model knows only the (t, sigma) pairs of its training grid (``linear_steps``,
    ``sigma_trunc``, SPEC 10), so the grid is ``num_steps + 1`` of those levels, evenly spaced in
    t, first and last included (default: all of them)."""
    common = dict(s=int(train.get("patch", 4)), alpha=float(train.get("alpha", 0.15)),
                  normalize=bool(train.get("normalize", True)), L=float(train.get("L", 0.93)),
                  sigma_b_max=float(train.get("sigma_b_max", 3.0)))
    trunc = float(train.get("sigma_trunc", 0.9))
    if train.get("relay_mode", "blur") == "linear":
        grid = schedules.relay_sigmas(int(train.get("linear_steps", 18)), trunc).tolist()
        t_relay = len(grid) - 1
        n = t_relay if num_steps is None else num_steps
        if not 1 <= n <= t_relay:
            raise ValueError(f"teacher_steps must be in 1..{t_relay} for this linear relay model (its training grid "
                             f"has {t_relay} steps), got {n}")
        idx = sorted({round(k * t_relay / n) for k in range(n + 1)})
        return RelayPath("linear", [grid[k] for k in idx], t_relay=float(t_relay),
                         ts=[float(t_relay - k) for k in idx], **common)
    n = 16 if num_steps is None else num_steps
    if n < 1:
        raise ValueError(f"teacher_steps must be >= 1, got {n}")
    start = trunc if sigma_start is None else float(sigma_start)
    levels = [start] if n == 1 else schedules.karras_sigmas(n, sigma_min, start, rho).tolist()
    return RelayPath("blur", levels + [0.0], **common)


def guided_x0(denoiser, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, guidance=None,
              guided_net: bool = False) -> torch.Tensor:
    """A teacher's x0 prediction. ``guidance`` (w per sample, ``[B]``): a guided student is called
    with it (``guided_net``); otherwise classifier-free guidance ``w cond - (w - 1) uncond``
    (SPEC 8) with per-sample w. Without guidance: ``denoiser(x, sigma[, class_labels])``."""
    if guidance is None:
        return denoiser(x, sigma) if class_labels is None else denoiser(x, sigma, class_labels)
    if guided_net:
        return denoiser(x, sigma, class_labels, guidance=guidance)
    w = guidance.to(x.dtype)[:, None, None, None]
    return w * denoiser(x, sigma, class_labels) - (w - 1) * denoiser(x, sigma, None)


@torch.no_grad()
def distillation_target(teacher_x0, x: torch.Tensor, i: torch.Tensor, path: RelayPath,
                        z_lr: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The student's x0 target at teacher level ``i[b]`` (even, < N) of ``path``: the x0 whose
    one student step from level i to i + 2 lands where the teacher's two steps land.

    ``teacher_x0(x, sigma [B]) -> x0_hat`` (guidance and labels bound). The teacher predicts
    x0_a at (x, sigma_i), steps to level i + 1 (:meth:`RelayPath.step`) and predicts x0_b there;
    the target is ``Wa x0_a + Wb x0_b`` per patch-DCT frequency (:meth:`RelayPath.target_weights`).
    """
    sig, _ = path.level_tensors(x)
    x0_a = teacher_x0(x, sig[i].to(x.dtype)).to(x.dtype)
    x1 = path.step(x, x0_a, i, z_lr, backend)
    x0_b = teacher_x0(x1, sig[i + 1].to(x.dtype)).to(x.dtype)
    wa, wb = (w.to(device=x.device, dtype=x.dtype)[i // 2] for w in path.target_weights())
    s = path.s
    coef = (reference.dct.scale_coefficients(patch_dct(x0_a, s, backend=backend), wa, s)
            + reference.dct.scale_coefficients(patch_dct(x0_b, s, backend=backend), wb, s))
    return patch_idct(coef, s, backend=backend)


def distillation_loss(student, teacher, y: torch.Tensor, class_labels=None, *, path: RelayPath,
                      generator: torch.Generator | None = None, seeds=None, guidance=None, teacher_guided: bool = False,
                      backend: str | None = None) -> torch.Tensor:
    """One distillation round's loss on clean images ``y [B, C, H, W]``: per sample a student step
    j (uniform over the N/2 steps of the coarsened ``path``), the state at teacher level i = 2j
    on the forward path, the teacher's two-step target (:func:`distillation_target`), and
    ``lambda(sigma_i) |student(x, sigma_i) - target|^2`` (SPEC 6's weight), mean over the batch.

    ``guidance``: None, or ``(w_min, w_max)``: w ~ U[w_min, w_max] per sample, the student is
    called with ``guidance=w``, the teacher as in :func:`guided_x0` (``teacher_guided``: the
    teacher is a guided student). Randomness from ``seeds`` (or ``generator``) as in the losses.
    """
    seeds = resolve_seeds(y, generator, seeds)
    half = path.num_steps // 2
    if path.num_steps % 2 or half < 1:
        raise ValueError(f"the teacher's grid must have an even number of steps, got {path.num_steps}")
    u = sample_uniforms(seeds, y, 1, LEVEL_OFFSET, backend)[:, 0]
    i = 2 * (u * half).long().clamp(max=half - 1)
    w = None
    if guidance is not None:
        lo, hi = (float(v) for v in guidance)
        w = lo + (hi - lo) * sample_uniforms(seeds, y, 1, GUIDANCE_OFFSET, backend)[:, 0]
    z_lr = nearest_upsample(area_downsample(y, path.s), path.s) if path.mode == "linear" else None
    x = path.corrupt(y, i, seeds, z_lr, backend)

    def teacher_x0(state, sigma):
        return guided_x0(teacher, state, sigma, class_labels, w, teacher_guided)

    target = distillation_target(teacher_x0, x, i, path, z_lr, backend)
    sigma = path.level_tensors(y)[0][i].float()
    extra = {} if w is None else {"guidance": w}
    x0_hat = student(x, sigma, class_labels, **extra)
    weight = schedules.edm_loss_weight(sigma)
    return (weight[:, None, None, None] * (x0_hat.float() - target.float()) ** 2).mean()


class GuidedDenoiser(torch.nn.Module):
    """A guided student as a plain sampler denoiser: ``denoiser(x, sigma[, labels])`` calls the
    student once with the fixed guidance weight ``w`` (in place of two calls for ``cfg=w``)."""

    def __init__(self, student, w: float):
        super().__init__()
        self.student, self.w = student, float(w)

    def forward(self, x, sigma, class_labels=None):
        return self.student(x, sigma, class_labels, guidance=torch.full((x.shape[0],), self.w, device=x.device))


# --- training ------------------------------------------------------------------------------

@dataclass
class DistillRoundConfig(TrainConfig):
    """One round: a relay-stage training run whose loss is :func:`distillation_loss` (saved in
    the student's checkpoint, with the teacher's settings it inherits)."""
    teacher: str = ""
    round: int = 1
    path: dict = field(default_factory=dict)     # the teacher's RelayPath (the student samples every other level)
    guidance: list | None = None                 # [w_min, w_max], or None: no guidance
    teacher_guided: bool = False                 # the teacher takes w (a guided student of an earlier round)


class Distiller(Trainer):
    """One distillation round: a :class:`Trainer` whose student starts from the teacher's EMA
    weights (a new guidance embedding starts at zero) and trains on :func:`distillation_loss`.
    Checkpoints, EMA and exact resume are the trainer's."""

    def __init__(self, cfg: DistillRoundConfig, *, resume: bool = True):
        if cfg.stage != "relay":
            raise ValueError("distillation trains a relay stage")
        self.path = RelayPath.from_dict(cfg.path)
        self.path.target_weights()  # an odd grid is an error before anything loads
        super().__init__(cfg, resume=resume)
        self.teacher, _ = load_denoiser(cfg.teacher, "relay", device=self.device)
        self.teacher.requires_grad_(False)
        if self.step == 0:
            missing, unexpected = self.unet.load_state_dict(self.teacher.net.state_dict(), strict=False)
            if unexpected or any(not k.startswith("guidance_embed.") for k in missing):
                raise ValueError(f"the student's network does not match the teacher {cfg.teacher!r}: missing "
                                 f"{missing}, unexpected {unexpected}")
            self.ema.load_state_dict(self.unet.state_dict())

    def _record(self) -> dict:
        student = self.path.coarsen()
        return {**super()._record(), "distill": {
            "round": self.cfg.round, "teacher": self.cfg.teacher, "teacher_steps": self.path.num_steps,
            "student_steps": student.num_steps, "teacher_path": self.path.to_dict(), "path": student.to_dict(),
            "guidance": self.cfg.guidance}}

    def _loss(self, y, labels, seeds):
        cfg = self.cfg
        if cfg.guidance is not None:
            labels = labels if cfg.class_cond else None   # the guided student learns the conditional model
        else:
            labels = self._training_labels(labels, seeds)
        return distillation_loss(self.denoiser, self.teacher, y, labels, path=self.path, seeds=seeds,
                                 guidance=cfg.guidance, teacher_guided=cfg.teacher_guided, backend=cfg.backend)


@dataclass
class DistillConfig:
    """A whole progressive distillation: ``rounds`` rounds from ``teacher`` (a relayops relay
    checkpoint, or a distilled student to continue from), each written to ``out/round<k>``."""
    teacher: str
    out: str = "runs/distill"
    rounds: int = 2
    teacher_steps: int | None = None   # blur: default 16; linear: default the training grid's steps
    sigma_start: float | None = None   # blur: first level (default the teacher's sigma_trunc)
    sigma_min: float = 0.008
    rho: float = 7.0
    guidance: list | None = None       # [w_min, w_max] (w_min = w_max: one weight); needs a class-conditional teacher
    steps: int = 500                   # training steps per round
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 50
    ema_decay: float = 0.99
    seed: int = 0
    save_every: int = 500
    device: str = "auto"
    progress: bool = True
    num_eval: int = 0                  # held-out crops for metrics.json (0: no comparison)
    eval_resolution: int = 64

    def validate(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.guidance is not None:
            g = [float(v) for v in self.guidance]
            if len(g) != 2 or not 1.0 <= g[0] <= g[1] or not all(map(math.isfinite, g)):
                raise ValueError(f"guidance must be [w_min, w_max] with 1 <= w_min <= w_max, got {self.guidance}")
            self.guidance = g
        if self.steps < 0 or self.batch_size < 1 or self.num_eval < 0:
            raise ValueError("steps and num_eval must be >= 0 and batch_size >= 1")


def _round_configs(cfg: DistillConfig) -> list[DistillRoundConfig]:
    """The rounds' configurations: round k's teacher is round k-1's student."""
    rec = read_record(cfg.teacher)
    if "network" in rec or "train" not in rec:
        raise ValueError(f"{cfg.teacher!r} is a converted network; distillation needs a relayops relay model "
                         "(relayops train --stage relay)")
    if rec.get("stage") != "relay":
        raise ValueError(f"{cfg.teacher!r} is a {rec.get('stage')!r} stage model; distillation needs a relay stage")
    train = rec["train"]
    if "distill" in rec:   # continue from a student: its own grid and guidance
        if cfg.teacher_steps is not None or cfg.sigma_start is not None:
            raise ValueError("a distilled teacher samples on its own grid: leave teacher_steps and sigma_start unset")
        if cfg.guidance is not None and cfg.guidance != rec["distill"]["guidance"]:
            raise ValueError(f"the teacher was distilled with guidance {rec['distill']['guidance']}; keep it")
        path, guidance, guided = RelayPath.from_dict(rec["distill"]["path"]), rec["distill"]["guidance"], \
            rec["distill"]["guidance"] is not None
        first = int(rec["distill"]["round"]) + 1
    else:
        path = teacher_path(train, cfg.teacher_steps, sigma_start=cfg.sigma_start, sigma_min=cfg.sigma_min,
                            rho=cfg.rho)
        guidance, guided, first = cfg.guidance, False, 1
    if path.num_steps % 2 ** cfg.rounds:
        raise ValueError(f"{cfg.rounds} rounds halve the steps {cfg.rounds} times: the teacher's {path.num_steps} "
                         f"steps must be divisible by {2 ** cfg.rounds} (set teacher_steps)")
    if guidance is not None and not rec["unet"].get("num_classes", 0):
        raise ValueError("guidance needs a class-conditional teacher (relayops train --class-cond)")
    model = {k: v for k, v in rec["unet"].items() if k != "num_classes"}
    model["guidance"] = guidance is not None
    base = asdict(TrainConfig.from_dict(train))
    base.update(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, ema_decay=cfg.ema_decay,
                seed=cfg.seed, save_every=cfg.save_every, sample_every=0, device=cfg.device, progress=cfg.progress,
                model=model, stage="relay")
    out, teacher, configs = Path(cfg.out), str(cfg.teacher), []
    for k in range(first, first + cfg.rounds):
        configs.append(DistillRoundConfig(**{**base, "out": str(out / f"round{k}")}, teacher=teacher, round=k,
                                          path=path.to_dict(), guidance=guidance, teacher_guided=guided))
        teacher, path, guided = configs[-1].out, path.coarsen(), guidance is not None
    return configs


def distill(cfg: DistillConfig, *, resume: bool = True, command: str | None = None) -> list[Path]:
    """Run every round (each resumes from its checkpoint, or is skipped when complete); returns
    the round directories, the last holding the final student. With ``num_eval`` it also writes
    ``out/metrics.json`` (:func:`compare`)."""
    cfg.validate()
    dirs = []
    for rc in _round_configs(cfg):
        print(f"[distill] round {rc.round}: {RelayPath.from_dict(rc.path).num_steps} -> "
              f"{RelayPath.from_dict(rc.path).num_steps // 2} steps, {rc.steps} training steps -> {rc.out}",
              file=sys.stderr)
        Distiller(rc, resume=resume).run()
        dirs.append(Path(rc.out))
    if cfg.num_eval:
        compare(cfg.teacher, dirs, num=cfg.num_eval, resolution=cfg.eval_resolution, seed=cfg.seed,
                device=cfg.device, out=Path(cfg.out) / "metrics.json", command=command)
    return dirs


# --- sampling and the comparison -------------------------------------------------------------

def _guided(denoiser, info: dict, guidance: float | None, name):
    """A guided student wrapped with its weight (default: the middle of its range); others as they are."""
    if info["guidance"] is None:
        return denoiser
    lo, hi = info["guidance"]
    w = (lo + hi) / 2 if guidance is None else float(guidance)
    if not lo <= w <= hi:
        raise ValueError(f"guidance {w} is outside the range [{lo}, {hi}] that {str(name)!r} was distilled for")
    return GuidedDenoiser(denoiser, w)


def load_student(path, *, device="cpu", guidance: float | None = None, ema: bool = True):
    """``(denoiser, RelayPath, record)`` of a distilled student: a plain sampler denoiser (a
    guided student wrapped in :class:`GuidedDenoiser` with weight ``guidance``, default the
    middle of its range) and the grid it samples on (:meth:`RelayPath.sample`)."""
    denoiser, rec = load_denoiser(path, "relay", ema=ema, device=device)
    if "distill" not in rec:
        raise ValueError(f"{str(path)!r} is not a distilled student (its record has no distillation)")
    if rec["distill"]["guidance"] is None and guidance is not None:
        raise ValueError(f"{str(path)!r} was distilled without guidance; it takes no guidance weight")
    return _guided(denoiser, rec["distill"], guidance, path), RelayPath.from_dict(rec["distill"]["path"]), rec


def pipeline_stage(path, denoiser, record: dict, *, guidance: float | None = None, relay_steps=None, eta=None):
    """The :class:`relayops.sampling.RelayStage` of a distilled blur-relay student for the pipeline
    (``relayops sample``): its own grid, Euler steps with eta = 0. ``guidance``: the weight of a
    guided student (one call per step), or classifier-free guidance for an unguided one."""
    from ..sampling import RelayStage

    grid = RelayPath.from_dict(record["distill"]["path"])
    if relay_steps is not None:
        raise ValueError(f"{str(path)!r} is a distilled student that samples with its own {grid.num_steps} steps; "
                         "leave out --relay-steps")
    if eta not in (None, 0.0):
        raise ValueError(f"{str(path)!r} is a distilled student of the deterministic sampler; leave out --eta")
    if grid.mode != "blur":
        raise ValueError(f"checkpoint {str(path)!r} is a linear-relay model; the pipeline runs blur relay stages "
                         "(sample it from Python: relayops.training.distill.load_student)")
    options = dict(sigmas=list(grid.sigmas), eta=0.0, heun=False, alpha=grid.alpha, normalize=grid.normalize,
                   L=grid.L, sigma_b_max=grid.sigma_b_max, d_min=grid.d_min)
    if record["distill"]["guidance"] is None and guidance is not None:
        options["cfg"] = guidance
    return RelayStage(_guided(denoiser, record["distill"], guidance, path), s=grid.s, options=options)


def heldout_crops(data: str, num: int, resolution: int, crop_scale, seed: int) -> torch.Tensor:
    """``[num, 3, R, R]`` evaluation crops: the held-out builtin photographs, or the data folder."""
    held = builtin_images("heldout") if data == "builtin" else load_images(data)[0]
    crops, _ = CropDataset(held, resolution, crop_scale=tuple(crop_scale), flip=False, seed=seed + 1).batch(
        range(num), epoch=0)
    return crops


def compare(teacher, students, *, num: int = 32, resolution: int = 64, seed: int = 0, device="auto",
            out=None, command: str | None = None) -> dict:
    """Super-resolve ``num`` held-out crops with the teacher at N, N/2, N/4 ... steps (on the
    coarsened grids) and each student at its own steps, all Euler with eta = 0 from the same
    start noise; PSNR and log-spectral distance (as ``relayops demo``) against the ground truth,
    the PSNR against the teacher's N-step output (what distillation aims at),
    and the wall and process CPU time per image (one batch of ``num`` after a warm-up call; on a
    shared machine the CPU time is the steadier measure). Writes the dict as
    JSON to ``out`` when given."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    loaded = [load_student(p, device=device) for p in students]
    if any(rec["distill"]["guidance"] is not None for _, _, rec in loaded):
        raise ValueError("the comparison runs unconditional models; these students were distilled with guidance")
    t_den, t_rec = load_denoiser(teacher, "relay", device=device)
    train = t_rec["train"]
    teacher_grid = RelayPath.from_dict(loaded[0][2]["distill"]["teacher_path"])
    truth = heldout_crops(train["data"], num, resolution, train.get("crop_scale", [1.0, 2.0]), seed)
    low = area_downsample(truth, teacher_grid.s).to(device)
    rows, teacher_n = [], {}
    teacher_grid.sample(t_den, low[:1], seed=seed)   # warm-up: the first call pays one-time costs

    def run(name, denoiser, grid):
        start, cpu_start = time.perf_counter(), time.process_time()
        x = grid.sample(denoiser, low, seed=seed + 1000).cpu().clamp(-1, 1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        teacher_n.setdefault("x", x)   # the first run: the teacher at N steps
        rows.append({"model": name, "steps": grid.num_steps, "psnr_db": round(float(psnr(x, truth).mean()), 3),
                     "psnr_vs_teacher_n_db": (None if x is teacher_n["x"] else
                                              round(float(psnr(x, teacher_n["x"]).mean()), 3)),
                     "log_spectral_distance_db": {b: round(v, 3) for b, v in
                                                  log_spectral_distance(x, truth, BANDS).items()},
                     "seconds_per_image": round(seconds / num, 4),
                     "cpu_seconds_per_image": round(cpu_seconds / num, 4)})

    grid = teacher_grid
    for _ in range(len(loaded) + 1):
        run("teacher", t_den, grid)
        if grid.num_steps % 2:
            break
        grid = grid.coarsen()
    for den, grid_s, rec in loaded:
        run(f"student round {rec['distill']['round']}", den, grid_s)
    s = teacher_grid.s
    result = {"command": command, "teacher": str(teacher), "students": [str(p) for p in students],
              "num_heldout_crops": num, "resolution": f"{resolution // s} -> {resolution} (s = {s})",
              "sampler": "Euler, eta = 0",
              "device": str(device), "torch_threads": torch.get_num_threads(), "rows": rows}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_comparison(m: dict) -> str:
    """The rows of :func:`compare` as a terminal table."""
    bands = list(m["rows"][0]["log_spectral_distance_db"])
    lines = [f"{'model':<16} {'steps':>5} {'PSNR dB':>8} {'vs N dB':>8}  " + "  ".join(f"LSD {b:>9}" for b in bands)
             + f"  {'s/image':>8}  {'CPU s/image':>11}"]
    for r in m["rows"]:
        vs = "" if r["psnr_vs_teacher_n_db"] is None else f"{r['psnr_vs_teacher_n_db']:.2f}"
        lines.append(f"{r['model']:<16} {r['steps']:>5} {r['psnr_db']:>8.2f} {vs:>8}  "
                     + "  ".join(f"{r['log_spectral_distance_db'][b]:>13.2f}" for b in bands)
                     + f"  {r['seconds_per_image']:>8.4f}  {r['cpu_seconds_per_image']:>11.4f}")
    return "\n".join(lines)
