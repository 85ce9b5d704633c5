"""Carry out a ``Plan`` on the graph, and replace unfolded A's by one multiply-add.

Forward:  W ← W ⊙_out s,  b ← s ⊙ b (+ t on one root).
Backward: W ← W ⊙_in s,   b ← b + W ⊛ t;  a leaf: W_P ← W_P ⊙_out (1/s), b_P ← b_P / s.
New values are computed in float64 and cast back to the weight's dtype. A weight or bias constant
that anything else reads is cloned, never modified. A's nodes are bypassed and left for pruning.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphfold.affine import BATCH_NORM_OPS, Affine
from graphfold.graph import Graph, canonical
from graphfold.layers import LAYOUTS, bias_format
from graphfold.plan import Blocked, Plan, Root, weight_const

_LIMITS = {tf.float16: 65504.0, tf.bfloat16: 3.38e38}


class Refused(Exception):
    """A fold that must not be written; the message says why."""


class Overflow(Refused):
    """A folded value does not fit the weight's dtype."""


def _check_new_bias(layer) -> None:
    """TensorFlow 2.21 with oneDNN (the default x86 CPU build) aborts the process (``CHECK`` in
    tensor_format.h, from grappler's remapper) when a ``DepthwiseConv2dNative`` with
    ``padding=EXPLICIT`` feeds a ``BiasAdd`` or ``Add``: never add one after such a layer."""
    if layer.op == "DepthwiseConv2dNative" and layer.attr["padding"].s == b"EXPLICIT":
        raise Refused(f"a bias after {layer.name} (DepthwiseConv2dNative with EXPLICIT padding) "
                      "makes TensorFlow's oneDNN remapper abort the process")


def _check_range(values: np.ndarray, dtype: tf.DType, what: str) -> None:
    limit = _LIMITS.get(dtype)
    if limit is not None and np.any(np.abs(values) > limit):
        raise Overflow(f"folded {what} overflows {dtype.name}")
    if not np.all(np.isfinite(values)):
        raise Overflow(f"folded {what} is not finite")


def _write_const(graph: Graph, node, index: int, const: str, value: np.ndarray) -> None:
    """Makes input ``index`` of ``node`` a constant holding ``value`` (in place when ``node`` is
    the only reader of ``const``, else on a clone)."""
    dtype = tf.as_dtype(graph.nodes[const].attr["dtype"].type)
    readers = graph.consumers(const)
    direct = canonical(node.input[index]) == const
    if direct and len(readers) == 1 and not graph.is_fetched(const):
        graph.set_const(const, value, dtype)
    else:
        clone = graph.add_const(f"{node.name}/folded_{index}", value, dtype)
        graph.set_input(node, index, clone)


def _bias_operand(graph: Graph, bias_node) -> int:
    for i, tensor in enumerate(graph.data_inputs(bias_node)):
        if graph.const(tensor) is not None:
            return i
    raise ValueError(f"{bias_node.name} has no constant operand")


def compute(graph: Graph, plan: Plan) -> list[tuple] | Blocked:
    """Every change ``plan`` makes, computed before any is made; or why it must not be made (a
    value that overflows the weight's dtype, ...). Pass the result to ``fold``."""
    try:
        return _compute(graph, plan)
    except Refused as err:
        return Blocked(plan.absorbed_by[0] if plan.absorbed_by else "?", str(err))


def _compute(graph: Graph, plan: Plan) -> list[tuple]:
    """Every change as ``(kind, node, input index, const, value)``, computed before any is made."""
    writes = []
    for root in plan.roots + plan.leaves:
        writes += _root_writes(graph, root)
    for sink in plan.sinks:
        layer = graph.nodes[sink.layer]
        const = weight_const(graph, layer)
        w = graph.const(const).astype(np.float64)
        dtype = tf.as_dtype(graph.nodes[const].attr["dtype"].type)
        layout = LAYOUTS[layer.op]
        new_w = layout.scale_in(w, sink.s, layer)
        _check_range(new_w, dtype, f"weight of {layer.name}")
        writes.append(("weight", layer, 1, const, new_w))
        if np.any(sink.t != 0):
            response = layout.response(w, sink.t, layer)
            _check_range(response, dtype, f"bias of {layer.name}")
            _check_new_bias(layer)
            writes.append(("add_bias", layer, None, None, response))
    return writes


def _root_writes(graph: Graph, root: Root) -> list[tuple]:
    """W ← W ⊙_out s; each bias on the path b ← s ⊙ b + t (``x - b``: b ← s ⊙ b − t), with the
    s, t that reach it; a t that reaches the layer itself goes into a new bias."""
    layer = graph.nodes[root.layer]
    const = weight_const(graph, layer)
    w = graph.const(const).astype(np.float64)
    new_w = LAYOUTS[layer.op].scale_out(w, root.s, layer)
    dtype = tf.as_dtype(graph.nodes[const].attr["dtype"].type)
    _check_range(new_w, dtype, f"weight of {layer.name}")
    writes = [("weight", layer, 1, const, new_w)]
    for name, axis, rank, s, t in root.biases:
        bias_node, k, bias_const, b = _bias(graph, name)
        sign = -1.0 if bias_node.op == "Sub" else 1.0      # Sub(y, b): s ⊙ (y − b) + t
        new_b = _channel_values(b, s, sign * t, axis, rank)
        _check_range(new_b, dtype, f"bias of {layer.name}")
        writes.append(("bias", bias_node, k, bias_const, new_b))
    if np.any(root.t != 0):
        _check_range(root.t, dtype, f"bias of {layer.name}")
        _check_new_bias(layer)
        writes.append(("new_bias", layer, None, None, root.t))
    return writes


def _bias(graph: Graph, name: str):
    """A bias node, the index of its constant operand, that constant's name and value."""
    node = graph.nodes[name]
    k = _bias_operand(graph, node)
    const = graph.producer(graph.data_inputs(node)[k]).name
    return node, k, const, graph.const(const).astype(np.float64)


def _channel_values(b: np.ndarray, s: np.ndarray, shift, axis: int | None,
                    rank: int) -> np.ndarray:
    """``s ⊙ b + shift`` shaped to broadcast along channel ``axis`` of a rank-``rank`` tensor
    (keeping b's own shape when b already has one value per channel)."""
    values = b.reshape(-1) * s + shift
    if values.size == b.size:
        return values.reshape(b.shape)
    if axis is None:
        return values.reshape(-1)
    return values.reshape([-1] + [1] * (rank - 1 - axis))


def fold(graph: Graph, affine: Affine, writes: list[tuple]) -> None:
    """Makes the changes ``compute`` returned for A's plan, and bypasses ``affine``."""
    for kind, node, index, const, value in writes:
        if kind in ("weight", "bias"):
            _write_const(graph, node, index, const, value)
        elif kind == "new_bias":
            _add_bias_after(graph, node, value)
        elif kind == "add_bias":
            _add_to_bias(graph, node, value)
    _bypass(graph, affine)


def _add_bias_after(graph: Graph, layer, bias: np.ndarray) -> None:
    """Inserts ``BiasAdd(layer, bias)`` after ``layer`` (a fetched ``layer`` name then names the
    ``BiasAdd``: it still computes the layer's output as it was before the fold)."""
    dtype = graph.dtype(layer)
    const = graph.add_const(f"{layer.name}/folded_bias", bias, dtype)
    add = graph.add_op(f"{layer.name}/folded_bias_add", "BiasAdd", [layer.name, const], dtype,
                       data_format=bias_format(layer))
    graph.shapes[add] = graph.shapes.get(canonical(layer.name))
    graph.redirect(layer.name, add)


def _add_to_bias(graph: Graph, layer, delta: np.ndarray) -> None:
    """Adds ``delta`` to the layer's bias: its own ``BiasAdd`` if it feeds one alone, else a new
    one."""
    users = graph.value_consumers(layer.name)
    if len(users) == 1 and users[0].op == "BiasAdd" and not graph.is_fetched(layer.name):
        bias_node = users[0]
        k = _bias_operand(graph, bias_node) if graph.const(bias_node.input[1]) is not None else None
        if k == 1:
            bias_const = graph.producer(bias_node.input[1]).name
            b = graph.const(bias_const).astype(np.float64)
            if b.size == delta.size:
                _write_const(graph, bias_node, 1, bias_const, b.reshape(-1) + delta)
                return
    _add_bias_after(graph, layer, delta)


def _bypass(graph: Graph, affine: Affine) -> None:
    """Consumers of A's output read A's input instead (A's nodes become dead)."""
    graph.redirect(affine.output, affine.input(graph))


def as_multiply_add(graph: Graph, affine: Affine) -> None:
    """Replaces A's nodes by ``x * s + t`` (one ``Mul`` and one ``AddV2``; either is omitted when
    it is the identity). A float16/bfloat16 batch-norm op stays as it is: its kernel computes in
    float32, and Grappler pushes a ``Mul`` that follows a conv into the conv's half-precision
    filter at run time (``MulConvPushDown``), the very overflow a refused fold avoided."""
    if affine.dtype in (tf.float16, tf.bfloat16) and \
            any(graph.nodes[name].op in BATCH_NORM_OPS for name in affine.nodes):
        return
    x = affine.input(graph)
    dtype = affine.dtype
    shape = [] if affine.axis is None else [-1] + [1] * (affine.rank - 1 - affine.axis)
    y = x
    base = affine.output
    if not np.all(affine.s == 1):
        s = graph.add_const(f"{base}/graphfold_scale", affine.s.reshape(shape), dtype)
        y = graph.add_op(f"{base}/graphfold_mul", "Mul", [y, s], dtype)
        graph.shapes[y] = graph.shapes.get(canonical(affine.output))
    if not np.all(affine.t == 0):
        t = graph.add_const(f"{base}/graphfold_shift", affine.t.reshape(shape), dtype)
        y = graph.add_op(f"{base}/graphfold_add", "AddV2", [y, t], dtype)
        graph.shapes[y] = graph.shapes.get(canonical(affine.output))
    graph.redirect(affine.output, y)
