"""ONNX export of models built with normlab's modules, through both of torch.onnx.export's
exporters, run in onnxruntime and compared with torch.nn's twin (or, for the norms torch lacks,
normlab's eager module, itself tested against float64 formulas elsewhere).

``dynamo=False`` is the TorchScript exporter, torch's default before 2.9 (normlab supports torch
>= 2.4): it has no ONNX form for ATen's fused kernels the native backend calls, so a traced call
goes through ops it knows (normlab.functional._onnx_traced); LayerNorm, GroupNorm/InstanceNorm
and BatchNorm become ONNX's own LayerNormalization, InstanceNormalization and
BatchNormalization. ``dynamo=True`` (the default since 2.9) exports torch.export's program.
Every export has a dynamic batch dim, checked at two batch sizes and a channels_last input.
"""

import contextlib
import io
import re
import warnings

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from formula import off_centre
from versions import TORCH_ONNX_DYNAMO, needs_torch_onnx_dynamo

onnx = pytest.importorskip("onnx", reason="pip install -e .[test] installs onnx")
ort = pytest.importorskip("onnxruntime", reason="pip install -e .[test] installs onnxruntime")

C = 8  # 8 channels in 4 groups: GN's groups hold 2 channels, EvoNorm-S0's too
HW = 5  # 5x5 positions: LayerNorm/RMSNorm over (C, 5, 5) need a fixed spatial size

# name -> (normlab module, torch.nn twin or None, the ONNX op the TorchScript exporter must use)
CASES = {
    # BN in eval: the running statistics, as ONNX BatchNormalization
    "batchnorm": (lambda: nlnn.BatchNorm2d(C), lambda: nn.BatchNorm2d(C), "BatchNormalization"),
    # a fused activation after the affine (torch.nn has no such argument)
    "batchnorm_silu": (lambda: nlnn.BatchNorm2d(C, activation="silu"), None,
                       "BatchNormalization"),
    # was aten::native_group_norm, which the TorchScript exporter cannot write
    "groupnorm": (lambda: nlnn.GroupNorm(4, C), lambda: nn.GroupNorm(4, C),
                  "InstanceNormalization"),
    "groupnorm_gelu": (lambda: nlnn.GroupNorm(4, C, activation="gelu"), None,
                       "InstanceNormalization"),
    # per-sample statistics in eval (no running stats): the group-norm path with G = C
    "instancenorm": (lambda: nlnn.InstanceNorm2d(C, affine=True),
                     lambda: nn.InstanceNorm2d(C, affine=True), "InstanceNormalization"),
    # running statistics in eval: BN's formula with IN's buffers
    "instancenorm_running": (lambda: nlnn.InstanceNorm2d(C, affine=True, track_running_stats=True),
                             lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True),
                             "BatchNormalization"),
    # was native_layer_norm with a traced width (SymbolicValueError)
    "layernorm": (lambda: nlnn.LayerNorm([C, HW, HW]), lambda: nn.LayerNorm([C, HW, HW]),
                  "LayerNormalization"),
    # LN over the channels at each position (ConvNeXt's), through permutes
    "layernorm2d": (lambda: nlnn.LayerNorm2d(C), None, None),
    # the same without centering: RMS over the channels
    "rmsnorm2d": (lambda: nlnn.RMSNorm2d(C), None, None),
    # was aten::_fused_rms_norm; torch.nn.RMSNorm itself does not export with dynamo=False
    "rmsnorm": (lambda: nlnn.RMSNorm([C, HW, HW]), None, None),
    # uncentred statistics per channel, then the TLU
    "frn": (lambda: nlnn.FilterResponseNorm2d(C), None, None),
    "evonorm_s0": (lambda: nlnn.EvoNorm2dS0(C, num_groups=4), None, None),
    "evonorm_b0": (lambda: nlnn.EvoNorm2dB0(C), None, None),
    "frozen_bn": (lambda: nlnn.FrozenBatchNorm2d(C), None, "BatchNormalization"),
    # eval uses the running statistics over the whole batch, as BN
    "ghost_bn": (lambda: nlnn.GhostBatchNorm2d(C, virtual_batch=2), None, "BatchNormalization"),
    "batch_renorm": (lambda: nlnn.BatchRenorm2d(C), None, "BatchNormalization"),
    # SyncBN in eval is BN (no process group needed)
    "syncbn": (lambda: nlnn.SyncBatchNorm(C), lambda: nn.BatchNorm2d(C), "BatchNormalization"),
}


def _model(make_norm, conv=nn.Conv2d):
    # the ReLU before the norm: the exporter folds a BatchNormalization right after a Conv
    # into the Conv's weights, and the graph check below wants to see the norm's own op
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, C, 3, padding=1), nn.ReLU(), make_norm())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # random affine (and TLU/EvoNorm) parameters
        model.train()
        for _ in range(3):  # running statistics away from their initial 0 and 1
            model(off_centre(4, 3, HW, HW))
    return model.eval()


def _export(model, path, dynamo, x=None):
    """``model`` written to ``path`` with a dynamic batch dim; the ONNX model loaded back."""
    x = off_centre(2, 3, HW, HW) if x is None else x
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        if dynamo:
            pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs it")
            torch.onnx.export(model, (x,), path, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:  # (torch < 2.5 has no dynamo=: the TorchScript exporter is its only one)
            torch.onnx.export(model, (x,), path, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}},
                              **({"dynamo": False} if TORCH_ONNX_DYNAMO else {}))
    return onnx.load(path)


def _inputs():
    torch.manual_seed(1)
    return [
        off_centre(2, 3, HW, HW),  # the export's batch size
        off_centre(3, 3, HW, HW),  # another one: the batch dim is dynamic
        off_centre(2, 3, HW, HW).contiguous(memory_format=torch.channels_last),
    ]


def _run(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=needs_torch_onnx_dynamo)],
                         ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_runs_in_onnxruntime_as_torch(name, dynamo, tmp_path):
    make, make_twin, fused_op = CASES[name]
    model = _model(make)
    reference = model
    if make_twin is not None:
        reference = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU(), make_twin()).eval()
        reference.load_state_dict(model.state_dict())
    path = str(tmp_path / f"{name}.onnx")
    graph = _export(model, path, dynamo).graph
    ops = {node.op_type for node in graph.node}
    assert "ATen" not in ops  # no fallback to an ATen op onnxruntime does not know
    if not dynamo and fused_op is not None:
        assert fused_op in ops, sorted(ops)
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(_run(path, x), reference(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=needs_torch_onnx_dynamo)],
                         ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("conv", [nlnn.WSConv2d, nlnn.ScaledStdConv2d])
def test_standardized_convolutions_export(conv, dynamo, tmp_path):
    # the weight standardization (the operator on the weight, G = out channels) is computed
    # in the graph from the stored weight; was aten::native_group_norm with dynamo=False
    model = _model(lambda: nlnn.GroupNorm(4, C), conv=conv)
    path = str(tmp_path / "ws.onnx")
    _export(model, path, dynamo)
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(_run(path, x), model(x), atol=2e-5, rtol=1e-5)


def test_a_timm_model_converted_to_normlab_group_norm_exports(tmp_path):
    # a whole network: timm's ResNet-18 with its BatchNorms converted to normlab's GroupNorm
    # (32 groups), through the TorchScript exporter (the one that failed), at 32x32
    from timm_import import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = normlab.convert_norm(timm.create_model("resnet18", num_classes=10), "gn").eval()
    norms = [m for m in model.modules() if isinstance(m, nlnn.GroupNorm)]
    assert len(norms) == 20  # the stem's, two per basic block, one per downsample
    with torch.no_grad():
        for m in norms:
            m.weight.add_(0.3 * torch.randn_like(m.weight))
            m.bias.add_(0.3 * torch.randn_like(m.bias))
    x = off_centre(2, 3, 32, 32)
    path = str(tmp_path / "resnet18.onnx")
    _export(model, path, dynamo=False, x=x)
    with torch.no_grad():
        for xx in (x, off_centre(3, 3, 32, 32)):
            torch.testing.assert_close(_run(path, xx), model(xx), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks' constants
def test_torch_jit_trace_outside_an_export_keeps_the_native_kernels():
    # only the ONNX exporter's trace takes the exportable ops: a plain torch.jit.trace (TorchScript
    # deployment) still records ATen's fused kernels - group norm's, and RMSNorm's, which the
    # exporter's trace writes as the reference's plain ops instead (it has no ONNX form there)
    model = _model(lambda: nlnn.GroupNorm(4, C))
    x = off_centre(2, 3, HW, HW)
    traced = torch.jit.trace(model, (x,))
    assert re.search(r"aten::(native_)?group_norm", str(traced.inlined_graph))
    torch.testing.assert_close(traced(x), model(x))
    rms = nn.Sequential(nlnn.RMSNorm(C)).eval()
    xr = off_centre(2, 3, C)
    graph = str(torch.jit.trace(rms, (xr,)).inlined_graph)
    assert re.search(r"aten::(_fused_)?rms_norm", graph) and "aten::pow" not in graph


def test_mixed_dtype_layer_norm_exports_through_the_plain_ops(tmp_path):
    # a float64 affine on float32 input (normlab accepts parameters of another dtype; torch's
    # LayerNorm does not): not ONNX LayerNormalization, whose inputs share one type, but the
    # reference's ops; computed in float32 as the eager module does
    model = nn.Sequential(nlnn.LayerNorm(C)).eval()
    with torch.no_grad():
        model[0].to(torch.float64)
        model[0].weight.add_(0.3 * torch.randn(C, dtype=torch.float64))
    x = off_centre(4, 3, C)
    path = str(tmp_path / "ln64.onnx")
    _export(model, path, dynamo=False, x=x)
    with torch.no_grad():
        for xx in (x, off_centre(2, 3, C)):
            torch.testing.assert_close(_run(path, xx), model(xx), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=needs_torch_onnx_dynamo)],
                         ids=["torchscript", "dynamo"])
def test_export_with_the_triton_backend_in_force(dynamo, tmp_path):
    # on a GPU auto picks the Triton kernels, whose custom ops have no ONNX form: under either
    # exporter the call is written with torch's ops whatever the backend in force (Triton on
    # the GPU, or under its interpreter on CPU tensors); a plain torch.export keeps the
    # kernel's op
    from normlab.backends import BackendUnavailable, get_backend

    try:
        if not get_backend("triton").available():
            pytest.skip("the triton backend is unavailable (no CUDA and TRITON_INTERPRET != 1)")
    except BackendUnavailable as e:
        pytest.skip(f"the triton backend is unavailable: {e}")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs CUDA tensors there
    model = _model(lambda: nlnn.GroupNorm(4, C, activation="silu")).to(device)
    x = off_centre(2, 3, HW, HW).to(device)
    with normlab.use_backend("triton"):
        ops = {str(n.target) for n in torch.export.export(model, (x,)).graph.nodes}
        assert any(op.startswith("normlab.") for op in ops), sorted(ops)  # Triton's op
        path = str(tmp_path / "triton.onnx")
        _export(model, path, dynamo, x=x)
        with torch.no_grad():
            for xx in _inputs():
                torch.testing.assert_close(_run(path, xx), model(xx.to(device)).cpu(),
                                           atol=2e-5, rtol=1e-5)
