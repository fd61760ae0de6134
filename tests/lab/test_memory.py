"""The peak-memory meter the runs record (``peak_memory_mb``): it sees what the block allocated."""

import sys

import pytest
import torch

from normlab.lab.memory import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_peak_counts_a_temporary_allocation():
    with PeakMemory(torch.device("cpu"), interval=0.005) as meter:
        x = torch.ones(64 * 2**20 // 4)        # 64 MiB, touched (ones writes every page)
        during = meter.peak_mib()
        del x                                   # freed: the peak stays
    assert during >= 60
    assert meter.peak_mib() >= 60


def test_cpu_peak_of_a_small_block_is_small_and_never_negative():
    with PeakMemory(torch.device("cpu")) as meter:
        torch.ones(16).sum()
    peak = meter.peak_mib()
    assert peak is None or 0 <= peak < 32


def test_bad_interval_is_a_clear_error():
    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        PeakMemory(torch.device("cpu"), interval=0)


@pytest.mark.lab_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_the_allocator_peak():
    dev = torch.device("cuda")
    with PeakMemory(dev) as meter:
        x = torch.ones(64 * 2**20 // 4, device=dev)
        del x
    assert meter.peak_mib() >= 64
