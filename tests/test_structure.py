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


# The modules of the folding engine: the tables (affine's sources, rules.RULES, layers.LINEAR,
# constants' evaluators) and the code that walks them. Op names belong in the tables only.
# Not here: casts.py (its subject is one op, Cast) and tf_quirks.py (each quirk is a table entry
# whose find/fix code names the ops of its pattern).
ENGINE = ("affine", "apply", "census", "constants", "decide", "graph", "inline", "layers", "plan",
          "rewrite", "rules", "shape_values", "shapes", "writes")
EMITTERS = ("add_op", "become")    # graph.add_op(name, "BiasAdd", ...): an op emitted, not a test
# The graph's plumbing, not knowledge of an op's math: a walker may name these.
PLUMBING = frozenset({"Const", "NoOp", "Placeholder"})


def table_ops() -> set[str]:
    from graphfold.affine import BATCH_NORMS, ELEMENTWISE_OPS
    from graphfold.layers import LINEAR
    from graphfold.rules import IDENTITIES, RULES
    return set(RULES) | set(LINEAR) | set(ELEMENTWISE_OPS) | set(BATCH_NORMS) | set(IDENTITIES)


def every_op() -> set[str]:
    """Every op TensorFlow registers (``tf.raw_ops``) and every op a table names, but the graph's
    plumbing."""
    import tensorflow as tf
    return ({name for name in dir(tf.raw_ops) if not name.startswith("_")} | table_ops()) \
        - PLUMBING


def ops_named_outside_tables(source: str, ops: set[str]) -> list[str]:
    """``"line: op"`` for every string literal naming one of ``ops`` inside a function or class
    body (not as the op a ``graph.add_op``/``graph.become`` call emits). A module-level
    collection (a tuple, set or dict: a table) may name ops; a module-level lone string may not."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    for statement in tree.body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and \
                not isinstance(statement.value, ast.Constant):
            allowed.update(id(n) for n in ast.walk(statement))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in EMITTERS and len(node.args) >= 2:
            allowed.add(id(node.args[1]))
    return [f"{node.lineno}: {node.value}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in ops and id(node) not in allowed]


def test_the_check_for_op_names_can_fail():
    ops = {"Conv2D", "BiasAdd", "Relu"}
    source = ("TABLE = {'Conv2D': 1}\nLONE = 'Relu'\n"
              "def f(graph, node):\n"
              "    graph.add_op('x', 'BiasAdd', [], None)\n"
              "    return node.op == 'Conv2D' or node.op in ('Relu',)\n")
    assert ops_named_outside_tables(source, ops) == ["2: Relu", "5: Conv2D", "5: Relu"]


def test_every_op_covers_what_the_tables_do_not():
    """The ops the engine check looks for include the ones no table handles (a walker naming
    ``Fill`` or ``If`` in a branch is knowledge outside a table too), not the plumbing."""
    ops = every_op()
    assert {"Fill", "Tile", "If", "StatelessWhile", "Shape", "Conv2D", "BiasAdd"} <= ops
    assert not ops & PLUMBING


def test_the_engine_names_no_op_outside_its_tables():
    """The walkers (apply, plan, rules, inline, constants, census, ...) read op facts from the
    tables: no function of the engine names an op, whether a table handles it or not (an op it
    emits and the graph's plumbing aside)."""
    ops = every_op()
    named = {module: found for module in ENGINE
             if (found := ops_named_outside_tables((PACKAGE / f"{module}.py").read_text(), ops))}
    assert not named, named
