"""Evaluate constant subgraphs into single ``Const`` nodes, with NumPy, from an explicit allowlist.

Only pure, deterministic math is evaluated (the ``EVALUATORS`` table). Nothing TensorFlow would
execute is ever run here: a stateful, random or I/O op is simply not in the table, so a subgraph
containing one is left as it is, whatever its inputs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphfold.fold.graph import Graph, canonical, split_tensor

# Results larger than this stay unevaluated (a Tile or Fill must not blow the graph up).
MAX_ELEMENTS = 1 << 24


def _attr_type(node, key):
    return tf.as_dtype(node.attr[key].type).as_numpy_dtype


def _squeeze(node, x):
    dims = list(node.attr["squeeze_dims"].list.i)
    return np.squeeze(x, axis=tuple(dims)) if dims else np.squeeze(x)


def _concat(node, *args):
    *values, axis = args
    return np.concatenate(values, axis=int(axis))


def _pack(node, *values):
    return np.stack(values, axis=node.attr["axis"].i)


def _rsqrt(node, x):
    return (1 / np.sqrt(x.astype(np.float64))).astype(x.dtype)


def _div(node, x, y):
    if np.issubdtype(x.dtype, np.integer):
        # TF's integer Div truncates toward zero (-7 / 2 = -3), unlike floor_divide; and a
        # division by zero is an error TF raises at run time: leave that node unevaluated.
        if np.any(y == 0):
            raise ValueError("integer division by zero")
        quotient = np.abs(x) // np.abs(y)
        return np.where((x < 0) != (y < 0), -quotient, quotient)
    return np.divide(x, y)


def _same_type(fn):
    """Applies ``fn`` and keeps the dtype of the first argument (NumPy may promote)."""

    def evaluate(node, *args):
        return np.asarray(fn(*args)).astype(args[0].dtype, copy=False)

    return evaluate


EVALUATORS = {
    "Identity": lambda node, x: x,
    "Snapshot": lambda node, x: x,
    "StopGradient": lambda node, x: x,
    "PreventGradient": lambda node, x: x,
    "Rsqrt": _rsqrt,
    "Sqrt": _same_type(np.sqrt),
    "Reciprocal": _same_type(np.reciprocal),
    "Inv": _same_type(np.reciprocal),
    "Neg": _same_type(np.negative),
    "Square": _same_type(np.square),
    "Abs": _same_type(np.abs),
    "Mul": _same_type(np.multiply),
    "Add": _same_type(np.add),
    "AddV2": _same_type(np.add),
    "Sub": _same_type(np.subtract),
    "RealDiv": _same_type(np.divide),
    "Div": lambda node, x, y: np.asarray(_div(node, x, y)).astype(x.dtype),
    "Maximum": _same_type(np.maximum),
    "Minimum": _same_type(np.minimum),
    "Reshape": lambda node, x, shape: np.reshape(x, shape.astype(np.int64)),
    "Squeeze": _squeeze,
    "ExpandDims": lambda node, x, axis: np.expand_dims(x, int(axis)),
    "Cast": lambda node, x: x.astype(_attr_type(node, "DstT")),
    "ConcatV2": _concat,
    "Pack": _pack,
    "Transpose": lambda node, x, perm: np.transpose(x, perm.astype(np.int64)),
    "Fill": lambda node, dims, value: np.full(dims.astype(np.int64), value, dtype=value.dtype),
    "Tile": lambda node, x, multiples: np.tile(x, multiples.astype(np.int64)),
    "Prod": lambda node, x, axes: np.prod(
        x, axis=tuple(np.atleast_1d(axes).tolist()), keepdims=node.attr["keep_dims"].b
    ).astype(x.dtype),
    "Shape": lambda node, x: np.asarray(x.shape, dtype=_attr_type(node, "out_type")),
}


_BROADCASTING = ("Mul", "Add", "AddV2", "Sub", "RealDiv", "Div", "Maximum", "Minimum")


def _fill_size(values) -> float:
    return float(np.prod(values[0].astype(np.float64)))


def _tile_size(values) -> float:
    return values[0].size * float(np.prod(values[1].astype(np.float64)))


def _broadcast_size(values) -> float:
    """[N, 1] * [1, M] has N·M elements."""
    return float(np.prod(np.broadcast_shapes(values[0].shape, values[1].shape), dtype=np.float64))


# The ops that can make their result larger than their inputs: its element count, known before
# computing it (float: a hostile ``Fill`` of [2**40, 2**40] must not wrap around).
_RESULT_SIZE = {
    "Fill": _fill_size,
    "Tile": _tile_size,
    **dict.fromkeys(_BROADCASTING, _broadcast_size),
}
# The evaluated ops whose result does not take the dtype of their ``T`` attribute.
_OWN_DTYPE = frozenset({"Cast", "Shape", "Prod", "Fill", "Tile"})


def _result_size(node, values) -> float:
    """The element count of the result before computing it (0: no larger than its inputs,
    checked after)."""
    size = _RESULT_SIZE.get(node.op)
    return 0.0 if size is None else size(values)


def _evaluate(node, values):
    if _result_size(node, values) > MAX_ELEMENTS:
        return None  # checked first: never allocate it
    result = np.asarray(EVALUATORS[node.op](node, *values))
    if result.size > MAX_ELEMENTS:
        return None
    if node.op not in _OWN_DTYPE and "T" in node.attr:
        expected = tf.as_dtype(node.attr["T"].type).as_numpy_dtype
        result = result.astype(expected, copy=False)  # no copy of a weight read through
    return result


def fold_constants(graph: Graph) -> int:
    """Replaces every allowlisted node whose data inputs are all constant by one ``Const``.

    Works in one topological sweep; returns the number of nodes replaced. Nodes made dead are
    left for ``Graph.prune``.
    """
    order = _topological(graph)
    values: dict[str, np.ndarray] = {}
    for name in order:
        node = graph.nodes[name]
        if node.op == "Const":
            continue
        if node.op not in EVALUATORS:
            continue
        inputs = graph.data_inputs(node)
        args = []
        for tensor in inputs:
            value = values.get(canonical(tensor))
            if value is None:
                value = graph.const(tensor)
            if value is None:
                break
            args.append(value)
        else:
            try:
                with np.errstate(all="ignore"):
                    result = _evaluate(node, args)
            except (ValueError, TypeError, IndexError):
                result = None
            if result is not None:
                values[name] = result
    _drop_pure_control_edges(graph, values.keys())
    replaced = 0
    for name, value in values.items():
        node = graph.nodes[name]
        consumers = [c for c in graph.consumers(name) if c.name not in values]
        if not consumers and not graph.is_fetched(name):
            continue
        dtype = tf.as_dtype(value.dtype)
        const = graph.add_const(name + "/folded", value, dtype)
        for control in (t for t in node.input if t.startswith("^")):
            graph.nodes[const].input.append(control)
        graph.replace_uses(name, const)
        if graph.is_fetched(name):
            # Keep the fetched name valid: turn the node itself into an Identity of the constant.
            graph.become(node, "Identity", [const], dtype)
        replaced += 1
    return replaced


def _drop_pure_control_edges(graph: Graph, pure) -> None:
    """A control edge from a constant or from evaluated pure math orders nothing: remove it (it
    would keep the original weights alive through the frozen function's ``NoOp``)."""
    pure = set(pure)
    for node in graph.graph_def.node:
        if any(t.startswith("^") for t in node.input):
            kept = [
                t
                for t in node.input
                if not t.startswith("^") or (t[1:] not in pure and graph.nodes[t[1:]].op != "Const")
            ]
            if len(kept) != len(node.input):
                del node.input[:]
                node.input.extend(kept)


def _topological(graph: Graph) -> list[str]:
    """Node names, every node after all its inputs (Kahn's algorithm, control edges included)."""
    indegree = {}
    users: dict[str, list[str]] = {}
    for name, node in graph.nodes.items():
        preds = {split_tensor(t.lstrip("^"))[0] for t in node.input}
        preds &= graph.nodes.keys()
        indegree[name] = len(preds)
        for pred in preds:
            users.setdefault(pred, []).append(name)
    ready = [n for n, d in indegree.items() if d == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for user in users.get(name, ()):
            indegree[user] -= 1
            if indegree[user] == 0:
                ready.append(user)
    return order
