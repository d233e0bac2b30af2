"""``RelayDenoiser``: a stage's network as a diffusers ``ModelMixin``, called as relayops'
denoisers are: ``denoiser(x, sigma, class_labels=None) -> x0_hat``.

It holds one of three networks, named by ``network`` in its config (saved with
``save_pretrained`` next to the safetensors weights):

* ``"edm"``: EDM's and RDM's ``EDMPrecond`` (:mod:`relayops.models`; the released RDM networks),
  ``network_config`` its constructor arguments (checked against relayops' size limits before
  anything is built);
* ``"unet"``: relayops' own UNet (:class:`relayops.training.UNet`, a ``relayops train`` run),
  ``network_config`` its ``UNetConfig``, wrapped in EDM's preconditioning (or v-prediction's,
  ``parameterization="vpred"``);
* ``"unet2d"``: a diffusers ``UNet2DModel`` trained as a relay (or base) denoiser,
  ``network_config`` its config, under EDM's preconditioning
  ``D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4)`` (SPEC 6): the UNet gets
  ``ln(sigma) / 4`` as its timestep. Its class labels (``num_class_embeds``) are class indices.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from .. import schedules
from ..models import build_network
from ..training.unet import EDMPrecond, UNet, UNetConfig, VPredPrecond

NETWORKS = ("edm", "unet", "unet2d")


class _UNet2DNetwork(nn.Module):
    """A ``UNet2DModel`` as the raw network ``F(x, c_noise, class_labels)`` that relayops'
    preconditioning wraps."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels=class_labels).sample


class RelayDenoiser(ModelMixin, ConfigMixin):
    """A stage's denoiser (see the module docstring). Build it with :meth:`from_network` or
    :meth:`from_unet2d`, or from its config (``network``, ``network_config``, ``sigma_data``,
    ``parameterization``)."""

    @register_to_config
    def __init__(self, network: str = "unet2d", network_config: dict | None = None, sigma_data: float = 0.5,
                 parameterization: str = "edm"):
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        if not isinstance(network_config, dict):
            raise ValueError(f"network_config must be a dict of the {network!r} network's arguments, "
                             f"got {type(network_config).__name__}")
        if parameterization not in ("edm", "vpred") or (parameterization == "vpred" and network != "unet"):
            raise ValueError(f"parameterization must be 'edm' (or 'vpred' for network 'unet'), got "
                             f"{parameterization!r}")
        if network == "edm":
            self.net = build_network(dict(network_config), device="cpu")
        elif network == "unet":
            unet = UNet(UNetConfig.from_dict(network_config))
            self.net = VPredPrecond(unet) if parameterization == "vpred" else EDMPrecond(unet, sigma_data)
        else:
            self.net = EDMPrecond(_UNet2DNetwork(UNet2DModel.from_config(network_config)), sigma_data)

    # --- what the pipeline needs to know -----------------------------------------------------------

    @property
    def resolution(self) -> int:
        """The image size the network was built for (the base stage samples at it)."""
        c = self.config
        if c.network == "edm":
            return int(c.network_config["img_resolution"])
        if c.network == "unet":
            return int(c.network_config.get("resolution", UNetConfig().resolution))
        size = c.network_config.get("sample_size")
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def channels(self) -> int:
        c = self.config
        if c.network == "edm":
            return int(c.network_config["img_channels"])
        if c.network == "unet":
            return int(c.network_config.get("in_channels", UNetConfig().in_channels))
        return int(c.network_config.get("in_channels", 3))

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (0: unconditional)."""
        c = self.config
        key = {"edm": "label_dim", "unet": "num_classes", "unet2d": "num_class_embeds"}[c.network]
        return int(c.network_config.get(key) or 0)

    # --- building ----------------------------------------------------------------------------------

    @classmethod
    def from_network(cls, denoiser: nn.Module, record: dict | None = None) -> "RelayDenoiser":
        """The wrapper of a relayops denoiser, weights included: a :class:`relayops.models.EDMPrecond`
        (``models.load_checkpoint``, or ``relayops.training.load_denoiser`` of a converted
        checkpoint, whose ``record`` names the architecture) or relayops' ``EDMPrecond`` /
        ``VPredPrecond`` around a ``UNet`` (``relayops.training.load_denoiser`` of a run)."""
        from ..models import EDMPrecond as ReleasedPrecond

        if isinstance(denoiser, ReleasedPrecond):
            record = record or getattr(denoiser, "record", None) or {}
            kwargs = (record.get("network") or {}).get("kwargs")
            if kwargs is None:
                raise ValueError("an EDMPrecond needs its checkpoint record (its constructor arguments): pass "
                                 "record=, or load it with relayops.models.load_checkpoint")
            out = cls(network="edm", network_config=dict(kwargs), sigma_data=float(denoiser.sigma_data))
        elif isinstance(denoiser, (EDMPrecond, VPredPrecond)) and isinstance(denoiser.net, UNet):
            vpred = isinstance(denoiser, VPredPrecond)
            out = cls(network="unet", network_config=denoiser.net.config.to_dict(),
                      sigma_data=schedules.SIGMA_DATA if vpred else float(denoiser.sigma_data),
                      parameterization="vpred" if vpred else "edm")
        else:
            raise TypeError(f"expected relayops.models.EDMPrecond or a preconditioned relayops UNet, got "
                            f"{type(denoiser).__name__}")
        out.net.load_state_dict(denoiser.state_dict())
        return out.to(next(denoiser.parameters()).device).eval()

    @classmethod
    def from_unet2d(cls, unet: UNet2DModel, sigma_data: float = schedules.SIGMA_DATA) -> "RelayDenoiser":
        """A diffusers ``UNet2DModel`` under EDM's preconditioning; the weights are shared with
        ``unet`` (training the denoiser trains it)."""
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"expected a diffusers UNet2DModel, got {type(unet).__name__}")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        out = cls(network="unet2d", network_config=config, sigma_data=sigma_data)
        out.net.net.unet = unet
        return out

    def forward(self, sample: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat, the denoised image, from ``sample`` ``[B, C, H, W]`` at noise level ``sigma``
        (a float or ``[B]``); ``class_labels``: class indices ``[B]`` (or one-hot rows for
        ``network="edm"``), None for none (the unconditional branch of guidance)."""
        return self.net(sample, sigma, class_labels)
