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
