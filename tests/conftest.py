"""Shared test setup.

Triton kernels are tested on CPU tensors through Triton's interpreter when no GPU is present:
TRITON_INTERPRET must be set before triton is first imported, so it is set here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Test helpers (tests/formula.py) are imported by name: put this folder on the path.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
