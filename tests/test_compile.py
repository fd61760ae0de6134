"""Modules and the operator under torch.compile(fullgraph=True): backend selection must not break
the graph (no imports or unsupported Python inside the traced dispatch)."""

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
