"""Peak memory of a run's training, for the cost table of the report (``peak_memory_mb``).

* CUDA: ``torch.cuda.max_memory_allocated`` since the meter started (it resets the device's
  peak statistics), in MiB: every tensor the caching allocator handed out at once (model,
  optimizer state, the data set the loader keeps on the device, activations); the allocator's
  cache and the CUDA context are not counted.
* CPU: the process's resident set cannot tell one run from the others in the same process (the
  allocator reuses what earlier runs freed), so the meter counts tensor bytes instead: during
  one training step (:meth:`PeakMemory.step`), the activations autograd saves for the backward
  pass, plus, after it, the parameters, their gradients and the optimizer's state (each storage
  counted once). That is the step's peak of tensor memory without the data set and without
  short-lived temporaries the allocator frees within an operation.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(1000, 1000)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> with PeakMemory(torch.device("cpu")) as meter:
    ...     with meter.step(model, opt):
    ...         model(torch.randn(100, 1000)).sum().backward()
    ...         opt.step()
    >>> round(meter.peak_mib(), 1)  # saved input 0.4 MiB + weights, grads, momentum 3 x 3.8 MiB
    11.8
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["PeakMemory"]


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class PeakMemory:
    """Context manager measuring a run's peak memory on ``device`` (module docstring);
    :meth:`peak_mib` may be read inside the block (the peak so far) or after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._peak_bytes: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    @contextlib.contextmanager
    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Around one training step (forward, backward, optimizer step) on the CPU: count the
        activations autograd saves, then the model's and optimizer's tensors. On CUDA the
        allocator's own peak is used and this does nothing."""
        if self.device.type == "cuda":
            yield
            return
        saved: dict[tuple, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "meta":
                saved.setdefault(_storage_key(t), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        state: dict[tuple, int] = {}
        tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()
                                                      if p.grad is not None]
        tensors += [v for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)]
        for t in tensors:
            state.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        total = sum(saved.values()) + sum(b for k, b in state.items() if k not in saved)
        self._peak_bytes = max(self._peak_bytes or 0, total)

    def peak_mib(self) -> Optional[float]:
        """The peak so far in MiB (None on the CPU before a measured step)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None if self._peak_bytes is None else self._peak_bytes / 2**20
