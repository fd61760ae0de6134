"""Worker bodies run by dist_harness.run_workers in each of W gloo processes.

Each worker reads the cases the parent test wrote (``cases.pt``), runs its rank's part and saves
what it observed to ``rank<r>.pt``; the parent computes the single-process reference and
compares. Workers assert nothing about correctness themselves.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def model_gn() -> nn.Module:
    """A small conv net with normlab GroupNorm (the DDP test's model)."""
    from normlab.nn import GroupNorm

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def model_bn() -> nn.Module:
    """The same net with torch's BatchNorm2d (converted to syncbn in the workers)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def bn_class(ndim: int):
    from normlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

    return {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[ndim]


@contextmanager
def no_collectives():
    """Make every collective this module could use raise (to prove eval does not communicate)."""
    names = ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def forbidden(*a, **k):
        raise AssertionError("a collective was called in eval mode")

    for n in saved:
        setattr(dist, n, forbidden)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def channels_last_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for 4D input, channels_last_3d for 5D."""
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def local_part(t: torch.Tensor, split: list[int], rank: int) -> torch.Tensor:
    start = sum(split[:rank])
    return t[start : start + split[rank]]


def syncbn_worker(rank: int, world: int, out: str) -> None:
    from normlab import use_backend
    from normlab.nn.syncbn import SyncBatchNorm, sync_batch_norm

    cases = torch.load(os.path.join(out, "cases.pt"))
    full_group = dist.new_group(list(range(world)))
    own_groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results = {}
    for case in cases:
        name, split, kw = case["name"], case["split"], dict(case["kwargs"])
        x_full = case["x"]
        c = x_full.shape[1]
        if case.get("process_group") == "own":  # a group of this rank alone: per-process BN
            kw["process_group"] = own_groups[rank]
        elif case.get("process_group"):
            kw["process_group"] = full_group
        m = SyncBatchNorm(c, dtype=x_full.dtype, **kw)
        if m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(case["weight"])
        if m.bias is not None:
            with torch.no_grad():
                m.bias.copy_(case["bias"])
        x = local_part(x_full, split, rank).clone()
        if case.get("channels_last"):
            x = x.contiguous(memory_format=channels_last_of(x))
        x.requires_grad_(True)
        backend = case.get("backend") or "auto"
        with use_backend(backend):
            y = m(x)
            (y * local_part(case["r"], split, rank)).sum().backward()
            with torch.no_grad():  # a second training step: the running stats compound
                m(local_part(case["x2"], split, rank))
            m.eval()
            with no_collectives(), torch.no_grad():
                y_eval = m(x.detach())
        res = {
            "y": y.detach(), "grad_x": x.grad, "y_eval": y_eval,
            "channels_last_out": y.is_contiguous(memory_format=channels_last_of(x)),
            "channels_last_grad": x.grad.is_contiguous(memory_format=channels_last_of(x)),
            "grad_w": None if m.weight is None else m.weight.grad,
            "grad_b": None if m.bias is None else m.bias.grad,
            "running_mean": None if m.running_mean is None else m.running_mean.clone(),
            "running_var": None if m.running_var is None else m.running_var.clone(),
            "num_batches_tracked": None if m.num_batches_tracked is None
            else int(m.num_batches_tracked),
        }
        if case.get("plain_bn"):
            bn = bn_class(x_full.dim())(c, dtype=x_full.dtype)
            with torch.no_grad():
                bn.weight.copy_(case["weight"])
                bn.bias.copy_(case["bias"])
            res["y_plain_bn"] = bn(local_part(x_full, split, rank)).detach()
        results[name] = res

    # too few values over all processes: every rank raises the same clear error
    try:
        SyncBatchNorm(3)(torch.randn(1 if rank == 0 else 0, 3))
        results["too_few"] = None
    except ValueError as e:
        results["too_few"] = str(e)

    # the group of another rank alone: new_group gave this rank torch's placeholder for "not a
    # member" (an int), which was refused as "got int"
    try:
        SyncBatchNorm(3, process_group=own_groups[(rank + 1) % world])
        results["not_a_member"] = None
    except (TypeError, ValueError) as e:
        results["not_a_member"] = f"{type(e).__name__}: {e}"

    # the backward formula against finite differences (a group of one process: the
    # communication is the identity, the arithmetic is the distributed one)
    g = torch.Generator().manual_seed(10 + rank)
    x64 = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()
    w64 = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b64 = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
    mine = own_groups[rank]
    results["gradcheck"] = torch.autograd.gradcheck(
        lambda a, w, b: sync_batch_norm(a, w, b, None, None, 1e-5, 0.1, mine), (x64, w64, b64)
    )
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def ddp_worker(rank: int, world: int, out: str) -> None:
    import normlab.distributed as nd
    from normlab import convert_norm
    from torch.utils.data import DataLoader, TensorDataset

    data = torch.load(os.path.join(out, "data.pt"))
    ds = TensorDataset(data["x"], data["y"], torch.arange(len(data["y"])))
    results = {"rank": nd.rank(), "world_size": nd.world_size(),
               "is_distributed": nd.is_distributed(), "is_main": nd.is_main_process()}
    for name, build in (("gn", model_gn), ("syncbn", lambda: convert_norm(model_bn(), "syncbn"))):
        model = nd.wrap_ddp(build(), "cpu")
        results[f"{name}_wrapped"] = type(model).__name__
        sampler = nd.make_sampler(ds, shuffle=True, seed=data["seed"])
        nd.set_epoch(sampler, 0)
        loader = DataLoader(ds, batch_size=data["batch"], sampler=sampler)
        xb, yb, idx = next(iter(loader))
        lr = nd.scaled_lr(data["batch"])
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        results[f"{name}_state"] = {k: v.clone() for k, v in nd.unwrap(model).state_dict().items()}
        results[f"{name}_indices"] = idx
        results[f"{name}_lr"] = lr
        results[f"{name}_loss_mean"] = nd.all_reduce_mean(loss.item(), weight=len(yb))
    results["sum"] = nd.all_reduce_sum([rank + 1.0, 2.0 * rank]).tolist()
    results["mean_unweighted"] = nd.all_reduce_mean(float(rank))
    # unequal weights (3 and 1 samples), and a rank with no samples whose own mean is NaN
    results["mean_weighted"] = nd.all_reduce_mean(float(rank), weight=[3, 1][rank])
    results["mean_empty_rank"] = nd.all_reduce_mean(2.5 if rank == 0 else float("nan"),
                                                    weight=4 if rank == 0 else 0)
    results["broadcast"] = nd.broadcast_object({"run": f"from-rank-{rank}"})
    try:
        nd.wrap_ddp(nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3)), "cpu")
        results["torch_syncbn_error"] = None
    except ValueError as e:
        results["torch_syncbn_error"] = str(e)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
