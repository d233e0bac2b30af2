"""Build script: the pure-Python package plus the compiled kernels.

* ``relayops._C``: CPU kernels (csrc/cpu, OpenMP), always built.
* ``relayops._C_cuda``: CUDA kernels (csrc/cuda), built when nvcc is found. ``RELAYOPS_CUDA=0``
  skips it, ``RELAYOPS_CUDA=1`` makes a missing nvcc an error; ``RELAYOPS_CUDA_ARCHS`` picks the
  GPU architectures (default: one per family the installed nvcc offers among 75, 80, 90, 100, 120:
  Turing, Ampere (86/89 run sm_80 code), Hopper, Blackwell datacenter and consumer). Machine code
  is built for each, plus PTX of the newest, which later GPUs compile at first launch.

The C++ sources of an extension compile in parallel, one per core (``RELAYOPS_BUILD_JOBS=N``
for N). ``RELAYOPS_BUILD_OPT`` replaces the optimisation flag (default ``-O3``): ``-O0`` builds in
seconds instead of minutes (the packaging test uses it) and gives kernels several times slower.
Neither module includes torch headers (pointers travel as integers), so the build needs only a
C++17 compiler, pybind11 and, for CUDA, nvcc. Usage: ``python setup.py build_ext --inplace``.
"""
import os
import shutil
import subprocess

import pybind11
from pybind11.setup_helpers import ParallelCompile
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Compile an extension's C++ sources side by side, one per core (RELAYOPS_BUILD_JOBS=N sets N).
ParallelCompile("RELAYOPS_BUILD_JOBS").install()

# -fno-math-errno lets sqrt vectorise (the Philox + Box-Muller loops); nothing here reads errno.
OPT = os.environ.get("RELAYOPS_BUILD_OPT", "-O3")
CXX_FLAGS = [OPT, "-std=c++17", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"]
INCLUDES = ["csrc/include", pybind11.get_include()]


def cuda_home(nvcc):
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else nvcc's parent."""
    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if d and os.path.isdir(os.path.join(d, "include")):
            return d
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_nvcc():
    """nvcc to use, or None; honours RELAYOPS_CUDA=0/1."""
    flag = os.environ.get("RELAYOPS_CUDA", "").strip()
    if flag == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc")
                                    if os.path.exists(os.path.join(home, "bin", "nvcc")) else None)
    if flag == "1" and nvcc is None:
        raise RuntimeError("RELAYOPS_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc


DEFAULT_ARCHS = ("75", "80", "90", "100", "120")


def cuda_archs(nvcc):
    """The architectures to build: RELAYOPS_CUDA_ARCHS ("80;90" or "80,90"), else DEFAULT_ARCHS
    that this nvcc can build (``nvcc --list-gpu-code``)."""
    requested = os.environ.get("RELAYOPS_CUDA_ARCHS", "").replace(",", ";")
    if requested.strip():
        return [a.strip() for a in requested.split(";") if a.strip()]
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["80", "90"]  # nvcc too old to list its targets: those two every CUDA 11.8+ builds
    offered = {code.removeprefix("sm_") for code in listed}
    return [a for a in DEFAULT_ARCHS if a in offered]


def gencode_flags(archs):
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc and links the objects into the extension."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        rebuilt = False
        if cu_sources:
            nvcc = find_nvcc()
            archs = cuda_archs(nvcc)
            os.makedirs(self.build_temp, exist_ok=True)
            objects = []
            for src in cu_sources:
                # the architectures are in the name: changing RELAYOPS_CUDA_ARCHS rebuilds
                obj = os.path.join(self.build_temp, f"{os.path.basename(src)}.sm_{'_'.join(archs)}.o")
                if self.force or not os.path.exists(obj) or _newer_sources(src, obj):
                    cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--threads", "0",
                           "-Xcompiler", "-fPIC", *[f"-I{d}" for d in ext.include_dirs], *gencode_flags(archs)]
                    print(" ".join(cmd))
                    subprocess.check_call(cmd)
                    rebuilt = True
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + objects
        # setuptools' up-to-date check does not look at the nvcc objects: relink when one changed.
        force = self.force
        self.force = force or rebuilt
        try:
            super().build_extension(ext)
        finally:
            self.force = force


def _newer_sources(src, obj):
    """True when the .cu file or any shared header is newer than its object file."""
    deps = [src] + [os.path.join(root, f) for d in ("csrc/include", "csrc/cuda")
                    for root, _, files in os.walk(d) for f in files]
    t = os.path.getmtime(obj)
    return any(os.path.getmtime(d) > t for d in deps)


def headers(*dirs):
    return [os.path.join(root, f) for d in dirs for root, _, files in os.walk(d) for f in files if f.endswith(".h")]


ext_modules = [
    Extension(
        "relayops._C",
        sources=["csrc/cpu/kernels.cpp", "csrc/cpu/module.cpp", "csrc/cpu/cuda_emulation.cpp"],
        include_dirs=INCLUDES,
        depends=headers("csrc/include", "csrc/cpu"),
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
        language="c++",
    )
]

nvcc = find_nvcc()
if nvcc is not None:
    home = cuda_home(nvcc)
    ext_modules.append(
        Extension(
            "relayops._C_cuda",
            sources=["csrc/cuda/kernels.cu", "csrc/cuda/checks.cu", "csrc/cuda/module.cpp"],
            include_dirs=INCLUDES + [os.path.join(home, "include")],
            depends=headers("csrc/include", "csrc/cuda"),
            library_dirs=[os.path.join(home, "lib64"), os.path.join(home, "lib")],
            # the static runtime: the module does not depend on a libcudart.so at import time
            libraries=["cudart_static", "dl", "rt", "pthread"],
            # the architecture list, for the module's error messages (relayops._C_cuda.archs)
            define_macros=[("RELAYOPS_CUDA_ARCHS", '"' + ",".join(cuda_archs(nvcc)) + '"')],
            extra_compile_args=[OPT, "-std=c++17", "-fvisibility=hidden"],
            language="c++",
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
