"""The compiled CPU kernels' instruction-set paths: "portable" (the compiler's vector extensions at
the build's baseline, the path of aarch64 too), "avx2" (AVX2 + FMA) and "avx512", each forced with
relayops.set_cpu_isa (the ``cpu_isa`` fixture of conftest.py; a path this CPU lacks is skipped).

* every op case of the shared matrix (float32, float64) on each path below the best one (the best
  one runs it in test_backends.py) against the float64 reference; the blur rows on every path;
* each path's vector Philox words equal to the reference's (counters whose low word wraps, and at
  the top of the 64-bit range); seeded noise of each path within 1e-6 of the reference (rows with
  vector tails, odd widths whose pairs straddle rows, per-sample seeds with an odd count per
  sample, and the extreme Philox words of test_box_muller_words.py);
* each path's vector ln, cos(2 pi .) and sin(2 pi .) against float64 libm (NumPy) over every
  input Box-Muller can give them (all 2^24 uniforms of SPEC 4), worst errors printed;
* the cap (never above the CPU, RELAYOPS_CPU_ISA, bad values);
* the CPU kernel sources compile for aarch64 and its portable path uses NEON vector instructions
  (with a cross compiler; skipped where none is installed), and the aarch64 build runs the op
  matrix under qemu-aarch64 (skipped without qemu-user).
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import relayops
from relayops.reference.philox import MASK32, philox4x32

compiled = pytest.importorskip("relayops.ops._compiled", reason="relayops._C is not built")

import test_backends as matrix  # noqa: E402
import test_box_muller_words as words  # noqa: E402
from compare import assert_close, scale_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# The best path of this CPU runs the whole matrix in test_backends.py; the lower ones run it here.
LOWER_ISAS = compiled.CPU_ISAS[:compiled.CPU_ISAS.index(compiled.best_cpu_isa())]


@pytest.fixture(params=LOWER_ISAS)
def lower_isa(request):
    before = compiled.cpu_isa()
    compiled.set_cpu_isa(request.param)
    yield request.param
    compiled.set_cpu_isa(before)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", list(matrix.CASES))
def test_op_matrix_on_lower_paths(lower_isa, name, dtype):
    """Every op case on the matrix shapes the kernels run (s = 2, 3, 4, 8, 16, H = W = s); bfloat16
    storage on each path: test_blur_rows_on_each_path."""
    for shape in matrix.SHAPES:
        if shape[4] <= relayops._C.max_s and shape[0]:
            inputs, exact = matrix.make_inputs(shape, dtype, "cpu")
            matrix.check_case(name, ("cpu", "cpu"), inputs, exact, shape[4], dtype)


@pytest.mark.parametrize("s", (2, 4, 8))
@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last), ids=("nchw", "nhwc"))
def test_blur_rows_on_each_path(cpu_isa, s, memory_format):
    """patch_blur and relay_corrupt (the fused blur rows) on rows wider than a vector plus a tail."""
    gen = torch.Generator().manual_seed(s)
    x = torch.randn(2, 3, 2 * s, 10 * s + 8 if s < 8 else 9 * s, generator=gen, dtype=torch.float64)
    tau = torch.tensor([0.3, 2.0], dtype=torch.float64)
    eps, eps2 = torch.randn_like(x), torch.randn_like(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 3e-2)):
        xi = x.to(dtype).contiguous(memory_format=memory_format)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        got = relayops.patch_blur(xi, tau.to(acc), s, backend="cpu")
        want = relayops.patch_blur(xi.double(), tau, s, backend="reference")
        assert_close(got, want, atol=tol * scale_of(want), what=f"patch_blur {dtype} on {cpu_isa}")
        got = relayops.relay_corrupt(xi, 0.5, 0.7, s, eps=eps.to(dtype), eps2=eps2.to(dtype), backend="cpu")
        e1, e2 = eps.to(dtype).double(), eps2.to(dtype).double()
        want = relayops.relay_corrupt(xi.double(), 0.5, 0.7, s, eps=e1, eps2=e2, backend="reference")
        assert_close(got, want, atol=tol * scale_of(want), what=f"relay_corrupt {dtype} on {cpu_isa}")


def test_philox_words_on_each_path(cpu_isa):
    """Each path's vector Philox (four vectors at a time, then single vectors, the last partial)
    against the reference's int64 emulation, word for word: counters (pair indices) whose low word
    wraps within a row (the carry into the high word) and at the top of the 64-bit range (wrapping
    to 0)."""
    isa = int(relayops._C.Isa.__members__[cpu_isa])
    for seed, offset in ((0, 0), (2**64 - 1, 2**40 + 3), (0x0123456789ABCDEF, 7)):
        for base in (0, 2**32 - 37, 5 * 2**32 + 11, 2**64 - 50):
            for n in (1, 7, 76, 300):
                got = torch.empty(4, n, dtype=torch.int32)
                relayops._C.philox_words(isa, seed, offset, base, n, got.data_ptr())
                e = [(base + i) % 2**64 for i in range(n)]
                counter = (torch.tensor([v & MASK32 for v in e]), torch.tensor([v >> 32 for v in e]),
                           torch.tensor(offset & MASK32), torch.tensor(offset >> 32))
                want = torch.stack(philox4x32(counter, (seed & MASK32, seed >> 32)))
                assert torch.equal(got.long() & MASK32, want), f"{cpu_isa}: seed {seed}, base {base}, n {n}"


@pytest.mark.parametrize("height, width", ((8, 7), (8, 76), (8, 256), (3, 9), (5, 75)))
def test_seeded_noise_within_1e6_of_reference(cpu_isa, height, width):
    """relay_noise (normalize=False: k = 1) drawn on each path: 7 = a tail only, 76 = whole vectors
    of 4, 8 and 16 lanes plus a tail, odd widths 9 and 75 (every other row starts in the middle of
    a pair; 3 x 3 x 9 and 3 x 5 x 75 elements per sample are odd); int seeds near 2^64 and
    per-sample seeds."""
    x = torch.zeros(2, 3, height, width)
    worst = 0.0
    for seed, offset in ((5, 0), (2**64 - 1, 2**40 + 3), ([7, 2**64 - 2], 9)):
        for s in [s for s in (1, 3, 4, 5) if width % s == 0 and height % s == 0]:
            got = relayops.relay_noise(x, s, seed=seed, offset=offset, normalize=False, backend="cpu")
            want = relayops.relay_noise(x.double(), s, seed=seed, offset=offset, normalize=False, backend="reference")
            worst = max(worst, float((got.double() - want).abs().max()))
    print(f"{cpu_isa}: worst |cpu - reference| of seeded noise {worst:.3g}")
    assert worst <= 1e-6


def test_box_muller_extreme_words_on_each_path(cpu_isa):
    """The extreme uniforms (u1 = 2^-24 and 1 - 2^-24, cos and sin at 1, 0 and -1) through each path's row code."""
    w = words.extreme_words()
    eps, eps2 = compiled.normals_from_words(words.as_int32(w), torch.float32)
    ref, ref2 = words.expected(w)
    worst = max(float((eps.double() - ref).abs().max()), float((eps2.double() - ref2).abs().max()))
    print(f"{cpu_isa}: worst Box-Muller error at the extreme words {worst:.3g}")
    assert worst < 1e-6


def _vector_function(isa: str, mode: int, words: np.ndarray) -> np.ndarray:
    """The path's vector ln u1 (mode 0), cos(2 pi u2) (mode 1) or sin(2 pi u2) (mode 2) of the
    uniforms of uint32 ``words``."""
    inp = torch.from_numpy(words.astype(np.uint32).view(np.int32))
    out = torch.empty(inp.shape, dtype=torch.float32)
    relayops._C.vector_transcendental(int(relayops._C.Isa.__members__[isa]), mode, inp.data_ptr(), out.data_ptr(),
                                      inp.numel())
    return out.numpy().astype(np.float64)


def test_vector_log_and_sincos_against_libm(cpu_isa):
    """ln u1 for every u1 = k 2^-24, k = 1 .. 2^24, and cos(2 pi u2), sin(2 pi u2) for every
    u2 = k 2^-24, k = 0 .. 2^24 - 1 (all the values Box-Muller evaluates, from the words
    k << 8 | junk), against NumPy's float64 log, cos and sin."""
    k = np.arange(2**24, dtype=np.uint64)
    w = (k << 8) | (k & 0xFF)  # the low 8 bits of a word are dropped: they must not matter
    u1, u2 = (k + 1) * 2.0**-24, k * 2.0**-24
    want = np.log(u1)
    err = np.abs(_vector_function(cpu_isa, 0, w) - want)
    rel = err / np.abs(np.where(want == 0, 1.0, want))
    log_abs, log_rel, at = err.max(), rel.max(), u1[rel.argmax()]
    err = np.abs(_vector_function(cpu_isa, 1, w) - np.cos(2 * np.pi * u2))
    cos_abs, cos_at = err.max(), u2[err.argmax()]
    err = np.abs(_vector_function(cpu_isa, 2, w) - np.sin(2 * np.pi * u2))
    sin_abs, sin_at = err.max(), u2[err.argmax()]
    print(f"{cpu_isa}: ln: worst absolute error {log_abs:.3g}, relative {log_rel:.3g} (at u = {at:.9g}); "
          f"cos(2 pi u): worst absolute error {cos_abs:.3g} (at u = {cos_at:.9g}); "
          f"sin(2 pi u): worst absolute error {sin_abs:.3g} (at u = {sin_at:.9g})")
    # a float32 result is rounded to within 6e-8 relative (1/2 ulp): allow about 2 ulp
    assert log_rel <= 2.5e-7 and log_abs <= 1e-6
    assert cos_abs <= 1.5e-7 and sin_abs <= 1.5e-7


def test_the_cap_never_raises_the_instruction_set():
    best = compiled.best_cpu_isa()
    before = compiled.cpu_isa()
    try:
        assert compiled.set_cpu_isa("avx512") == best  # "no cap": the best the CPU has
        assert compiled.set_cpu_isa("portable") == "portable" == relayops.cpu_isa()
        assert relayops.set_cpu_isa("avx2") == ("avx2" if best != "portable" else "portable")
        with pytest.raises(ValueError, match="cap must be one of"):
            relayops.set_cpu_isa("sse9")
        with pytest.raises(TypeError, match="cap must be a str"):
            relayops.set_cpu_isa(2)
    finally:
        compiled.set_cpu_isa(before)


_ENV_SCRIPT = "import relayops; print('isa', relayops.cpu_isa())"


def test_environment_variable_caps_at_import():
    env = dict(os.environ, RELAYOPS_CPU_ISA="portable")
    done = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "isa portable" in done.stdout, done.stderr[-2000:]
    env["RELAYOPS_CPU_ISA"] = "scalar"
    done = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "RELAYOPS_CPU_ISA must be one of" in done.stderr


CROSS = "aarch64-linux-gnu-g++"
# The CPU module's C++ sources but its pybind11 module: kernels.cpp (the portable build), its
# instruction-set builds kernels_avx512.cpp and kernels_avx2.cpp (empty but for GCC on x86-64) and
# dispatch.cpp.
CPU_SOURCES = sorted(p for p in (ROOT / "csrc/cpu").glob("*.cpp") if p.name != "module.cpp")
_NEEDS_CROSS = pytest.mark.skipif(shutil.which(CROSS) is None,
                                  reason=f"no aarch64 cross compiler ({CROSS}; Debian: g++-aarch64-linux-gnu)")

# The includes vector_rows.h expects before it (see its header).
_AARCH64_PRELUDE = """
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <arm_neon.h>
#include "relayops/philox.h"
namespace portable {
#define RELAYOPS_VECTOR_BYTES 16
#include "vector_rows.h"
}
"""
_AARCH64_ROWS = _AARCH64_PRELUDE + """
void rows(const uint32_t* w, int64_t n, float* a, float* b) { portable::box_muller_row(w, 1, n, a, b); }
void words(const relayops::PhiloxKey& key, uint64_t base, int64_t n, uint32_t* w) {
  portable::philox_row(key, base, n, w);
}
"""


def _aarch64_asm(tmp_path, source: str, *flags: str) -> str:
    """source compiled to aarch64 assembly with csrc/cpu and csrc/include on the include path."""
    src, asm = tmp_path / "rows.cpp", tmp_path / "rows.s"
    src.write_text(source)
    subprocess.run([CROSS, "-std=c++17", "-O2", *flags, "-S", f"-I{ROOT / 'csrc/cpu'}",
                    f"-I{ROOT / 'csrc/include'}", str(src), "-o", str(asm)], check=True, capture_output=True, text=True)
    return asm.read_text()


@_NEEDS_CROSS
def test_portable_rows_vectorise_for_aarch64(tmp_path):
    """The portable Box-Muller rows built for aarch64 use NEON vector sqrt, FMA and divide; the
    Philox rows NEON widening multiplies (two 32 x 32 -> 64-bit products per umull / umull2)."""
    text = _aarch64_asm(tmp_path, _AARCH64_ROWS, "-fno-math-errno")
    for op in ("fsqrt", "fmla", "fdiv"):
        assert re.search(rf"\b{op}\s+v\d+\.4s", text), f"no 4-lane {op} in the aarch64 build of box_muller_row"
    for op in ("umull", "umull2"):
        assert re.search(rf"\b{op}\s+v\d+\.2d", text), f"no {op} in the aarch64 build of philox_row"


_AARCH64_BLUR = _AARCH64_PRELUDE + """
void blur(const float* const* in, float* const* out, int64_t w, const float (*a)[4]) {
  portable::blur_rows<4>(in, out, w, a, 0.999f, 0.001f, nullptr, 0.0f, 0);
}
"""


@_NEEDS_CROSS
def test_portable_blur_rows_vectorise_for_aarch64(tmp_path):
    """The portable path's fused blur rows (s = 4) built for aarch64 are 4-lane NEON FMAs."""
    text = _aarch64_asm(tmp_path, _AARCH64_BLUR)
    assert re.search(r"\bfmla\s+v\d+\.4s", text), "no 4-lane fmla in the aarch64 build of blur_rows"


_NEEDS_QEMU = pytest.mark.skipif(shutil.which(CROSS) is None or shutil.which("qemu-aarch64") is None,
                                 reason=f"needs {CROSS} and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, qemu-user)")
_ELEMENT_BYTES = {int(code): torch.empty(0, dtype=dtype).element_size() for dtype, code in compiled.DTYPE_CODES.items()}


@pytest.fixture(scope="module")
def aarch64_runner(tmp_path_factory):
    """tests/aarch64_runner.cpp and the CPU kernels (CPU_SOURCES) built for aarch64 (static, OpenMP)."""
    exe = tmp_path_factory.mktemp("aarch64") / "runner"
    sources = (*CPU_SOURCES, ROOT / "tests/aarch64_runner.cpp")
    subprocess.run([CROSS, "-std=c++17", "-O1", "-fopenmp", "-fno-math-errno", "-static", f"-I{ROOT / 'csrc/include'}",
                    f"-I{ROOT / 'csrc/cpu'}", *map(str, sources), "-o", str(exe)], check=True, capture_output=True,
                   text=True)
    return exe


def _run_under_qemu(runner: Path, workdir: Path):
    """A stand-in for relayops._C.run that runs the call in the aarch64 build under qemu: the
    memory each pointer reaches (from the shape and strides) goes to the runner in a file, and the
    output comes back into the output tensor's memory."""
    def run(mode, dtype, s, shape, views, per_sample, seeds, scalars, seed, offset, flags, cuda_tiles=False):
        regions = []

        def region(ptr, nbytes):
            if not ptr:
                return 0
            regions.append(ctypes.string_at(ptr, nbytes))
            return len(regions)

        size, acc_size = _ELEMENT_BYTES[int(dtype)], 8 if int(dtype) == int(compiled.DType.float64) else 4
        b = shape[0]
        words = [int(mode), int(dtype), s, *shape]
        for ptr, *strides in views:
            extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
            words += [region(ptr, extent * size), *strides]
        words += [region(p, (b * s * s if i == 4 else b) * acc_size) for i, p in enumerate(per_sample)]
        words.append(region(seeds, 8 * b))
        header = struct.pack(f"<{len(words)}q4d2Q5q", *words, *scalars, seed, offset, *flags, int(cuda_tiles))
        body = b"".join(struct.pack("<q", len(r)) + r for r in regions)
        (workdir / "call.bin").write_bytes(header + struct.pack("<q", len(regions)) + body)
        subprocess.run(["qemu-aarch64", str(runner), str(workdir / "call.bin"), str(workdir / "out.bin")], check=True,
                       capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        result = (workdir / "out.bin").read_bytes()
        ctypes.memmove(views[7][0], result, len(result))

    return run


AARCH64_SHAPES = [(2, 3, 8, 12, 4), (1, 4, 16, 8, 8), (3, 2, 6, 4, 2), (2, 1, 9, 6, 3), (1, 2, 16, 32, 16)]


@_NEEDS_QEMU
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_op_matrix_on_aarch64(aarch64_runner, tmp_path, monkeypatch, dtype):
    """Every op case of the shared matrix, run by the aarch64 build of the CPU kernels (the portable
    path: NEON Philox, Box-Muller and fused blur) under qemu-aarch64, against the float64
    reference: fused blur rows (s = 2, 4), the two-pass rows (s = 8, 16) and per-patch code (s = 3)."""
    monkeypatch.setattr(compiled._C, "run", _run_under_qemu(aarch64_runner, tmp_path))
    for shape in AARCH64_SHAPES:
        inputs, exact = matrix.make_inputs(shape, dtype, "cpu")
        for name in matrix.CASES:
            matrix.check_case(name, ("cpu", "cpu"), inputs, exact, shape[4], dtype)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="no clang++ (Debian: clang)")
def test_cpu_kernels_compile_with_clang(tmp_path):
    """The CPU kernels compile with clang++ as well as GCC (their vector-extension rows use each
    compiler's shuffle builtin; OpenMP is left out: clang's runtime headers are a separate
    package). With clang only the portable build is made (the AVX files compile to nothing).
    -O0: whether clang accepts the code does not depend on the optimiser, which takes most of
    the time at -O1 (the aarch64 test below checks clang's vectorised code)."""
    done = subprocess.run(["clang++", "-std=c++17", "-O0", "-c", f"-I{ROOT / 'csrc/include'}",
                           f"-I{ROOT / 'csrc/cpu'}", *map(str, CPU_SOURCES)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]


@_NEEDS_CROSS
@pytest.mark.skipif(shutil.which("clang++") is None, reason="no clang++ (Debian: clang)")
def test_cpu_kernels_compile_with_clang_for_aarch64(tmp_path):
    """The build Apple silicon gets (clang, aarch64; here with the cross toolchain's headers):
    csrc/cpu/kernels.cpp compiles, its Philox rows use NEON widening multiplies and its Box-Muller
    and blur rows 4-lane FMAs."""
    asm = tmp_path / "kernels.s"
    done = subprocess.run(["clang++", "--target=aarch64-linux-gnu", "-std=c++17", "-O1", "-S",
                           f"-I{ROOT / 'csrc/include'}", str(ROOT / "csrc/cpu/kernels.cpp"), "-o", str(asm)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    text = asm.read_text()
    for op, lanes in (("umull", "2d"), ("umull2", "2d"), ("fmla", "4s"), ("fsqrt", "4s")):
        assert re.search(rf"\b{op}\s+v\d+\.{lanes}", text), f"no {op} .{lanes} in clang's aarch64 build"


@_NEEDS_CROSS
def test_cpu_kernels_compile_for_aarch64(tmp_path):
    """The CPU kernels (no torch or pybind11 headers) compile for aarch64 with OpenMP."""
    done = subprocess.run([CROSS, "-std=c++17", "-O0", "-fopenmp", "-fno-math-errno", "-c",
                           f"-I{ROOT / 'csrc/include'}", *map(str, CPU_SOURCES)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64" or shutil.which("g++") is None
                    or shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs g++, nm and objdump on x86-64 Linux")
def test_avx512_build_shares_only_baseline_code(tmp_path):
    """The AVX-512 build of kernels.cpp defines the inline functions and template instances of the
    shared headers too (as weak symbols); the linker keeps one copy of each for all three builds,
    so those must be baseline code, or an AVX2 or older CPU would run AVX-512 instructions. Every
    function the object exports or shares has no VEX/EVEX instruction (AVX's v-prefixed forms);
    its own row code (internal symbols) does. -O0 keeps the header functions out of line."""
    obj = tmp_path / "kernels_avx512.o"
    subprocess.run(["g++", "-std=c++17", "-O0", "-fopenmp", "-fno-math-errno", "-c", f"-I{ROOT / 'csrc/include'}",
                    str(ROOT / "csrc/cpu/kernels_avx512.cpp"), "-o", str(obj)], check=True, capture_output=True)
    shared = {line.split()[-1] for line in subprocess.run(["nm", str(obj)], capture_output=True, text=True,
                                                          check=True).stdout.splitlines()
              if len(line.split()) == 3 and line.split()[1] in "TWV"}
    vex, name = {}, None
    for line in subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        head = re.match(r"[0-9a-f]+ <(.+)>:$", line)
        if head:
            name = head.group(1)
        elif name and re.match(r"\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):
            vex[name] = vex.get(name, 0) + 1
    assert len(shared) > 100 and sum(1 for n in vex if "avx512" in n) > 10    # both kinds are there
    assert not shared & set(vex), sorted(shared & set(vex))[:5]
