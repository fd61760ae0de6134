"""normlab.precise_bn under torch.distributed: 2 gloo processes, each with its own batches,
end with the statistics one process computes over all of them (and equal on every process).
Process 1's batches do not reach one layer; it still takes part in that layer's merge."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_harness  # noqa: E402
import precise_bn_workers as pw  # noqa: E402

import normlab  # noqa: E402

WORLD = 2


def test_statistics_merged_over_processes_equal_one_process_over_all_batches(tmp_path):
    dist_harness.run_workers(pw.precise_bn_worker, WORLD, str(tmp_path), timeout=90)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    one = pw.model()
    record = normlab.precise_bn(one, pw.batches_of(0) + pw.batches_of(1))
    assert sorted(record.recomputed) == ["bn", "extra", "inn"]
    for r, res in enumerate(ranks):
        assert res["recomputed"] == ["bn", "extra", "inn"], r
        assert res["batches"] == (3, 2)[r]
        for key, value in one.state_dict().items():
            torch.testing.assert_close(res["state"][key], value, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"rank {r} {key}: {m}")
    # the merge did something: a process alone has other statistics
    alone = pw.model()
    normlab.precise_bn(alone, pw.batches_of(1))
    assert not torch.allclose(alone.bn.running_var, one.bn.running_var, rtol=0.01)
