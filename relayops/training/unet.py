"""A small EDM/ADM-style UNet and the preconditioning wrappers that turn it into a denoiser.

The network ``UNet`` maps ``(x [B, C, H, W], c_noise [B], class_labels [B] or None)`` to
``[B, C, H, W]``: residual blocks with GroupNorm and a noise embedding applied as a scale and
shift (ADM), self-attention at chosen resolutions, dropout, channel multipliers per level,
optional class conditioning and an optional guidance-weight input (a distilled student,
docs/spec.md 10.2). It is fully convolutional, so a model trained on crops samples at
any size that is a multiple of ``2 ** (len(channel_mult) - 1)``.

``EDMPrecond`` wraps it into the denoiser ``D(x; sigma)`` of SPEC 6 (the samplers' contract:
``denoiser(x, sigma[, class_labels]) -> x0_hat``; a distilled student with a guidance input also
takes ``guidance=w``). ``VPredPrecond`` wraps a v-prediction network (SPEC 11) into the same
contract, so every sampler works with either.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import schedules
from .._validate import per_sample


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`; stored in every checkpoint's JSON config."""
    in_channels: int = 3
    resolution: int = 64          # nominal input size; attention levels are chosen from it
    model_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 1           # residual blocks per level (encoder); the decoder has one more
    attn_resolutions: list = field(default_factory=list)
    dropout: float = 0.0
    num_classes: int = 0          # 0: unconditional
    num_heads: int = 1
    guidance: bool = False        # a guidance-weight input (distilled classifier-free guidance)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing ``channels`` (GroupNorm needs a divisor)."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar ``c_noise`` (one per sample), then a two-layer MLP."""

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
        # c_noise = ln(sigma)/4 is O(1): scaled by 100, the wavelengths span 0.06 to 600 units.
        args = (c_noise.float() * 100.0)[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, noise embedding as scale/shift, dropout, GroupNorm-SiLU-conv, skip."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity (ADM)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


@dataclass(frozen=True)
class Level:
    """One resolution level of a UNet: its channels, residual blocks and whether it attends."""
    channels: int
    blocks: int
    attention: bool


def unet_levels(model_channels: int, channel_mult, num_blocks, resolution: int, attn_resolutions) -> list[Level]:
    """The levels of a UNet whose first level is at ``resolution`` (each later level halves it).
    ``num_blocks``: one int for every level or one per level."""
    blocks = list(num_blocks) if isinstance(num_blocks, (list, tuple)) else [num_blocks] * len(channel_mult)
    if len(blocks) != len(channel_mult):
        raise ValueError(f"num_blocks has {len(blocks)} entries; channel_mult has {len(channel_mult)} levels")
    return [Level(model_channels * m, int(b), resolution // 2**i in attn_resolutions)
            for i, (m, b) in enumerate(zip(channel_mult, blocks))]


def build_encoder(cin: int, levels: list[Level], emb_channels: int, dropout: float, num_heads: int):
    """The down path: each level's residual blocks (plus attention), a stride-2 convolution between
    levels. Returns ``(modules, skip channel counts, output channels)``; the skips start with the input."""
    down, skips, cur = nn.ModuleList(), [cin], cin
    for i, level in enumerate(levels):
        for _ in range(level.blocks):
            blocks = nn.ModuleList([ResBlock(cur, level.channels, emb_channels, dropout)])
            cur = level.channels
            if level.attention:
                blocks.append(AttnBlock(cur, num_heads))
            down.append(blocks)
            skips.append(cur)
        if i < len(levels) - 1:
            down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
            skips.append(cur)
    return down, skips, cur


def build_decoder(cin: int, skips: list, levels: list[Level], emb_channels: int, dropout: float, num_heads: int):
    """The up path matching :func:`build_encoder` (consumes ``skips`` from the end): per level, from
    the lowest resolution up, one block more than the encoder, each fed a skip; a nearest 2x
    upsampling and convolution between levels. Returns ``(modules, output channels)``."""
    up, cur = nn.ModuleList(), cin
    for i in reversed(range(len(levels))):
        level = levels[i]
        for _ in range(level.blocks + 1):
            blocks = nn.ModuleList([ResBlock(cur + skips.pop(), level.channels, emb_channels, dropout)])
            cur = level.channels
            if level.attention:
                blocks.append(AttnBlock(cur, num_heads))
            up.append(blocks)
        if i > 0:
            up.append(upsampler(cur))
    return up, cur


def upsampler(channels: int) -> nn.ModuleList:
    """Nearest 2x upsampling followed by a 3x3 convolution."""
    return nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)])


def run_layers(layers, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Apply layers in order; residual blocks also take the embedding."""
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


def run_encoder(down: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor):
    """``(h, skips)`` of :func:`build_encoder`'s modules; the skips start with the input ``h``."""
    hs = [h]
    for blocks in down:
        h = run_layers(blocks, h, emb)
        hs.append(h)
    return h, hs


def run_decoder(up: nn.ModuleList, h: torch.Tensor, hs: list, emb: torch.Tensor) -> torch.Tensor:
    """:func:`build_decoder`'s modules; every residual block first concatenates the last skip."""
    for blocks in up:
        if isinstance(blocks[0], ResBlock):
            h = torch.cat([h, hs.pop()], dim=1)
        h = run_layers(blocks, h, emb)
    return h


def embed_noise_and_labels(embed: NoiseEmbedding, label_embed, num_classes: int, c_noise: torch.Tensor,
                           class_labels, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks' conditioning: SiLU of the noise embedding plus the label embedding (no label:
    the token ``num_classes``) plus ``extra`` (a distilled student's guidance embedding)."""
    emb = embed(c_noise) if extra is None else embed(c_noise) + extra
    if label_embed is not None:
        if class_labels is None:
            class_labels = torch.full((c_noise.shape[0],), num_classes, dtype=torch.long, device=c_noise.device)
        emb = emb + label_embed(class_labels.long())
    return F.silu(emb)


class UNet(nn.Module):
    """The raw network ``F(x, c_noise, class_labels)``; see the module docstring."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_ch = 4 * ch
        self.embed = NoiseEmbedding(ch, emb_ch)
        # Class labels: index num_classes is the "no label" token (used by classifier-free guidance).
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes > 0 else None
        # The guidance weight w of a distilled student, embedded like the noise level and added to
        # its embedding. The last layer starts at zero: a student starts as its teacher.
        self.guidance_embed = NoiseEmbedding(ch, emb_ch) if cfg.guidance else None
        if self.guidance_embed is not None:
            nn.init.zeros_(self.guidance_embed.mlp[-1].weight)
            nn.init.zeros_(self.guidance_embed.mlp[-1].bias)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        levels = unet_levels(ch, cfg.channel_mult, cfg.num_blocks, cfg.resolution, cfg.attn_resolutions)
        self.down, skips, cur = build_encoder(ch, levels, emb_ch, cfg.dropout, cfg.num_heads)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_ch, cfg.dropout), AttnBlock(cur, cfg.num_heads),
                                  ResBlock(cur, cur, emb_ch, cfg.dropout)])
        self.up, cur = build_decoder(cur, skips, levels, emb_ch, cfg.dropout, cfg.num_heads)
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None):
        """``guidance``: the guidance weight w per sample (``[B]``), for a network built with
        ``guidance=True`` only (None there means w = 1: the conditional model)."""
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"UNet input H x W = {tuple(x.shape[-2:])} must be multiples of {self.size_multiple}")
        guidance_emb = None
        if self.guidance_embed is not None:
            w = torch.ones(x.shape[0], device=x.device) if guidance is None else guidance
            guidance_emb = self.guidance_embed(w)
        elif guidance is not None:
            raise ValueError("guidance was given, but this network has no guidance input (UNetConfig.guidance)")
        emb = embed_noise_and_labels(self.embed, self.label_embed, self.config.num_classes, c_noise, class_labels,
                                     guidance_emb)
        h, hs = run_encoder(self.down, self.conv_in(x), emb)
        h = run_layers(self.mid, h, emb)
        h = run_decoder(self.up, h, hs, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMPrecond(nn.Module):
    """``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` (SPEC 6, coefficients from
    ``relayops.schedules.edm_precond``). x: ``[B, C, H, W]``; sigma: float or ``[B]``, > 0.
    Computes in float32 (the net itself may run under autocast) and returns x's dtype."""

    def __init__(self, net: UNet, sigma_data: float = schedules.SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                guidance=None) -> torch.Tensor:
        sigma = per_sample("sigma", sigma, x, positive=True).float()  # [B]; the wrapper computes in float32
        c_skip, c_out, c_in, c_noise = schedules.edm_precond(sigma, self.sigma_data)
        c_skip, c_out, c_in = (c[:, None, None, None] for c in (c_skip, c_out, c_in))
        xf = x.float()
        extra = {} if guidance is None else {"guidance": per_sample("guidance", guidance, x).float()}
        out = self.net(c_in * xf, c_noise, class_labels, **extra)
        return (c_skip * xf + c_out * out.float()).to(x.dtype)


class VPredPrecond(nn.Module):
    """A v-prediction network (SPEC 11) seen as an EDM denoiser ``D(x; sigma)``.

    The variance-preserving state ``z = alpha x0 + sigma_t eps`` is the EDM state
    ``x = x0 + sigma eps`` scaled by ``alpha = 1 / sqrt(1 + sigma^2)``, with ``sigma_t = sigma alpha``
    and ``logsnr = -2 ln sigma``. The net sees ``z`` and ``c_noise = logsnr / 8`` and predicts
    ``v``; ``x0 = alpha z - sigma_t v``. x: ``[B, C, H, W]``; sigma: float or ``[B]``, > 0.
    """

    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def predict_v(self, z: torch.Tensor, logsnr: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.net(z, logsnr / 8, class_labels).float()

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = per_sample("sigma", sigma, x, positive=True).float()  # [B]; the wrapper computes in float32
        logsnr = -2 * torch.log(sigma)
        alpha, sigma_t = schedules.alpha_sigma_from_logsnr(logsnr)
        a, st = alpha[:, None, None, None], sigma_t[:, None, None, None]
        z = a * x.float()
        v = self.predict_v(z, logsnr, class_labels)
        return schedules.x_from_v(z, v, a, st).to(x.dtype)
