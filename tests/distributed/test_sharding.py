"""normlab's norms under torch.distributed's sharding tools, against torch.nn's under the same
plan: FSDP2 (``fully_shard``, both ``reshard_after_forward``), DCP state dicts (sharded and
full, loaded across normlab and torch.nn), DTensor inputs (Replicate and Shard placements,
uneven shards included), tensor parallel (``SequenceParallel`` on LayerNorm and RMSNorm between
``ColwiseParallel`` and ``RowwiseParallel``); and every module built on the meta device, then
``to_empty`` and ``reset_parameters`` (FSDP2's way to build a model), against torch's init.

One launch of 2 gloo processes runs every distributed check (``sharding_workers.py``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import dist_harness  # noqa: E402
import sharding_workers as sw  # noqa: E402
from versions import needs_torch_sharding  # noqa: E402

import normlab.nn as nln  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharding"))
    dist_harness.run_workers(sw.sharding_worker, WORLD, out, timeout=150)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def close(a, b, what, rtol=1e-5, atol=1e-5):
    if isinstance(a, dict):
        assert "error" not in a, f"{what}: {a['error']}"
        assert "error" not in b, f"{what}, the reference: {b['error']}"
        assert sorted(a) == sorted(b), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            close(a[k], b[k], f"{what} {k}", rtol, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


@needs_torch_sharding
@pytest.mark.parametrize("reshard", [True, False])
@pytest.mark.parametrize("kind", ["transformer", "conv"])
def test_fully_shard_training_matches_torch_nn(ranks, kind, reshard):
    for r, res in enumerate(ranks):
        key = f"fsdp/{kind}/reshard={reshard}"
        # the norm's parameters were sharded at rest (FSDP2 in force, not a no-op)
        assert res[f"{key}/normlab/norm_weight"] == ("DTensor", "(Shard(dim=0),)")
        assert res[f"{key}/normlab/norm_weight"] == res[f"{key}/torch/norm_weight"]
        close(res[f"{key}/normlab/losses"], res[f"{key}/torch/losses"], f"rank {r} losses")
        close(res[f"{key}/normlab/state"], res[f"{key}/torch/state"], f"rank {r} state")
    # the model trained: the second loss is not the first
    assert not torch.equal(*ranks[0][f"fsdp/{kind}/reshard={reshard}/torch/losses"])


@needs_torch_sharding
def test_dcp_state_dict_round_trip_across_normlab_and_torch_nn(ranks):
    for r, res in enumerate(ranks):
        for name in ("normlab", "torch"):  # normlab's checkpoint into either model
            close(res[f"dcp/{name}/state"], res["dcp/src_state"], f"rank {r} {name} state",
                  rtol=0, atol=0)
        close(res["dcp/normlab/out"], res["dcp/src_out"], f"rank {r} output", rtol=0, atol=0)
        # (torch's modules compute the same to rounding: its LayerNorm2d reference permutes)
        close(res["dcp/torch/out"], res["dcp/src_out"], f"rank {r} torch output")
        ref, got = res["dcp/torch_full->normlab"]  # torch's full state dict into normlab's
        close(got, ref, f"rank {r} torch full state dict -> normlab", rtol=1e-6, atol=1e-6)


def _dtensor_keys():
    keys = []
    for case, _, _, dims in sw.dtensor_cases():
        for dim in dims:
            keys.append((case, "Replicate()" if dim is None else f"Shard(dim={dim})"))
    return keys


@needs_torch_sharding
@pytest.mark.parametrize("case,placement", _dtensor_keys())
def test_dtensor_input_matches_torch_nn(ranks, case, placement):
    for r, res in enumerate(ranks):
        got = res[f"dtensor/{case}/{placement}/normlab"]
        ref = res[f"dtensor/{case}/{placement}/torch"]
        close(got, ref, f"rank {r} {case} on {placement}", rtol=1e-5, atol=2e-5)


@needs_torch_sharding
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_sequence_parallel_matches_torch_nn(ranks, norm):
    for r, res in enumerate(ranks):
        got, ref = res[f"tp/{norm}/normlab"], res[f"tp/{norm}/torch"]
        close(got, ref, f"rank {r} {norm} under SequenceParallel", rtol=1e-5, atol=2e-5)
        assert got["weight_type"] == "DTensor"  # SequenceParallel replicated the weight


# (normlab module, torch.nn module with the same init or None: then the eager normlab module,
# and the input's dims where not 4)
C = 8  # channels: 2 groups of 4 for GroupNorm and EvoNorm2dS0
META_CASES = {
    "BatchNorm1d": (lambda: nln.BatchNorm1d(C), lambda: nn.BatchNorm1d(C), 3),
    "BatchNorm2d": (lambda: nln.BatchNorm2d(C), lambda: nn.BatchNorm2d(C)),
    "BatchNorm3d": (lambda: nln.BatchNorm3d(C), lambda: nn.BatchNorm3d(C), 5),
    "BatchNormXd": (lambda: nln.BatchNormXd(C), lambda: nn.BatchNorm2d(C)),
    "BatchRenorm2d": (lambda: nln.BatchRenorm2d(C), None),
    "GhostBatchNorm2d": (lambda: nln.GhostBatchNorm2d(C, virtual_batch=2), lambda: nn.BatchNorm2d(C)),
    "SyncBatchNorm": (lambda: nln.SyncBatchNorm(C), lambda: nn.SyncBatchNorm(C)),
    "FrozenBatchNorm2d": (lambda: nln.FrozenBatchNorm2d(C), None),
    "InstanceNorm2d": (lambda: nln.InstanceNorm2d(C, affine=True, track_running_stats=True),
                       lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True)),
    "GroupNorm": (lambda: nln.GroupNorm(2, C), lambda: nn.GroupNorm(2, C)),
    "LayerNorm": (lambda: nln.LayerNorm([3, 3]), lambda: nn.LayerNorm([3, 3])),
    "LayerNorm2d": (lambda: nln.LayerNorm2d(C), None),
    "RMSNorm": (lambda: nln.RMSNorm([3, 3]), lambda: nn.RMSNorm([3, 3])),
    "FilterResponseNorm2d": (lambda: nln.FilterResponseNorm2d(C), None),
    "EvoNorm2dS0": (lambda: nln.EvoNorm2dS0(C, num_groups=2), None),
    "EvoNorm2dB0": (lambda: nln.EvoNorm2dB0(C), None),
    "WSConv2d": (lambda: nln.WSConv2d(C, C, 3), None),
    "ScaledStdConv2d": (lambda: nln.ScaledStdConv2d(C, C, 3), None),
}


@pytest.mark.parametrize("name", sorted(META_CASES))
def test_meta_device_to_empty_reset_parameters_gives_the_init(name):
    build, build_torch, *dims = META_CASES[name]
    torch.manual_seed(0)  # (the convs' init is random: the same draws on both sides)
    ref = build_torch() if build_torch is not None else build()
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    with torch.no_grad():  # to_empty's memory holds anything: make it visibly wrong
        for t in list(module.parameters()) + list(module.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else -7)
    torch.manual_seed(0)
    module.reset_parameters()
    got, want = module.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    # (N, C, *spatial) = (4, 8, 3, 3) (3 for BatchNorm1d, (3, 3, 3) for BatchNorm3d): 4 samples
    # make 2 ghost batches of 2; 3x3 positions, the shape of LayerNorm's and RMSNorm's
    # normalized_shape and of the 3x3 convs' kernel
    x = torch.randn((4, C) + (3,) * ((dims[0] if dims else 4) - 2)) * 1.5 + sw.OFFSET
    torch.manual_seed(0)
    eager = build()  # nothing but the state (no tensor attribute) was left on the meta device
    torch.testing.assert_close(module(x), eager(x), rtol=0, atol=0)
