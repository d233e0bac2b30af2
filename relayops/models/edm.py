"""EDM's networks and preconditioning ("Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022), with EDM's parameter names and shapes.

The released EDM and RDM checkpoints hold these modules; building them here with the same
constructor arguments gives state dicts with the same keys and shapes, so the released weights
load with ``strict=True`` (see :mod:`relayops.models.convert`).

* :class:`DhariwalUNet`: the ADM architecture ("Diffusion Models Beat GANs on Image Synthesis")
  as EDM configures it; the RDM stages are all DhariwalUNets.
* :class:`SongUNet`: DDPM++ / NCSN++ ("Score-Based Generative Modeling through Stochastic
  Differential Equations") as EDM configures them.
* :class:`EDMPrecond`: ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` (docs/spec.md
  section 6), the denoiser the samplers call as ``denoiser(x, sigma, class_labels)``.

Runtime options that are not part of a checkpoint: ``EDMPrecond.activation_dtype`` (run the
network in float16 or bfloat16; the preconditioning stays in float32) and
``EDMPrecond.channels_last`` (feed the network channels-last tensors). Forward passes have no
data-dependent Python control flow, so ``torch.compile`` traces them in one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import schedules
from .._validate import per_sample

__all__ = ["Conv2d", "DhariwalUNet", "EDMPrecond", "FourierEmbedding", "GroupNorm", "Linear", "PositionalEmbedding",
           "SongUNet", "UNetBlock", "weight_init"]


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisers: xavier/kaiming, uniform/normal, for a tensor of ``shape``."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """A fully connected layer whose weights are cast to the input's dtype (EDM's ``Linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """EDM's convolution with optional 2x up- or downsampling by a separable FIR filter.

    ``kernel = 0`` means no weights: the layer only resamples. The normalised outer product of
    ``resample_filter`` is kept as the ``resample_filter`` buffer when resampling (``[1, 1]``:
    2x2 mean for down, nearest-neighbour repeat for up). ``fused_resample`` applies the filter
    and the convolution in the order EDM's NCSN++ uses (upsample first / convolve first).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2
        self.register_buffer("resample_filter", f if up or down else None)
        # Static geometry (no tensor reads in forward).
        self._w_pad = kernel // 2
        self._f_pad = (len(resample_filter) - 1) // 2

    def _up(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def _down(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        wp, fp = self._w_pad, self._f_pad
        if w is not None and self.fused_resample and self.up:
            x = self._up(x, f, max(fp - wp, 0))
            return F.conv2d(x, w, b, padding=max(wp - fp, 0))
        if w is not None and self.fused_resample and self.down:
            x = self._down(F.conv2d(x, w, padding=wp + fp), f, 0)
            return x if b is None else x + b.reshape(1, -1, 1, 1)
        if self.up:
            x = self._up(x, f, fp)
        if self.down:
            x = self._down(x, f, fp)
        if w is not None:
            return F.conv2d(x, w, b, padding=wp)
        return x if b is None else x + b.reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, num_channels // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """EDM's residual block, optionally resampling, optionally followed by self-attention.

    ``h = conv0(silu(norm0(x)))``; the embedding gives ``(scale, shift)`` (``adaptive_scale``:
    ``h = silu(shift + norm1(h) (scale + 1))``, else ``h = silu(norm1(h + shift))``);
    ``h = conv1(dropout(h))``; ``x = (h + skip(x)) skip_scale``. Attention (``num_heads`` heads;
    by default ``out_channels // channels_per_head``) adds ``proj(attention(qkv(norm2(x))))`` and
    scales by ``skip_scale`` again. The qkv channels are interleaved as EDM lays them out:
    channel ``h (3 c_h) + 3 i + j`` is component j (q, k, v) of channel i of head h, with
    ``c_h = out_channels / num_heads``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter=(1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"out_channels {out_channels} is not divisible by {self.num_heads} attention heads")
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, float(skip_scale), adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skip_scale == 1 else x * self.skip_scale

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the H W positions of ``norm2(x)`` (before proj)."""
        b, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm2(x)).reshape(b, heads, c // heads, 3, h * w)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).unbind(0)        # [B, heads, HW, c_h] each
        a = F.scaled_dot_product_attention(q, k, v)          # softmax(q k^T / sqrt(c_h)) v
        return a.transpose(-1, -2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = self._scaled(h + (self.skip(x) if self.skip is not None else x))
        if self.num_heads:
            x = self._scaled(self.proj(self.attention(x)) + x)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f_i), sin(x f_i)]``, ``f_i = max_positions^(-i / (n/2 - endpoint))``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]`` (NCSN++), ``f`` a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Training-time label dropout for classifier-free guidance (whole label rows zeroed)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class DhariwalUNet(nn.Module):
    """ADM as EDM builds it; the arguments and defaults are EDM's.

    Mapping: ``emb = silu(map_layer1(silu(map_layer0(pe(c_noise) + map_augment(aug)))) +
    map_label(labels))``. Encoder ``enc.{R}x{R}_conv``, then per lower level ``enc.{r}x{r}_down``
    and ``enc.{r}x{r}_block{i}``; decoder ``dec.{r}x{r}_in0/in1`` at the bottom (in0 with
    attention), ``dec.{r}x{r}_up`` elsewhere, ``dec.{r}x{r}_block{i}`` for i <= num_blocks;
    attention in every block at ``attn_resolutions``; ``out_norm``, ``out_conv``.
    ``eff_attn`` (RDM's switch to xformers attention, the same mathematics) is accepted and
    ignored: attention here always runs ``scaled_dot_product_attention``.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10, label_dropout: float = 0,
                 eff_attn: bool = False):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        # Decoder blocks named "*_block*" take the matching encoder output (fixed here, not read in forward).
        self._dec_concat = ["_block" in name for name in self.dec]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for concat, block in zip(self._dec_concat, self.dec.values()):
            if concat:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ as EDM builds them; the arguments and defaults are EDM's.

    DDPM++: ``embedding_type='positional'``, ``channel_mult_noise=1``, encoder and decoder
    ``'standard'``, ``resample_filter=[1, 1]``. NCSN++: ``'fourier'``, 2, ``'residual'``,
    ``[1, 3, 3, 1]``. Attention in the encoder blocks at ``attn_resolutions`` and in the last
    decoder block of those levels; the output comes from the ``aux`` layers. ``eff_attn`` is
    accepted and ignored, as in :class:`DhariwalUNet`.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10, label_dropout: float = 0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter=(1, 1), eff_attn: bool = False):
        for name, value, allowed in (("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
        # The kind of every layer, fixed here so that forward reads no names.
        self._enc_kinds = [name.split("_", 1)[1].rstrip("0123456789") for name in self.enc]
        self._dec_kinds = [name.split("_", 1)[1].rstrip("0123456789") for name in self.dec]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos], as DDPM++ orders them
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for kind, block in zip(self._enc_kinds, self.enc.values()):
            if kind == "aux_down":
                aux = block(aux)
            elif kind == "aux_skip":
                x = skips[-1] = x + block(aux)
            elif kind == "aux_residual":
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for kind, block in zip(self._dec_kinds, self.dec.values()):
            if kind == "aux_up":
                aux = block(aux)
            elif kind == "aux_norm":
                tmp = block(x)
            elif kind == "aux_conv":
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if kind == "block":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


ARCHITECTURES = {"DhariwalUNet": DhariwalUNet, "SongUNet": SongUNet}


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4)``.

    Arguments as EDM's ``EDMPrecond``: the network is ``model_type`` (``"DhariwalUNet"`` or
    ``"SongUNet"``) built with ``img_resolution``, ``in_channels = out_channels = img_channels``,
    ``label_dim`` and ``**model_kwargs``; it is the submodule ``model``.

    Call: ``D(x, sigma, class_labels=None, augment_labels=None)`` with x ``[B, C, H, W]`` (any
    floating dtype), sigma a float or ``[B]`` (or ``[B, 1, 1, 1]``) tensor > 0, class_labels
    one-hot (or soft) ``[B, label_dim]`` or integer class indices ``[B]``; ``None`` means the zero
    label, the unconditional branch of classifier-free guidance (as in EDM). Returns x's dtype
    (the preconditioning runs in float32). The network runs in ``activation_dtype`` when set
    (float16, bfloat16), else as EDM decides: float16 when ``use_fp16`` and x is on a GPU,
    float32 otherwise.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__()
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = ARCHITECTURES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                               out_channels=img_channels, label_dim=label_dim, **model_kwargs)
        self.activation_dtype: torch.dtype | None = None
        self.channels_last = False

    def round_sigma(self, sigma):
        """EDM's hook for networks with a discrete noise grid; EDMPrecond is continuous."""
        return torch.as_tensor(sigma)

    def _network_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.activation_dtype is not None:
            return self.activation_dtype
        return torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32

    def _labels(self, class_labels, x: torch.Tensor):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be a tensor of one-hot rows [B, label_dim] or class indices [B], "
                            f"got {type(class_labels).__name__}")
        if not class_labels.is_floating_point():  # class indices [B] -> one-hot rows
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"class indices must have shape [{x.shape[0]}], got {tuple(class_labels.shape)}")
            if class_labels.device.type == "cpu" and not torch.compiler.is_compiling():
                bad = (class_labels < 0) | (class_labels >= self.label_dim)
                if bool(bad.any()):
                    raise ValueError(f"class indices must be in [0, {self.label_dim}), got {class_labels.tolist()}")
            return F.one_hot(class_labels.long(), self.label_dim).to(torch.float32)
        if class_labels.numel() != x.shape[0] * self.label_dim:
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}; expected "
                             f"[{x.shape[0]}, {self.label_dim}]")
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor) and sigma.dim() == 4:
            sigma = sigma.reshape(-1)
        xf = x.to(torch.float32)
        sigma = per_sample("sigma", sigma, xf, positive=True)  # [B] float32
        c_skip, c_out, c_in, c_noise = schedules.edm_precond(sigma, self.sigma_data)
        c_skip, c_out, c_in = (c[:, None, None, None] for c in (c_skip, c_out, c_in))
        x_in = (c_in * xf).to(self._network_dtype(x))
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        f_x = self.model(x_in, c_noise, self._labels(class_labels, x), augment_labels=augment_labels)
        return (c_skip * xf + c_out * f_x.to(torch.float32)).to(x.dtype)
