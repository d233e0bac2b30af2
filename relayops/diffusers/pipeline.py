"""``RelayDiffusionPipeline``: relay diffusion as a diffusers pipeline.

A pipeline is one stage, a :class:`RelayDenoiser` and a :class:`RelayScheduler`, plus the
pipeline of the stages below it (``base``, itself a ``RelayDiffusionPipeline``, None for the
base stage). So 16 -> 64 -> 256 is three nested pipelines; each one generates at its own
resolution, and ``save_pretrained`` writes the lower ones into the subfolder ``base/``
(``model_index.json``, ``denoiser/`` and ``scheduler/`` per stage, safetensors weights and JSON
configs), which ``from_pretrained`` reads back from a local folder without network access.
A relay stage without ``base`` super-resolves the images given to it (``image=``).

Seeds are relayops' by default, so that the images equal ``relayops sample``'s: image b uses
the Philox seed ``seed + b`` (or ``seed[b]`` for a list), and stage k (0 = base) draws at
Philox offsets from ``k * 2**32``, as :class:`relayops.sampling.RelayPipeline`. A
``torch.Generator`` (``generator=``) draws the noise with ``torch.randn`` instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from .. import sampling, solvers
from ..training.data import to_uint8
from .models import RelayDenoiser
from .scheduler import BASE_SOLVERS, RELAY_SOLVERS, RelayScheduler

OUTPUT_TYPES = ("pil", "np", "pt")
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class RelayPipelineOutput(ImagePipelineOutput):
    """diffusers' ``ImagePipelineOutput`` (``images``: the last stage's) plus, with
    ``output_stages=True``, ``images_per_stage``: every stage's images, lowest first."""
    images_per_stage: list | None = None


def _per_stage(name: str, value, n: int) -> list:
    """A call argument as one value per stage (lowest first): a list or tuple of n values, or
    one value for every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values; the pipeline has {n} stages (lowest first)")
        return list(value)
    return [value] * n


def _stage_solvers(solver, stages) -> list:
    """The solver of each stage for a call: a name applies to the stages of its kind (a base-
    or a relay-stage solver, as ``relayops sample --solver``); a list names one per stage."""
    if isinstance(solver, str):
        solvers.check_solver(solver, BASE_SOLVERS + RELAY_SOLVERS)
        base = solver in BASE_SOLVERS
        kinds = [st.scheduler.is_base for st in stages]
        if base not in kinds:
            raise ValueError(f"solver {solver!r} is for a {'base' if base else 'relay'} stage; this pipeline has none")
        return [solver if kind == base else None for kind in kinds]
    names = _per_stage("solver", solver, len(stages))
    for k, (st, name) in enumerate(zip(stages, names)):
        if name is not None and solvers.check_solver(name, BASE_SOLVERS + RELAY_SOLVERS) and \
                (name in BASE_SOLVERS) != st.scheduler.is_base:
            raise ValueError(f"solver {name!r} for stage {k}, a {'base' if st.scheduler.is_base else 'relay'} stage")
    return names


class RelayDiffusionPipeline(DiffusionPipeline):
    """One relay-diffusion stage and the stages below it (see the module docstring).

    Components: ``denoiser`` (:class:`RelayDenoiser`), ``scheduler`` (:class:`RelayScheduler`),
    ``base`` (the pipeline of the lower stages, or None). Config: ``guidance_scale``, this
    stage's default guidance weight (None: no guidance), and ``state_dtype`` ("float32" or
    "float64", the sampler state's dtype; the networks run as they are).
    """

    _optional_components = ["base"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, denoiser: RelayDenoiser, scheduler: RelayScheduler,
                 base: "RelayDiffusionPipeline | None" = None, guidance_scale: float | None = None,
                 state_dtype: str = "float32"):
        super().__init__()
        if not isinstance(denoiser, RelayDenoiser):
            raise TypeError(f"denoiser must be a RelayDenoiser, got {type(denoiser).__name__}")
        if not isinstance(scheduler, RelayScheduler):
            raise TypeError(f"scheduler must be a RelayScheduler, got {type(scheduler).__name__}")
        if base is not None and not isinstance(base, RelayDiffusionPipeline):
            raise TypeError(f"base must be a RelayDiffusionPipeline or None, got {type(base).__name__}")
        if base is not None and scheduler.is_base:
            raise ValueError(f"a stage above a base has a relay scheduler; solver {scheduler.config.solver!r} "
                             "is a base-stage solver")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, got {state_dtype!r}")
        self.register_modules(denoiser=denoiser, scheduler=scheduler, base=base)
        self.register_to_config(guidance_scale=guidance_scale, state_dtype=state_dtype)
        self.stage_index: int | None = None  # the stage running now (0 = lowest), for step callbacks

    @property
    def stages(self) -> list["RelayDiffusionPipeline"]:
        """The pipelines of every stage, lowest first (the last is this one)."""
        return ([] if self.base is None else self.base.stages) + [self]

    def to(self, *args, **kwargs):
        """Move (or cast) every stage's network."""
        super().to(*args, **kwargs)
        if self.base is not None:
            self.base.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, num_inference_steps=None, solver=None,
                 generator: torch.Generator | None = None, seed=0, guidance_scale=None,
                 image: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 output_stages: bool = False):
        """Generate ``batch_size`` images through every stage (or super-resolve ``image``).

        Per-stage arguments take one value for all stages or a list, lowest stage first:
        ``num_inference_steps`` (None: each scheduler's config; see :class:`RelayScheduler` for
        what it counts), ``solver`` (None: the scheduler's; a name switches the stages of its
        kind, base or relay, for this call), ``guidance_scale`` (classifier-free guidance weight w,
        ``x0_hat = w cond - (w - 1) uncond``; None: the stage's config). ``class_labels``: an
        int, or one class index per image (None: unconditional). ``seed``: an int (image b
        uses ``seed + b``) or one int per image; ``generator``: a torch.Generator instead.
        ``image``: low-resolution images ``[B, C, h, w]`` in [-1, 1] for a pipeline whose lowest
        stage is a relay stage. ``output_type``: "pil" (8 bits as ``relayops sample`` writes
        them), "np" (``[B, H, W, C]`` floats in [0, 1]) or "pt" (``[B, C, H, W]`` in [0, 1]).
        ``callback_on_step_end(pipe, i, t, kwargs)``: after every model call, with
        ``pipe.stage_index`` the stage; ``kwargs`` holds the tensors named in
        ``callback_on_step_end_tensor_inputs``; a returned ``latents`` replaces the state.
        ``output_stages``: also return every lower stage's images (``images_per_stage``).

        Returns a :class:`RelayPipelineOutput` (a diffusers ``ImagePipelineOutput``: ``images``),
        or a tuple with ``return_dict=False``.
        """
        stages = self.stages
        n = len(stages)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got "
                             f"{sorted(unknown)}")
        if isinstance(generator, (list, tuple)):
            raise ValueError("pass one torch.Generator, or per-image Philox seeds with seed=[...]")
        steps = _per_stage("num_inference_steps", num_inference_steps, n)
        weights = _per_stage("guidance_scale", guidance_scale, n)
        names = _stage_solvers(solver, stages)
        first = stages[0]
        if image is None and not first.scheduler.is_base:
            raise ValueError("the lowest stage is a relay stage: pass the low-resolution images as image=")
        if image is not None:
            if first.scheduler.is_base:
                raise ValueError("image= is for a pipeline whose lowest stage is a relay stage; this one starts "
                                 "with a base stage")
            batch_size = image.shape[0]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = self.denoiser.device
        dtype = STATE_DTYPES[self.config.state_dtype]
        labels = self._labels(class_labels, batch_size, device)
        if generator is None:
            seed = [seed + b for b in range(batch_size)] if isinstance(seed, int) and not isinstance(seed, bool) \
                else list(seed)
            if len(seed) != batch_size:
                raise ValueError(f"seed has {len(seed)} values for {batch_size} images")
        x = None if image is None else image.to(device)
        outputs = []
        for k, stage in enumerate(stages):
            self.stage_index = k
            x = self._run_stage(stage, k, x, batch_size, labels, steps[k], names[k], weights[k], seed, generator,
                                dtype, device, callback_on_step_end, callback_on_step_end_tensor_inputs)
            outputs.append(x)
        self.stage_index = None
        images = self._postprocess(outputs[-1], output_type)
        per_stage = [self._postprocess(v, output_type) for v in outputs] if output_stages else None
        if not return_dict:
            return (images, per_stage) if output_stages else (images,)
        return RelayPipelineOutput(images=images, images_per_stage=per_stage)

    def _run_stage(self, stage, k, x_lr, batch_size, labels, steps, solver, weight, seed, generator, dtype, device,
                   callback, callback_inputs) -> torch.Tensor:
        """One stage's sampling loop, diffusers' way: ``for t in scheduler.timesteps``: the
        denoiser at (latents, t), then ``scheduler.step``."""
        scheduler = stage.scheduler
        if solver is not None and solver != scheduler.config.solver:
            scheduler = RelayScheduler.from_config(scheduler.config, solver=solver)
        scheduler.set_timesteps(steps, device=device)
        noise = dict(seed=seed if generator is None else None, generator=generator, offset=k << 32)
        if scheduler.is_base:
            den = stage.denoiser
            latents = scheduler.noise_start((batch_size, den.channels, den.resolution, den.resolution), dtype=dtype,
                                            device=device, **noise)
        else:
            latents = scheduler.relay_start(x_lr, dtype=dtype, **noise)
        weight = stage.config.guidance_scale if weight is None else weight
        with self.progress_bar(total=len(scheduler.timesteps)) as bar:
            for i, t in enumerate(scheduler.timesteps):
                x0_hat = sampling._denoise(stage.denoiser, latents, float(t), labels, weight)
                out = scheduler.step(x0_hat, t, latents)
                latents = out.prev_sample
                if callback is not None:
                    tensors = {"latents": latents, "pred_original_sample": out.pred_original_sample}
                    returned = callback(self, i, t, {name: tensors[name] for name in callback_inputs}) or {}
                    latents = returned.get("latents", latents)
                bar.update()
        return latents

    @staticmethod
    def _labels(class_labels, batch_size: int, device) -> torch.Tensor | None:
        if class_labels is None:
            return None
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels] * batch_size
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dtype.is_floating_point or labels.shape != (batch_size,):
            raise ValueError(f"class_labels must be an int or {batch_size} class indices, got shape "
                             f"{tuple(labels.shape)} and dtype {labels.dtype}")
        return labels.long()

    @staticmethod
    def _postprocess(x: torch.Tensor, output_type: str):
        """Images in [-1, 1] as PIL images (relayops' 8-bit conversion), numpy or torch in [0, 1]."""
        if output_type == "pil":
            from PIL import Image

            arrays = to_uint8(x.cpu()).permute(0, 2, 3, 1).numpy()
            return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
        unit = (x.float().clamp(-1, 1) + 1) / 2
        return unit.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32) if output_type == "np" else unit
