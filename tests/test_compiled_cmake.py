"""The CMake build of csrc/ and its C++ unit tests (Philox known answers, DCT orthogonality,
block-sum covariance), configured and run with ctest in a temporary directory; and each test
program fails (exit status 1, ctest reports it) when a check fails, 256 failures included."""
import os
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

    # A failing check fails the program (tests/cpp/check.h injects N failing checks): an exit
    # status of the failure count would read 256 failures as success.
    for name in ("test_philox", "test_dct", "test_block_sum"):
        for n in (1, 256):
            env = dict(os.environ, RELAYOPS_CPP_INJECT_FAILURES=str(n))
            run = subprocess.run([str(build / name)], capture_output=True, text=True, env=env)
            assert run.returncode == 1, (name, n, run.returncode)
            assert f"{name}: {n} failure(s)" in run.stdout, run.stdout[-300:]
    env = dict(os.environ, RELAYOPS_CPP_INJECT_FAILURES="256")
    failed = subprocess.run(["ctest", "--test-dir", str(build)], capture_output=True, text=True, env=env)
    assert failed.returncode != 0 and "0% tests passed, 3 tests failed out of 3" in failed.stdout, failed.stdout
