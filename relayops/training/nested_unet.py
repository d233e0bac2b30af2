"""Matryoshka diffusion's NestedUNet (MDM, Gu et al. 2023) and its x-prediction wrapper (SPEC 11).

For resolutions ``r_1 < ... < r_R`` (each a power-of-two multiple of the one below), the network
is a UNet at ``r_R`` whose feature levels are those of :class:`relayops.training.unet.UNet`
(``channel_mult``, ``num_blocks``, ``attn_resolutions``, from the highest resolution down). Where
the features reach ``r_{R-1}``, the UNet of ``r_{R-1}`` takes over: a :class:`NestedLevel` with its
own input convolution (whose output is *added* to the outer level's downsampled features), its
own encoder and decoder, its own inner level, and its own output layers; the outer decoder then
continues from the inner level's last features. Recursively, the innermost level is a complete
UNet at ``r_1`` (with the middle blocks). So every resolution has its own input and output
layers, the lower resolutions' networks are sub-modules of the higher ones' (shared weights),
and the lower resolutions' predictions also see the higher resolutions' inputs.

``NestedUNet(zs, c_noise, class_labels)`` takes the noisy images of the lowest ``k``
resolutions (ascending, ``k = len(zs)``) and returns one output per resolution: with ``k < R``
only the level of ``r_k`` and its inner levels run (the progressive training phases). Residual
blocks, attention, the noise embedding and the encoder/decoder builders are the UNet's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import schedules
from ..multires import mdm_alpha_sigma
from .unet import (AttnBlock, NoiseEmbedding, ResBlock, _groups, build_decoder, build_encoder, embed_noise_and_labels,
                   run_decoder, run_encoder, run_layers, unet_levels, upsampler)


@dataclass
class NestedUNetConfig:
    """Architecture of :class:`NestedUNet`; stored in every MDM checkpoint's JSON config."""
    in_channels: int = 3
    resolutions: list = field(default_factory=lambda: [16, 32, 64])  # ascending
    model_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])    # feature levels from the highest resolution down
    num_blocks: int | list = 1    # residual blocks per level (one int, or one per level)
    attn_resolutions: list = field(default_factory=list)            # feature resolutions with self-attention
    dropout: float = 0.0
    num_classes: int = 0
    num_heads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NestedUNetConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def first_level(self, resolution: int) -> int:
        """The feature level at which ``resolution`` enters: ``log2(r_R / resolution)``."""
        return int(round(math.log2(self.resolutions[-1] / resolution)))

    def validate(self) -> None:
        res = [int(r) for r in self.resolutions]
        if not res or res != sorted(set(res)) or res[0] < 1:
            raise ValueError(f"resolutions must be distinct positive ints in ascending order, got {self.resolutions!r}")
        for lo, hi in zip(res, res[1:]):
            if hi % lo or (hi // lo) & (hi // lo - 1):
                raise ValueError(f"each resolution must be a power-of-two multiple of the one below; "
                                 f"{hi} / {lo} is not")
        lowest = self.first_level(res[0])
        if len(self.channel_mult) <= lowest:
            raise ValueError(f"channel_mult has {len(self.channel_mult)} levels; the lowest resolution {res[0]} is "
                             f"level {lowest} below {res[-1]}, so at least {lowest + 1} are needed")
        halvings = len(self.channel_mult) - 1 - lowest
        if res[0] % 2**halvings:
            raise ValueError(f"the innermost UNet halves {res[0]} {halvings} times: {res[0]} must be a multiple "
                             f"of {2**halvings} (use fewer channel_mult levels)")


class NestedLevel(nn.Module):
    """The UNet of resolution ``resolutions[index]``, holding the level below it as ``inner``.

    ``cin``: channels of its first features (the outer level's downsampled features are added
    there). ``forward(zs, emb, outer=None) -> (last decoder features, [output per resolution])``
    with ``zs`` the noisy images up to this resolution, ascending.
    """

    def __init__(self, cfg: NestedUNetConfig, index: int, cin: int, emb_channels: int):
        super().__init__()
        self.resolution = cfg.resolutions[index]
        levels = unet_levels(cfg.model_channels, cfg.channel_mult, cfg.num_blocks, cfg.resolutions[-1],
                             cfg.attn_resolutions)
        first = cfg.first_level(self.resolution)
        last = cfg.first_level(cfg.resolutions[index - 1]) if index > 0 else len(levels)
        own = levels[first:last]
        self.conv_in = nn.Conv2d(cfg.in_channels, cin, 3, padding=1)
        self.down, skips, cur = build_encoder(cin, own, emb_channels, cfg.dropout, cfg.num_heads)
        if index > 0:
            # MDM's nesting: the outer features, downsampled, join the inner level's input features.
            self.to_inner = nn.Conv2d(cur, cur, 3, stride=2, padding=1)
            self.inner = NestedLevel(cfg, index - 1, cur, emb_channels)
            cur = self.inner.out_channels
            self.from_inner = upsampler(cur)
            self.mid = None
        else:
            self.to_inner = self.inner = self.from_inner = None
            self.mid = nn.ModuleList([ResBlock(cur, cur, emb_channels, cfg.dropout), AttnBlock(cur, cfg.num_heads),
                                      ResBlock(cur, cur, emb_channels, cfg.dropout)])
        self.up, cur = build_decoder(cur, skips, own, emb_channels, cfg.dropout, cfg.num_heads)
        self.out_channels = cur
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, zs: list, emb: torch.Tensor, outer: torch.Tensor | None = None):
        h = self.conv_in(zs[-1])
        if outer is not None:
            h = h + outer
        h, hs = run_encoder(self.down, h, emb)
        if self.inner is not None:
            inner_h, outs = self.inner(zs[:-1], emb, self.to_inner(h))
            h = run_layers(self.from_inner, inner_h, emb)
        else:
            h, outs = run_layers(self.mid, h, emb), []
        h = run_decoder(self.up, h, hs, emb)
        return h, outs + [self.conv_out(F.silu(self.norm_out(h)))]


class NestedUNet(nn.Module):
    """The raw network ``F(zs, c_noise, class_labels) -> [output per resolution]``; see the module
    docstring. zs: ``[B, C, r_i, r_i]`` for the lowest ``len(zs)`` resolutions, ascending."""

    def __init__(self, config: NestedUNetConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_ch = 4 * ch
        self.embed = NoiseEmbedding(ch, emb_ch)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes > 0 else None
        self.outer = NestedLevel(cfg, len(cfg.resolutions) - 1, ch, emb_ch)

    @property
    def resolutions(self) -> list:
        return list(self.config.resolutions)

    def level(self, resolution: int) -> NestedLevel:
        """The sub-network (UNet) of one resolution; it holds the lower ones."""
        if resolution not in self.config.resolutions:
            raise ValueError(f"resolution {resolution} is not one of {self.config.resolutions}")
        lvl = self.outer
        while lvl.resolution != resolution:
            lvl = lvl.inner
        return lvl

    def forward(self, zs, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> list:
        zs = list(zs)
        res = self.config.resolutions
        if not 1 <= len(zs) <= len(res):
            raise ValueError(f"zs must hold the noisy images of the lowest 1..{len(res)} resolutions, got {len(zs)}")
        for k, z in enumerate(zs):
            want = (self.config.in_channels, res[k], res[k])
            if not isinstance(z, torch.Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != want:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"zs[{k}] must be [B, {want[0]}, {want[1]}, {want[2]}] (resolution {res[k]}), "
                                 f"got {got}")
        emb = embed_noise_and_labels(self.embed, self.label_embed, self.config.num_classes, c_noise, class_labels)
        return self.level(res[len(zs) - 1])(zs, emb)[1]


class MDMDenoiser(nn.Module):
    """A v-predicting :class:`NestedUNet` as the joint denoiser of SPEC 11.

    ``denoiser(zs, t, class_labels=None) -> [x_hat^r]``: zs the noisy images of the lowest
    ``len(zs)`` resolutions at time t (``[B]`` or a float, shared by the resolutions), with
    ``z^r = alpha_t^r x^r + sigma_t^r eps^r`` on resolution r's schedule (``schedule``,
    ``reference`` as in :func:`relayops.multires.mdm_alpha_sigma`). The net sees the z's and
    ``c_noise = logsnr_cosine(t) / 8`` and predicts each ``v^r``;
    ``x_hat^r = alpha_t^r z^r - sigma_t^r v^r``. Computes in float32; returns the z's dtype.
    """

    def __init__(self, net: nn.Module, schedule: str = "shifted", reference: int = 64):
        super().__init__()
        if schedule not in ("cosine", "shifted", "interpolated"):
            raise ValueError(f"schedule must be 'cosine', 'shifted' or 'interpolated', got {schedule!r}")
        self.net = net
        self.schedule = schedule
        self.reference = reference
        inner = getattr(net, "module", net)   # under DistributedDataParallel
        self.resolutions = list(inner.config.resolutions)

    def alpha_sigma(self, t: torch.Tensor, resolution: int):
        """``(alpha_t, sigma_t)`` of one resolution, ``[B]`` float32 (computed in float64)."""
        a, s = mdm_alpha_sigma(t.double(), resolution, self.schedule, self.reference)
        return a.float(), s.float()

    def predict_v(self, zs, t: torch.Tensor, class_labels=None) -> list:
        c_noise = (schedules.logsnr_cosine(t.double()) / 8).float()
        return [v.float() for v in self.net([z.float() for z in zs], c_noise, class_labels)]

    def forward(self, zs, t, class_labels: torch.Tensor | None = None) -> list:
        zs = list(zs)
        if not zs:
            raise ValueError("zs must hold at least the lowest resolution's noisy image")
        if not isinstance(t, torch.Tensor):
            t = torch.full((zs[0].shape[0],), float(t), device=zs[0].device)
        if t.shape != (zs[0].shape[0],):
            raise ValueError(f"t must be a float or a [B] = [{zs[0].shape[0]}] tensor, got shape {tuple(t.shape)}")
        vs = self.predict_v(zs, t, class_labels)
        out = []
        for z, v, r in zip(zs, vs, self.resolutions):
            a, s = (c[:, None, None, None] for c in self.alpha_sigma(t, r))
            out.append(schedules.x_from_v(z.float(), v, a, s).to(z.dtype))
        return out
