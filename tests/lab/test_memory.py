"""The peak-memory meter the runs record (``peak_memory_mb``): on the CPU the tensor bytes of a
training step, counted against the sizes written out by hand; on CUDA the allocator's peak."""

import pytest
import torch

from normlab.lab.memory import PeakMemory


def test_cpu_step_counts_saved_activations_parameters_gradients_and_momentum():
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 500)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 1000) + 3.0
    with PeakMemory(torch.device("cpu")) as meter:
        assert meter.peak_mib() is None                    # nothing measured yet
        with meter.step(model, opt):
            model(x).relu().sum().backward()
            opt.step()
    # the linear layer saves its input (64 x 1000) and its weight; relu saves its output
    # (64 x 500); then weight + bias, their gradients and their momentum buffers
    params = (1000 * 500 + 500) * 4
    expected = 64 * 1000 * 4 + 64 * 500 * 4 + 3 * params
    assert meter.peak_mib() == pytest.approx(expected / 2**20)


def test_cpu_peak_is_the_largest_step():
    model = torch.nn.Linear(100, 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with PeakMemory(torch.device("cpu")) as meter:
        for batch in (512, 8):                            # the large step sets the peak
            with meter.step(model, opt):
                model(torch.randn(batch, 100)).sum().backward()
                opt.step()
    assert meter.peak_mib() == pytest.approx((512 * 100 * 4 + 2 * (100 * 100 + 100) * 4) / 2**20)


@pytest.mark.lab_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_the_allocator_peak():
    dev = torch.device("cuda")
    with PeakMemory(dev) as meter:
        x = torch.ones(64 * 2**20 // 4, device=dev)
        del x
    assert meter.peak_mib() >= 64
