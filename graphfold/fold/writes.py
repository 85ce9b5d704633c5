"""What a fold writes, as values, computed from a plan before anything changes (pure).

    Forward:  W ← W ⊙_out s,  b ← s ⊙ b (+ t on one root: its bias, or a new one).
    Backward: W ← W ⊙_in s,   b ← b + W ⊛ t;  a leaf: W_P ← W_P ⊙_out (1/s), b_P ← b_P / s.

New values are computed in float64 and cast back to the weight's dtype; a value that is not
finite or overflows the dtype makes the plan ``Blocked``. ``apply.fold`` carries the writes out.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework.node_def_pb2 import NodeDef

from graphfold.errors import Blocked
from graphfold.fold.affine import recognise
from graphfold.fold.graph import Graph, canonical
from graphfold.fold.layers import Site
from graphfold.fold.plan import Plan, Root, Sink, weight_const
from graphfold.fold.rules import LAYER_BIAS_OPS, RULES, Demand, const_operand

# The largest magnitude each dtype holds: a folded value (computed in float64) past it would be
# cast to inf.
_LIMITS = {tf.float16: 65504.0, tf.bfloat16: 3.38e38, tf.float32: float(np.finfo(np.float32).max)}


# ---- writes: what a fold changes, as values ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SetConst:
    """Input ``index`` of ``node`` becomes a constant holding ``value`` (the constant ``const`` is
    overwritten when ``node`` is its only reader, else a clone is made)."""

    node: NodeDef
    index: int
    const: str
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class NewBias:
    """A bias holding ``value`` is inserted after the layer ``site.layer`` (of ``site.node``'s
    dtype and data format)."""

    site: Site
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class KeepShift:
    """A stays as one add where it was: its input + ``value`` (a partial fold)."""

    value: np.ndarray


Write = SetConst | NewBias | KeepShift


# ---- ranges --------------------------------------------------------------------------------------
def _largest(values: np.ndarray) -> float:
    """max |value| in two reductions and no temporary array; NaN (or inf) if a value is not
    finite (NaN propagates through max and min). It runs on every folded weight."""
    return max(float(np.max(values)), -float(np.min(values))) if values.size else 0.0


def _in_range(values: np.ndarray, dtype: tf.DType) -> bool:
    top, limit = _largest(values), _LIMITS.get(dtype)
    return math.isfinite(top) and (limit is None or top <= limit)


def check_range(values: np.ndarray, dtype: tf.DType, layer: str, what: str) -> Blocked | None:
    """Why ``values`` cannot be written: a value is not finite, or past ``dtype``'s range."""
    if _in_range(values, dtype):
        return None
    if not math.isfinite(_largest(values)):
        return Blocked(layer, f"folded {what} is not finite")
    return Blocked(layer, f"folded {what} overflows {dtype.name}")


def _scaled(w: np.ndarray, factor: np.ndarray, dtype: tf.DType, layer: str) -> np.ndarray | Blocked:
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
    values = w * factor  # float64: says what is wrong, or is right
    return check_range(values, dtype, layer, "weight") or values


# ---- the writes of a plan ------------------------------------------------------------------------
def compute(graph: Graph, plan: Plan) -> list[Write] | Blocked:
    """Every change ``plan`` makes, computed before any is made; or why it must not be made (a
    value that overflows the weight's dtype, ...). ``apply.fold`` makes them."""
    writes: list[Write] = []
    for root in plan.roots + plan.leaves:
        more = _root_writes(graph, root)
        if isinstance(more, Blocked):
            return more
        writes += more
    for sink in plan.sinks:
        more = _sink_writes(graph, sink)
        if isinstance(more, Blocked):
            return more
        writes += more
    return writes


def _weight_dtype(graph: Graph, const: str) -> tf.DType:
    return tf.as_dtype(graph.nodes[const].attr["dtype"].type)


def _weight_write(
    graph: Graph, where: Site, factor: np.ndarray
) -> tuple[SetConst, tf.DType] | Blocked:
    """``W ← W · F`` (F broadcast) as a write, with the weight's dtype."""
    layer = where.layer
    const = weight_const(graph, layer, where.weight_index)
    if isinstance(const, Blocked):  # plan.site checked it: never
        return const
    dtype = _weight_dtype(graph, const)
    new_w = _scaled(where.w, factor, dtype, layer.name)
    if isinstance(new_w, Blocked):
        return new_w
    return SetConst(layer, where.weight_index, const, new_w), dtype


def _sink_writes(graph: Graph, sink: Sink) -> list[Write] | Blocked:
    """W ← W ⊙_in s; b ← b + W ⊛ t."""
    where = sink.site
    layer, linear = where.layer, where.linear
    weight = _weight_write(graph, where, linear.in_factor(where, sink.s))
    if isinstance(weight, Blocked):
        return weight
    writes: list[Write] = [weight[0]]
    dtype = weight[1]
    if sink.response is not None:
        blocked = check_range(sink.response, dtype, layer.name, "bias") or linear.refuse_bias(
            where.node
        )
        if blocked:
            return blocked
        writes.append(_into_bias(graph, where, sink.response))
    return writes


def _root_writes(graph: Graph, root: Root) -> list[Write] | Blocked:
    """W ← W ⊙_out s; each bias on the path b ← s ⊙ b + t (``x - b``: b ← s ⊙ b − t), with the
    s, t that reach it; a t that reaches the layer itself goes into a new bias."""
    where = root.site
    layer, linear = where.layer, where.linear
    weight = _weight_write(graph, where, linear.out_factor(where, root.s))
    if isinstance(weight, Blocked):
        return weight
    writes: list[Write] = [weight[0]]
    dtype = weight[1]
    for bias in root.biases:
        bias_node, k, bias_const, b = _bias(graph, bias.node)
        new_b = _channel_values(b, bias.s, bias.sign * bias.t, bias.axis, bias.rank)
        blocked = check_range(new_b, dtype, layer.name, "bias")
        if blocked:
            return blocked
        writes.append(SetConst(bias_node, k, bias_const, new_b))
    if np.any(root.t != 0):
        blocked = check_range(root.t, dtype, layer.name, "bias") or linear.refuse_bias(where.node)
        if blocked:
            return blocked
        writes.append(NewBias(where, root.t))
    return writes


def _bias(graph: Graph, name: str) -> tuple[NodeDef, int, str, np.ndarray]:
    """A bias node, the index of its constant operand, that constant's name and value."""
    node = graph.nodes[name]
    k = const_operand(graph, node)
    assert k is not None  # the plan recognised it as a constant bias
    const = graph.producer(graph.data_inputs(node)[k]).name
    value = graph.const(const)
    assert value is not None
    return node, k, const, value.astype(np.float64)


def _channel_values(b: np.ndarray, s: np.ndarray, shift, axis: int | None, rank: int) -> np.ndarray:
    """``s ⊙ b + shift`` shaped to broadcast along channel ``axis`` of a rank-``rank`` tensor
    (keeping b's own shape when b already has one value per channel)."""
    values = b.reshape(-1) * s + shift
    if values.size == b.size:
        return values.reshape(b.shape)
    if axis is None:
        return values.reshape(-1)
    return values.reshape([-1] + [1] * (rank - 1 - axis))


def _into_bias(graph: Graph, where: Site, delta: np.ndarray) -> Write:
    """``delta`` added to the layer's own bias (``own_bias``) when the sum stays in range, else
    to a new one after the layer."""
    found = own_bias(graph, where, delta)
    if found is not None:
        node, k, const, total = found
        if _in_range(total, _weight_dtype(graph, const)):
            return SetConst(node, k, const, total)
    return NewBias(where, delta)


def own_bias(graph: Graph, where: Site, delta: np.ndarray):
    """``(bias node, its constant operand, that constant, b + delta)`` for the layer's own bias: a
    per-channel constant add (``rules.LAYER_BIAS_OPS``) that the layer's output reaches alone,
    perhaps through ops that carry a shift down unchanged (a ``Tensordot``'s output
    ``Reshape``: ``rules.RULES``' backward entries, one variable operand, no padding); None when
    there is none (then a bias of its own is added)."""
    if where.out_shape is None:
        return None
    rank = len(where.out_shape)
    demand = Demand(np.ones_like(delta), delta, where.linear.out_axis(where.node, rank), rank)
    tensor = canonical(where.layer.name)
    for _ in range(8):
        users = graph.value_consumers(tensor)
        if graph.is_fetched(tensor) or len(users) != 1:
            return None
        user, inputs = users[0], graph.data_inputs(users[0])
        reads = [i for i, t in enumerate(inputs) if canonical(t) == tensor]
        if user.op in LAYER_BIAS_OPS:
            constant = (
                len(inputs) == 2
                and len(reads) == 1
                and graph.const(inputs[1 - reads[0]]) is not None
            )
            return _bias_sum(graph, user, demand) if constant else None
        rule = RULES.get(user.op)
        after = rule.backward(graph, user, reads, demand) if rule and rule.backward else None
        if after is None or isinstance(after, Blocked) or after.pads or after.leaves:
            return None
        demand, tensor = after.demand, canonical(user.name)
    return None


def _bias_sum(graph: Graph, node, demand: Demand):
    """``node``'s constant, plus the shift of ``demand``, when it is a per-channel bias on the
    same axis with as many channels."""
    shift = recognise(graph, node)
    if (
        shift is None
        or shift.blocked
        or not np.all(shift.s == 1)
        or shift.axis not in (demand.axis,)
        or shift.t.size != demand.t.size
    ):
        return None
    k, const, b = _bias(graph, node.name)[1:]
    return node, k, const, (b.reshape(-1) + demand.t).reshape(b.shape)
