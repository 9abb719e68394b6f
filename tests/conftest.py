"""Test setup: run Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_backends():
    """Backends that run on CPU tensors in the test suite."""
    return ("torch", "triton")
