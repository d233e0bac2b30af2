"""The specialised CUDA kernels (csrc/include/relayops/patch_kernels.h) run on the CPU, thread by
thread and warp by warp, through relayops._C.emulate_cuda: the same choice of kernel as
relayops._C_cuda, the same grid, the same per-thread bodies. Their outputs against the float64
reference for every op, patch size, dtype and odd and even image sizes (the noise ops: every case
of tests/test_backends.py, drawn and given noise, per-sample seeds, offsets, Heun, second order);
which inputs fall back to the tile kernel; and, from every warp's recorded global accesses, that
float32 at s = 4 moves whole 32-byte sectors with 128-bit accesses.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

import relayops
import relayops.ops._compiled as compiled  # ImportError here means: run `python setup.py build_ext --inplace`

from compare import assert_close, scale_of
from test_backends import CASES, check_case, make_inputs

TILES, PATCH, BOX, RELAY = 0, 1, 2, 3  # CudaPath codes (patch_kernels.h)
SIZES = (2, 3, 4, 5, 8, 16)


def _call(name, x, s, tau):
    """One transform op on the cpu backend (the emulation, when it is switched on) or the reference."""
    def run(backend):
        if name == "patch_blur":
            return relayops.patch_blur(x if backend == "cpu" else x.double(), tau, s, backend=backend)
        if name == "block_noise_adjoint":  # the op block_noise's gradient calls
            g = x if backend == "cpu" else x.double()
            return torch.ops.relayops.block_noise(g, s, True) if backend == "cpu" else \
                relayops.reference.block_noise(g, s, adjoint=True)
        return getattr(relayops, name)(x if backend == "cpu" else x.double(), s, backend=backend)
    return run


OPS = ("patch_dct", "patch_idct", "patch_blur", "block_noise", "block_noise_adjoint")


@pytest.fixture
def emulated(monkeypatch):
    """Switch the cpu backend to the emulation of relayops._C_cuda; yields a function returning
    (path, accesses) of the last call."""
    monkeypatch.setattr(compiled, "CPU_EMULATE_CUDA", True)
    monkeypatch.setattr(compiled, "LAST_EMULATION", None)

    def last():
        assert compiled.LAST_EMULATION is not None, "the cpu backend did not run the CUDA emulation"
        return compiled.LAST_EMULATION

    yield last


def expected_path(name, s, dtype, fast_layout=True):
    """Which kernel docs/design.md says an input takes (independent of the C++ rule)."""
    if not fast_layout or not 2 <= s <= 8:
        return TILES
    if name.startswith("block_noise"):
        return BOX if dtype != torch.float64 or s <= 6 else TILES
    return PATCH


def check(name, x, s, emulated, path):
    tau = torch.tensor([0.3, 1.7, 0.05])[: x.shape[0]].to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    run = _call(name, x, s, tau)
    out = run("cpu")
    assert emulated()[0] == path, f"{name} s={s} {x.dtype} {tuple(x.shape)} took path {emulated()[0]}, not {path}"
    want = run("reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.dtype == torch.float64:
        atol = 1e-12 * scale_of(want)
    elif x.dtype == torch.float32:
        atol = 2e-6 * scale_of(want)
    else:  # half storage: within twice the rounding error of the reference computed in float32 and rounded
        same = _call(name, x.float(), s, tau.float())("reference").to(x.dtype).double()
        atol = 2 * (same - want).abs().max().item() + 1e-6
    assert_close(out, want, atol=atol, what=f"{name} s={s} {x.dtype} {tuple(x.shape)}")


def _shapes(s):
    """(B, C, H, W): H = W = s (wraparound over the whole image), odd and even patch counts,
    several warps per row and several bands of rows (block noise walks about 32 rows)."""
    return [(1, 1, s, s), (2, 3, 3 * s, 5 * s), (1, 2, 18 * s, 37 * s)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("s", SIZES)
@pytest.mark.parametrize("name", OPS)
def test_values_against_the_reference(emulated, name, s, dtype):
    gen = torch.Generator().manual_seed(s)
    for shape in _shapes(s):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        check(name, x, s, emulated, expected_path(name, s, dtype))


def _layouts(x, s):
    """(name, tensor with x's values, whether the specialised kernels take it)."""
    b, c, h, w = x.shape
    wide = torch.zeros(b, c, h, w + 8, dtype=x.dtype)
    wide[..., 1 : w + 1] = x
    aligned = torch.zeros(b, c, h, w + 16, dtype=x.dtype)
    aligned[..., 16 : w + 16] = x
    return [
        ("contiguous", x, True),
        ("transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2), False),  # columns contiguous
        ("channels_last", x.contiguous(memory_format=torch.channels_last), False),  # C = 3 > 1
        ("misaligned", wide[..., 1 : w + 1], False),  # data pointer one element past a vector
        ("offset_aligned", aligned[..., 16 : w + 16], True),  # row stride w + 16, base 16 elements in
    ]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("s", (4, 5, 8))
@pytest.mark.parametrize("name", OPS)
def test_fallback_selection(emulated, name, s, dtype):
    """Strided, channels_last and misaligned inputs take the tile kernel, aligned ones with padded
    rows the specialised kernel; both give the reference's values."""
    x = torch.randn(2, 3, 2 * s, 8 * s, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    for layout, t, fast in _layouts(x, s):
        if layout == "misaligned" and s == 5:
            fast = True  # s = 5 rows are read one element at a time: any element alignment will do
        check(name, t, s, emulated, expected_path(name, s, dtype, fast))


def test_patch_size_and_dtype_limits(emulated):
    """s = 1 and s > 8 keep the tile kernel; float64 block noise stops at s = 6."""
    for s, dtype in ((1, torch.float32), (16, torch.float32), (7, torch.float64), (8, torch.float64),
                     (6, torch.float64), (8, torch.float32)):
        x = torch.randn(1, 2, 2 * s, 3 * s, generator=torch.Generator().manual_seed(s), dtype=dtype)
        check("block_noise", x, s, emulated, expected_path("block_noise", s, dtype))
        check("patch_dct", x, s, emulated, expected_path("patch_dct", s, dtype))


# ---------------------------------------------------------------------------------------------
# Memory traffic, from every warp's recorded global accesses (warp, step, k, lane, address, bytes,
# store): accesses with the same (warp, step, k) are one instruction of that warp.


def _instructions(accesses):
    groups = defaultdict(list)
    for warp, step, k, lane, addr, nbytes, store in accesses:
        groups[warp, step, k].append((lane, addr, nbytes, store))
    return groups


def _vector_group_sectors(group, where):
    """One warp instruction's accesses: each 128 bits wide and all loads or all stores; returns
    (the number of bytes it needs, the number of 32-byte sectors those bytes lie in)."""
    assert {a[2] for a in group} == {16}, f"{where}: widths {({a[2] for a in group})}"
    assert len({a[3] for a in group}) == 1
    needed = set()
    for _, addr, nbytes, _ in group:
        needed.update(range(addr, addr + nbytes))
    return len(needed), len({b // 32 for b in needed})


def _record(name, x, s, monkeypatch):
    monkeypatch.setattr(compiled, "CPU_EMULATE_CUDA", "record")
    _call(name, x, s, torch.tensor([0.4, 1.1]))("cpu")
    path, accesses = compiled.LAST_EMULATION
    assert accesses, "nothing recorded"
    return path, accesses


@pytest.mark.parametrize("name", OPS)
def test_float32_s4_moves_whole_sectors_with_128_bit_accesses(name, monkeypatch):
    """Every warp instruction of the float32 s = 4 kernels touches exactly as many 32-byte sectors
    as its bytes need (consecutive lanes on consecutive 16-byte vectors), and every access is
    128 bits wide."""
    x = torch.randn(2, 2, 48, 4 * 72, generator=torch.Generator().manual_seed(2))
    path, accesses = _record(name, x, 4, monkeypatch)
    assert path == expected_path(name, 4, torch.float32)
    for (warp, step, k), group in _instructions(accesses).items():
        needed, sectors = _vector_group_sectors(group, f"{name}: warp {warp} step {step} access {k}")
        assert sectors == math.ceil(needed / 32), (
            f"{name}: warp {warp} step {step} access {k} touches {sectors} sectors for {needed} bytes")


@pytest.mark.parametrize("s", (3, 4, 5, 8))
@pytest.mark.parametrize("name", ("patch_dct", "patch_blur"))
def test_patch_kernels_read_and_write_every_element_once(name, s, monkeypatch):
    """The patch kernels' recorded loads cover each input element exactly once, their stores each
    output element exactly once (no overlap between threads, nothing skipped)."""
    x = torch.randn(2, 3, 3 * s, 11 * s, generator=torch.Generator().manual_seed(s))
    _, accesses = _record(name, x, s, monkeypatch)
    loads, stores = defaultdict(int), defaultdict(int)
    for *_, addr, nbytes, store in accesses:
        for byte in range(addr, addr + nbytes, 4):
            (stores if store else loads)[byte] += 1
    base = x.data_ptr()
    assert sorted(loads) == list(range(base, base + 4 * x.numel(), 4)) and set(loads.values()) == {1}
    assert len(stores) == x.numel() and set(stores.values()) == {1}


def test_block_noise_reads_each_row_once_per_band_plus_halo(monkeypatch):
    """Block noise reads each input row once per band of rows it feeds (band_rows + s - 1 rows for
    band_rows outputs), the halo by shuffles except for one vector per warp and input row (lane
    0's left neighbour): about (band_rows + s - 1) / band_rows loads per element, not s^2."""
    s = 4
    x = torch.randn(1, 1, 64, 4 * 64, generator=torch.Generator().manual_seed(5))
    _, accesses = _record("block_noise", x, s, monkeypatch)
    loaded = sum(a[5] for a in accesses if not a[6]) / 4
    stored = sum(a[5] for a in accesses if a[6]) / 4
    assert stored == x.numel()
    band_rows = 32
    own = x.numel() * (band_rows + s - 1) / band_rows
    warps, bands = 64 // 32, 64 // band_rows
    halo = warps * bands * (band_rows + s - 1) * 4  # one 4-element vector per warp and input row
    assert loaded == own + halo


def test_emulation_is_not_the_default():
    """Without the switch the cpu backend runs its own loops (no emulation result is produced)."""
    compiled.LAST_EMULATION = None
    relayops.patch_dct(torch.randn(1, 1, 8, 8), 4, backend="cpu")
    assert compiled.LAST_EMULATION is None


# ---------------------------------------------------------------------------------------------
# The noise ops: relay_noise, relay_corrupt, relay_step (Euler, Heun, second order).

NOISE_CASES = [name for name in CASES if name.startswith(("relay_noise", "relay_corrupt", "relay_step"))]


def relay_path(name, s, dtype):
    """The kernel docs/design.md says a contiguous input of noise case ``name`` takes: even s up to
    a largest s per op and accumulation type (beyond it ptxas would spill), else the tiles."""
    double = dtype == torch.float64
    if name.startswith("relay_noise"):
        largest = 6 if double else 8
    elif "heun" in name or "second" in name:
        largest = 2 if double else 4
    else:  # relay_corrupt, relay_step Euler
        largest = 4 if double else 6
    return RELAY if s % 2 == 0 and 2 <= s <= largest else TILES


def check_noise_case(emulated, name, shape, dtype):
    inputs, exact = make_inputs(shape, dtype, "cpu")
    s = shape[4]
    check_case(name, ("cpu", "cpu"), inputs, exact, s, dtype)
    assert emulated()[0] == relay_path(name, s, dtype), f"{name} {dtype} {shape} took path {emulated()[0]}"


@pytest.mark.parametrize("s", (2, 4, 6, 8))
@pytest.mark.parametrize("name", NOISE_CASES)
def test_noise_ops_against_the_reference(emulated, name, s):
    """float32, every noise case of tests/test_backends.py: odd patch counts (3 x 5; halos wrap
    around both edges); at s = 4 also H = W = s (every halo is the patch itself) and an image of
    two warps of patch columns (31 each) and several bands of rows."""
    shapes = [(2, 3, 3 * s, 5 * s, s)]
    if s == 4:
        shapes += [(1, 1, s, s, s), (1, 2, 40, 4 * 37, s)]
    for shape in shapes:
        check_noise_case(emulated, name, shape, torch.float32)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", ("relay_noise_seed_list", "relay_corrupt_given", "relay_step_heun_given",
                                  "relay_step_second_given"))
def test_noise_ops_in_other_dtypes(emulated, name, dtype):
    """float64 (at s = 2, where every op has a float64 kernel) and the 16-bit storage types (s = 4)."""
    s = 2 if dtype == torch.float64 else 4
    check_noise_case(emulated, name, (2, 3, 3 * s, 5 * s, s), dtype)


@pytest.mark.parametrize("name", ("relay_noise_given", "relay_corrupt_given", "relay_step_heun_given"))
def test_noise_ops_fallback_selection(emulated, name):
    """Odd s, misaligned and transposed images take the tile kernel (with the reference's values);
    an aligned image with padded rows takes the noise-op kernel."""
    for s, layout, path in ((3, "contiguous", TILES), (5, "contiguous", TILES), (4, "misaligned", TILES),
                            (4, "transposed", TILES), (4, "offset_aligned", RELAY)):
        inputs, exact = make_inputs((2, 3, 2 * s, 8 * s, s), torch.float32, "cpu")
        for key in ("x", "x0", "xp", "x0p", "eps", "eps2"):
            inputs[key] = next(t for lay, t, _ in _layouts(inputs[key], s) if lay == layout)
        check_case(name, ("cpu", "cpu"), inputs, exact, s, torch.float32)
        assert emulated()[0] == path, f"{name} s={s} {layout}: path {emulated()[0]}, not {path}"


def _record_case(name, shape, monkeypatch):
    monkeypatch.setattr(compiled, "CPU_EMULATE_CUDA", "record")
    inputs, _ = make_inputs(shape, torch.float32, "cpu")
    out = CASES[name][0](inputs, shape[4], "cpu")
    path, accesses = compiled.LAST_EMULATION
    assert path == RELAY and accesses
    return inputs, out, accesses


RECORDED = ("relay_noise_seed", "relay_noise_given", "relay_corrupt_seed_list", "relay_step_euler_seed",
            "relay_step_heun_given", "relay_step_second_given", "relay_step_eta0")


@pytest.mark.parametrize("name", RECORDED)
def test_noise_ops_move_whole_sectors_with_128_bit_accesses(name, monkeypatch):
    """float32, s = 4: every warp instruction is 128 bits per lane and touches exactly the 32-byte
    sectors its bytes need (lanes 1..31 on consecutive 16-byte vectors), except that a given
    eps2 row, which lane 0 reads too (the column left of lane 1's: 32 vectors 16 bytes off a
    sector boundary every other warp, or the last column of the row for the first warp), may
    touch one sector more."""
    _, _, accesses = _record_case(name, (1, 2, 12, 4 * 40, 4), monkeypatch)
    for (warp, step, k), group in _instructions(accesses).items():
        needed, sectors = _vector_group_sectors(group, f"{name}: warp {warp} step {step} access {k}")
        supplier = any(lane == 0 for lane, *_ in group)
        assert not supplier or name.endswith("_given"), f"{name}: lane 0 (the supplier) accessed memory"
        assert sectors <= math.ceil(needed / 32) + supplier, (
            f"{name}: warp {warp} step {step} access {k} touches {sectors} sectors for {needed} bytes")


@pytest.mark.parametrize("name", RECORDED)
def test_noise_ops_read_and_write_every_element_once(name, monkeypatch):
    """Each output element is stored once; each image input the op reads is loaded once per
    element (x twice for Heun: in x0_eff and in gamma x); given eps once, given eps2 once per
    element plus the s - 1 rows above each band and the supplier lane's column (lane 0 of each warp).
    Bands (docs/design.md): 64 image rows, halved down to 16 while the launch has fewer than 2048
    warps, as this small one does."""
    s, shape = 4, (1, 1, 24, 4 * 40, 4)  # 2 warps (31 columns each), bands of 16 rows (below)
    inputs, out, accesses = _record_case(name, shape, monkeypatch)
    counts = defaultdict(int)
    for *_, addr, nbytes, store in accesses:
        for byte in range(addr, addr + nbytes, 4):
            counts[byte, store] += 1

    def per_element(t, store=0):
        base = t.data_ptr()
        return torch.tensor([counts.get((base + 4 * i, store), 0) for i in range(t.numel())]).reshape(t.shape)

    assert (per_element(out, 1) == 1).all()
    reads = {"relay_noise_seed": (), "relay_noise_given": ("eps",), "relay_corrupt_seed_list": ("x",),
             "relay_step_euler_seed": ("x", "x0"), "relay_step_heun_given": ("x0", "xp", "x0p", "eps"),
             "relay_step_second_given": ("x", "x0", "x0b", "eps"), "relay_step_eta0": ("x", "x0")}[name]
    for key in reads:
        assert (per_element(inputs[key]) == 1).all(), key
    if name == "relay_step_heun_given":
        assert (per_element(inputs["x"]) == 2).all()
    if name.endswith("_given"):
        rows = torch.ones(shape[2], dtype=torch.int64)
        for h0 in range(0, shape[2], 16):  # the s - 1 rows above each band, wrapping around, are read again
            rows[[(h0 - i) % shape[2] for i in range(1, s)]] += 1
        cols = torch.ones(shape[3], dtype=torch.int64)
        cols[4 * 30: 4 * 31] += 1  # warp 1's lane 0 supplies the halo of column 30
        cols[4 * 39: 4 * 40] += 1  # warp 0's lane 0 that of the last column, wrapping around
        want = (rows[:, None] * cols[None, :]).expand(shape[:4])
        assert torch.equal(per_element(inputs["eps2"]), want)
