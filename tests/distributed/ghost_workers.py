"""Worker body for the ghost-BN DDP equivalence test (run by dist_harness.run_workers).

Each of K gloo processes trains the same small conv net with torch.nn.BatchNorm2d (per-process
statistics) under DistributedDataParallel: at every step it takes slice ``rank`` (``n``
consecutive images, or interleaved: images ``rank, rank + K, ...``) of the global batch, and records its state_dict and loss after the step.
The parent compares rank 0's record with one process running GhostBatchNorm2d on the whole
global batch. The worker asserts nothing itself.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn


def small_net(norm: Callable[[int], nn.Module]) -> nn.Module:
    """conv-norm-relu x2, pool, linear; the same weights for any norm (seeded, the norm layers
    draw nothing at init)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), norm(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def ddp_bn_worker(rank: int, world: int, out: str) -> None:
    import normlab.distributed as nd

    data = torch.load(os.path.join(out, "data.pt"))
    n = data["n"]
    model = nd.wrap_ddp(small_net(nn.BatchNorm2d), "cpu")
    opt = sgd(model, data["lr"])
    record = []
    for x, y in zip(data["x"], data["y"]):
        # interleaved: rank r gets images r, r + K, ... (how DistributedSampler deals them)
        mine = slice(rank, None, world) if data["interleaved"] else slice(rank * n, (rank + 1) * n)
        xs, ys = x[mine], y[mine]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        opt.step()
        state = {k: v.detach().clone() for k, v in nd.unwrap(model).state_dict().items()}
        record.append({"state": state, "loss": loss.item()})
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
