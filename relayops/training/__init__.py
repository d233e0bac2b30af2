"""The reference trainer: a small EDM/ADM UNet, the stage losses, data, checkpoints and the loop;
also Matryoshka diffusion (stage "mdm": a NestedUNet over several resolutions, docs/mdm.md).

    from relayops.training import TrainConfig, train, load_denoiser
    train(TrainConfig(stage="base", data="builtin", resolution=16, steps=2000, out="runs/base"))
    denoiser, record = load_denoiser("runs/base", expected_stage="base")
"""
from ..sampling import nearest_upsample  # re-exported from its home, relayops.sampling
from .checkpoint import load_checkpoint, read_record, save_checkpoint
from .data import CropDataset, area_downsample, builtin_images, eval_crops, load_images, save_grid
from .losses import edm_base_loss, linear_relay_loss, mdm_train_loss, relay_loss, vpred_loss
from .nested_unet import MDMDenoiser, NestedUNet, NestedUNetConfig
from .trainer import TrainConfig, Trainer, build_denoiser, load_denoiser, train
from .unet import EDMPrecond, UNet, UNetConfig, VPredPrecond

__all__ = [
    "CropDataset", "EDMPrecond", "MDMDenoiser", "NestedUNet", "NestedUNetConfig", "TrainConfig", "Trainer", "UNet",
    "UNetConfig", "VPredPrecond", "mdm_train_loss",
    "area_downsample", "build_denoiser", "builtin_images", "edm_base_loss", "eval_crops", "linear_relay_loss",
    "load_checkpoint", "load_denoiser", "load_images", "nearest_upsample", "read_record", "relay_loss",
    "save_checkpoint", "save_grid", "train", "vpred_loss",
]
