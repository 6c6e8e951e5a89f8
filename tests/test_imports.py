"""The package's import structure: no cycles between modules, no imports inside functions, no private
names imported across modules. (`lint-imports` checks the stage layering itself.)"""
import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1] / "jfig"


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("jfig", include_external_packages=False)


def test_no_import_cycles(graph):
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith(importer + ".") or importer.startswith(imported + "."):
                continue          # a package's __init__ re-exporting its modules is not a cycle
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None and not any(importer.startswith(m + ".") for m in back[1:-1]):
                cycles.append((importer, *back))
    assert not cycles, cycles


def _modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_no_imports_inside_functions():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found.append(f"{path.relative_to(ROOT.parent)}:{inner.lineno}")
    assert not found, found


def test_no_private_names_across_modules():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("jfig")):
                found += [f"{path.relative_to(ROOT.parent)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
    assert not found, found
