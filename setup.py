"""Build script: the pure-Python package plus the compiled kernels.

* ``relayops._C``: CPU kernels (csrc/cpu, OpenMP), always built. kernels.cpp is compiled once per
  instruction set (itself: portable; kernels_avx512.cpp, kernels_avx2.cpp: the AVX builds), as
  separate translation units.
* ``relayops._C_cuda``: CUDA kernels (csrc/cuda), built when nvcc is found. ``RELAYOPS_CUDA=0``
  skips it, ``RELAYOPS_CUDA=1`` makes a missing nvcc an error, ``RELAYOPS_CUDA=gpu`` builds it
  only where an NVIDIA GPU is visible (``make demo``); ``RELAYOPS_CUDA_ARCHS`` picks the GPU
  architectures (default: one per family the installed nvcc offers among 75, 80, 90, 100, 120:
  Turing, Ampere (86/89 run sm_80 code), Hopper, Blackwell datacenter and consumer). Machine code
  is built for each, plus PTX of the newest, which later GPUs compile at first launch.

The C++ sources of an extension compile in parallel, one per core (``RELAYOPS_BUILD_JOBS=N``
for N), and nvcc compiles the .cu files meanwhile, beside ``relayops._C``'s C++ sources. A
rebuild compiles only the sources whose object is older than the source or one of the
headers it includes (the compiler's dependency files, ``-MMD``), or whose flags changed; an
editable install (``pip install -e .``) keeps its objects in build/ too, so ``setup.py build_ext
--inplace`` after it compiles nothing. ``RELAYOPS_BUILD_OPT`` replaces the optimisation flags
(default ``-O3``; no debug information unless it adds ``-g``): ``-O0`` builds in seconds instead
of minutes (the packaging test uses it) and gives kernels several times slower.
``RELAYOPS_NO_EXTENSIONS=1`` declares no compiled modules (the Makefile installs the package that
way and builds the modules in place itself, once). Neither module includes torch headers
(pointers travel as integers), so the build needs only a C++17 compiler, pybind11 and, for CUDA,
nvcc. Usage: ``python setup.py build_ext --inplace``.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pybind11
from pybind11.setup_helpers import ParallelCompile
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext



def needs_recompile(obj, src):
    """True when the object file is older than its source or than a header the compiler listed in
    its dependency file (written beside it by -MMD), or either file is missing."""
    try:
        built = os.path.getmtime(obj)
        with open(os.path.splitext(obj)[0] + ".d") as f:
            rule = f.read()
    except OSError:
        return True
    # "obj: src header ...", lines continued with a backslash, spaces in names escaped
    deps = [d.replace("\\ ", " ") for d in re.split(r"(?<!\\)\s+", rule.replace("\\\n", " ").partition(": ")[2]) if d]
    return any(not os.path.exists(d) or os.path.getmtime(d) > built for d in deps + [src])


# Compile an extension's C++ sources side by side, one per core (RELAYOPS_BUILD_JOBS=N sets N),
# each only when needs_recompile says so.
ParallelCompile("RELAYOPS_BUILD_JOBS", needs_recompile=needs_recompile).install()

# -fno-math-errno lets sqrt vectorise (the Philox + Box-Muller loops); nothing here reads errno.
# -g0 drops the debug information Python's own flags ask for (six times the code's size);
# RELAYOPS_BUILD_OPT="-O3 -g" brings it back. -MMD: the dependency files of needs_recompile.
OPT = os.environ.get("RELAYOPS_BUILD_OPT", "-O3").split()
CXX_FLAGS = ["-g0", *OPT, "-std=c++17", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden", "-MMD"]
INCLUDES = ["csrc/include", pybind11.get_include()]
# Flags added after CXX_FLAGS for one source. The CPU emulation of the CUDA kernels is test-only code
# run on small shapes: at -O3 it took 100 s of the CPU module's 195 s of compiling, at -O1 33 s.
SOURCE_FLAGS = {"csrc/cpu/cuda_emulation.cpp": ["-O1"]}


def cuda_home(nvcc):
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else nvcc's parent."""
    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if d and os.path.isdir(os.path.join(d, "include")):
            return d
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def gpu_visible():
    """True where an NVIDIA GPU is visible: /dev/nvidia0 exists or ``nvidia-smi -L`` lists one."""
    if os.path.exists("/dev/nvidia0"):
        return True
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def find_nvcc():
    """nvcc to use, or None; honours RELAYOPS_CUDA=0/1/gpu."""
    flag = os.environ.get("RELAYOPS_CUDA", "").strip()
    if flag not in ("", "0", "1", "gpu"):
        raise RuntimeError(f"RELAYOPS_CUDA={flag!r}: use 0 (no CUDA module), 1 (required) or gpu (only where "
                           "a GPU is visible)")
    if flag == "0" or (flag == "gpu" and not gpu_visible()):
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
    """build_ext that compiles .cu sources with nvcc and links the objects into the extension,
    keeps an editable install's objects in build/ and rebuilds an extension whose flags changed."""

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:  # the objects where `setup.py build_ext` looks for them, not in a temporary folder
            self.build_temp = os.path.join("build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    def build_extensions(self):
        # nvcc compiles the CUDA module's .cu files in a thread while relayops._C's C++ sources
        # compile: the C++ build ends with one source compiling alone, and nvcc takes the idle core.
        with ThreadPoolExecutor(max_workers=1) as pool:
            self._cuda_compiles = {ext.name: pool.submit(self._compile_cuda, ext, self.force)
                                   for ext in self.extensions if any(s.endswith(".cu") for s in ext.sources)}
            super().build_extensions()

    def build_extension(self, ext):
        # The C++ objects are stale, although newer than their sources, when the flags, macros or
        # sources changed (another RELAYOPS_BUILD_OPT, say): a stamp beside them records those.
        cxx_sources = [s for s in ext.sources if not s.endswith(".cu")]
        stamp = os.path.join(self.build_temp, ext.name + ".flags")
        flags = repr((ext.extra_compile_args, ext.define_macros, [(s, SOURCE_FLAGS.get(s)) for s in cxx_sources]))
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "a+") as f:  # created empty the first time
            f.seek(0)
            changed = f.read() != flags
        if changed:
            for obj in self.compiler.object_filenames(cxx_sources, output_dir=self.build_temp):
                if os.path.exists(obj):
                    os.remove(obj)
        # setuptools' up-to-date check sees neither the flags nor the nvcc objects: relink then.
        force = self.force
        compiled = getattr(self, "_cuda_compiles", {}).pop(ext.name, None)
        cuda_rebuilt = compiled.result() if compiled is not None else self._compile_cuda(ext, force)
        self.force = force or cuda_rebuilt or changed
        compile_one = self.compiler._compile

        def compile_with_source_flags(obj, src, src_ext, cc_args, extra_postargs, pp_opts):
            extra = extra_postargs + SOURCE_FLAGS.get(os.path.normpath(src), [])
            return compile_one(obj, src, src_ext, cc_args, extra, pp_opts)

        self.compiler._compile = compile_with_source_flags
        try:
            super().build_extension(ext)
        finally:
            self.force = force
            self.compiler._compile = compile_one
        with open(stamp, "w") as f:
            f.write(flags)

    def _compile_cuda(self, ext, force):
        """Compiles ext's .cu sources with nvcc where they changed (all of them with ``force``) and
        hands their objects to the link; True when one was compiled."""
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        rebuilt = False
        if cu_sources:
            os.makedirs(self.build_temp, exist_ok=True)
            nvcc = find_nvcc()
            archs = cuda_archs(nvcc)
            objects = []
            for src in cu_sources:
                # the architectures are in the name: changing RELAYOPS_CUDA_ARCHS rebuilds
                obj = os.path.join(self.build_temp, f"{os.path.basename(src)}.sm_{'_'.join(archs)}.o")
                if force or not os.path.exists(obj) or _newer_sources(src, obj):
                    cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--threads", "0",
                           "-Xcompiler", "-fPIC", *[f"-I{d}" for d in ext.include_dirs], *gencode_flags(archs)]
                    print(" ".join(cmd))
                    subprocess.check_call(cmd)
                    rebuilt = True
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + objects
        return rebuilt


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
        # kernels.cpp is the portable build; kernels_avx512.cpp and kernels_avx2.cpp compile it again
        # for their instruction sets: separate translation units, compiled in parallel
        sources=[
            "csrc/cpu/kernels_avx512.cpp",
            "csrc/cpu/kernels_avx2.cpp",
            "csrc/cpu/kernels.cpp",
            "csrc/cpu/dispatch.cpp",
            "csrc/cpu/module.cpp",
            "csrc/cpu/cuda_emulation.cpp",
        ],
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
            extra_compile_args=["-g0", *OPT, "-std=c++17", "-fvisibility=hidden", "-MMD"],
            language="c++",
        )
    )

# RELAYOPS_NO_EXTENSIONS=1: the package alone (the Makefile installs it so, then builds in place).
no_extensions = os.environ.get("RELAYOPS_NO_EXTENSIONS", "") == "1"
setup(ext_modules=[] if no_extensions else ext_modules, cmdclass={"build_ext": BuildExt})
