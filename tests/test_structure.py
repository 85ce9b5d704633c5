"""The house: graphfold's modules sit in five layers (folders), each importing only from its own
layer, the layers below and the shared leaves; no cycles; none reaches back up into the package
(``import graphfold`` inside it); and the knowledge of ops lives in the engine's tables."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "graphfold"
# Bottom to top (README, "Architecture"); the shared leaves at graphfold/ itself come first.
LAYERS = ("", "fold", "convert", "serving", "fleet", "cli")
# Allowed above its layer: ``python -m graphfold`` runs the command.
ENTRY_POINTS = {"__main__"}


def _module_name(path: pathlib.Path) -> str:
    """``fold.rules`` for graphfold/fold/rules.py, ``errors`` for graphfold/errors.py."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _module_of(dotted: str, modules: set[str]) -> str:
    """The graphfold module an import names: ``graphfold.fold.rules`` -> ``fold.rules``; a
    name imported from a package (``from graphfold.fold import rules``) is handled by the
    caller."""
    return dotted.removeprefix("graphfold.") if dotted != "graphfold" else "graphfold"


def _imports() -> dict[str, set[str]]:
    """module -> the graphfold modules (or packages) it imports, at any depth of its code."""
    paths = [p for p in PACKAGE.rglob("*.py")]
    modules = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] == "graphfold"
            ):
                base = _module_of(node.module, modules)
                for alias in node.names:
                    sub = alias.name if base == "graphfold" else f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "graphfold":
                        found.add(_module_of(alias.name, modules))
        graph[_module_name(path)] = found
    return graph


def _layer(module: str) -> int:
    """The layer of a module or package: ``fold.rules`` -> 1, ``errors`` -> 0."""
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else 0


def test_every_module_sits_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        assert len(parts) == 1 or (len(parts) == 2 and parts[0] in LAYERS), path


def test_no_module_imports_a_layer_above_its_own():
    """fold <- convert <- serving <- fleet <- cli, the leaves below all of them."""
    above = {}
    for module, imported in _imports().items():
        if module.split(".")[-1] in ENTRY_POINTS or module == "__init__":
            continue
        wrong = sorted(i for i in imported if i != "graphfold" and _layer(i) > _layer(module))
        if wrong:
            above[module] = wrong
    assert not above, above


def test_the_layer_check_can_fail():
    assert _layer("fold.report") == 1 and _layer("cli.render") == 5 and _layer("errors") == 0
    assert _layer("cli.render") > _layer("fold.report")  # report importing render: refused


def test_the_leaves_import_no_layer():
    for module, imported in _imports().items():
        if "." not in module and module not in ENTRY_POINTS | {"__init__"}:
            assert all(_layer(i) == 0 for i in imported if i != "graphfold"), (module, imported)


def test_no_module_imports_the_package_itself():
    for module, imported in _imports().items():
        if module != "__init__":
            assert "graphfold" not in imported and "__init__" not in imported, module


def test_no_import_cycles():
    graph = {
        m: {i for i in deps if i != m and i != m.rpartition(".")[0]}
        for m, deps in _imports().items()
        if not m.endswith("__init__")
    }
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
ENGINE = tuple(
    f"fold.{m}"
    for m in (
        "affine",
        "apply",
        "census",
        "constants",
        "decide",
        "graph",
        "inline",
        "layers",
        "plan",
        "rules",
        "shape_values",
        "shapes",
        "writes",
    )
) + ("convert.rewrite",)
EMITTERS = ("add_op", "become")  # graph.add_op(name, "BiasAdd", ...): an op emitted, not a test
# The graph's plumbing, not knowledge of an op's math: a walker may name these.
PLUMBING = frozenset({"Const", "NoOp", "Placeholder"})


def table_ops() -> set[str]:
    from graphfold.fold.affine import BATCH_NORMS, ELEMENTWISE_OPS
    from graphfold.fold.layers import LINEAR
    from graphfold.fold.rules import IDENTITIES, RULES

    return set(RULES) | set(LINEAR) | set(ELEMENTWISE_OPS) | set(BATCH_NORMS) | set(IDENTITIES)


def every_op() -> set[str]:
    """Every op TensorFlow registers (``tf.raw_ops``) and every op a table names, but the graph's
    plumbing."""
    import tensorflow as tf

    return ({name for name in dir(tf.raw_ops) if not name.startswith("_")} | table_ops()) - PLUMBING


def ops_named_outside_tables(source: str, ops: set[str]) -> list[str]:
    """``"line: op"`` for every string literal naming one of ``ops`` inside a function or class
    body (not as the op a ``graph.add_op``/``graph.become`` call emits). A module-level
    collection (a tuple, set or dict: a table) may name ops; a module-level lone string may not."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    for statement in tree.body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and not isinstance(
            statement.value, ast.Constant
        ):
            allowed.update(id(n) for n in ast.walk(statement))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in EMITTERS
            and len(node.args) >= 2
        ):
            allowed.add(id(node.args[1]))
    return [
        f"{node.lineno}: {node.value}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in ops and id(node) not in allowed
    ]


def test_the_check_for_op_names_can_fail():
    ops = {"Conv2D", "BiasAdd", "Relu"}
    source = (
        "TABLE = {'Conv2D': 1}\nLONE = 'Relu'\n"
        "def f(graph, node):\n"
        "    graph.add_op('x', 'BiasAdd', [], None)\n"
        "    return node.op == 'Conv2D' or node.op in ('Relu',)\n"
    )
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
    named = {
        module: found
        for module in ENGINE
        if (
            found := ops_named_outside_tables(
                (PACKAGE / f"{module.replace('.', '/')}.py").read_text(), ops
            )
        )
    }
    assert not named, named
