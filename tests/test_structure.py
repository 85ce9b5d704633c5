"""The house: graphfold's modules import each other without cycles, none reaches back up into the
package (``import graphfold`` inside it), and the knowledge of ops lives in the two tables."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "graphfold"


def _imports() -> dict[str, set[str]]:
    """module -> the graphfold modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        module = path.stem
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("graphfold"):
                if node.module == "graphfold":
                    found.update(alias.name for alias in node.names)
                else:
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "graphfold":
                        found.add("graphfold")
                    elif alias.name.startswith("graphfold."):
                        found.add(alias.name.split(".")[1])
        graph[module] = found
    return graph


def test_no_module_imports_the_package_itself():
    for module, imported in _imports().items():
        if module != "__init__":
            assert "graphfold" not in imported and "__init__" not in imported, module


def test_no_import_cycles():
    graph = {m: {i for i in deps if i != m} for m, deps in _imports().items() if m != "__init__"}
    state: dict[str, int] = {}

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in graph.get(module, ()):
            visit(dep, path + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


def test_the_walkers_name_no_op_of_the_tables():
    """plan.py walks the tables: no op the rule table or the linear table handles is named there
    (the oneDNN Pad+Conv2D quirk aside)."""
    from graphfold.layers import LINEAR
    from graphfold.rules import RULES
    source = (PACKAGE / "plan.py").read_text()
    quirk = {"Conv2D", "Pad", "PadV2"}      # plan._pad_meets_conv: a TensorFlow bug, not a rule
    named = [op for op in (set(RULES) | set(LINEAR)) - quirk if f'"{op}"' in source]
    assert not named, named
