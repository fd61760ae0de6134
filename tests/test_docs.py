"""The docstring examples run and print what they show, and the Python blocks of the README
and docs/ run as written (CPU; a few seconds in all).

Left out: ``normlab.backends.triton_norm`` (its example needs a CUDA GPU) and
``normlab.lab.plots`` (its example needs a finished store); both are marked ``+SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

from normlab.models import registry as model_registry

MODULES = [
    "normlab.functional",
    "normlab.factory",
    "normlab.convert",
    "normlab.fold",
    "normlab.optimize",
    "normlab.precise_bn",
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


ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks():
    """(file:line, code) of every fenced ```python block of the README and docs/*.md."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return found


@pytest.mark.parametrize("where,code", [pytest.param(w, c, id=w) for w, c in _python_blocks()])
def test_doc_python_blocks_run_as_written(where, code, tmp_path, monkeypatch, capsys):
    """A snippet in the README or docs/ runs as written, on its own (imports included): a
    reader copies it whole, so it may not lean on names from another block."""
    monkeypatch.chdir(tmp_path)
    # A snippet may register a model (the README's "mynet"); the registry is process-wide, so
    # it is restored afterwards: a test that later lists the models sees only normlab's own.
    monkeypatch.setattr(model_registry, "_REGISTRY", dict(model_registry._REGISTRY))
    exec(compile(code, where, "exec"), {"__name__": "__doc_snippet__"})


def test_doc_python_blocks_are_found():
    assert len(_python_blocks()) >= 2  # the README's GhostBatchNorm and Example blocks


def _ratio_range(rows, key="ratio"):
    values = [float(r[key]) for r in rows]
    return f"{min(values):.2f}-{max(values):.2f}x"


def test_choosing_guide_cpu_costs_are_the_committed_measurements():
    """docs/choosing.md's CPU cost cell quotes benchmarks/results CSVs: its ranges are those
    files' numbers (re-measuring changes the CSV, and this test says which line to update)."""
    import csv
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    guide = open(os.path.join(root, "docs", "choosing.md")).read()
    with open(os.path.join(root, "benchmarks", "results", "cpu_layers_1thread.csv")) as f:
        layers = [r for r in csv.DictReader(f) if "NHWC" not in r["case"]]
    for norm in ("GN", "BN", "LN", "IN"):
        rows = [r for r in layers if r["case"].startswith(norm)]
        assert f"{norm} {_ratio_range(rows)}" in guide, norm
    with open(os.path.join(root, "benchmarks", "results",
                           "cpu_channels_last_1thread_cpu_dx.csv")) as f:
        cl = [r for r in csv.DictReader(f) if r["pass"] == "fwd+bwd"]
    at_most_1 = [r for r in cl if float(r["native_ratio"]) < 1]
    tiny = [r for r in cl if r["shape"] == "2x32x4x4"]
    assert (f"{_ratio_range(at_most_1, 'native_ratio')[:-1]}x on {len(at_most_1)} of {len(cl)}"
            in guide)
    assert f"{_ratio_range(tiny, 'native_ratio')} on a tiny (2, 32, 4, 4)" in guide


def _readme_table_paths():
    """Each path the README's "What is where" table names in its code and tests columns,
    resolved: from the repository root, else beside the cell's previous path (``studies.py``,
    ``plots.py``), else under ``src/normlab/`` (``backends/``). Unresolved ones map to None."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What is where"):text.index("## Backends")]
    found = {}
    for row in table.splitlines()[4:]:
        for cell in row.split("|")[2:4]:
            base = None
            for name in re.findall(r"`([^`]+)`", cell):
                if "/" not in name and "." not in name:
                    continue  # a symbol, such as `_onnx_traced`
                for where in (ROOT, base, ROOT / "src" / "normlab"):
                    if where is not None and (where / name).exists():
                        found[name] = (where / name).resolve()
                        base = found[name].parent
                        break
                else:
                    found[name] = None
    return found


def test_readme_table_paths_exist_and_cover_the_package_and_tests():
    """Every file or folder the README's table names exists, and every module of
    src/normlab/ and every test file is named by it (itself or a folder above it)."""
    found = _readme_table_paths()
    assert not [n for n, p in found.items() if p is None], "README table names missing paths"
    named = {p for p in found.values()}

    def covered(path):
        return any(p == path or p in path.parents for p in named)

    modules = [p for p in (ROOT / "src" / "normlab").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    tests = list((ROOT / "tests").rglob("test_*.py"))
    missing = [str(p.relative_to(ROOT)) for p in modules + tests if not covered(p.resolve())]
    assert not missing, f"the README's 'What is where' table does not name {missing}"


def test_the_norm_map_names_every_norm_and_its_files_and_kernels_exist():
    """The README's "Every norm: where it is" table: a row for each name of
    ``normlab.factory.NORMS`` (but none), its files under the column's folder, and each kernel
    or function it names defined in triton_norm.py (or reference.py, functional.py)."""
    from normlab.factory import NORMS

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Every norm: where it is"):text.index("## The lab")]
    rows = [r.split("|")[1:-1] for r in table.splitlines() if r.startswith("| ")][1:]
    names = {n for r in rows for n in re.findall(r"`([a-z0-9_]+)`", r[0])}
    assert set(NORMS) - {"none"} <= names, set(NORMS) - names
    bases = ("src/normlab/nn", None, "tests", "benchmarks")
    sources = "".join((ROOT / "src/normlab" / f).read_text() for f in (
        "backends/triton_norm.py", "backends/reference.py", "functional.py"))
    for row in rows:
        for base, cell in zip(bases, row[1:]):
            for name in re.findall(r"`([^`]+)`", cell):
                if name.endswith(".py"):
                    assert (ROOT / base / name).exists(), (base, name)
                elif base is None and name.startswith(("_", "ROWS")):
                    assert re.search(rf"^(def |){re.escape(name)}\b", sources, re.M), name


def test_the_readme_contents_line_links_every_section():
    """The contents line at the README's top: one link per ``## `` section, each to the anchor
    GitHub makes of that heading (lower case, punctuation dropped, spaces as hyphens)."""
    text = (ROOT / "README.md").read_text()
    heads = re.findall(r"^## (.+)$", text, re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}
    contents = text[text.index("Contents:"):text.index("\n\n", text.index("Contents:"))]
    assert set(re.findall(r"\]\(#([^)]+)\)", contents)) == anchors


def test_every_reference_citation_names_a_section_of_docs_references():
    """"REFERENCE section N" (and "sections N-M", "REFERENCE N") in the code, tests, benchmarks,
    scripts and docs: each N is a section of docs/references.md, the file that names its
    sources (the brief it came from is not in the repository)."""
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs/references.md").read_text(), re.M))
    assert sections == {str(n) for n in range(1, 8)}
    cited = {}
    for folder in ("src", "tests", "benchmarks", "scripts", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md", ".sh") or path.name == "references.md":
                continue
            text = re.sub(r"\s+", " ", path.read_text())
            for m in re.finditer(r"REFERENCE(?:'s)?(?: sections?)? (\d+)(?:-(\d+))?", text):
                lo, hi = int(m[1]), int(m[2] or m[1])
                cited.update({str(n): path for n in range(lo, hi + 1)})
            assert "REFERENCE" + ".md" not in text, path  # (split: this file is read too)
    assert cited and set(cited) <= sections, {n: p for n, p in cited.items() if n not in sections}
