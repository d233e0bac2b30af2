"""``RelayScheduler``: relayops' samplers behind diffusers' scheduler interface.

One scheduler serves one stage. Its ``solver`` names the stage, as ``relayops sample --solver``
does: ``edm-heun`` / ``edm-2m`` make it a base stage (EDM, from pure noise), ``rdm-heun``,
``rdm-euler``, ``relay-2s``, ``relay-2m`` (and any relay solver that ``relayops.solvers`` adds) a
relay stage that continues from upsampled low-resolution images. The steps are not a copy of
the samplers: ``step`` hands each model output to the solver generator of
:mod:`relayops.sampling` (``edm_calls``, ``relay_calls``), the same code ``edm_sample`` and
``relay_sample`` run, so a diffusers-style loop gives their images. Each relay step is one fused
``relayops.relay_step``.

Where it departs from the usual scheduler contract (docs/diffusers.md says why):

* ``timesteps`` are noise levels sigma, one entry per model call (a two-call solver such as
  rdm-heun lists a level twice, as diffusers' Heun scheduler does); the model gets the sigma
  itself and its output is the denoised image x0_hat (``RelayDenoiser``), not epsilon.
* The start state comes from :meth:`relay_start` (the relay counterpart of ``add_noise``: the
  upsampled low-resolution images plus relay noise) or :meth:`noise_start` (the base stage),
  which also fix the noise of the later steps (relayops' Philox seeds, or a torch.Generator).
  ``add_noise`` does not exist: relay noise is block-correlated and the blur acts per DCT
  frequency, which a scalar noise level cannot express (training uses ``relayops.relay_corrupt``).
* ``num_inference_steps`` of a relay stage is the size of the Karras grid before its truncation
  at ``sigma_trunc`` (relayops' ``num_steps``), so fewer steps are taken; ``sigmas=`` gives the
  levels directly.
* Steps must follow ``timesteps`` in order from the start state (multistep solvers keep the
  previous model outputs, and the noise of step i is drawn at its own Philox offset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .. import sampling, solvers
from .._validate import check_image, check_real

# The solvers a scheduler takes, by stage.
BASE_SOLVERS = tuple(solvers.EDM_SOLVERS)
RELAY_SOLVERS = tuple(solvers.SOLVERS)


@dataclass
class RelaySchedulerOutput(BaseOutput):
    """``prev_sample``: the state the model is to be called at next (after the last call: the
    stage's images); ``pred_original_sample``: the model output just given, x0_hat."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class RelayScheduler(SchedulerMixin, ConfigMixin):
    """relayops' EDM and relay solvers as a diffusers scheduler (see the module docstring).

    Config (saved with ``save_pretrained``): ``solver``; the relay path ``s`` (patch size =
    upscaling factor), ``alpha``, ``normalize``, ``L``, ``sigma_b_max``, ``d_min`` and the
    stochasticity ``eta``; the grid ``sigma_min``, ``sigma_max``, ``rho`` (None: the stage's
    default, 0.002 / 80 / 7 for the base stage, 0.008 / 80 / 7 for a relay stage) and
    ``sigma_trunc`` (relay); EDM's churn ``S_churn``, ``S_min``, ``S_max`` (None: no upper
    limit), ``S_noise`` and ``sde_scale`` (base). ``num_steps``: the default grid size (the
    samplers' ``num_steps``: EDM steps, or relay grid levels before the truncation).
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, solver: str = "relay-2m", num_steps: int | None = None, s: int = 4,
                 eta: float = 0.2, alpha: float = 0.15, normalize: bool = True, L: float = 0.93,
                 sigma_b_max: float = 3.0, d_min: float = 0.001, sigma_trunc: float = 0.9,
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float | None = None, S_noise: float = 1.0,
                 sde_scale: float = 0.0):
        solvers.check_solver(solver, BASE_SOLVERS + RELAY_SOLVERS)
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"s must be a positive int, got {s!r}")
        check_real("eta", eta, low=0.0, high=1.0, high_open=True)
        check_real("sde_scale", sde_scale, low=0.0, high=1.0, high_open=True)
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}")
        self.grid: list[float] | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._reset()

    # --- what kind of stage ------------------------------------------------------------------------

    @property
    def is_base(self) -> bool:
        """True for a base stage (EDM solvers, start from pure noise)."""
        return self.config.solver in BASE_SOLVERS

    @property
    def order(self) -> int:
        """Model calls per step (diffusers' ``order``): 2 for rdm-heun, relay-2s and edm-heun."""
        return solvers.CALLS_PER_STEP[self.config.solver]

    @property
    def init_noise_sigma(self) -> float:
        """The first noise level of the grid (a base stage starts from this much white noise)."""
        self._need_grid()
        return self.grid[0]

    @property
    def step_index(self) -> int | None:
        """The number of model outputs given to :meth:`step` since the start (None before it)."""
        return self._index

    def _reset(self) -> None:
        self._calls = None      # the solver generator of this run
        self._index = None      # model outputs received
        self._seeds = None      # the noise source fixed by relay_start / noise_start
        self._offset = 0

    def _need_grid(self) -> None:
        if self.grid is None:
            raise RuntimeError("call set_timesteps first")

    def _relay_settings(self, num_steps: int | None) -> dict:
        c = self.config
        return sampling.relay_settings(None, num_steps=num_steps, sigma_trunc=c.sigma_trunc, eta=c.eta,
                                       alpha=c.alpha, L=c.L, sigma_b_max=c.sigma_b_max, normalize=c.normalize,
                                       rho=c.rho, sigma_min=c.sigma_min, sigma_max=c.sigma_max)

    def _churn(self) -> dict:
        c = self.config
        return dict(S_churn=c.S_churn, S_min=c.S_min, S_max=float("inf") if c.S_max is None else c.S_max)

    # --- diffusers' interface ----------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None) -> None:
        """The grid of this run: ``sigmas`` (decreasing; a final 0 is appended if missing), or
        ``num_inference_steps`` levels (default: the config's, else relayops' defaults: 18 EDM
        levels, a 150-level relay grid) of the Karras grid (SPEC 7; a relay stage takes the
        levels below ``sigma_trunc``). ``timesteps`` lists the level of every model call."""
        if num_inference_steps is not None and sigmas is not None:
            raise ValueError("pass num_inference_steps or sigmas, not both")
        n = num_inference_steps or self.config.num_steps
        c = self.config
        if self.is_base:
            n = n or 18
            grid = sampling.edm_grid(sigmas, n, 0.002 if c.sigma_min is None else c.sigma_min,
                                     80.0 if c.sigma_max is None else c.sigma_max, 7.0 if c.rho is None else c.rho)
        else:
            grid = sampling.relay_grid(self._relay_settings(n), sigmas)
        self.num_inference_steps = len(grid) - 1  # the steps taken
        self.grid = grid
        levels = sampling.denoiser_levels(grid, c.solver, **(self._churn() if self.is_base else {}))
        self._levels = levels  # host floats: the per-step checks read these, not the device tensor
        self.timesteps = torch.tensor(levels, dtype=torch.float64, device=device)
        self.sigmas = torch.tensor(grid, dtype=torch.float64, device=device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The sample as it is: the model (a ``RelayDenoiser``) scales its input itself."""
        return sample

    def relay_start(self, image: torch.Tensor, seed=0, generator: torch.Generator | None = None,
                    offset: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The relay stage's start state from low-resolution images ``[B, C, h, w]`` (the relay
        counterpart of ``add_noise``, SPEC 8): ``nearest_upsample(image, s) + sigma_0 n`` with
        relay noise n; ``[B, C, h s, w s]`` in ``dtype`` (default: image's).

        Noise: relayops' Philox ``seed`` (an int for the batch, or one int per sample, which
        regenerates an image alone exactly) drawn at ``offset`` (the later steps at offsets
        after it, as ``relay_sample``), or ``generator`` (torch.randn, as diffusers). The same
        source serves every later step of this run."""
        if self.is_base:
            raise ValueError(f"relay_start is for a relay stage; solver {self.config.solver!r} is a base-stage "
                             "solver: use noise_start")
        self._need_grid()
        c = self.config
        image = check_image("image", image)
        up = sampling.nearest_upsample(image.to(dtype or image.dtype), c.s)
        self._start(up, seed, generator, offset)
        return sampling.relay_start(up, c.s, self.grid[0], alpha=float(c.alpha), normalize=bool(c.normalize),
                                    seeds=self._seeds, offset=offset)

    def noise_start(self, shape, seed=0, generator: torch.Generator | None = None, offset: int = 0,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The base stage's start state: ``sigma_0`` times white noise of ``shape`` (B, C, H, W),
        the noise as for :meth:`relay_start`."""
        if not self.is_base:
            raise ValueError(f"noise_start is for a base stage; solver {self.config.solver!r} is a relay solver: "
                             "use relay_start")
        self._need_grid()
        like = torch.empty(tuple(int(v) for v in shape), dtype=dtype, device=device)
        self._start(like, seed, generator, offset)
        return sampling.edm_start(like, self.grid[0], self._seeds, offset)

    def _start(self, like: torch.Tensor, seed, generator, offset: int) -> None:
        self._reset()
        self._seeds = sampling._seeds(seed if generator is None else generator, like)
        self._offset = int(offset)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Take the model output x0_hat at (``sample``, ``timestep``) and return the state to call
        the model at next (``prev_sample``; after the last entry of ``timesteps``, the stage's
        images) with ``pred_original_sample`` = x0_hat. ``timestep`` must be the next entry of
        ``timesteps``. Without a start call first, ``generator`` (or Philox seed 0) gives the
        noise."""
        self._need_grid()
        if self._calls is None:
            if self._index is not None:
                raise RuntimeError("this run has ended: call set_timesteps (and a start) for a new one")
            if self._seeds is None:
                self._start(sample, 0 if generator is None else generator, None, 0)
            self._calls = self._solver_calls(sample)
            self._expect(next(self._calls)[1], 0)
            self._index = 0
        level = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        want = self._levels[self._index]
        if level != want:
            raise ValueError(f"step {self._index} expects timestep {want} (timesteps[{self._index}]), got {level}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}; the sample has "
                             f"{tuple(sample.shape)}")
        x0_hat = model_output.to(sample.dtype)
        try:
            prev, level = self._calls.send((sample, x0_hat))
        except StopIteration as done:
            prev, self._calls = done.value, None
        self._index += 1
        if self._calls is not None:
            self._expect(level, self._index)
        if not return_dict:
            return prev, x0_hat
        return RelaySchedulerOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def _expect(self, level: float, index: int) -> None:
        """The solver's next call must be the one ``timesteps`` announced (they come from the
        same grid; this guards the two against drifting apart)."""
        if index >= len(self._levels) or level != self._levels[index]:
            raise AssertionError(f"solver call {index} at level {level}; timesteps announced {self._levels}")

    def _solver_calls(self, x: torch.Tensor):
        c = self.config
        if self.is_base:
            return sampling.edm_calls(x, self.grid, c.solver, self._seeds, S_noise=c.S_noise, sde_scale=c.sde_scale,
                                      offset=self._offset, **self._churn())
        check_image("sample", x, c.s)
        return sampling.relay_calls(x, self.grid, c.solver, self._seeds, s=c.s, eta=float(c.eta),
                                    alpha=float(c.alpha), normalize=bool(c.normalize), L=float(c.L),
                                    sigma_b_max=float(c.sigma_b_max), d_min=float(c.d_min), offset=self._offset)

    def __len__(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else 0
