"""The offline GPU model (docs/gpu-model.md): every CUDA and Triton kernel's sm_90 machine code
against its budget in bench/gpu_budgets.py, without a GPU.

The CUDA kernels are read from the fat binary of the built relayops/_C_cuda*.so (CI builds it:
nvcc is installed there); the Triton kernels are compiled for sm_90 from the launches the Triton
ops make. The tests skip only where the tools are absent: no nvcc (so no CUDA module), no
cuobjdump (it ships with the CUDA toolkit and inside the triton package), or no triton. Budgets
listed in gpu_budgets.PENDING are reported, not enforced: CUDA ones as skips that give the numbers,
Triton ones by bench/sass_report.py (the test compiles only the Triton kernels it enforces, plus
patch_dct's).
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_budgets as budgets  # noqa: E402
import sass_report  # noqa: E402

# ----------------------------------------------------------------------------- the parser, by hand

HANDWRITTEN = """
        Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                   /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P1 LDG.E.U16 R9, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R4, R4, R5 ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/               @P2 BRA 0x80 ;
        /*0070*/                   CALL.REL.NOINC 0xa0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   NOP ;
        /*00a0*/                   STL [R1], R0 ;
        /*00b0*/                   RET.REL.NODEC R2 0x0 ;
        /*00c0*/                   BRA 0xc0;
"""


def test_parser_reads_loops_widths_and_subroutines():
    """Counted by hand from HANDWRITTEN: 9 body instructions (NOP, the subroutine at 0xa0-0xb0 and
    the closing self-branch excluded); one loop 0x10-0x50 of 5 instructions holding one 128-bit
    store; loads 1 x 128 and 1 x 16 bits; one local-memory instruction (in the subroutine)."""
    code = sass_report.analyse(sass_report.parse_sass(HANDWRITTEN)["k"])
    assert code.body == 9 and code.subroutines == 2 and code.calls == 1 and code.forward_branches == 1
    assert code.loads == {16: 1, 128: 1} and code.stores == {128: 1} and code.local == 1
    (loop,) = code.loops
    assert (loop.start, loop.end, loop.size, loop.stores, loop.innermost) == (0x10, 0x50, 5, 1, True)
    assert sass_report.hot_loop(code) is loop


def test_a_call_inside_the_body_is_no_subroutine():
    """sm_80 code calls the next instruction to reconverge a warp; only targets after the last
    EXIT are out-of-line subroutines."""
    text = """
        Function : k
        /*0000*/               @P1 CALL.REL.NOINC 0x10 ;
        /*0010*/                   FADD R0, R0, R0 ;
        /*0020*/                   EXIT ;
        /*0030*/                   RET.REL.NODEC R2 0x0 ;
        /*0040*/                   BRA 0x40;
"""
    code = sass_report.analyse(sass_report.parse_sass(text)["k"])
    assert (code.body, code.subroutines, code.calls) == (4, 0, 1)


def test_parser_reads_resource_usage():
    text = """
 Function _Z3fooPf:
  REG:27 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert sass_report.parse_res_usage(text) == {
        "_Z3fooPf": {"REG": 27, "STACK": 8, "SHARED": 1024, "LOCAL": 0, "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}


def test_kernel_names_and_template_parameters():
    name = sass_report.short_cuda_name(
        "void relayops::cuda::(anonymous namespace)::tile_kernel<4, relayops::bfloat16_t, float>"
        "(relayops::Params<float>, relayops::TileGeom)")
    assert name == "tile_kernel<4, relayops::bfloat16_t, float>"
    assert sass_report.cuda_params(name) == {"S": 4, "dtype": "bfloat16"}


def test_budget_check_names_each_miss():
    """problems() on made-up rows: a kernel within every limit passes; each miss is named."""
    good = {"per_element": 10.0, "note": "", "local_instructions": 0, "registers": 40, "per": "thread",
            "elements": 16, "counted_loads": {128: 4, 32: 1}, "counted_stores": {128: 4}}
    assert problems(good, "patch_dct", 16, 128) == []
    bad = {**good, "per_element": 17.0, "local_instructions": 2, "registers": 130, "counted_loads": {"128": 3},
           "counted_stores": {"128": 4, "32": 1}}
    found = " | ".join(problems(bad, "patch_dct", 16, 128))
    for words in ("17.0 instructions per element > 16", "2 local-memory", "130 registers > 128",
                  "narrower than 128 bits: {'32': 1}", "3 128-bit loads per thread, the image inputs need 4"):
        assert words in found, found


def test_docs_show_the_budget_table():
    """docs/gpu-model.md holds the table gpu_budgets.markdown() prints (one source of truth)."""
    assert budgets.markdown() in (ROOT / "docs" / "gpu-model.md").read_text()


# ----------------------------------------------------------------------------- the kernels


def _tools() -> str:
    cuobjdump = sass_report.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump here (neither the CUDA toolkit's nor the triton package's); CI has both")
    return cuobjdump


@pytest.fixture(scope="module")
def cuda_rows_if_built():
    """The CUDA rows, or None where nvcc is absent (so the module is not built)."""
    cuobjdump = _tools()
    so = sass_report.cuda_module()
    if so is None:
        if shutil.which("nvcc") is None:
            return None
        pytest.fail("nvcc is installed but relayops/_C_cuda*.so is not built: python setup.py build_ext --inplace")
    rows = sass_report.cuda_rows(so, budgets.ARCH, cuobjdump)
    assert rows, f"{so.name} holds no sm_{budgets.ARCH} code (built with RELAYOPS_CUDA_ARCHS without {budgets.ARCH}?)"
    return rows


@pytest.fixture(scope="module")
def cuda_rows(cuda_rows_if_built):
    if cuda_rows_if_built is None:
        pytest.skip("no nvcc here, so relayops._C_cuda is not built (CI builds it)")
    return cuda_rows_if_built


# Triton kernels compiled by the test: those with enforced budgets, plus patch_dct (a quick compile)
# so the kernel table is always checked against a launch. Pending ones are reported by the tool.
def _triton_ops() -> list[str]:
    return [op for op in budgets.OPS if op == "patch_dct" or ("triton", op) not in budgets.PENDING]


@pytest.fixture(scope="module")
def triton_rows():
    cuobjdump = _tools()
    pytest.importorskip("triton")
    return sass_report.triton_rows_subprocess(_triton_ops(), [budgets.DTYPE], [budgets.ARCH], cuobjdump)


def _row(rows, op):
    found = [r for r in rows if r["op"] == op and r["s"] == budgets.S and r["dtype"] == budgets.DTYPE
             and r["arch"] == budgets.ARCH]
    return found


def problems(row: dict, op: str, limit: float, max_registers: int | None) -> list[str]:
    """What in ``row`` misses its budget (empty when it meets it)."""
    out = []
    if row["per_element"] is None:
        return [f"no per-element count ({row['note']})"]
    if row["per_element"] > limit:
        out.append(f"{row['per_element']:.1f} instructions per element > {limit:g}")
    if row["local_instructions"] > budgets.MAX_LOCAL_INSTRUCTIONS:
        out.append(f"{row['local_instructions']} local-memory instructions (spills or a stack array)")
    if max_registers is not None and row["registers"] > max_registers:
        out.append(f"{row['registers']} registers > {max_registers}")
    narrow_stores = {b: n for b, n in row["counted_stores"].items() if int(b) != budgets.WIDE_BITS}
    if narrow_stores:
        out.append(f"global stores narrower than {budgets.WIDE_BITS} bits: {narrow_stores}")
    wide_loads = row["counted_loads"].get(budgets.WIDE_BITS, row["counted_loads"].get(str(budgets.WIDE_BITS), 0))
    needed = budgets.IMAGE_INPUTS[op] * row["elements"] * 32 / budgets.WIDE_BITS
    if wide_loads < needed:
        out.append(f"{wide_loads} {budgets.WIDE_BITS}-bit loads per {row['per']}, the image inputs need {needed:g}")
    return out


def _judge(backend: str, op: str, row: dict | None, limit: float, max_registers=None):
    pending = (backend, op) in budgets.PENDING
    if row is None:
        why = f"no {backend} kernel for {op} at s = {budgets.S}, {budgets.DTYPE}, sm_{budgets.ARCH} in the kernel table"
        if pending:
            pytest.skip(f"pending budget (not enforced): {why}")
        pytest.fail(why)
    found = problems(row, op, limit, max_registers)
    summary = (f"{backend} {op}: `{row['kernel']}` {row['per_element'] or float('nan'):.1f} instr/elem "
               f"(budget {limit:g}), {row['registers']} registers")
    if pending:
        pytest.skip(f"pending budget (not enforced): {summary}; " + ("; ".join(found) or "meets it: enforce it"))
    assert not found, f"{summary}: " + "; ".join(found)


@pytest.mark.parametrize("op", budgets.OPS)
def test_cuda_kernel_meets_its_budget(cuda_rows, op):
    rows = _row(cuda_rows, op)
    assert len(rows) <= 1, f"several CUDA kernels claim {op}: {[r['kernel'] for r in rows]}"
    _judge("cuda", op, rows[0] if rows else None, budgets.instruction_budget("cuda", op))


@pytest.mark.parametrize("op", budgets.OPS)
def test_triton_kernel_meets_its_budget(cuda_rows_if_built, triton_rows, op):
    if op not in _triton_ops():
        pytest.skip(f"pending budget (not enforced), not compiled here: python bench/sass_report.py --ops {op}")
    rows = _row(triton_rows, op)
    assert len(rows) <= 1, f"{op} launches several Triton kernels: {[r['kernel'] for r in rows]}"
    cuda = _row(cuda_rows_if_built or [], op)
    measured = cuda[0]["per_element"] if cuda else None
    _judge("triton", op, rows[0] if rows else None, budgets.instruction_budget("triton", op, measured),
           budgets.TRITON_MAX_REGISTERS)


def test_triton_table_matches_the_launches(triton_rows):
    """The kernel table's output elements per thread (per loop trip for loop kernels) against what
    the op's launch does at sass_report.CHECK_SHAPE, a width every program tiles: output elements
    / (threads x trips). Idle lanes at the plane's edge may cost the launch up to 5%; it may never
    do more than the table claims (that would understate instructions per element)."""
    assert triton_rows, "no Triton kernel compiled"
    for row in triton_rows:
        claimed, launched = row["launch_claimed"], row["launch_elements"]
        assert claimed is not None, f"{row['kernel']} ({row['op']}) is not in the kernel table"
        where = f"{row['kernel']} ({row['op']}): the kernel table says {claimed}, the launch gives {launched}"
        assert 0.95 * claimed <= launched <= claimed * (1 + 1e-9), where


def test_every_kernel_is_read(cuda_rows):
    """The report finds the module's kernels and parses each (a format change in cuobjdump would
    show as empty bodies here)."""
    assert cuda_rows and all(r["body"] > 0 and r["registers"] for r in cuda_rows)
    assert all(re.fullmatch(r"[\w:<>, ]+", r["kernel"]) for r in cuda_rows), [r["kernel"] for r in cuda_rows]
