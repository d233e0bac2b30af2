"""The CMake build of csrc/ and its C++ unit tests (Philox known answers, DCT orthogonality,
block-sum covariance), configured and run with ctest in a temporary directory."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="needs cmake and ctest")
def test_cmake_ctest(tmp_path):
    build = tmp_path / "build"
    # The pybind11 modules are built by setup.py for the Python tests; here only the C++ tests.
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DRELAYOPS_BUILD_MODULES=OFF"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, text=True)
    result = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
