"""Worker body for the precise_bn test under torch.distributed (run by dist_harness.run_workers).

Each gloo process recomputes the statistics of the same model over its own share of the batches
and saves them; the parent compares them with one process over all the batches. The worker
asserts nothing itself.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import normlab
import normlab.nn as nln


class Branchy(nn.Module):
    """conv-BN, InstanceNorm with running stats, and a BN only batches of more than 4 images
    reach (on one process only: the others contribute nothing to it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.inn = nln.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.extra = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.inn(torch.relu(self.bn(self.conv(x))))
        return self.extra(x) if x.shape[0] > 4 else x


def batches_of(rank: int) -> list:
    """Rank 0: three batches of 6 images; rank 1: two of 3 (off-centre, means differ)."""
    g = torch.Generator().manual_seed(10 + rank)
    n, count = (6, 3) if rank == 0 else (3, 2)
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) + 1 + 0.5 * (b + 3 * rank)
            for b in range(count)]


def model() -> nn.Module:
    return Branchy().double()


def precise_bn_worker(rank: int, world: int, out: str) -> None:
    net = model()
    record = normlab.precise_bn(net, batches_of(rank))
    torch.save({"state": net.state_dict(), "recomputed": sorted(record.recomputed),
                "batches": record.batches}, os.path.join(out, f"rank{rank}.pt"))
