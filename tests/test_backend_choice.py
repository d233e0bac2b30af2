"""Backend choice (docs/design.md): backend=, then RELAYOPS_BACKEND, then automatic by device and dtype."""
import pytest
import torch

import relayops
from relayops import choose_backend

AVAILABLE = relayops.available_backends()
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_explicit_keyword_wins(monkeypatch):
    monkeypatch.setenv("RELAYOPS_BACKEND", "cpu")
    assert choose_backend("reference", CPU) == "reference"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("RELAYOPS_BACKEND", "reference")
    assert choose_backend(None, CPU) == "reference"
    monkeypatch.setenv("RELAYOPS_BACKEND", "auto")
    assert choose_backend(None, CPU) == ("cpu" if "cpu" in AVAILABLE else "reference")
    monkeypatch.setenv("RELAYOPS_BACKEND", "vulkan")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(None, CPU)


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("RELAYOPS_BACKEND", raising=False)
    assert choose_backend(None, CPU, torch.float32) == ("cpu" if "cpu" in AVAILABLE else "reference")
    on_cuda = "cuda" if "cuda" in AVAILABLE else "triton" if "triton" in AVAILABLE else "reference"
    assert choose_backend(None, CUDA, torch.float32) == on_cuda
    # Triton computes in float32: float64 CUDA tensors go to compiled CUDA or the reference
    assert choose_backend(None, CUDA, torch.float64) == ("cuda" if "cuda" in AVAILABLE else "reference")


def test_backend_must_fit_the_device():
    if "cpu" in AVAILABLE:
        with pytest.raises(ValueError, match="cannot run tensors on cuda"):
            choose_backend("cpu", CUDA)
    if "cuda" not in AVAILABLE:
        with pytest.raises(ValueError, match="is not available here"):
            choose_backend("cuda", CUDA)


class _ModuleWithoutImage:
    """Stands in for a relayops._C_cuda built without the GPU's architecture."""
    archs = "80,90"

    @staticmethod
    def has_kernel_image(device):
        return False


def test_cuda_build_without_the_gpus_architecture(monkeypatch):
    """A CUDA build that lacks the GPU's architecture: the message names the GPU, its sm_XY and the
    architectures built, and says how to rebuild."""
    from relayops.ops import _compiled

    monkeypatch.setattr(_compiled, "_C_cuda", _ModuleWithoutImage)
    monkeypatch.setattr(_compiled, "_missing_image", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    problem = _compiled.cuda_device_problem(torch.device("cuda", 0))
    assert "Tesla T4 (sm_75)" in problem and "sm_80, sm_90" in problem and "RELAYOPS_CUDA_ARCHS=75" in problem


def test_automatic_choice_skips_a_backend_that_cannot_run_on_the_device(monkeypatch):
    """The automatic choice falls back (one warning per device); an explicit request raises the
    backend's reason."""
    from relayops.ops import _backend

    tables = dict(_backend._tables, cuda={}, triton={})
    monkeypatch.setattr(_backend, "_tables", tables)
    monkeypatch.setattr(_backend, "_dtypes", dict(_backend._dtypes, cuda=(torch.float32,), triton=(torch.float32,)))
    monkeypatch.setattr(_backend, "_device_checks", {"cuda": lambda d: "no kernel image for this GPU"})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("RELAYOPS_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="no kernel image for this GPU; using the next backend"):
        assert choose_backend(None, CUDA, torch.float32) == "triton"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend(None, CUDA, torch.float32) == "triton"  # no second warning
    with pytest.raises(ValueError, match="no kernel image for this GPU"):
        choose_backend("cuda", CUDA)
