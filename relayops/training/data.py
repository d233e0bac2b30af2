"""Training images: a folder of PNG/JPEG files or the photographs bundled with scikit-image.

:func:`read_image` (one file) and :func:`skimage_image` (one bundled sample) are the package's
only image readers; ``relayops.analysis`` uses them too.

Images are kept in memory as uint8 ``[3, H, W]`` tensors. A sample is a random square crop
(side between ``crop_scale[0]`` and ``crop_scale[1]`` times the resolution, never more than the
image), randomly flipped, resized to ``resolution x resolution`` with antialiasing and scaled to
[-1, 1] (float32, ``[3, R, R]``). The randomness of sample ``index`` in ``epoch`` comes from a
generator seeded by ``(seed, epoch, index)`` only, so a resumed run sees the same data in the
same order, whichever process draws it.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._optional import require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")
# Refused before decoding (a small file can declare a huge image): 8192 x 8192 pixels.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_BYTES = 256 << 20
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# scikit-image's bundled photographs (no download needed). The bottom quarter of each training
# photograph is held out as the "test" split (unseen crops of the same kind of picture); two other
# photographs are the "heldout" split (unlike the training set: a harder test).
BUILTIN_TRAIN = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                 "camera", "moon", "coins", "brick", "grass", "gravel")
BUILTIN_HELDOUT = ("chelsea", "coffee")
BUILTIN_TEST_FRACTION = 0.25
BUILTIN_SPLITS = ("train", "test", "heldout")


def _to_chw_uint8(array: np.ndarray) -> torch.Tensor:
    """HxW (grey), HxWx3 or HxWx4 array -> uint8 ``[3, H, W]`` tensor (grey repeated, alpha dropped)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = a[:, :, :3]
    return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).contiguous()


def read_image(path) -> torch.Tensor:
    """One PNG or JPEG file as a uint8 ``[3, H, W]`` tensor.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file) for
    anything else: not a file, more than ``MAX_IMAGE_BYTES`` bytes, or what :func:`decode_image`
    refuses.
    """
    require("PIL.Image", "reading images")  # the missing extra first, whatever the path
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"cannot read image {str(path)!r}: not a file")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"cannot read image {str(path)!r}: {size} bytes is more than the limit of "
                         f"{MAX_IMAGE_BYTES} (relayops.training.data.MAX_IMAGE_BYTES)")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """The bytes of one PNG or JPEG file as a uint8 ``[3, H, W]`` tensor; ``name`` (a path, a zip
    member) is only for messages.

    Raises ``ValueError`` (naming it) for another format, a truncated or corrupt file (PNG: every
    chunk checksum and the end chunk are checked), more than ``MAX_IMAGE_BYTES`` bytes or more than
    ``MAX_IMAGE_PIXELS`` pixels (from the header, before decoding). Only the PNG and JPEG decoders
    are allowed: some PIL formats (EPS) would start external programs.
    """
    Image = require("PIL.Image", "reading images")

    try:
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{len(data)} bytes is more than the limit of {MAX_IMAGE_BYTES} "
                             f"(relayops.training.data.MAX_IMAGE_BYTES)")
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"{w}x{h} pixels is more than the limit of {MAX_IMAGE_PIXELS} "
                                 f"(relayops.training.data.MAX_IMAGE_PIXELS)")
            if im.format == "PNG":
                im.verify()  # chunk checksums; decoding alone accepts a cut-off end
                if not data.endswith(_PNG_END):
                    raise ValueError("truncated PNG file (no end chunk)")
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            return _to_chw_uint8(np.asarray(im.convert("RGB")))
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ...) for broken files
        raise ValueError(f"cannot read image {name!r}: {e}") from None


@functools.cache
def skimage_image(name: str) -> torch.Tensor:
    """scikit-image's bundled image ``skimage.data.<name>()`` as a uint8 ``[3, H, W]`` tensor.

    Raises ``ValueError`` for a name that is not one. Cached: decoding takes up to a second
    and callers only ever read the tensor.
    """
    skimage_data = require("skimage.data", "loading scikit-image's sample images")
    load = getattr(skimage_data, name, None)
    if not callable(load):
        raise ValueError(f"scikit-image has no sample image {name!r}")
    return _to_chw_uint8(load())


def builtin_images(split: str = "train") -> list[torch.Tensor]:
    """scikit-image's photographs as uint8 ``[3, H, W]`` tensors.

    split "train": the top three quarters of each training photograph; "test": their bottom
    quarter (never trained on); "heldout": the photographs kept out of training altogether.
    """
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"split must be one of {BUILTIN_SPLITS}, got {split!r}")
    if split == "heldout":
        return [skimage_image(name) for name in BUILTIN_HELDOUT]
    images = [skimage_image(name) for name in BUILTIN_TRAIN]
    cuts = [im.shape[-2] - round(im.shape[-2] * BUILTIN_TEST_FRACTION) for im in images]
    if split == "train":
        return [im[:, :cut] for im, cut in zip(images, cuts)]
    return [im[:, cut:] for im, cut in zip(images, cuts)]


def folder_images(path) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """All PNG/JPEG files under ``path`` (recursively, sorted) as uint8 ``[3, H, W]`` tensors.

    Returns ``(images, labels, class_names)``: the label of a file is the index of the
    first-level subfolder it lies in (files directly in ``path`` share class 0).
    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for one without images
    or with an unreadable image.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(root)!r} contains no PNG or JPEG images")
    def class_of(p: Path) -> str:
        parts = p.relative_to(root).parts
        return parts[0] if len(parts) > 1 else ""

    class_names = sorted({class_of(p) for p in files})
    images, labels = [], []
    for p in files:
        images.append(read_image(p))
        labels.append(class_names.index(class_of(p)))
    return images, labels, class_names


def load_images(data: str | os.PathLike, split: str = "train"):
    """``data`` = "builtin" or a folder. Returns ``(images, labels, class_names)``."""
    if str(data) == "builtin":
        images = builtin_images(split)
        return images, [0] * len(images), [""]
    return folder_images(data)


def area_downsample(x: torch.Tensor, s: int) -> torch.Tensor:
    """Low-resolution input by area averaging over s x s blocks: ``[B, C, H, W] -> [B, C, H/s, W/s]``."""
    if x.shape[-1] % s or x.shape[-2] % s:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {s}")
    return F.avg_pool2d(x, s)


class CropDataset:
    """Random crops of in-memory images (see the module docstring).

    ``len(dataset)`` is ``samples_per_epoch`` (a virtual epoch; sample i comes from image
    ``i % len(images)``), so small image sets still give a useful distributed sampler.
    """

    def __init__(self, images: list[torch.Tensor], resolution: int, *, labels: list[int] | None = None,
                 crop_scale: tuple[float, float] = (1.0, 2.0), flip: bool = True,
                 samples_per_epoch: int | None = None, seed: int = 0):
        if not images:
            raise ValueError("no training images")
        if not 1.0 <= crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"crop_scale must satisfy 1 <= min <= max, got {crop_scale}")
        for i, im in enumerate(images):
            if min(im.shape[-2:]) < resolution:
                raise ValueError(f"image {i} is {im.shape[-1]}x{im.shape[-2]} pixels, smaller than the "
                                 f"resolution {resolution}; use a smaller --resolution or larger images")
        self.images = images
        self.labels = labels if labels is not None else [0] * len(images)
        self.resolution = resolution
        self.crop_scale = crop_scale
        self.flip = flip
        self.samples_per_epoch = samples_per_epoch or max(len(images), 1024)
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, int]:
        """``(image [3, R, R] float32 in [-1, 1], label)`` for one index of one epoch."""
        rng = np.random.default_rng([self.seed, epoch, index])
        k = index % len(self.images)
        im = self.images[k]
        h, w = im.shape[-2:]
        r = self.resolution
        side = int(round(rng.uniform(r * self.crop_scale[0], r * self.crop_scale[1])))
        side = max(r, min(side, h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = im[:, top:top + side, left:left + side].float()[None] / 127.5 - 1.0
        if side != r:
            crop = F.interpolate(crop, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        if self.flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop[0].clamp(-1, 1), self.labels[k]

    def batch(self, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked samples: ``([B, 3, R, R] float32, [B] int64 labels)``."""
        items = [self.sample(int(i), epoch) for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([c for _, c in items], dtype=torch.long)


def eval_crops(images: list[torch.Tensor], resolution: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` fixed crops (native scale, no resize) as ``[count, 3, R, R]`` in [-1, 1], for evaluation."""
    rng = np.random.default_rng([seed, 12345])
    out = []
    for i in range(count):
        im = images[i % len(images)]
        h, w = im.shape[-2:]
        top = int(rng.integers(0, h - resolution + 1))
        left = int(rng.integers(0, w - resolution + 1))
        out.append(im[:, top:top + resolution, left:left + resolution].float() / 127.5 - 1.0)
    return torch.stack(out)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, pad: int = 2, enhance=()) -> None:
    """Write ``[N, 3, H, W]`` images in [-1, 1] as one PNG grid (atomically); ``enhance`` as in
    :func:`save_png`."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    save_png(grid, path, enhance)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype, any shape) as uint8 0..255: ``round((x + 1) * 127.5)``
    after clamping. The one conversion of generated images to 8 bits (PNG files, evaluation)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(image: torch.Tensor, path, enhance=()) -> None:
    """Write one ``[3, H, W]`` image in [-1, 1] to a PNG (temporary file, then rename).

    ``enhance``: ``(name, factor)`` pairs of PIL ``ImageEnhance`` classes (``"Brightness"``,
    ``"Contrast"``, ``"Color"``, ``"Sharpness"``) applied in order to the 8-bit image.
    """
    Image = require("PIL.Image", "writing images")
    ImageEnhance = require("PIL.ImageEnhance", "writing images")

    arr = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img = Image.fromarray(arr)
    for name, factor in enhance:
        if name not in ("Brightness", "Contrast", "Color", "Sharpness"):
            raise ValueError(f"unknown image enhancement {name!r}")
        img = getattr(ImageEnhance, name)(img).enhance(factor)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
