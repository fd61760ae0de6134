"""GhostBatchNorm2d in one process equals K-process gloo DDP with per-process BatchNorm, step
for step: the GN paper's "images per GPU" protocol emulated on one device (Wu & He, ECCV 2018;
ghost batches: Hoffer et al., NeurIPS 2017).

The same images, the same initial weights, SGD with momentum and weight decay, a few steps;
process k of the DDP job holds slice k of each global batch: n consecutive images, or
(``interleaved=True``) images k, k + K, ..., the rank's share under a DistributedSampler. After every
step the one-process model's parameters and buffers must equal rank 0's (the buffers rank 0
keeps and checkpoints) to float32 rounding, and its loss the mean of the ranks' losses.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import dist_harness  # noqa: E402
import ghost_workers  # noqa: E402

from normlab.nn import GhostBatchNorm2d  # noqa: E402

K, N, STEPS = 3, 2, 3  # 3 processes (not a power of 2) x 2 images: the paper's smallest batch


@pytest.fixture(scope="module", params=[False, True], ids=["consecutive", "interleaved"])
def runs(request, tmp_path_factory):
    interleaved = request.param
    out = str(tmp_path_factory.mktemp("ghost_ddp"))
    g = torch.Generator().manual_seed(7)
    # off-centre images with per-slice differences, so every slice's statistics differ
    x = [torch.randn(K * N, 3, 6, 6, generator=g) * 2 + 1.5
         + torch.arange(K * N).view(-1, 1, 1, 1) * 0.3 for _ in range(STEPS)]
    y = [torch.randint(0, 5, (K * N,), generator=g) for _ in range(STEPS)]
    lr = 0.2  # large enough that three steps move the weights visibly
    torch.save({"x": x, "y": y, "n": N, "lr": lr, "interleaved": interleaved},
               os.path.join(out, "data.pt"))
    dist_harness.run_workers(ghost_workers.ddp_bn_worker, K, out, timeout=120)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(K)]

    model = ghost_workers.small_net(
        lambda c: GhostBatchNorm2d(c, virtual_batch=N, interleaved=interleaved))
    opt = ghost_workers.sgd(model, lr)
    emulated = []
    for xb, yb in zip(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        emulated.append({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                         "loss": loss.item()})
    return ranks, emulated


@pytest.mark.parametrize("step", range(STEPS))
def test_one_process_emulation_equals_ddp_rank0_step_for_step(runs, step):
    ranks, emulated = runs
    got, want = emulated[step]["state"], ranks[0][step]["state"]
    assert list(got) == list(want)  # the same state_dict keys as BatchNorm
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"step {step}, {key}: {m}")
    mean_loss = sum(r[step]["loss"] for r in ranks) / K
    assert emulated[step]["loss"] == pytest.approx(mean_loss, rel=1e-6)


def test_the_comparison_can_fail(runs):
    """The ranks' own running statistics differ (each saw its slice), and the weights moved: the
    equality above is not between constants."""
    ranks, emulated = runs
    for step in range(STEPS):
        r0, r1 = ranks[0][step]["state"], ranks[1][step]["state"]
        assert (r0["1.running_mean"] - r1["1.running_mean"]).abs().max() > 1e-3
    first, last = emulated[0]["state"]["0.weight"], emulated[-1]["state"]["0.weight"]
    assert (first - last).abs().max() > 1e-4
