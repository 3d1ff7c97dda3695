import os

import pytest
import torch

# Triton kernels run in the interpreter on a machine without a GPU. The variable must be set before
# any @triton.jit function is defined, i.e. before gnsrepro.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
