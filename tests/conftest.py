import os

import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set before
# relayops (and so relayops.triton's @triton.jit kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Fresh kernel outputs are NaN-filled under test (relayops._alloc), so a skipped element fails.
os.environ.setdefault("RELAYOPS_NAN_FILL", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_determinism():
    """Puts back the process-wide settings that a deterministic training run changes."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


# The instruction sets of the compiled CPU kernels, lowest first (relayops.set_cpu_isa).
CPU_ISAS = ("portable", "avx2", "avx512")
_ISA_FEATURES = {"avx2": "avx2 and fma", "avx512": "avx512f"}


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs the test with the compiled CPU kernels capped at each instruction set; skipped (with
    the reason) where this CPU lacks it. Puts the previous cap back afterwards."""
    compiled = pytest.importorskip("relayops.ops._compiled", reason="relayops._C is not built")
    isa = request.param
    if CPU_ISAS.index(isa) > CPU_ISAS.index(compiled.best_cpu_isa()):
        pytest.skip(f"this CPU lacks {_ISA_FEATURES[isa]} (the {isa} path runs on CPUs that have it)")
    before = compiled.cpu_isa()
    assert compiled.set_cpu_isa(isa) == isa
    yield isa
    compiled.set_cpu_isa(before)
