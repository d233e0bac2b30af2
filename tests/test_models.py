"""relayops.models.edm: EDM's networks with EDM's names and shapes, the attention layout,
resampling, embeddings, preconditioning, low precision, channels-last and torch.compile."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from relayops.models import RDM_CONFIGS, EDMPrecond, UNetBlock
from relayops.models.edm import Conv2d, GroupNorm, PositionalEmbedding, SongUNet

DT = torch.float64


def meta_net(**kwargs) -> EDMPrecond:
    with torch.device("meta"):
        return EDMPrecond(**kwargs)


# --- the released architectures -------------------------------------------------------------------

# (config, augment_dim) -> (state-dict tensors, parameters) of the released RDM stages, as the
# authors' own network code builds them: tests/data/edm-reference/manifest.json (see its README;
# tests/test_edm_reference.py checks every key and shape of the same file).
_MANIFEST = json.loads((Path(__file__).resolve().parent / "data" / "edm-reference" / "manifest.json").read_text())
_PRESET = {"imagenet64": "imagenet64", "imagenet256": "imagenet256-relay", "celebahq64": "celebahq64",
           "celebahq256": "celebahq256-relay"}
TABLE = {(_PRESET[name.split("/")[0]], cfg["kwargs"]["augment_dim"]): (cfg["tensors"], cfg["parameters"])
         for name, cfg in _MANIFEST["configs"].items()}


@pytest.mark.parametrize("name,augment_dim", list(TABLE))
def test_released_parameter_tables(name, augment_dim):
    net = meta_net(**RDM_CONFIGS[name], augment_dim=augment_dim)
    tensors, parameters = TABLE[name, augment_dim]
    assert len(net.state_dict()) == tensors
    assert sum(p.numel() for p in net.parameters()) == parameters


def test_edm_key_names_and_shapes():
    sd = {k: tuple(v.shape) for k, v in meta_net(**RDM_CONFIGS["imagenet64"], augment_dim=9).state_dict().items()}
    expected = {
        "model.map_augment.weight": (192, 9), "model.map_layer0.weight": (768, 192), "model.map_layer0.bias": (768,),
        "model.map_layer1.weight": (768, 768), "model.map_label.weight": (768, 1000),
        "model.enc.64x64_conv.weight": (192, 3, 3, 3), "model.enc.64x64_block2.affine.weight": (384, 768),
        "model.enc.32x32_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.32x32_down.skip.resample_filter": (1, 1, 2, 2),   # kernel 0: resampling only
        "model.enc.32x32_block0.skip.weight": (384, 192, 1, 1),
        "model.enc.32x32_block0.qkv.weight": (1152, 384, 1, 1), "model.enc.32x32_block0.proj.weight": (384, 384, 1, 1),
        "model.dec.8x8_in0.qkv.weight": (2304, 768, 1, 1), "model.dec.8x8_in1.conv1.weight": (768, 768, 3, 3),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2), "model.dec.64x64_block0.norm0.weight": (384 + 192,),
        "model.dec.64x64_block0.skip.weight": (192, 576, 1, 1), "model.dec.64x64_block3.norm0.weight": (192 + 192,),
        "model.out_norm.weight": (192,),
        "model.out_conv.weight": (3, 192, 3, 3), "model.out_conv.bias": (3,),
    }
    for key, shape in expected.items():
        assert sd.get(key) == shape, key
    for absent in ("model.map_label.bias", "model.map_augment.bias", "model.map_noise.freqs",
                   "model.enc.32x32_down.skip.weight", "model.dec.8x8_in1.qkv.weight",
                   "model.enc.64x64_block0.qkv.weight", "model.enc.64x64_block0.skip.weight"):
        assert absent not in sd, absent
    # attention in every encoder and decoder block at 32, 16 and 8, nowhere at 64
    qkv = {k.split(".")[2] for k in sd if k.endswith("qkv.weight")}
    assert {k for k in qkv if k.startswith("64x64")} == set()
    assert {"32x32_block2", "16x16_block3", "8x8_in0", "8x8_block0"} <= qkv and "8x8_in1" not in qkv


def test_group_norm_groups():
    assert [GroupNorm(c).num_groups for c in (3 * 4, 64, 128, 192, 768)] == [3, 16, 32, 32, 32]
    assert GroupNorm(64).eps == 1e-5


# --- the attention layout ---------------------------------------------------------------------------

def test_attention_against_a_direct_per_head_computation():
    """EDM's qkv layout: output channel h (3 c_h) + 3 i + j of qkv is component j (q, k, v) of
    channel i of head h; each head attends with softmax(q^T k / sqrt(c_h)) over the H W positions;
    head h's result is channel h c_h + i."""
    torch.manual_seed(0)
    c, heads, ch = 128, 2, 64
    block = UNetBlock(c, c, emb_channels=8, attention=True, channels_per_head=ch).to(DT)
    assert block.num_heads == heads
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, c, 3, 5, dtype=DT)
    got = block.attention(x)

    y = F.group_norm(x, 32, block.norm2.weight, block.norm2.bias, 1e-5).reshape(2, c, 15)
    w, b = block.qkv.weight.reshape(3 * c, c), block.qkv.bias
    qkv = torch.einsum("oc,bcp->bop", w, y) + b[None, :, None]
    want = torch.empty(2, c, 15, dtype=DT)
    for h in range(heads):
        rows = lambda j: [h * 3 * ch + 3 * i + j for i in range(ch)]  # noqa: E731
        q, k, v = (qkv[:, rows(j)] for j in range(3))
        logits = torch.einsum("bcp,bcq->bpq", q, k) / math.sqrt(ch)
        want[:, h * ch:(h + 1) * ch] = torch.einsum("bpq,bcq->bcp", logits.softmax(-1), v)
    torch.testing.assert_close(got, want.reshape(2, c, 3, 5), rtol=1e-10, atol=1e-12)

    # and the block adds proj(attention) to its residual output
    emb = torch.randn(2, 8, dtype=DT)
    h = block.conv0(F.silu(block.norm0(x)))
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.conv1(F.silu(shift + block.norm1(h) * (scale + 1))) + x
    torch.testing.assert_close(block(x, emb), block.proj(block.attention(h)) + h, rtol=1e-10, atol=1e-12)


# --- resampling and embeddings --------------------------------------------------------------------

def test_resample_filter_is_mean_down_and_nearest_up():
    x = torch.randn(2, 4, 6, 8, dtype=DT)
    down = Conv2d(4, 4, kernel=0, down=True).to(DT)
    up = Conv2d(4, 4, kernel=0, up=True).to(DT)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-14)
    torch.testing.assert_close(up(x), x.repeat_interleave(2, -2).repeat_interleave(2, -1), rtol=0, atol=1e-14)
    # a down convolution resamples first; the fused one (NCSN++) convolves first
    conv = Conv2d(4, 5, kernel=3, down=True).to(DT)
    fused = Conv2d(4, 5, kernel=3, down=True, fused_resample=True).to(DT)
    fused.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), F.conv2d(F.avg_pool2d(x, 2), conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(fused(x), F.avg_pool2d(F.conv2d(x, conv.weight, conv.bias, padding=1), 2))


@pytest.mark.parametrize("endpoint", [False, True])
def test_positional_embedding(endpoint):
    x = torch.tensor([-1.3, 0.0, 2.5], dtype=DT)
    emb = PositionalEmbedding(8, endpoint=endpoint)(x)
    denom = 3 if endpoint else 4
    freqs = torch.tensor([10000.0 ** (-i / denom) for i in range(4)], dtype=DT)
    torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], 1))


# --- preconditioning --------------------------------------------------------------------------------

class Probe(torch.nn.Module):
    """Stands in for the network: returns 3 * its input and records its arguments."""

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        self.seen = (x.clone(), noise_labels.clone(), None if class_labels is None else class_labels.clone())
        return 3 * x


def tiny(**kw) -> EDMPrecond:
    torch.manual_seed(1)
    net = EDMPrecond(**{**dict(img_resolution=16, img_channels=3, label_dim=4, model_channels=16,
                               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]), **kw}).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def test_precond_formula_and_labels():
    net = tiny()
    net.model = Probe()
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sigma = torch.tensor([0.3, 4.0], dtype=DT)
    out = net(x, sigma, torch.tensor([1, 3]))
    sd = 0.5
    s = sigma.view(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    want = sd**2 / (s**2 + sd**2) * x + s * sd / torch.sqrt(s**2 + sd**2) * 3 * (c_in * x).float().double()
    assert out.dtype == DT
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)  # the wrapper computes in float32
    x_in, c_noise, labels = net.model.seen
    assert x_in.dtype == torch.float32
    torch.testing.assert_close(c_noise, (sigma.log() / 4).float())
    assert torch.equal(labels, torch.eye(4)[[1, 3]])                 # indices -> one-hot rows
    net(x, sigma[:, None, None, None], torch.eye(4)[[2, 0]])         # EDM's [B, 1, 1, 1] sigma
    assert torch.equal(net.model.seen[2], torch.eye(4)[[2, 0]])
    net(x, 0.7)                                                      # no label: EDM's zero label
    assert torch.equal(net.model.seen[2], torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 4\)"):
        net(x, sigma, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="class_labels has shape"):
        net(x, sigma, torch.eye(3))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        net(x, torch.tensor([0.3, 0.0], dtype=DT))


def test_low_precision_channels_last_and_compile():
    net = tiny()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        ref = net(x, sigma, labels)
        net.channels_last = True
        net.to(memory_format=torch.channels_last)
        torch.testing.assert_close(net(x, sigma, labels), ref, rtol=1e-5, atol=1e-5)
        net.channels_last = False
        net.activation_dtype = torch.bfloat16
        low = net(x, sigma, labels)
        assert low.dtype == torch.float32
        assert 0 < (low - ref).abs().max() < 0.05 * ref.abs().max()
        net.activation_dtype = None
        compiled = torch.compile(net, backend="eager", fullgraph=True)  # one graph: no Python branches on data
        torch.testing.assert_close(compiled(x, sigma, labels), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp", "skip"])
def test_song_unet_variants(variant):
    kw = dict(ddpmpp=dict(), ncsnpp=dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                         resample_filter=[1, 3, 3, 1]),
              skip=dict(encoder_type="skip", decoder_type="skip"))[variant]
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, **kw).eval()
    keys = set(net.state_dict())
    assert {"model.map_label.bias", "model.map_augment.weight", "model.dec.16x16_aux_norm.weight",
            "model.dec.16x16_aux_conv.weight", "model.dec.8x8_in0.qkv.weight",
            "model.dec.8x8_block1.qkv.weight"} <= keys
    assert "model.dec.8x8_block0.qkv.weight" not in keys  # DDPM++: attention in the last decoder block only
    assert ("model.map_noise.freqs" in keys) == (variant == "ncsnpp")
    assert ("model.enc.8x8_aux_residual.weight" in keys) == (variant == "ncsnpp")
    assert ("model.dec.16x16_aux_up.resample_filter" in keys) == (variant == "skip")
    assert net.model.enc["8x8_block0"].skip_scale == math.sqrt(0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 2.0]), torch.eye(2))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="UNet")
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type="fancy")
