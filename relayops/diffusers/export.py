"""relayops pipelines as diffusers pipelines: :func:`pipeline_from_stages` turns the stages of a
:class:`relayops.sampling.RelayPipeline` (what ``relayops sample`` runs) into a
:class:`RelayDiffusionPipeline` with the same networks and sampler settings, so that both give
the same images; ``relayops convert --to diffusers`` saves it."""
from __future__ import annotations

import torch

from .. import sampling, solvers
from .models import RelayDenoiser
from .pipeline import RelayDiffusionPipeline
from .scheduler import RelayScheduler

# relay_sample settings a RelayScheduler config holds (sampling.RELAY_DEFAULTS' keys and d_min).
_RELAY_KEYS = ("sigma_trunc", "eta", "alpha", "L", "sigma_b_max", "normalize", "rho", "sigma_min", "sigma_max")
_BASE_KEYS = ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "sde_scale")


def _leftover(options: dict, stage: str) -> None:
    if options:
        raise ValueError(f"the {stage} stage's options {sorted(options)} have no RelayScheduler equivalent")


def base_scheduler(stage: sampling.BaseStage) -> tuple[RelayScheduler, float | None]:
    """(scheduler, guidance weight) of a base stage, with edm_sample's defaults where the stage
    gives none."""
    opts = dict(stage.options)
    cfg = opts.pop("cfg", None)
    solver = opts.pop("solver", "edm-heun")
    kw = {k: opts.pop(k) for k in _BASE_KEYS if k in opts}
    _leftover(opts, "base")
    if kw.get("S_max") == float("inf"):
        kw["S_max"] = None
    return RelayScheduler(solver=solver, num_steps=int(stage.num_steps), **kw), cfg


def relay_scheduler(stage: sampling.RelayStage) -> tuple[RelayScheduler, float | None]:
    """(scheduler, guidance weight) of a relay stage: ``relay_sample``'s settings from the
    stage's preset and options, written out in full."""
    opts = dict(stage.options)
    cfg = opts.pop("cfg", None)
    solver = solvers.resolve_solver(opts.pop("solver", None), opts.pop("heun", None))
    d_min = opts.pop("d_min", 0.001)
    settings = sampling.relay_settings(stage.preset, num_steps=stage.num_steps,
                                       **{k: opts.pop(k) for k in _RELAY_KEYS if k in opts})
    _leftover(opts, "relay")
    kw = {k: settings[k] for k in _RELAY_KEYS}
    kw["normalize"] = bool(kw["normalize"])
    return RelayScheduler(solver=solver, num_steps=int(settings["num_steps"]), s=int(stage.s), d_min=d_min,
                          **kw), cfg


def pipeline_from_stages(stages, dtype: torch.dtype = torch.float32, records=None) -> RelayDiffusionPipeline:
    """The diffusers pipeline of a base stage and relay stages (:class:`relayops.sampling.BaseStage`,
    :class:`relayops.sampling.RelayStage`, as ``RelayPipeline`` takes them), sampling as
    ``RelayPipeline(stages, dtype=dtype)`` does. ``records``: each stage's checkpoint record
    (a converted EDM/RDM network's ``network`` entry names its architecture)."""
    stages = list(stages)
    records = list(records) if records is not None else [None] * len(stages)
    if not stages or not isinstance(stages[0], sampling.BaseStage):
        raise ValueError("the first stage must be a BaseStage")
    state_dtype = {torch.float32: "float32", torch.float64: "float64"}.get(dtype)
    if state_dtype is None:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    pipe = None
    for k, (stage, record) in enumerate(zip(stages, records)):
        if k and not isinstance(stage, sampling.RelayStage):
            raise ValueError("every stage after the first must be a RelayStage")
        scheduler, cfg = base_scheduler(stage) if k == 0 else relay_scheduler(stage)
        denoiser = RelayDenoiser.from_network(stage.denoiser, record)
        if k == 0 and (denoiser.resolution, denoiser.channels) != (stage.resolution, stage.channels):
            raise ValueError(f"the base stage samples {stage.channels} x {stage.resolution}^2 images; its network "
                             f"was built for {denoiser.channels} x {denoiser.resolution}^2, which the pipeline uses")
        pipe = RelayDiffusionPipeline(denoiser, scheduler, base=pipe, guidance_scale=cfg, state_dtype=state_dtype)
    return pipe
