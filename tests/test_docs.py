"""The docstring examples run and print what they show (CPU; a few seconds in all).

Left out: ``normlab.backends.triton_norm`` (its example needs a CUDA GPU) and
``normlab.lab.plots`` (its example needs a finished store); both are marked ``+SKIP``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "normlab.functional",
    "normlab.factory",
    "normlab.convert",
    "normlab.fold",
    "normlab.optimize",
    "normlab.distributed",
    "normlab.spp",
    "normlab.nn.batchnorm",
    "normlab.nn.batch_renorm",
    "normlab.nn.frozen_bn",
    "normlab.nn.groupnorm",
    "normlab.nn.instancenorm",
    "normlab.nn.layernorm",
    "normlab.nn.rmsnorm",
    "normlab.nn.frn",
    "normlab.nn.evonorm",
    "normlab.nn.std_conv",
    "normlab.nn.syncbn",
    "normlab.nn.ghost_batchnorm",
    "normlab.optim",
    "normlab.optim.agc",
    "normlab.models",
    "normlab.models.registry",
    "normlab.models.resnet",
    "normlab.models.nf_resnet",
    "normlab.models.bn_dropout_cnn",
    "normlab.models.residual",
    "normlab.lab.cli.spp",
    "normlab.lab.config",
    "normlab.lab.data",
    "normlab.lab.store",
    "normlab.lab.recipe",
    "normlab.lab.checkpoint",
    "normlab.lab.studies",
    "normlab.lab.outfiles",
    "normlab.lab.store_rows",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, name, globs={**vars(module), "torch": torch})
    tests = [t for t in tests if t.examples]
    assert tests, f"{name} has no docstring examples"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
