"""The lab's layers as normlab.lab's docstring draws them: data flows one way, each module
imports only those on its line or below it, at the top of the file. Read from the source with
ast (nothing is imported), so a new module or import that breaks the order fails here, naming it."""

import ast
import re
from pathlib import Path

import normlab.lab as lab

LAB = Path(lab.__file__).parent


def _ranks() -> dict:
    """module -> its line in the docstring's layer list (continuation lines do not count)."""
    block = lab.__doc__.split("::\n", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in block.splitlines() if re.match(r"    \S", line)]
    ranks = {}
    for i, line in enumerate(lines):
        # the line's names: "run.py", "cli/", "checkpoint.py / memory.py", then the description
        head = re.match(r"\s*((?:\w+\.py|\w+/)(?: / (?:\w+\.py|\w+/))*)", line).group(1)
        for name in re.findall(r"(\w+)(?:\.py|/)", head):
            ranks[name] = i
    return ranks


def _module(path: Path) -> str:
    rel = path.relative_to(LAB)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem  # cli/x.py -> "cli"


def _lab_imports(tree: ast.Module):
    """(node, imported lab module) for every ``from normlab.lab[.x] import ...``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normlab.lab"):
            parts = node.module.split(".")
            for name in ([parts[2]] if len(parts) > 2 else [a.name for a in node.names]):
                yield node, name


def _files():
    return sorted(p for p in LAB.rglob("*.py") if p.name != "__init__.py" or p.parent != LAB)


def test_every_lab_module_is_in_the_layer_list():
    ranks = _ranks()
    missing = sorted({_module(p) for p in _files()} - set(ranks))
    assert not missing, f"add these to normlab.lab's docstring: {missing}"
    assert not set(ranks) - {_module(p) for p in _files()}, "the list names a module that is gone"


def test_each_module_imports_only_those_below_it_at_the_top():
    ranks = _ranks()
    wrong = []
    for path in _files():
        mod = _module(path)
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node, target in _lab_imports(tree):
            where = f"{path.relative_to(LAB)}:{node.lineno}"
            if target != mod and ranks[target] < ranks[mod]:
                wrong.append(f"{where} imports {target}, a layer above it")
            if id(node) not in top:
                wrong.append(f"{where} imports {target} inside a function")
    assert not wrong, wrong
