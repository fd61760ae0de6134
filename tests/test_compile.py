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
        (lambda: nlnn.GroupNorm(4, 16, activation="silu"), (2, 16, 6, 6)),
        (lambda: nlnn.BatchNorm2d(8), (4, 8, 5, 5)),
        (lambda: nlnn.LayerNorm(12), (3, 7, 12)),
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
