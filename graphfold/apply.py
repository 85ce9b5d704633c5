"""Carry out a ``Plan`` on the graph, and replace unfolded A's by one multiply-add.

Forward:  W ← W ⊙_out s,  b ← s ⊙ b (+ t on one root).
Backward: W ← W ⊙_in s,   b ← b + W ⊛ t;  a leaf: W_P ← W_P ⊙_out (1/s), b_P ← b_P / s.
New values are computed in float64 and cast back to the weight's dtype. A weight or bias constant
that anything else reads is cloned, never modified. A's nodes are bypassed and left for pruning.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from graphfold.affine import BATCH_NORM_OPS, Affine
from graphfold.errors import Blocked
from graphfold.formats import bias_format
from graphfold.graph import Graph, canonical
from graphfold.layers import LINEAR
from graphfold.plan import Plan, Root, site, weight_const

# The largest magnitude each dtype holds: a folded value (computed in float64) past it would be
# cast to inf.
_LIMITS = {tf.float16: 65504.0, tf.bfloat16: 3.38e38,
           tf.float32: float(np.finfo(np.float32).max)}


# ---- writes: what a fold changes, as values ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SetConst:
    """Input ``index`` of ``node`` becomes a constant holding ``value`` (the constant ``const`` is
    overwritten when ``node`` is its only reader, else a clone is made)."""
    node: object
    index: int
    const: str
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class AddToBias:
    """``value`` is added to the layer's bias (its own ``BiasAdd``, or a new one)."""
    layer: object
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class NewBias:
    """``BiasAdd(layer, value)`` is inserted after the layer."""
    layer: object
    value: np.ndarray


Write = SetConst | AddToBias | NewBias


def _check_new_bias(layer) -> None:
    """TensorFlow 2.21 with oneDNN (the default x86 CPU build) aborts the process (``CHECK`` in
    tensor_format.h, from grappler's remapper) when a ``DepthwiseConv2dNative`` with
    ``padding=EXPLICIT`` feeds a ``BiasAdd`` or ``Add``: never add one after such a layer."""
    if layer.op == "DepthwiseConv2dNative" and layer.attr["padding"].s == b"EXPLICIT":
        raise Blocked(layer.name, "a bias after a DepthwiseConv2dNative with EXPLICIT padding "
                                  "makes TensorFlow's oneDNN remapper abort the process")


def _largest(values: np.ndarray) -> float:
    """max |value| in two reductions and no temporary array; NaN (or inf) if a value is not
    finite (NaN propagates through max and min). It runs on every folded weight."""
    return max(float(np.max(values)), -float(np.min(values))) if values.size else 0.0


def _in_range(values: np.ndarray, dtype: tf.DType) -> bool:
    top, limit = _largest(values), _LIMITS.get(dtype)
    return math.isfinite(top) and (limit is None or top <= limit)


def _check_range(values: np.ndarray, dtype: tf.DType, layer: str, what: str) -> None:
    """Blocked if a value is not finite, or past the largest ``dtype`` holds."""
    if _in_range(values, dtype):
        return
    if not math.isfinite(_largest(values)):
        raise Blocked(layer, f"folded {what} is not finite")
    raise Blocked(layer, f"folded {what} overflows {dtype.name}")


def _scaled(w: np.ndarray, factor: np.ndarray, dtype: tf.DType, layer: str) -> np.ndarray:
    """``W · F`` (F broadcast), each product in float64, as ``dtype``; Blocked if one is not
    finite or past ``dtype``'s range. A float32 or float64 W is multiplied straight into a new
    array of its dtype (NumPy's float64 loop, cast on output: the same values, no float64 copy
    of the weight)."""
    if dtype in (tf.float32, tf.float64) and w.dtype == dtype.as_numpy_dtype:
        out = np.empty(w.shape, w.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(w, factor, out=out, casting="unsafe")
        if math.isfinite(_largest(out)):
            return out
    values = w * factor                            # float64: says what is wrong, or is right
    _check_range(values, dtype, layer, "weight")
    return values


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


def compute(graph: Graph, plan: Plan) -> list[Write] | Blocked:
    """Every change ``plan`` makes, computed before any is made; or why it must not be made (a
    value that overflows the weight's dtype, ...). Pass the result to ``fold``."""
    try:
        writes = []
        for root in plan.roots + plan.leaves:
            writes += _root_writes(graph, root)
        for sink in plan.sinks:
            writes += _sink_writes(graph, sink)
        return writes
    except Blocked as blocked:
        return blocked


def _weight(graph: Graph, layer):
    where = site(graph, layer)
    if isinstance(where, Blocked):
        raise where
    const = weight_const(graph, layer)
    return where, const, tf.as_dtype(graph.nodes[const].attr["dtype"].type)


def _sink_writes(graph: Graph, sink) -> list[Write]:
    """W ← W ⊙_in s; b ← b + W ⊛ t."""
    layer = graph.nodes[sink.layer]
    linear = LINEAR[layer.op]
    where, const, dtype = _weight(graph, layer)
    new_w = _scaled(where.w, linear.in_factor(where, sink.s), dtype, layer.name)
    writes: list[Write] = [SetConst(layer, linear.weight, const, new_w)]
    if np.any(sink.t != 0):
        response = linear.shift_response(where, sink.t)
        if isinstance(response, str):
            raise Blocked(layer.name, response)
        _check_range(response, dtype, layer.name, "bias")
        _check_new_bias(layer)
        writes.append(AddToBias(layer, response))
    return writes


def _root_writes(graph: Graph, root: Root) -> list[Write]:
    """W ← W ⊙_out s; each bias on the path b ← s ⊙ b + t (``x - b``: b ← s ⊙ b − t), with the
    s, t that reach it; a t that reaches the layer itself goes into a new bias."""
    layer = graph.nodes[root.layer]
    linear = LINEAR[layer.op]
    where, const, dtype = _weight(graph, layer)
    new_w = _scaled(where.w, linear.out_factor(where, root.s), dtype, layer.name)
    writes: list[Write] = [SetConst(layer, linear.weight, const, new_w)]
    for bias in root.biases:
        bias_node, k, bias_const, b = _bias(graph, bias.node)
        sign = -1.0 if bias_node.op == "Sub" else 1.0      # Sub(y, b): s ⊙ (y − b) + t
        new_b = _channel_values(b, bias.s, sign * bias.t, bias.axis, bias.rank)
        _check_range(new_b, dtype, layer.name, "bias")
        writes.append(SetConst(bias_node, k, bias_const, new_b))
    if np.any(root.t != 0):
        _check_range(root.t, dtype, layer.name, "bias")
        _check_new_bias(layer)
        writes.append(NewBias(layer, root.t))
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


def fold(graph: Graph, affine: Affine, writes: list[Write]) -> None:
    """Makes the changes ``compute`` returned for A's plan, and bypasses ``affine``."""
    for write in writes:
        if isinstance(write, SetConst):
            _write_const(graph, write.node, write.index, write.const, write.value)
        elif isinstance(write, NewBias):
            _add_bias_after(graph, write.layer, write.value)
        else:
            _add_to_bias(graph, write.layer, write.value)
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
            total = b.reshape(-1) + delta if b.size == delta.size else None
            dtype = tf.as_dtype(graph.nodes[bias_const].attr["dtype"].type)
            if total is not None and _in_range(total, dtype):     # else: a BiasAdd of its own
                _write_const(graph, bias_node, 1, bias_const, total)
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
