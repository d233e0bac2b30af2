"""The build (setup.py build_ext, as `make build` runs it): a second build with nothing changed
compiles and links nothing; a touched source compiles again alone; a touched header compiles the
sources that include it (the compiler's dependency files). On a copy of the sources in a temporary
folder, the CPU module only, at -O0."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_BUILDS = {"csrc/cpu/kernels.cpp", "csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"}
CPU_SOURCES = KERNEL_BUILDS | {"csrc/cpu/dispatch.cpp", "csrc/cpu/module.cpp", "csrc/cpu/cuda_emulation.cpp"}


def build(tree: Path) -> set:
    """Runs the build in ``tree``; the C++ sources it compiled."""
    env = dict(os.environ, RELAYOPS_CUDA="0", RELAYOPS_BUILD_OPT="-O0")
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return set(re.findall(r" -c (\S+\.cpp) ", done.stdout))


def touch(path: Path, after: Path) -> None:
    """Gives ``path`` a modification time later than ``after``'s, but not in the future: a later
    build's objects must come out newer than ``path`` however fast they compile."""
    t = max(time.time(), after.stat().st_mtime + 0.01)
    os.utime(path, (t, t))
    time.sleep(max(0.0, t - time.time()) + 0.05)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_rebuilds_only_what_changed(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    for name in ("setup.py", "pyproject.toml", "README.md", "relayops/__init__.py"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    assert build(tree) == CPU_SOURCES
    module = next((tree / "relayops").glob("_C.*"))
    linked = module.stat().st_mtime_ns
    assert build(tree) == set() and module.stat().st_mtime_ns == linked     # nothing changed: nothing done
    touch(tree / "csrc/cpu/dispatch.cpp", module)
    assert build(tree) == {"csrc/cpu/dispatch.cpp"} and module.stat().st_mtime_ns > linked
    touch(tree / "csrc/cpu/vector_rows.h", module)                          # included by the three kernel builds
    assert build(tree) == KERNEL_BUILDS
