import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on a machine without a GPU. The variable must be set before
# any @triton.jit function is defined, i.e. before gnsrepro.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs two workers) each worker is one of several processes sharing the cores:
# torch's default of one intra-op thread per core in every worker oversubscribes them (in-process training ran up to
# 6x slower on two cores), so each worker takes its share, and so do the processes it starts that inherit its env.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small pycode corpus prepared once for the whole session."""
    from gnsrepro.config import DataConfig
    from gnsrepro.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    prepare(DataConfig(name="pycode", data_dir=str(root), max_bytes=1_500_000, num_proc=2))
    return root
