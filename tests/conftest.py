"""Shared test setup: the Triton interpreter on CPU machines, GPU tests skipped where no GPU is."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker under `pytest -n`: the workers already fill the cores, and TVM's and torch's thread
    # pools spinning beside another worker's would slow both.
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    torch.set_num_threads(1)
if not HAS_CUDA:
    # Must be set before triton is first imported (NOTES.md).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every launch runs the kernel its plan names from the first call on, so a test checks that kernel's numbers (and
# timings time it): the Gluon kernel compiles before its launch, not behind the template's. The tests of the
# background compile turn it on (test_binaries.py, test_gluon_gpu.py).
os.environ.setdefault("ATTNC_BACKGROUND_COMPILE", "0")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the lent H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _shared_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("attnc-shared-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Each test gets its own kernel cache so tests never see each other's artifacts, except tests (or modules)
    marked `shared_cache`: they only check numbers, and sharing one cache builds each of their TVM kernels once (a
    kernel is keyed by its math, so a shared entry is the kernel the test would have built)."""
    shared = request.node.get_closest_marker("shared_cache") is not None
    root = request.getfixturevalue("_shared_cache_dir") if shared else tmp_path / "attnc-cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the golden files under tests/golden/ from the current code generators")
