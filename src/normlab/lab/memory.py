"""Peak memory of a run, for the cost table of the report (``peak_memory_mb`` in the store).

* CUDA: ``torch.cuda.max_memory_allocated`` since the meter started (it resets the device's
  peak statistics): the bytes the caching allocator handed to tensors, in MiB; the allocator's
  cache and the CUDA context are not counted.
* CPU (Linux): the process's resident set, sampled every ``interval`` seconds by a daemon thread
  from ``/proc/self/statm``; the peak minus the resident set when the meter started, in MiB:
  what the run added (model, optimizer state, activations, gradients, a data set it loaded).
  Sampling can miss a peak shorter than the interval. Other systems: None (not measured).

Example::

    >>> import torch
    >>> with PeakMemory(torch.device("cpu")) as meter:
    ...     x = torch.ones(1 << 20)
    >>> meter.peak_mib() is None or meter.peak_mib() >= 0
    True
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import torch

__all__ = ["PeakMemory"]

_STATM = "/proc/self/statm"


def _resident_bytes() -> Optional[int]:
    """This process's resident set size in bytes (Linux), else None."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring the peak memory of the block on ``device`` (module docstring);
    :meth:`peak_mib` may be read inside the block (the peak so far) or after it."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.device = torch.device(device)
        self.interval = float(interval)
        self._base: Optional[int] = None
        self._peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._peak = _resident_bytes()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, name="normlab-peak-memory",
                                            daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        now = _resident_bytes()
        if now is not None and self._peak is not None:
            self._peak = max(self._peak, now)

    def peak_mib(self) -> Optional[float]:
        """The peak so far in MiB (None where it is not measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._base is None:
            return None
        self._update()
        return max(0, self._peak - self._base) / 2**20

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
