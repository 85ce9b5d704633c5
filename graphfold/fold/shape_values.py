"""The static value of a shape tensor, where TensorFlow's shape inference leaves it unknown.

``Tensordot`` (Keras' ``Dense`` on a rank-3 or rank-4 input) reshapes its input to
``[prod(free dims), prod(contracted dims)]`` with a shape it computes from ``Shape(x)``; with the
batch dimension unknown, TensorFlow infers ``(None, None)`` for the result, though the contracted
size is known. ``shape_value`` evaluates such shape arithmetic (``Shape``, ``GatherV2``,
``StridedSlice``, ``Prod``, ``Pack``, ``ConcatV2``, ``Cast``, constants) element by element, with
None for each element that depends on an unknown dimension. One evaluator per op, in a table.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np

from graphfold.fold.graph import SHAPE_ONLY_OPS, Graph

Value: TypeAlias = "list[int | None] | int | None"  # a vector, a scalar, or unknown altogether
MAX_DEPTH = 16


def shape_value(graph: Graph, tensor: str, depth: int = 0) -> Value:
    """The value of the integer tensor ``tensor`` (a vector as a list, a scalar as an int), None
    for what is not known statically."""
    const = graph.const(tensor)
    if const is not None:
        if const.dtype.kind not in "iu" or const.ndim > 1:
            return None
        return [int(v) for v in const] if const.ndim == 1 else int(const)
    node = graph.producer(tensor)
    evaluate = _EVALUATORS.get(node.op)
    if evaluate is None or depth >= MAX_DEPTH:
        return None
    operands = (
        [shape_value(graph, t, depth + 1) for t in graph.data_inputs(node)[1:]]
        if node.op not in SHAPE_ONLY_OPS
        else []
    )
    return evaluate(graph, node, depth, operands)


def _first(graph: Graph, node, depth: int):
    return shape_value(graph, graph.data_inputs(node)[0], depth + 1)


def _shape(graph, node, depth, operands):
    shape = graph.shape(graph.data_inputs(node)[0])
    return None if shape is None else list(shape)


def _gather(graph, node, depth, operands):
    params, (indices, axis) = _first(graph, node, depth), operands[:2]
    if not isinstance(params, list) or axis not in (0, None) or indices is None:
        return None
    picked = [indices] if isinstance(indices, int) else indices
    if any(i is None or not -len(params) <= i < len(params) for i in picked):
        return None
    values = [params[i] for i in picked]
    return values[0] if isinstance(indices, int) else values


def _prod(graph, node, depth, operands):
    values, axis = _first(graph, node, depth), operands[0]
    if not isinstance(values, list) or axis not in (0, [0]) or node.attr["keep_dims"].b:
        return None
    return None if any(v is None for v in values) else int(np.prod(values, dtype=np.int64))


def _pack(graph, node, depth, operands):
    values = [_first(graph, node, depth)] + operands
    if node.attr["axis"].i != 0 or not all(v is None or isinstance(v, int) for v in values):
        return None
    return values


def _concat(graph, node, depth, operands):
    parts = [_first(graph, node, depth)] + operands[:-1]
    if operands[-1] not in (0, -1) or not all(isinstance(p, list) for p in parts):
        return None
    return [v for part in parts for v in part]


def _strided_slice(graph, node, depth, operands):
    """A 1-D slice ``x[begin:end:stride]`` (begin/end masks; a shrink to one element)."""
    values, (begin, end, strides) = _first(graph, node, depth), operands[:3]
    attr = {
        k: node.attr[k].i
        for k in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")
    }
    if not isinstance(values, list) or not all(
        isinstance(v, list) and len(v) == 1 and v[0] is not None for v in (begin, end, strides)
    ):
        return None
    if attr["ellipsis_mask"] or attr["new_axis_mask"]:
        return None
    start = None if attr["begin_mask"] & 1 else begin[0]
    stop = None if attr["end_mask"] & 1 else end[0]
    if attr["shrink_axis_mask"] & 1:
        return values[start] if start is not None and -len(values) <= start < len(values) else None
    return values[start : stop : strides[0]]


def _cast(graph, node, depth, operands):
    return _first(graph, node, depth)


_EVALUATORS = {
    "Shape": _shape,
    "GatherV2": _gather,
    "Prod": _prod,
    "Pack": _pack,
    "ConcatV2": _concat,
    "StridedSlice": _strided_slice,
    "Cast": _cast,
    "Identity": _cast,
}
