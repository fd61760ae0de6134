"""Worker body for tests/distributed/test_sharding.py, run by dist_harness.run_workers in each of
2 gloo processes: normlab's norms and torch.nn's under FSDP2 (``fully_shard``), DCP state
dicts, DTensor inputs and tensor parallel (``SequenceParallel``).

Every check runs the same thing twice, once with normlab's module and once with torch.nn's (same
init, same data), and saves both results to ``rank<r>.pt`` (DTensors as full plain tensors); the
parent compares. The worker asserts nothing about correctness itself.
"""

from __future__ import annotations

import os

import torch
from torch import nn

OFFSET = 3.0  # off-centre data: a norm that forgot to centre, or centred twice, is visible


class TorchLayerNorm2d(nn.LayerNorm):
    """The reference for normlab's LayerNorm2d: torch's LayerNorm over the channels of NCHW."""

    def __init__(self, c: int) -> None:
        super().__init__(c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _libs():
    import normlab.nn as nln

    return {"torch": nn, "normlab": nln}


def _ln2d(lib, c: int) -> nn.Module:
    return TorchLayerNorm2d(c) if lib is nn else lib.LayerNorm2d(c)


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters (not the ones-and-zeros init, which hides a swapped weight and
    bias) and random running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) + OFFSET)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def transformer_block(lib) -> nn.Module:
    # features 8 -> 16 -> 16 -> 4: small; LayerNorm and RMSNorm each on a hidden layer
    return _randomized(nn.Sequential(
        nn.Linear(8, 16), lib.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), lib.RMSNorm(16),
        nn.Linear(16, 4)), 0)


def conv_net(lib) -> nn.Module:
    # channels 3 -> 8: GroupNorm(2 groups of 4), BatchNorm2d and LayerNorm2d each after a conv
    return _randomized(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), lib.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), lib.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), _ln2d(lib, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)), 1)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard(model: nn.Module, mesh, reshard: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for sub in model:  # each layer with parameters its own FSDP unit, then the root
        if any(True for _ in sub.parameters()):
            fully_shard(sub, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def _batch(kind: str, rank: int, same_on_every_rank: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 if same_on_every_rank else 10 + rank)
    # transformer: 4 rows of 8 features; conv: 4 images of 3x6x6 (6x6 -> 4x4 after the 3x3 conv)
    shape = (4, 8) if kind == "transformer" else (4, 3, 6, 6)
    return torch.randn(shape, generator=g) * 1.5 + OFFSET


def fsdp_part(rank: int, mesh) -> dict:
    """Two SGD steps of each model under fully_shard, both reshard_after_forward settings."""
    res = {}
    for kind, build in (("transformer", transformer_block), ("conv", conv_net)):
        for reshard in (True, False):
            for name, lib in _libs().items():
                model = _shard(build(lib), mesh, reshard)
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                x = _batch(kind, rank)  # each rank its own batch, as data parallel runs
                losses = []
                for _ in range(2):
                    loss = model(x).square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    losses.append(loss.detach())
                key = f"fsdp/{kind}/reshard={reshard}/{name}"
                res[key + "/losses"] = torch.stack(losses)
                res[key + "/state"] = {k: _full(v).detach().clone()
                                       for k, v in model.state_dict().items()}
                norm = model[1]
                res[key + "/norm_weight"] = (type(norm.weight).__name__,
                                             str(getattr(norm.weight, "placements", None)))
    return res


def dcp_part(rank: int, mesh, out: str) -> dict:
    """A sharded normlab model's state through torch.distributed.checkpoint, loaded into a new
    normlab model and into a torch.nn one; and torch's full state dict loaded into normlab's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    full = StateDictOptions(full_state_dict=True)
    res = {}
    src = _shard(conv_net(_libs()["normlab"]), mesh, True)
    # one training step on the same batch on every rank: the BN buffers (plain tensors, which
    # DCP saves once, as replicated) then agree across ranks
    src(_batch("conv", rank, same_on_every_rank=True)).square().mean().backward()
    path = os.path.join(out, "dcp_checkpoint")
    dcp.save({"model": get_model_state_dict(src)}, checkpoint_id=path)
    x = _batch("conv", rank)
    src.eval()
    with torch.no_grad():
        res["dcp/src_out"] = src(x)
    res["dcp/src_state"] = {k: v.clone() for k, v in get_model_state_dict(src, options=full).items()}
    for name, lib in _libs().items():
        dst = _shard(_randomized(conv_net(lib), 7), mesh, True)  # other values than src's
        state = {"model": get_model_state_dict(dst)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(dst, state["model"])
        dst.eval()
        with torch.no_grad():
            res[f"dcp/{name}/out"] = dst(x)
        res[f"dcp/{name}/state"] = {k: v.clone() for k, v in
                                    get_model_state_dict(dst, options=full).items()}
    # torch's full state dict into a sharded normlab model
    tsrc = _shard(_randomized(conv_net(nn), 3), mesh, True)
    dst = _shard(conv_net(_libs()["normlab"]), mesh, True)
    set_model_state_dict(dst, get_model_state_dict(tsrc, options=full), options=full)
    tsrc.eval()
    dst.eval()
    with torch.no_grad():
        res["dcp/torch_full->normlab"] = (tsrc(x), dst(x))
    return res


def dtensor_cases():
    """(name, builder, input, placement dim or None for Replicate): module calls on a DTensor."""
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(shape, generator=g) * 1.5 + OFFSET

    seq = randn(4, 6, 8)  # (batch, sequence, features): 6 positions, 3 per rank
    odd = randn(3, 6, 8)  # a batch of 3 on 2 ranks: the uneven shard (2 + 1)
    img = randn(4, 8, 4, 4)  # (N, C, H, W): 8 channels, 4 per rank
    img_odd = randn(3, 8, 5, 4)  # batch 3 and height 5 over 2 ranks: uneven shards
    return [
        ("LayerNorm", lambda lib: lib.LayerNorm(8), seq, [None, 0, 1]),
        ("LayerNorm/uneven", lambda lib: lib.LayerNorm(8), odd, [0]),
        ("LayerNorm/2d-shape", lambda lib: lib.LayerNorm([6, 8]), seq, [None, 0]),
        ("RMSNorm", lambda lib: lib.RMSNorm(8), seq, [None, 0, 1]),
        ("RMSNorm/uneven", lambda lib: lib.RMSNorm(8), odd, [0]),
        ("InstanceNorm2d/affine", lambda lib: lib.InstanceNorm2d(8, affine=True), img,
         [None, 0, 1]),
        ("InstanceNorm2d/running", lambda lib: lib.InstanceNorm2d(8, track_running_stats=True),
         img, [None, 0, 1]),
        ("InstanceNorm1d/affine", lambda lib: lib.InstanceNorm1d(6, affine=True), seq, [0, 1]),
        ("LayerNorm2d", lambda lib: _ln2d(lib, 8), img, [None, 0, 1]),
        ("LayerNorm2d/uneven", lambda lib: _ln2d(lib, 8), img_odd, [0, 2]),
        ("BatchNorm2d", lambda lib: lib.BatchNorm2d(8), img, [None, 0, 1]),
        # sharded GroupNorm fails in torch's own module too (DTensor's group-norm backward rule)
        ("GroupNorm", lambda lib: lib.GroupNorm(2, 8), img, [None]),
    ]


def dtensor_part(rank: int, mesh) -> dict:
    """Each case's module (parameters and buffers replicated by distribute_module) on a DTensor
    input: output, its placements, input and parameter gradients, buffers after the step."""
    from torch.distributed.tensor import Replicate, Shard

    res = {}
    for case, build, x, dims in dtensor_cases():
        for dim in dims:
            for name, lib in _libs().items():
                placement = Replicate() if dim is None else Shard(dim)
                res[f"dtensor/{case}/{placement!r}/{name}"] = _recorded(
                    _dtensor_call, build(lib), mesh, x, placement)
    return res


def _recorded(fn, *args) -> dict:
    """fn's result, or its error as text (one failing case must not hide the others; DTensor
    raises the same error on every rank, so the ranks stay in step)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (reported by the parent test)
        return {"error": f"{type(e).__name__}: {e}"}


def _dtensor_call(module, mesh, x, placement) -> dict:
    from torch.distributed.tensor import distribute_module, distribute_tensor

    module = distribute_module(_randomized(module, 2), mesh)
    dx = distribute_tensor(x, mesh, [placement]).requires_grad_()
    y = module(dx)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    (_full(y) * w).sum().backward()
    return dict(out=_full(y).detach(), placements=str(y.placements), x_grad=_full(dx.grad),
                grads={k: _full(p.grad) for k, p in module.named_parameters()},
                buffers={k: _full(b) for k, b in module.named_buffers()})


class _Block(nn.Module):
    """norm -> Linear(8, 16) -> ReLU -> Linear(16, 8): a transformer MLP with its pre-norm."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.up, self.down = norm, nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def tensor_parallel_part(rank: int, world: int, mesh) -> dict:
    """SequenceParallel on the norm (input sharded on the sequence dim), ColwiseParallel and
    RowwiseParallel around it; each rank feeds its slice of the sequence."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 8, generator=g) * 1.5 + OFFSET  # (batch, 6 positions: 3 a rank, 8)
    w = torch.randn(2, 6, 8, generator=g)

    def step(norm: nn.Module) -> dict:
        block = _randomized(_Block(norm), 4)
        plan = {"norm": SequenceParallel(), "up": ColwiseParallel(),
                "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
        block = parallelize_module(block, mesh, plan)
        xs = x.clone().requires_grad_()
        y = block(xs.chunk(world, dim=1)[rank])  # this rank's positions
        (_full(y) * w).sum().backward()
        return dict(out=_full(y).detach(), x_grad=xs.grad,
                    weight_type=type(block.norm.weight).__name__,
                    grads={k: _full(p.grad) for k, p in block.named_parameters()})

    return {f"tp/{norm_name}/{name}": _recorded(step, getattr(lib, norm_name)(8))
            for norm_name in ("LayerNorm", "RMSNorm") for name, lib in _libs().items()}


def sharding_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    res.update(fsdp_part(rank, mesh))
    res.update(dcp_part(rank, mesh, out))
    res.update(dtensor_part(rank, mesh))
    res.update(tensor_parallel_part(rank, world, mesh))
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
