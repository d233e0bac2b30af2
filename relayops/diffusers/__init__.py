"""relay diffusion in Hugging Face diffusers (the ``[diffusers]`` extra; docs/diffusers.md).

    from relayops.diffusers import RelayDiffusionPipeline
    pipe = RelayDiffusionPipeline.from_pretrained("runs/rdm-diffusers")   # relayops convert --to diffusers
    images = pipe(batch_size=4, class_labels=207, seed=0).images

* :class:`RelayScheduler`: relayops' EDM and relay solvers behind diffusers' scheduler interface;
* :class:`RelayDenoiser`: a stage's network (EDM/RDM's, relayops' UNet, or a diffusers
  ``UNet2DModel``) as a ``ModelMixin`` that returns x0_hat;
* :class:`RelayDiffusionPipeline`: a base stage and relay stages;
* :func:`pipeline_from_stages`: the pipeline of a :class:`relayops.sampling.RelayPipeline`'s stages.

``import relayops`` never imports diffusers; importing this module needs it.
"""
from .._optional import require

require("diffusers", "relayops.diffusers")

from .export import pipeline_from_stages  # noqa: E402
from .models import RelayDenoiser  # noqa: E402
from .pipeline import RelayDiffusionPipeline  # noqa: E402
from .scheduler import RelayScheduler, RelaySchedulerOutput  # noqa: E402

__all__ = ["RelayDenoiser", "RelayDiffusionPipeline", "RelayScheduler", "RelaySchedulerOutput",
           "pipeline_from_stages"]
