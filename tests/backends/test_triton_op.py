"""Registration of the Triton kernels through ``torch.library.triton_op`` ($NORMLAB_TRITON_OP=1).

With the flag the four ops' bodies launch through ``torch.library.wrap_triton``: a torch.compile
trace holds the kernel launches themselves (``triton_kernel_wrapper_functional`` nodes that
Inductor schedules and CUDA graphs capture), not one opaque ``normlab::triton_norm_*`` node.

What the CPU can check: Triton's interpreter cannot be traced into (``wrap_triton`` hands an
interpreted kernel back unwrapped and a trace would run it on fake tensors), so the traced graph
is built in a fresh process without the interpreter and never run. What only a GPU can check
(benchmarks/gpu_session.sh runs this file with the flag): the compiled graph's results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import normlab
from formula import normalize64, off_centre, rel_err
from versions import needs_triton_kernels_for_op

tn = pytest.importorskip("normlab.backends.triton_norm")

# Runs without TRITON_INTERPRET, with NORMLAB_TRITON_OP=1. torch.compile (fullgraph) traces the
# ops into a capturing backend that never runs the graph; prints per traced function the
# opaque normlab ops left in the graph and, per kernel launch, (STAGE, tensors copied before it).
_TRACE_SCRIPT = r'''
import json
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.backends.common import aot_autograd
from normlab.backends import triton_norm as tn

class Hopper:
    """The target torch's analysis of which tensors a kernel writes compiles the kernels for
    (TTIR only; without it every tensor argument counts as written). No GPU here."""
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Hopper())

class Captured(Exception):
    pass

def traced(fn, *args):
    graphs = []
    def capture(gm, example_inputs):
        graphs.append(gm)
        def never_run(*a):
            raise Captured
        return never_run
    torch._dynamo.reset()
    try:
        torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=capture))(*args)
    except Captured:
        pass
    (gm,) = graphs
    opaque = [str(n.target) for n in gm.graph.nodes if "normlab" in str(n.target)]
    launches = [[n.kwargs["kwargs"].get("STAGE"), n.kwargs["tensors_to_clone"]]
                for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return {"opaque": opaque, "launches": launches}

out = {"registered_as_triton_op": tn.TRITON_OP, "kernels": {
    op: [k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op(
        f"normlab::triton_norm_{op}")] for op in ("fwd", "bwd", "fixed", "fixed_bwd")}}
torch.manual_seed(0)
# GroupNorm(4, 8) at batch 2: 8 statistics, one program each (fused: one launch per direction
# plus the dw/db row reduction)
x, dy = torch.randn(2, 8, 4, 4) + 3, torch.randn(2, 8, 4, 4)
w, b = torch.randn(8).requires_grad_(), torch.randn(8).requires_grad_()
stats = torch.randn(5, 2, 4)
mean, var = torch.randn(8), torch.rand(8) + 0.5
wd, bd = w.detach(), b.detach()  # the backward ops have no derivative: traced without grad
out["fwd"] = traced(lambda x, w, b: tn.triton_norm_fwd(x, w, b, 4, False, 1e-5, "silu", True)[0],
                    x.requires_grad_(), w, b)
out["fixed"] = traced(lambda x: tn.triton_norm_fixed(x, mean, var, w, b, 1e-5, "relu"), x)
out["bwd"] = traced(lambda dy, x: tn.triton_norm_bwd(dy, x, wd, bd, stats, 4, False, "silu", True),
                    dy, x.detach())
# the fused backward summing its dw/db rows itself (FOLD 2): one launch, the counters written
tn.TUNING["fold_rows"] = True
out["bwd_fold"] = traced(
    lambda dy, x: tn.triton_norm_bwd(dy, x, wd, bd, stats, 4, False, "silu", True), dy, x.detach())
tn.TUNING["fold_rows"] = None
# LayerNorm over the features of (6, 8): the rows backward and its sum of partial rows
x2, dy2 = torch.randn(6, 8) + 3, torch.randn(6, 8)
out["bwd_rows"] = traced(
    lambda dy, x: tn.triton_norm_bwd(dy, x, wd, bd, torch.randn(5, 6, 1), 1, False, "none", True),
    dy2, x2)
out["fixed_bwd"] = traced(
    lambda dy, x: tn.triton_norm_fixed_bwd(dy, x, mean, var, wd, None, 1e-5, "none"), dy,
    x.detach())
# few statistics for the target: every statistic split over several programs (two launches)
tn.TUNING.update(target_programs=64, block_elems=8)
out["fwd_split"] = traced(lambda x: tn.triton_norm_fwd(x, w, b, 4, False, 1e-5, "none", True)[0],
                          x.detach())
out["bwd_split"] = traced(
    lambda dy, x: tn.triton_norm_bwd(dy, x, wd, bd, stats, 4, False, "none", True), dy, x.detach())
print(json.dumps(out))
'''

# the buffers each kernel writes (its outputs and scratch): only these may be copied
_WRITTEN = {"Y", "STATS", "PART", "DX", "AB", "PDW", "PDB", "DW", "DB", "CNT"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled graph runs (below)")
@needs_triton_kernels_for_op
def test_triton_op_traces_into_kernel_launches_that_copy_no_input():
    """With $NORMLAB_TRITON_OP=1 each op is a triton_op (torch.library's own record names its
    kernels), and a fullgraph trace of every op, forward and backward, fused and split, holds
    one node per kernel launch and no opaque normlab op. The launches copy only the buffers the
    kernels write: never x, dy, the parameters or the statistics (a copy of x would add two
    passes over the activation to every forward), except, for the backward that folds its row
    reduction, the statistics' counter row (K int32, counted up and put back to zero)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NORMLAB_TRITON_OP"] = "1"
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["registered_as_triton_op"]
    bwd_kernels = ["_bwd_kernel", "_reduce_rows_kernel", "_rows_bwd_kernel", "_sum_rows_kernel"]
    assert out["kernels"] == {"fwd": ["_rows_fwd_kernel", "_fwd_kernel"], "fixed": ["_fwd_kernel"],
                              "bwd": bwd_kernels, "fixed_bwd": bwd_kernels}
    stages = {"fwd": [0], "fixed": [3], "bwd": [0, None], "bwd_fold": [0],
              "bwd_rows": [None, None], "fixed_bwd": [3, None],
              "fwd_split": [1, 2], "bwd_split": [1, 2]}  # None: a kernel without stages
    for name, expect in stages.items():
        graph = out[name]
        assert graph["opaque"] == [], (name, graph["opaque"])
        assert [stage for stage, _ in graph["launches"]] == expect, (name, graph["launches"])
        for stage, copied in graph["launches"]:
            assert copied and set(copied) <= _WRITTEN, (name, stage, copied)
    assert "CNT" in out["bwd_fold"]["launches"][0][1]
    assert all("CNT" not in copied for name, graph in out.items() if name != "bwd_fold"
               and isinstance(graph, dict) and "launches" in graph
               for _, copied in graph["launches"])


@pytest.mark.parametrize("value", ["2", "yes", "true"])
def test_flag_rejects_values_other_than_0_and_1(monkeypatch, value):
    monkeypatch.setenv("NORMLAB_TRITON_OP", value)
    with pytest.raises(ValueError, match=repr(value)):
        tn._use_triton_op()


def test_flag_has_no_effect_under_the_interpreter(monkeypatch):
    """Interpreted kernels cannot be traced into: the custom-op registration stays."""
    monkeypatch.setenv("NORMLAB_TRITON_OP", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tn._use_triton_op() is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="running the compiled graph needs a GPU")
@pytest.mark.skipif(not tn.TRITON_OP, reason="set NORMLAB_TRITON_OP=1 (benchmarks/gpu_session.sh)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_op_inductor_and_cuda_graph_match_eager_on_cuda(channels_last):
    """On the GPU: Inductor (fullgraph) compiles the kernels into its own graph, with poisoned
    buffers, and the compiled GroupNorm fwd+bwd equals the eager twins and float64; replaying
    the compiled step as a CUDA graph (mode="reduce-overhead") gives the same gradients."""
    tn.TUNING["poison"] = float("nan")
    try:
        gn = normlab.nn.GroupNorm(4, 16, activation="silu").cuda()
        with torch.no_grad():
            gn.weight.copy_(torch.randn(16))
            gn.bias.copy_(torch.randn(16))
        # (2, 16, 8, 8): 8 statistics, the fused path; channels_last: blocks of groups
        x = off_centre(2, 16, 8, 8).cuda()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, device="cuda")

        def step(inp):
            with normlab.use_backend("triton"):
                return gn(inp)

        results = []
        for fn in (step, torch.compile(step, fullgraph=True),
                   torch.compile(step, fullgraph=True, mode="reduce-overhead")):
            for _ in range(3):  # reduce-overhead records the CUDA graph after warm-up calls
                gn.zero_grad()
                xt = x.clone().requires_grad_()
                y = fn(xt)
                y.backward(dy)
            results.append((y.detach().clone(), xt.grad, gn.weight.grad.clone(),
                            gn.bias.grad.clone()))
    finally:
        tn.TUNING["poison"] = None
    eager = results[0]
    for compiled in results[1:]:
        for a, b in zip(eager, compiled):
            assert not torch.isnan(b).any()
            assert rel_err(b.cpu(), a.cpu()) < 1e-5
    expect = normalize64(x.cpu(), 4, False, gn.weight.detach().cpu(), gn.bias.detach().cpu(),
                         activation="silu")
    assert rel_err(eager[0].cpu(), expect) < 2e-6
