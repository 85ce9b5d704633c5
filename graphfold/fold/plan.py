"""Plan folds without touching the graph: per A, walk to the layers that can absorb it.

Forward (docs/folding.md §3): from A's input up to *roots*, layers whose out-channels absorb s, and
whose bias absorbs t. Backward (§4): from A's output down to consumer layers whose in-channels
absorb s, and whose bias absorbs ``W ⊛ t``; an ``Add`` on the way needs *leaves*, layers on the
other operand whose outputs are divided by s. The walks are loops over the rule table
(``rules.RULES``) and the linear-layer table (``layers.LINEAR``; a call whose body is one such
layer counts as one, ``inline.linear_body``); a walk yields a complete ``Plan`` or the first
``Blocked`` it met. ``decide.py`` chooses among the plans; nothing here modifies the graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tensorflow.core.framework.node_def_pb2 import NodeDef

from graphfold.errors import Blocked
from graphfold.fold import formats
from graphfold.fold.affine import Affine
from graphfold.fold.graph import Graph, canonical, split_tensor
from graphfold.fold.inline import CALLS, linear_body
from graphfold.fold.layers import LINEAR, PADDING_TOUCHES, Site
from graphfold.fold.rules import IDENTITIES, RULES, Demand, Next, homogeneous_check, prelu_at


@dataclasses.dataclass
class BiasOnPath:
    """A constant bias between a root and A: it becomes s ⊙ b + sign · t with the s, t seen there
    (``sign`` −1 for ``y − b``)."""

    node: str
    axis: int | None
    rank: int
    s: np.ndarray
    t: np.ndarray
    sign: float = 1.0


@dataclasses.dataclass
class Root:
    """A layer absorbing A forward: W ⊙_out s (+ t as a new bias when no bias on its path took
    it); each bias on its path becomes s ⊙ b + t with the s and t that reach that bias (the bias
    nearest A takes t, the ones below it see t = 0). A bias below an Add or Concat is listed on
    one root only."""

    layer: str
    s: np.ndarray
    t: np.ndarray
    biases: list[BiasOnPath]
    site: Site


@dataclasses.dataclass
class Sink:
    """A layer absorbing A backward: W ⊙_in s, and ``response`` = ``W ⊛ t`` added to its bias
    (None when t = 0)."""

    layer: str
    s: np.ndarray
    t: np.ndarray
    site: Site
    response: np.ndarray | None = None


@dataclasses.dataclass
class Plan:
    direction: str  # "forward" or "backward"
    roots: list[Root] = dataclasses.field(default_factory=list)
    sinks: list[Sink] = dataclasses.field(default_factory=list)
    leaves: list[Root] = dataclasses.field(default_factory=list)  # roots of 1/s, behind Adds

    @property
    def absorbed_by(self) -> list[str]:
        return [r.layer for r in self.roots] + [s.layer for s in self.sinks]


# ---- linear layers ------------------------------------------------------------------------------
def layer_of(graph: Graph, node: NodeDef) -> tuple[NodeDef, int, int] | None:
    """``(layer, data, weight)`` when ``node`` is a linear layer (``layers.LINEAR``), or a call
    that runs one (``inline.linear_body``): the layer's NodeDef, and the inputs of ``node`` that
    are its data and its weight; None otherwise."""
    if node.op in LINEAR:
        return node, LINEAR[node.op].data, LINEAR[node.op].weight
    return linear_body(graph, node) if node.op in CALLS else None


def weight_const(graph: Graph, layer: NodeDef, index: int) -> str | Blocked:
    """The ``Const`` node behind input ``index`` (a weight) of ``layer`` (through Identity)."""
    tensor = graph.data_inputs(layer)[index]
    for _ in range(16):
        node = graph.producer(tensor)
        if graph.const(node.name) is not None:
            return node.name
        if node.op not in IDENTITIES:
            break
        tensor = graph.data_inputs(node)[0]
    return Blocked(layer.name, "its weight is not a constant")


def site(graph: Graph, layer: NodeDef) -> Site | Blocked:
    """The layer (a ``layer_of``) with its weight and shapes, or why it cannot take a fold at
    all. A float32 or float64 weight is kept as it is (no float64 copy): the fold's arithmetic
    with the float64 s and t promotes it exactly; other dtypes are converted to float64."""
    found = layer_of(graph, layer)
    assert found is not None, f"{layer.name} is not a linear layer"
    inner, data, weight_input = found
    const = weight_const(graph, layer, weight_input)
    if isinstance(const, Blocked):
        return const
    weight = graph.const(const)
    assert weight is not None  # weight_const found a constant
    if weight.dtype not in (np.float32, np.float64):
        weight = weight.astype(np.float64)
    host = None if inner is layer else layer
    where = Site(
        inner,
        weight,
        graph.shape(graph.data_inputs(layer)[data]),
        graph.shape(layer.name),
        host,
        None if host is None else weight_input,
    )
    return where.linear.refuse(where) or where


def _fit(layer, demand: Demand, axis: int, n: int, side: str) -> Blocked | None:
    if demand.axis is not None and demand.axis != axis:
        return Blocked(layer.name, f"A's channel axis is not the layer's {side}-channel axis")
    if demand.s.size not in (1, n):
        return Blocked(layer.name, f"A has {demand.s.size} channels, the layer's {side}put {n}")
    return None


def _vectors(demand: Demand, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.broadcast_to(demand.s, (n,)).astype(np.float64),
        np.broadcast_to(demand.t, (n,)).astype(np.float64),
    )


def _root(graph: Graph, layer, demand: Demand) -> list[Root] | Blocked:
    where = site(graph, layer)
    if isinstance(where, Blocked):
        return where
    linear = where.linear
    n = linear.out_channels(where)
    blocked = _fit(layer, demand, linear.out_axis(where.node, demand.rank), n, "out")
    return blocked or [Root(layer.name, *_vectors(demand, n), [], where)]


def _sink(graph: Graph, layer, tensor: str, demand: Demand, padded: bool) -> Sink | Blocked:
    where = site(graph, layer)
    if isinstance(where, Blocked):
        return where
    linear = where.linear
    n = linear.in_channels(where)
    shape = graph.shape(tensor)
    if shape is None or (demand.axis is not None and shape[demand.axis] not in (None, n)):
        return Blocked(layer.name, "unknown input channels")
    blocked = _fit(layer, demand, linear.in_axis(where.node, demand.rank), n, "in")
    if blocked:
        return blocked
    s, t = _vectors(demand, n)
    if not demand.has_shift:
        return Sink(layer.name, s, t, where)
    if padded:
        return Blocked(layer.name, PADDING_TOUCHES)
    response = linear.shift_response(where, t)
    if isinstance(response, Blocked):
        return response
    return Sink(layer.name, s, t, where, response)


def _stop(node) -> Blocked:
    return Blocked(node.name, f"{node.op} is not a linear layer nor an op A can pass through")


# ---- forward ------------------------------------------------------------------------------------
def plan_forward(graph: Graph, affine: Affine) -> Plan | Blocked:
    demand = Demand(affine.s, affine.t, affine.axis, affine.rank)
    roots = _up(graph, affine.input(graph), affine.nodes[0], demand, set())
    return roots if isinstance(roots, Blocked) else Plan("forward", roots=roots)


def _up(
    graph: Graph, tensor: str, reader: str | tuple[str, ...], demand: Demand, seen: set[str]
) -> list[Root] | Blocked:
    """Roots that absorb ``demand`` applied to ``tensor``, read on the path by ``reader`` (or
    by each of several readers)."""
    node = graph.producer(tensor)
    readers = (reader,) if isinstance(reader, str) else reader
    others = [c.name for c in graph.value_consumers(tensor) if c.name not in readers]
    if others:
        return Blocked(node.name, f"its output is also read by {others[0]}")
    if graph.is_fetched(tensor):
        return Blocked(node.name, "its output is also a function output")
    if node.name in seen:
        return Blocked(node.name, "reached twice on the way to the layers")
    seen.add(node.name)
    if split_tensor(tensor)[1] == 0 and layer_of(graph, node) is not None:
        return _root(graph, node, demand)
    rule = RULES.get(node.op)
    steps = rule.forward(graph, node, demand) if rule and rule.forward else _stop(node)
    if isinstance(steps, Blocked):
        return steps
    found: list[Root] = []
    for step in steps:
        roots = _up(graph, step.tensor, step.readers or node.name, step.demand, seen)
        if isinstance(roots, Blocked):
            return roots
        if step.bias:  # recorded once, with the s and t seen here (roots below share it)
            taken = step.taken
            assert taken is not None  # a Step with a bias has what it takes
            roots[0].biases.append(
                BiasOnPath(step.bias, taken.axis, taken.rank, taken.s, taken.t, step.bias_sign)
            )
        found.extend(roots)
    return found


# ---- backward -----------------------------------------------------------------------------------
def plan_backward(graph: Graph, affine: Affine) -> Plan | Blocked:
    demand = Demand(affine.s, affine.t, affine.axis, affine.rank)
    plan = Plan("backward")
    blocked = _down(graph, canonical(affine.output), demand, plan, set(), padded=False)
    if blocked is not None:
        return blocked
    if not plan.sinks:
        return Blocked(affine.output, "its output reaches no linear layer")
    layers = [sink.layer for sink in plan.sinks] + [leaf.layer for leaf in plan.leaves]
    twice = [layer for layer in layers if layers.count(layer) > 1]
    if twice:  # y = A(x); L(y + P(y)): P would need W ⊙_in s and W ⊙_out 1/s at once
        return Blocked(twice[0], "the layer reads A's output and is also a leaf behind an Add")
    return _pad_meets_conv(graph, affine, plan) or plan


def _down(
    graph: Graph, tensor: str, demand: Demand, plan: Plan, seen: set[str], padded: bool
) -> Blocked | None:
    """Adds to ``plan`` the sinks (and leaves) that absorb ``demand`` applied to ``tensor``."""
    if graph.is_fetched(tensor):
        return Blocked(split_tensor(tensor)[0], "its output is a function output")
    consumers = graph.value_consumers(tensor)
    if not consumers:
        return Blocked(split_tensor(tensor)[0], "its output has no consumer")
    prelu = prelu_at(graph, tensor)
    if prelu is not None:  # one homogeneous op made of five
        nodes, output = prelu
        if seen & set(nodes):
            return Blocked(output.name, "reached twice")
        seen.update(nodes)
        return homogeneous_check(graph, output, demand, "PReLU") or _down(
            graph, canonical(output.name), demand, plan, seen, padded
        )
    for node in consumers:
        if node.name in seen:
            return Blocked(node.name, "reached twice")
        seen.add(node.name)
        reads = [
            i for i, t in enumerate(graph.data_inputs(node)) if canonical(t) == canonical(tensor)
        ]
        layer = layer_of(graph, node)
        if layer is not None:
            if reads != [layer[1]]:
                return Blocked(node.name, "A feeds the layer's weight or shape")
            sink = _sink(graph, node, tensor, demand, padded)
            if isinstance(sink, Blocked):
                return sink
            plan.sinks.append(sink)
            continue
        rule = RULES.get(node.op)
        after = rule.backward(graph, node, reads, demand) if rule and rule.backward else _stop(node)
        if isinstance(after, Blocked):
            return after
        blocked = _leaves(graph, node, after, plan) or _down(
            graph, canonical(node.name), after.demand, plan, seen, padded or after.pads
        )
        if blocked is not None:
            return blocked
    return None


def _leaves(graph: Graph, node, after: Next, plan: Plan) -> Blocked | None:
    for operand, inverse in after.leaves:
        leaves = _up(graph, operand, node.name, inverse, set())
        if isinstance(leaves, Blocked):
            return Blocked(leaves.node, f"leaf behind {node.name}: {leaves.reason}")
        plan.leaves.extend(leaves)
    return None


def _pad_meets_conv(graph: Graph, affine: Affine, plan: Plan) -> Blocked | None:
    """TensorFlow 2.21 with oneDNN fuses ``Pad → Conv2D`` and drops a padding of the batch or
    channel axis (an error, or silently a smaller batch). Bypassing A must not make such a Pad
    feed such a layer (``Linear.fuses_pad``) directly (through Identity, which Grappler
    removes)."""

    def skip_identities(tensor):
        while graph.producer(tensor).op in IDENTITIES:
            tensor = graph.data_inputs(graph.producer(tensor))[0]
        return tensor

    pad = graph.producer(skip_identities(affine.input(graph)))
    rule = RULES.get(pad.op)
    pads = rule.pad_amounts(graph, pad) if rule is not None and rule.pad_amounts else None
    if pads is None or pads.shape != (4, 2):
        return None
    y = canonical(affine.output)
    for sink in plan.sinks:
        layer = sink.site.layer
        if not sink.site.linear.fuses_pad or canonical(skip_identities(layer.input[0])) != y:
            continue
        spatial = formats.spatial_axes(formats.data_format(sink.site.node), 4)
        if any(np.any(pads[axis] != 0) for axis in range(4) if axis not in spatial):
            return Blocked(
                layer.name,
                f"{pad.name} pads the batch or channel axis: without A "
                "between them, TensorFlow's oneDNN Pad+Conv2D fusion drops "
                "that padding",
            )
    return None
