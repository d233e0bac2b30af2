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
