"""EDM's and RDM's networks, and their released checkpoints read without running their code.

    from relayops import models
    net = models.load_checkpoint("imagenet_second_stage.pt")     # safe: see models.safe_pickle
    models.convert("imagenet_second_stage.pt", "runs/rdm-imagenet256")  # relayops checkpoint
    x0_hat = net(x, sigma, class_labels)                           # the samplers' denoiser call

:mod:`relayops.models.edm` holds the networks (``DhariwalUNet``, ``SongUNet``, ``EDMPrecond``)
with EDM's parameter names; :data:`RDM_CONFIGS` the architectures of the released RDM models.
"""
from .convert import build_network, convert, load_checkpoint, network_from_record, read_checkpoint
from .edm import DhariwalUNet, EDMPrecond, SongUNet, UNetBlock
from .safe_pickle import UnsafeCheckpointError

# EDMPrecond arguments of the released RDM stages (the authors' train.py: ADM architecture,
# 192 x [1, 2, 3, 4] at 64x64, 256 x [1, 1, 2, 2, 4, 4] at 256x256; attention at 32, 16 and 8).
# augment_dim is 9 where the run used EDM's augmentation; the files record it either way.
_ADM64 = dict(img_resolution=64, img_channels=3, model_type="DhariwalUNet", model_channels=192,
              channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8])
_ADM256 = dict(img_resolution=256, img_channels=3, model_type="DhariwalUNet", model_channels=256,
               channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2, attn_resolutions=[32, 16, 8])
RDM_CONFIGS = {
    "imagenet64": dict(_ADM64, label_dim=1000),
    "imagenet256-relay": dict(_ADM256, label_dim=1000),
    "celebahq64": dict(_ADM64, label_dim=0),
    "celebahq256-relay": dict(_ADM256, label_dim=0),
}

__all__ = ["DhariwalUNet", "EDMPrecond", "RDM_CONFIGS", "SongUNet", "UNetBlock", "UnsafeCheckpointError",
           "build_network", "convert", "load_checkpoint", "network_from_record", "read_checkpoint"]
