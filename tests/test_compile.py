"""Modules and the operator under torch.compile(fullgraph=True): backend selection must not break
the graph (no imports or unsupported Python inside the traced dispatch)."""

import copy

import pytest
import torch

import normlab
import normlab.nn as nlnn
from normlab import functional as NF
from formula import off_centre


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nlnn.GroupNorm(4, 16, activation="silu"), (2, 16, 6, 6)),  # fused activation
        (lambda: nlnn.BatchNorm2d(8), (4, 8, 5, 5)),                     # running-stat update
        (lambda: nlnn.LayerNorm(12), (3, 7, 12)),                        # the rows form
        (lambda: nlnn.RMSNorm(12), (3, 7, 12)),                          # center=False
        (lambda: nlnn.FilterResponseNorm2d(8), (2, 8, 5, 5)),            # center=False + TLU
        (lambda: nlnn.EvoNorm2dB0(8), (4, 8, 5, 5)),                     # moments, running var
    ],
)
def test_fullgraph(make, shape):
    m = make()
    x = off_centre(*shape)
    expected = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected)


def test_use_backend_inside_compiled_code():
    x = off_centre(2, 8, 4, 4)

    def f(x):
        with normlab.use_backend("reference"):
            return NF.group_norm(x, 4)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_compiled_module_follows_the_backend_choice(monkeypatch):
    """The compiled graph follows ``use_backend`` around the call, $NORMLAB_BACKEND and the
    thread: TorchDynamo reads the per-thread stack and the variable and retraces when they change
    (torch 2.4's could read neither: a threading.local subclass's attribute, bytes.decode)."""
    import threading

    from normlab.backends import _INSTANCES, get_backend, register_backend

    chosen = []

    class Spy:
        name = "spy"
        supports_uncentered = True

        def available(self):
            return True

        def unsupported_reason(self, *a):
            return None

        def normalize(self, *args, **kwargs):
            chosen.append("spy")
            return get_backend("reference").normalize(*args, **kwargs)

        def normalize_fixed(self, *args):
            chosen.append("spy")
            return get_backend("reference").normalize_fixed(*args)

    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)
    m = nlnn.GroupNorm(4, 16, activation="silu")
    with torch.no_grad():
        m.weight.normal_(1.0, 0.5)
        m.bias.normal_()
    x = off_centre(2, 16, 5, 5)
    expected = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="eager")

    def run(expect_spy):
        chosen.clear()
        torch.testing.assert_close(compiled(x), expected)
        assert chosen == (["spy"] if expect_spy else [])

    register_backend("spy", Spy())
    try:
        run(False)
        with normlab.use_backend("spy"):
            run(True)
            with normlab.use_backend("native"):
                run(False)
            seen = {}

            def other_thread():  # the stack is per thread: auto here, then its own choice
                try:
                    run(False)
                    with normlab.use_backend("spy"):
                        run(True)
                except BaseException as e:  # (handed to the main thread)
                    seen["error"] = e

            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            if "error" in seen:
                raise seen["error"]
            run(True)
        run(False)
        monkeypatch.setenv("NORMLAB_BACKEND", " Spy ")
        run(True)
        monkeypatch.delenv("NORMLAB_BACKEND")
        run(False)
    finally:
        _INSTANCES.pop("spy", None)


def test_frn_compiles_once_for_every_spatial_size():
    # the uncentred statistics over H*W went to ATen's fused RMS op, whose int[] width TorchDynamo
    # specialized (it shows a SymInt to type() as an int): with dynamic shapes, one recompile per
    # new H*W (and a strict torch.export with dynamic H, W failed). torch's GroupNorm, the
    # centred twin, compiles once for all of them
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = nlnn.FilterResponseNorm2d(8)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.tau.normal_(0.0, 0.3)
    # H != W everywhere (no duck-sized H == W guard), and H*W differs from shape to shape
    xs = [off_centre(*s) for s in [(2, 8, 5, 7), (3, 8, 6, 9), (4, 8, 9, 4), (2, 8, 11, 3)]]

    def graphs(module):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(module, backend="eager", dynamic=True)
        outs = [compiled(x) for x in xs]
        return counters["stats"]["unique_graphs"], outs

    want, _ = graphs(torch.nn.GroupNorm(4, 8))
    got, outs = graphs(m)
    assert got == want == 1
    w, b, tau = (p.detach().double().reshape(1, -1, 1, 1) for p in (m.weight, m.bias, m.tau))
    for x, y in zip(xs, outs):  # the float64 formula: x / sqrt(mean_HW(x^2) + eps), TLU
        x = x.double()
        exact = torch.maximum(x / torch.sqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + m.eps)
                              * w + b, tau)
        torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)


# every module with a torch.nn twin is compared with it; the others with one graph. Sizes: the
# batch and H, W change from call to call, H != W and H*W differ (no duck-sized guard), the
# batch stays a multiple of 2 above 2 (GhostBatchNorm's virtual batch of 2: a batch of one
# slice is plain BatchNorm, another branch and so another graph)
_DYNAMIC_SIZES = [(4, 8, 5, 7), (6, 8, 6, 9), (8, 8, 9, 4), (10, 8, 11, 3)]


@pytest.mark.parametrize("make,twin", [
    (lambda: nlnn.BatchNorm2d(8), lambda: torch.nn.BatchNorm2d(8)),
    (lambda: nlnn.SyncBatchNorm(8), lambda: torch.nn.BatchNorm2d(8)),  # one process: BN's
    (lambda: nlnn.GroupNorm(4, 8), lambda: torch.nn.GroupNorm(4, 8)),
    (lambda: nlnn.InstanceNorm2d(8, affine=True, track_running_stats=True),
     lambda: torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
    (lambda: nlnn.LayerNorm2d(8), None), (lambda: nlnn.RMSNorm2d(8), None),
    (lambda: nlnn.EvoNorm2dS0(8, num_groups=4), None), (lambda: nlnn.EvoNorm2dB0(8), None),
    (lambda: nlnn.BatchRenorm2d(8), None), (lambda: nlnn.FrozenBatchNorm2d(8), None),
    (lambda: nlnn.GhostBatchNorm2d(8, virtual_batch=2), None),
    (lambda: nlnn.WSConv2d(8, 8, 3, padding=1), None),
    (lambda: nlnn.ScaledStdConv2d(8, 8, 3, padding=1), None),
])
@pytest.mark.parametrize("train", [True, False])
def test_every_module_compiles_once_for_every_size_with_dynamic_true(make, twin, train):
    """torch.compile(fullgraph=True, dynamic=True), as a detector or a variable-resolution
    trainer compiles: one graph for every batch and spatial size (torch.nn's twin: one too),
    outputs and buffers those of the eager module."""
    from torch._dynamo.utils import counters

    def graphs(module):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=True)
        return [compiled(x) for x in xs], counters["stats"]["unique_graphs"]

    torch.manual_seed(0)
    m = make().train(train)
    with torch.no_grad():  # random affine and running statistics, not 1 and 0
        for name, t in m.named_parameters():
            t.copy_(torch.rand_like(t) + 0.5 if "weight" in name or name == "v" else
                    torch.randn_like(t))
        for name, t in m.named_buffers():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in name or "weight" in name else
                        torch.randn_like(t))
    eager = copy.deepcopy(m)
    xs = [off_centre(*s) for s in _DYNAMIC_SIZES]
    outs, got = graphs(m)
    want = 1 if twin is None else graphs(twin().train(train))[1]
    assert got == want == 1
    for x, y in zip(xs, outs):
        torch.testing.assert_close(y, eager(x))
    for (name, t), u in zip(m.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(t, u, msg=name)
