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
