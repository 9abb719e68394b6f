"""Test setup: run Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    """Without CUDA the gpu tests skip. On a GPU machine run the suite twice: ``TRITON_INTERPRET=1 pytest -m 'not
    gpu'`` (Triton kernels on CPU tensors need the interpreter) and ``pytest -m gpu`` (the compiled kernels)."""
    if HAS_CUDA and not INTERPRETING:
        return
    reason = "needs a CUDA device" if not HAS_CUDA else "TRITON_INTERPRET=1: run the gpu tests without it"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cpu_backends():
    """Backends that run on CPU tensors in the test suite."""
    return ("torch", "triton")
