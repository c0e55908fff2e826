"""The house rules, checked: imports point down the layers, files stay small and say what they hold.

Layers, bottom to top: core (errors, files, provenance, tables, runtime, models, weighting maths)
<- data <- cache <- precompute, distill (siblings that never import each other) <- experiments
<- cli. A module may import its own package and any lower layer, nothing else.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"core": 0, "data": 1, "cache": 2, "precompute": 3, "distill": 3, "experiments": 4, "cli": 5}
MAX_LINES = 500


def _sources() -> list[Path]:
    files = [ROOT / "cli.py", *sorted(ROOT.glob("cli_*.py"))]
    for package in LAYER:
        if (ROOT / package).is_dir():
            files += sorted((ROOT / package).glob("*.py"))
    return files


def _package(path: Path) -> str:
    return "cli" if path.parent == ROOT and (path.name == "cli.py" or path.name.startswith("cli_")) else path.parent.name


def _imports(path: Path | str) -> set[str]:
    """Top-level project packages imported anywhere in the file (also inside functions); ``path``
    may be the source text itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if isinstance(path, Path) else path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {"cli" if n.startswith("cli_") else n.split(".")[0] for n in names
                  if n.split(".")[0] in LAYER or n.startswith("cli_")}
    return found


def _wrong(own: str, imported: set[str]) -> list[str]:
    """The imported packages a module of package ``own`` may not import: its own layer or above."""
    return sorted(p for p in imported - {own} if LAYER[p] >= LAYER[own])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    own = _package(path)
    wrong = _wrong(own, _imports(path))
    assert not wrong, (f"{path.relative_to(ROOT)} ({own}, layer {LAYER[own]}) imports {wrong}: "
                       "imports must point down (core <- data <- cache <- precompute, distill <- "
                       "experiments <- cli)")


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_are_small_and_say_what_they_hold(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
    if path.name == "__init__.py" and not text.strip():
        return
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{path.name}: no module docstring saying what it holds"
    assert text.lstrip().startswith('"""'), f"{path.name}: the first line must be the module docstring"


def test_the_rule_flags_siblings_and_upward_imports_even_inside_functions():
    """The check itself, on sources written here: it must fail for what it is meant to catch."""
    sibling = "def f():\n    from precompute.run import run_precompute\n"
    assert _wrong("distill", _imports(sibling)) == ["precompute"]
    assert _wrong("precompute", _imports("import distill.train\n")) == ["distill"]
    assert _wrong("core", _imports("from data.folders import Metadata\n")) == ["data"]
    assert _wrong("cli", _imports("from cli_cache import cache\n")) == []
    assert _wrong("experiments", _imports("from distill.config import DistillConfig\nimport torch\n")) == []


def test_the_check_sees_every_module():
    names = {str(p.relative_to(ROOT)) for p in _sources()}
    assert {"cache/schema.py", "core/weighting.py", "distill/task.py", "data/metrics.py"} <= names
