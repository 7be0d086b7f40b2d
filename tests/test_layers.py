"""The house rules, checked: imports point only downward (import-linter), no module imports a module that
imports it back, attack-side code never reaches the client's private images, no module imports another
module's private name, and mypy passes on src/.

The checkers run as modules of this interpreter (``python -m mypy``, importlinter's API), never through a
PATH lookup, so they run in a venv that is used without being activated."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "clipleak"


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_import_contracts_hold():
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, "an import points upward or reaches clipleak.client; see lint-imports"


def import_cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Every import of ``a`` -> ``b`` in ``graph`` where ``b`` reaches ``a`` back (directly or through a
    chain), as the shortest cycle ``(a, b, ..., a)``; each cycle once (by its set of modules)."""
    found: dict[frozenset[str], tuple[str, ...]] = {}
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back is not None:
                cycle = (a, *back)
                found.setdefault(frozenset(cycle), cycle)
    return list(found.values())


def test_no_import_cycle():
    """No module imports (at module level, ``TYPE_CHECKING`` blocks included) a module that imports it back."""
    cycles = import_cycles(grimp.build_graph("clipleak", cache_dir=None))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_check_finds_a_chain():
    """The cycle check is not decorative: a three-module circle and a two-module one are both found."""
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.e"), ("p.e", "p.d"),
                               ("p.f", "p.a")]:
        graph.add_import(importer=importer, imported=imported)
    cycles = {frozenset(c) for c in import_cycles(graph)}
    assert cycles == {frozenset({"p.a", "p.b", "p.c"}), frozenset({"p.d", "p.e"})}


def test_import_linter_catches_an_upward_import(tmp_path):
    """The contract is not decorative: an engine module that imports the attacks breaks it."""
    from importlinter.cli import lint_imports

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "src", copy / "src")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "src" / "clipleak" / "engine" / "upward.py"
    bad.write_text("from ..attacks import ATTACKS  # noqa\n")
    code = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True))"], cwd=copy, capture_output=True, text=True,
                          env={"PYTHONPATH": str(copy / "src"), "PATH": "/usr/bin:/bin"})
    assert code.returncode != 0, code.stdout
    assert "BROKEN" in code.stdout or "broken" in code.stdout.lower()
    del lint_imports


def test_no_module_imports_a_private_name():
    offenders = []
    for f in _modules():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{f.relative_to(SRC)}: from {node.module} import {a.name}")
    assert not offenders, offenders


def test_only_the_client_loads_the_private_part():
    """``data.load_part(..., "private")`` is the one door to private images; only clipleak.client uses it."""
    users = []
    for f in _modules():
        text = f.read_text()
        rel = f.relative_to(SRC)
        if rel.parts[0] in ("client", "data"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and node.value == "private" and "load_part" in text:
                users.append(str(rel))
    assert not users, users
    client = (SRC / "client" / "private.py").read_text()
    assert "load_part(spec, image_size," in client


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is a dev dependency")
def test_mypy_passes_on_src():
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
