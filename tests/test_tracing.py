"""normlab.functional under torch.fx.symbolic_trace, torch.export and torch.compile(fullgraph=True),
as torch.nn.functional (issue 13 item 2): the ops dispatch ``__torch_function__`` so a Proxy
records them as call_function nodes; the traced programs agree with the eager module and with
torch.nn.functional on the same input."""

import copy
import operator

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import normlab.functional as NLF
import normlab.nn as nlnn
from formula import off_centre

# (2, 8, 4, 4): 8 channels split into 4 groups, 16 positions: every op has > 1 value per set


class _Ops(nn.Module):
    """Every public op of normlab.functional (or torch's namesake) in one forward."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8))
        self.register_buffer("running_mean", torch.randn(8))
        self.register_buffer("running_var", torch.rand(8) + 0.5)

    def forward(self, x):
        f, w, b = self.fn, self.weight, self.bias
        y = f.layer_norm(x.permute(0, 2, 3, 1), (8,), w, b).permute(0, 3, 1, 2)
        y = f.group_norm(y, 4, w, b)
        y = f.batch_norm(y, self.running_mean, self.running_var, w, b, self.training)
        return f.instance_norm(y, weight=w, bias=b)


def _pair(train):
    torch.manual_seed(0)
    ours = _Ops(NLF).train(train)
    theirs = _Ops(F).train(train)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("train", [False, True])
def test_symbolic_trace_records_the_ops_and_matches_torch(train):
    ours, theirs = _pair(train)
    gm = torch.fx.symbolic_trace(ours)  # was "TypeError: input must be a torch.Tensor, got Proxy"
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for op in (NLF.layer_norm, NLF.group_norm, NLF.batch_norm, NLF.instance_norm):
        assert op in targets
    x = off_centre(2, 8, 4, 4)
    torch.testing.assert_close(gm(x), theirs(x), atol=1e-4, rtol=1e-4)
    # the graph module shares the buffers: in training it moved them as torch moved its own
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)


def test_symbolic_trace_of_the_operator_itself():
    class Op(nn.Module):
        def forward(self, x, mean, var):
            return NLF.normalize(x, 2, False, activation="silu") + NLF.normalize_fixed(x, mean, var)

    gm = torch.fx.symbolic_trace(Op())
    x, mean, var = off_centre(2, 8, 4, 4), torch.randn(8), torch.rand(8) + 0.5
    want = F.silu(F.group_norm(x, 2)) + F.batch_norm(x, mean, var)
    torch.testing.assert_close(gm(x, mean, var), want, atol=1e-5, rtol=1e-5)


def test_export_matches_torch():
    ours, theirs = _pair(False)
    x = off_centre(2, 8, 4, 4)
    program = torch.export.export(ours, (x,))
    torch.testing.assert_close(program.module()(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: nlnn.BatchNorm2d(8), (4, 8, 5, 5)),  # eval: running statistics (normalize_fixed)
     (lambda: nlnn.InstanceNorm2d(8, affine=True), (2, 8, 5, 5)),  # per sample and channel
     (lambda: nlnn.GroupNorm(4, 8), (2, 8, 5, 5)),  # 2 channels per group
     (lambda: nlnn.LayerNorm(8), (3, 5, 8))],  # (batch, tokens, features): the rows form
)
def test_modules_export_in_eval(make, shape):
    m = make().eval()
    x = off_centre(*shape)
    torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), m(x))


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph_of_the_ops(train):
    ours, theirs = _pair(train)
    x = off_centre(2, 8, 4, 4)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make",
    [lambda: nlnn.BatchNorm2d(8),                        # per channel, over the batch
     lambda: nlnn.GroupNorm(4, 8),                       # ATen's group norm, symbolic HxW
     lambda: nlnn.InstanceNorm2d(8, affine=True),        # G = C
     lambda: nlnn.LayerNorm2d(8),                        # permuted rows of C
     lambda: nlnn.RMSNorm2d(8),                          # the same, uncentred
     lambda: nlnn.FilterResponseNorm2d(8),               # uncentred over HxW: the fused RMS op
                                                         # took an int width (guard HxW == 42)
     lambda: nlnn.EvoNorm2dS0(8, num_groups=4)],         # moments
)
@pytest.mark.parametrize("train", [False, True])
# strict=True: TorchDynamo's trace, where FRN's width H*W was specialized by the fused RMS op
# ("Guard failed: input.size()[2] * input.size()[3] == 42")
@pytest.mark.parametrize("strict", [False, True])
def test_modules_export_with_dynamic_batch_and_spatial_sizes(make, train, strict):
    # detectors and segmenters export with dynamic image sizes: one program for 6x7 and 9x5
    from torch.export import Dim

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make()).train(train)
    dims = {0: Dim("n", min=2), 2: Dim("h", min=2), 3: Dim("w", min=2)}
    program = torch.export.export(m, (off_centre(2, 3, 6, 7),), dynamic_shapes=(dims,),
                                  strict=strict)
    x = off_centre(3, 3, 9, 5)
    torch.testing.assert_close(program.module()(x), m(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks' constants
@pytest.mark.parametrize(
    "make",
    [lambda: nlnn.BatchNorm2d(8), lambda: nlnn.BatchRenorm2d(8),
     lambda: nlnn.FrozenBatchNorm2d(8), lambda: nlnn.GroupNorm(4, 8),
     lambda: nlnn.InstanceNorm2d(8, affine=True), lambda: nlnn.LayerNorm([8, 5, 5]),
     lambda: nlnn.LayerNorm2d(8), lambda: nlnn.RMSNorm2d(8), lambda: nlnn.WSConv2d(8, 8, 3),
     lambda: nlnn.ScaledStdConv2d(8, 8, 3), lambda: nlnn.RMSNorm([8, 5, 5]),
     lambda: nlnn.FilterResponseNorm2d(8), lambda: nlnn.EvoNorm2dS0(8, num_groups=4),
     lambda: nlnn.EvoNorm2dB0(8), lambda: nlnn.GhostBatchNorm2d(8, virtual_batch=2)],
)
@pytest.mark.parametrize("train", [False, True])
def test_modules_under_torch_jit_trace(make, train):
    # torch.jit.script is refused (tests/nn/test_scripting.py); its error points to
    # torch.jit.trace, which records every module's ops: the trace at batch 4 runs batch 6
    m = make().train(train)
    traced = torch.jit.trace(m, (off_centre(4, 8, 5, 5),), check_trace=False)
    x = off_centre(6, 8, 5, 5)
    torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize(
    "make",
    [lambda: nlnn.BatchNorm2d(8),  # ATen's own running-statistics update (the baseline)
     # slices' statistics copied into the buffers after the call: was a torch.no_grad() block
     lambda: nlnn.GhostBatchNorm2d(8, virtual_batch=2),
     # running variance updated through update_running_stats (was decorated torch.no_grad())
     lambda: nlnn.EvoNorm2dB0(8),
     # running statistics from native's _update_from_pass (was decorated torch.no_grad():
     # the default, non-strict export dropped that block, strict=True kept it)
     lambda: nlnn.InstanceNorm2d(8, track_running_stats=True)],
)
@pytest.mark.parametrize("strict", [False, True])
def test_training_export_saves_loads_and_runs(make, strict, tmp_path):
    # a no_grad block that only mutates buffers was exported as a wrap_with_set_grad_enabled
    # node without outputs, which torch.export.load refused ("Node.meta
    # wrap_with_set_grad_enabled is missing val field"): the program saved but did not load
    torch.manual_seed(0)
    m = make().train()
    x = off_centre(4, 8, 5, 5)
    program = torch.export.export(m, (x,), strict=strict)
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    twin = make().train()
    twin.load_state_dict(m.state_dict())
    torch.testing.assert_close(loaded(x), twin(x))
    torch.testing.assert_close(loaded.state_dict()["running_var"], twin.running_var)


@pytest.mark.parametrize("interleaved", [False, True])
def test_ghost_batchnorm_training_export_with_a_dynamic_batch(interleaved):
    # K slices of 2 with K dynamic: the operator's G = K * C is symbolic (check_groups took
    # only ints: "num_groups must be an int, got 16*((s31//2))")
    from torch.export import Dim

    torch.manual_seed(0)
    m = nlnn.GhostBatchNorm2d(8, virtual_batch=2, interleaved=interleaved).train()
    twin = nlnn.GhostBatchNorm2d(8, virtual_batch=2, interleaved=interleaved).train()
    twin.load_state_dict(m.state_dict())
    program = torch.export.export(m, (off_centre(4, 8, 5, 5),),
                                  dynamic_shapes=({0: 2 * Dim("k", min=2)},))
    x = off_centre(8, 8, 5, 5)  # four slices where the export saw two
    torch.testing.assert_close(program.module()(x), twin(x))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_exported_batchnorm_is_the_op_torchs_batchnorm_gives(train, fused):
    # tools that find BatchNorm in an exported program by its op (PT2E QAT's conv-BN fusion and
    # its quantizers' conv-bn-relu patterns) look for aten.batch_norm, what torch's BatchNorm
    # gives; training normlab BN gave aten.native_batch_norm (checked with torchao 0.18's
    # prepare_qat_pt2e: torch's BN fused into the conv, normlab's not, before this)
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train(train)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3), nlnn.BatchNorm2d(8, activation="relu")
                         if fused else nlnn.BatchNorm2d(8), *([] if fused else [nn.ReLU()]))
    ours.train(train).load_state_dict(theirs.state_dict())
    x = off_centre(4, 3, 8, 8)

    def ops(model):
        program = torch.export.export(model, (x,))
        return [str(n.target) for n in program.graph.nodes if n.op == "call_function"], program

    want, _ = ops(theirs)
    got, program = ops(ours)
    assert got == want
    twin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train(train)
    twin.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(program.module()(x), twin(x))


def test_exported_uncentred_statistics_over_the_batch_stay_uncentred():
    # only BatchNorm's centred call is written as torch.batch_norm in an export: the operator
    # over the batch without centering keeps its own statistics (mean square, no mean)
    class Op(nn.Module):
        def forward(self, x):
            return NLF.normalize(x, 8, True, center=False)

    x = off_centre(4, 8, 5, 5)
    program = torch.export.export(Op(), (x,))
    want = x / torch.sqrt(x.pow(2).mean(dim=(0, 2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda m: m.GroupNorm(4, 8),                     # 2 channels per group
     lambda m: m.InstanceNorm2d(8, affine=True)],     # G = C: one channel per group
)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("strict", [False, True])
def test_channels_last_export_with_dynamic_sizes_runs_every_size(make, train, strict):
    # channels_last CPU input picks its path by a size rule (native_channels_last); its
    # comparisons on the dynamic sizes became guards of the program: exported at a small size,
    # it refused the sizes where the rule picks another path ("Guard failed: 8 * ... < 65536";
    # strict=True failed to export: "argument of type LazyProxy"). torch.nn's runs them all
    from torch.export import Dim

    torch.manual_seed(0)
    theirs = make(nn).train(train)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = make(nlnn).train(train)
    ours.load_state_dict(theirs.state_dict())
    dims = {0: Dim("n", min=2), 2: Dim("h", min=2), 3: Dim("w", min=2)}
    x = off_centre(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(ours, (x,), dynamic_shapes=(dims,), strict=strict).module()
    for shape in [(3, 8, 9, 5),      # small: ATen's kernel on shifted input, as exported
                  (64, 8, 30, 31),   # 476k elements, 930 positions: the sums path's size
                  (2, 8, 40, 40)]:   # 1600 positions: ATen's vectorized forward's size
        xx = off_centre(*shape).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(program(xx), theirs(xx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make,train", [
    # the modules whose exported program moves buffers, each in the mode that moves them: ATen's
    # own update (BN, SyncBN on one process), normlab's updates written as ops (IN's running
    # statistics, GhostBN's slice 0, Batch Renorm's r/d and step, EvoNorm-B0's variance)
    (lambda: nlnn.BatchNorm2d(8), True),
    (lambda: nlnn.SyncBatchNorm(8), True),
    (lambda: nlnn.InstanceNorm2d(8, affine=True, track_running_stats=True), True),
    (lambda: nlnn.GhostBatchNorm2d(8, virtual_batch=2), True),
    (lambda: nlnn.BatchRenorm2d(8), True),
    (lambda: nlnn.EvoNorm2dB0(8), True),
    (lambda: nlnn.BatchNorm2d(8, activation="silu"), False),  # eval, a fused activation
    (lambda: nlnn.RMSNorm2d(8), False),  # permuted rows, uncentred
])
def test_run_decompositions_keeps_outputs_and_buffer_updates(make, train):
    """``ExportedProgram.run_decompositions()`` (the core ATen opset that ExecuTorch and other
    lowerings start from): normlab's ops decompose, and the program still computes the eager
    module's output and moves its buffers as the eager module does."""
    torch.manual_seed(0)
    m = make().train(train)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name
                        or name == "v" else torch.randn_like(t))
    twin = copy.deepcopy(m)
    x = off_centre(4, 8, 5, 5)
    program = torch.export.export(m, (x,)).run_decompositions()
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    targets.discard(operator.getitem)  # (the outputs of a multi-output op, as torch's BN gives)
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets), targets  # ATen ops only
    module = program.module()
    torch.testing.assert_close(module(x), twin(x))
    for name, want in twin.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], want, msg=name)
