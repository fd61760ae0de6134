"""The lab's tests are CPU tests: gloo process groups of 2 on one machine, bitwise-equal resumes,
"cpu ..." device strings. RunConfig's device defaults to "auto" (CUDA when available), so on a
machine with a GPU every test here runs as on a CPU-only one: GPUs hidden from the processes it
starts and ``torch.cuda.is_available()`` False in this one. A test marked ``lab_gpu`` opts out
(it exercises the "auto" -> CUDA path and skips without a GPU).
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "lab_gpu: a lab test that may use the GPU (no CPU-only patch)")


@pytest.fixture(autouse=True)
def _lab_runs_on_cpu(request, monkeypatch):
    if request.node.get_closest_marker("lab_gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield
