"""Plan folds without touching the graph: per A, walk to the layers that can absorb it.

Forward (FOLDING.md §3): from A's input up to *roots*, layers whose out-channels absorb s, and
whose bias absorbs t. Backward (§4): from A's output down to consumer layers whose in-channels
absorb s, and whose bias absorbs ``W ⊛ t``; an ``Add`` on the way needs *leaves*, layers on the
other operand whose outputs are divided by s. A walk either yields a complete ``Plan`` or the
first ``Blocked`` it met; the condition travels with the walk as a ``Demand``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from graphfold.affine import Affine, recognise
from graphfold.graph import Graph, canonical, split_tensor
from graphfold.layers import LAYOUTS, channel_axis

PASS_THROUGH = ("Identity", "Snapshot", "StopGradient")
RESHAPES = ("Reshape", "Squeeze", "ExpandDims")
ADDS = ("Add", "AddV2")
LEAF_EPS = 1e-6  # refuse a leaf when some |s| < LEAF_EPS · max|s|


@dataclasses.dataclass(frozen=True)
class Blocked:
    """Why an A cannot fold: the first node that stopped the walk, and the rule that failed."""
    node: str
    reason: str

    def __str__(self):
        return f"{self.node}: {self.reason}"


@dataclasses.dataclass
class Demand:
    """What the walk carries: the per-channel s and t as seen at the current tensor, on which
    axis of a tensor of which rank."""
    s: np.ndarray
    t: np.ndarray
    axis: int | None
    rank: int

    def slice(self, start: int, stop: int) -> "Demand":
        cut = (lambda v: v if v.size == 1 else v[start:stop])
        return Demand(cut(self.s), cut(self.t), self.axis, self.rank)

    def with_axis(self, axis: int | None, rank: int) -> "Demand":
        return Demand(self.s, self.t, axis, rank)

    def without_shift(self) -> "Demand":
        return Demand(self.s, np.zeros_like(self.t), self.axis, self.rank)

    @property
    def has_shift(self) -> bool:
        return bool(np.any(self.t != 0))

    @property
    def positive(self) -> bool:
        return bool(np.all(self.s > 0))


@dataclasses.dataclass
class Root:
    """A layer absorbing A forward: W ⊙_out s (+ t as a new bias when no bias on its path took
    it); each bias on its path becomes s ⊙ b + t with the s, t that reach that bias (the bias
    nearest A takes t, the ones below it see t = 0). A bias below an Add or Concat is listed on
    one root only."""
    layer: str
    s: np.ndarray
    t: np.ndarray
    # (bias node, channel axis, rank, s, t at the bias)
    biases: list[tuple[str, int | None, int, np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Sink:
    """A layer absorbing A backward: W ⊙_in s, and ``W ⊛ t`` added to its bias."""
    layer: str
    s: np.ndarray
    t: np.ndarray


@dataclasses.dataclass
class Plan:
    direction: str                      # "forward" or "backward"
    roots: list[Root] = dataclasses.field(default_factory=list)
    sinks: list[Sink] = dataclasses.field(default_factory=list)
    leaves: list[Root] = dataclasses.field(default_factory=list)   # roots of 1/s, behind Adds

    @property
    def absorbed_by(self) -> list[str]:
        return [r.layer for r in self.roots] + [s.layer for s in self.sinks]


# ---- helpers ------------------------------------------------------------------------------------
def weight_const(graph: Graph, layer) -> str | None:
    """The ``Const`` node behind a layer's weight input (through Identity), or None."""
    tensor = layer.input[1]
    for _ in range(16):
        node = graph.producer(tensor)
        if node.op == "Const":
            return node.name
        if node.op not in PASS_THROUGH:
            return None
        tensor = graph.data_inputs(node)[0]
    return None


def _const_operand(graph: Graph, node) -> int | None:
    for i, tensor in enumerate(graph.data_inputs(node)):
        if graph.const(tensor) is not None:
            return i
    return None


def axis_in_to_out(graph: Graph, node, axis: int | None) -> tuple[int | None, int] | None:
    """Where channel ``axis`` of a reshaping op's input lands in its output, with the output rank;
    None when the op does not keep the channel axis intact. A ``Reshape`` must keep the channel
    axis last, with the same known size."""
    src, dst = graph.shape(graph.data_inputs(node)[0]), graph.shape(node.name)
    if src is None or dst is None:
        return None
    if axis is None:
        return None, len(dst)
    if node.op == "Squeeze":
        listed = list(node.attr["squeeze_dims"].list.i)
        dims = [d % len(src) for d in listed] if listed else \
            [i for i, d in enumerate(src) if d == 1]
        if axis in dims:
            return None
        return axis - sum(d < axis for d in dims), len(dst)
    if node.op == "ExpandDims":
        where = graph.const(graph.data_inputs(node)[1])
        if where is None:
            return None
        where = int(where) % len(dst)
        return (axis + 1 if where <= axis else axis), len(dst)
    if node.op == "Transpose":
        return (axis, len(dst)) if _is_identity_transpose(graph, node) else None
    if axis == len(src) - 1 and src[-1] is not None and dst[-1] == src[-1]:
        return len(dst) - 1, len(dst)
    return None


def axis_out_to_in(graph: Graph, node, axis: int | None) -> tuple[int | None, int] | None:
    """The inverse of ``axis_in_to_out``."""
    src = graph.shape(graph.data_inputs(node)[0])
    if src is None:
        return None
    if axis is None:
        return (None, len(src)) if axis_in_to_out(graph, node, None) else None
    for candidate in range(len(src)):
        mapped = axis_in_to_out(graph, node, candidate)
        if mapped is not None and mapped[0] == axis:
            return candidate, len(src)
    return None


def _is_identity_transpose(graph: Graph, node) -> bool:
    perm = graph.const(graph.data_inputs(node)[1])
    return perm is not None and list(perm) == list(range(len(perm)))


def _float_cast(node) -> bool:
    """A ``Cast`` between floating-point types (Keras mixed precision computes a half-precision
    layer's batch norm in float32 between two of them): per-channel maps commute with it."""
    if node.op != "Cast":
        return False
    return all(tf.as_dtype(node.attr[key].type).is_floating for key in ("SrcT", "DstT"))


def _pads(graph: Graph, node) -> bool:
    """Whether ``SpaceToBatchND`` adds zero padding (a ``BatchToSpaceND`` only crops)."""
    if node.op != "SpaceToBatchND":
        return False
    pads = graph.const(graph.data_inputs(node)[2])
    return pads is None or bool(np.any(pads != 0))


def _reduced_axes(graph: Graph, node, rank: int) -> list[int] | None:
    axes = graph.const(graph.data_inputs(node)[1])
    if axes is None:
        return None
    return sorted({int(a) % rank for a in np.atleast_1d(axes)})


def _format_axis(node, rank: int) -> int:
    fmt = node.attr["data_format"].s or b"NHWC"
    return 1 if fmt.startswith(b"NC") else rank - 1


def _pad_amounts(graph: Graph, node) -> np.ndarray | None:
    pads = graph.const(graph.data_inputs(node)[1])
    if node.op == "PadV2":
        value = graph.const(graph.data_inputs(node)[2])
        if value is None or np.any(value != 0):
            return None
    return pads


# ---- forward ------------------------------------------------------------------------------------
def plan_forward(graph: Graph, affine: Affine) -> Plan | Blocked:
    x = affine.input(graph)
    demand = Demand(affine.s, affine.t, affine.axis, affine.rank)
    seen: set[str] = set()
    result = _up(graph, x, affine.nodes[0], demand, seen)
    if isinstance(result, Blocked):
        return result
    return Plan("forward", roots=result)


def _up(graph: Graph, tensor: str, reader: str, demand: Demand,
        seen: set[str]) -> list[Root] | Blocked:
    """Roots that absorb ``demand`` applied to ``tensor``, read on the path by ``reader``."""
    node = graph.producer(tensor)
    others = [c.name for c in graph.value_consumers(tensor) if c.name != reader]
    if others:
        return Blocked(node.name, f"its output is also read by {others[0]}")
    if graph.is_fetched(tensor):
        return Blocked(node.name, "its output is also a function output")
    if node.name in seen:
        return Blocked(node.name, "reached twice on the way to the layers")
    seen.add(node.name)
    op = node.op
    if op in LAYOUTS and split_tensor(tensor)[1] == 0:
        return _root(graph, node, demand)
    inputs = graph.data_inputs(node)
    if op in PASS_THROUGH or op == "BatchToSpaceND" or _float_cast(node):
        return _up(graph, inputs[0], node.name, demand, seen)
    if op == "SpaceToBatchND":
        if demand.has_shift and _pads(graph, node):
            return Blocked(node.name, "SpaceToBatchND pads with zeros: needs a zero shift")
        return _up(graph, inputs[0], node.name, demand, seen)
    if op in RESHAPES or op == "Transpose":
        mapped = axis_out_to_in(graph, node, demand.axis)
        if mapped is None:
            return Blocked(node.name, f"{op} does not keep the channel axis intact")
        return _up(graph, inputs[0], node.name, demand.with_axis(*mapped), seen)
    shift = recognise(graph, node)
    if shift is not None and not shift.blocked and np.all(shift.s == 1) and \
            (shift.axis is None or demand.axis is None or shift.axis == demand.axis):
        # s ⊙ (y + b) + t = s ⊙ y + (s ⊙ b + t): this bias takes t, y only sees s. Recorded
        # once, with the s and t seen here (roots below an Add/Concat share the bias).
        x = inputs[1 - _const_operand(graph, node)] if op != "BiasAdd" else inputs[0]
        roots = _up(graph, x, node.name, demand.without_shift(), seen)
        if isinstance(roots, Blocked):
            return roots
        roots[0].biases.append((node.name, demand.axis, demand.rank, demand.s, demand.t))
        return roots
    if op in ("AvgPool", "AvgPool3D", "MaxPool", "MaxPool3D"):
        if demand.axis is not None and demand.axis != _format_axis(node, demand.rank):
            return Blocked(node.name, "pools over the channel axis")
        if op.startswith("MaxPool") and not demand.positive:
            return Blocked(node.name, "MaxPool needs every scale > 0 (a negative γ flips max)")
        return _up(graph, inputs[0], node.name, demand, seen)
    if op == "Mean":
        axes = _reduced_axes(graph, node, graph.rank(inputs[0]) or 0)
        if axes is None or graph.rank(inputs[0]) is None:
            return Blocked(node.name, "Mean over unknown axes")
        in_rank = graph.rank(inputs[0])
        if demand.axis is None:
            return _up(graph, inputs[0], node.name, demand.with_axis(None, in_rank), seen)
        if node.attr["keep_dims"].b:
            axis = demand.axis
        else:
            kept = [a for a in range(in_rank) if a not in axes]
            axis = kept[demand.axis]
        if axis in axes:
            return Blocked(node.name, "Mean reduces the channel axis")
        return _up(graph, inputs[0], node.name, demand.with_axis(axis, in_rank), seen)
    if op == "Relu":
        if not demand.positive:
            return Blocked(node.name, "Relu needs every scale > 0")
        if demand.has_shift:
            return Blocked(node.name, "Relu needs a zero shift")
        return _up(graph, inputs[0], node.name, demand, seen)
    if op in ("Pad", "PadV2"):
        pads = _pad_amounts(graph, node)
        if pads is None:
            return Blocked(node.name, "padding is not a constant zero")
        if demand.has_shift:
            return Blocked(node.name, "zero padding needs a zero shift")
        if demand.axis is not None and np.any(pads[demand.axis] != 0):
            return Blocked(node.name, "pads the channel axis")
        return _up(graph, inputs[0], node.name, demand, seen)
    if op in ADDS and _const_operand(graph, node) is None and len(inputs) == 2:
        shapes = [graph.shape(t) for t in inputs]
        if shapes[0] is None or shapes[0] != shapes[1] or graph.shape(tensor) != shapes[0]:
            return Blocked(node.name, "Add broadcasts its operands")
        if inputs[0] == inputs[1]:
            return Blocked(node.name, "Add of a tensor with itself")
        found = []
        for i, operand in enumerate(inputs):
            part = demand if i == 0 else demand.without_shift()
            roots = _up(graph, operand, node.name, part, seen)
            if isinstance(roots, Blocked):
                return roots
            found.extend(roots)
        return found
    if op == "ConcatV2":
        return _up_concat(graph, node, tensor, demand, seen)
    if op == "Placeholder":
        return Blocked(node.name, "graph input")
    return Blocked(node.name, f"{op} is not a linear layer nor an op A can pass through")


def _concat_slices(graph: Graph, node, axis: int | None, rank: int):
    """``[(operand, start, stop)]`` when ``node`` concatenates on ``axis``, else a reason."""
    inputs = graph.data_inputs(node)
    concat_axis = graph.const(inputs[-1])
    if concat_axis is None or axis is None:
        return "concatenates on an unknown axis"
    if int(concat_axis) % rank != axis:
        return "does not concatenate on the channel axis"
    slices, start = [], 0
    for operand in inputs[:-1]:
        shape = graph.shape(operand)
        if shape is None or shape[axis] is None:
            return "an operand has an unknown channel count"
        slices.append((operand, start, start + shape[axis]))
        start += shape[axis]
    return slices


def _up_concat(graph: Graph, node, tensor, demand: Demand, seen) -> list[Root] | Blocked:
    slices = _concat_slices(graph, node, demand.axis, demand.rank)
    if isinstance(slices, str):
        return Blocked(node.name, f"ConcatV2 {slices}")
    found = []
    for operand, start, stop in slices:
        if [op for op, _, _ in slices].count(operand) > 1:
            return Blocked(node.name, "ConcatV2 reads one tensor twice")
        roots = _up(graph, operand, node.name, demand.slice(start, stop), seen)
        if isinstance(roots, Blocked):
            return roots
        found.extend(roots)
    return found


def _root(graph: Graph, layer, demand: Demand) -> list[Root] | Blocked:
    if weight_const(graph, layer) is None:
        return Blocked(layer.name, "its weight is not a constant")
    if demand.axis is not None and demand.axis != channel_axis(layer, demand.rank):
        return Blocked(layer.name, "A's channel axis is not the layer's output-channel axis")
    w = graph.const(weight_const(graph, layer))
    out = LAYOUTS[layer.op].out_channels(w, layer)
    if demand.s.size not in (1, out):
        return Blocked(layer.name, f"A has {demand.s.size} channels, the layer {out}")
    s = np.broadcast_to(demand.s, (out,)).astype(np.float64)
    t = np.broadcast_to(demand.t, (out,)).astype(np.float64)
    return [Root(layer.name, s, t, [])]


# ---- backward -----------------------------------------------------------------------------------
def plan_backward(graph: Graph, affine: Affine) -> Plan | Blocked:
    y = canonical(affine.output)
    demand = Demand(affine.s, affine.t, affine.axis, affine.rank)
    plan = Plan("backward")
    blocked = _down(graph, y, demand, plan, set(), padded=False)
    if blocked is not None:
        return blocked
    if not plan.sinks:
        return Blocked(affine.output, "its output reaches no linear layer")
    layers = [sink.layer for sink in plan.sinks] + [leaf.layer for leaf in plan.leaves]
    twice = [layer for layer in layers if layers.count(layer) > 1]
    if twice:   # y = A(x); L(y + P(y)): P would need W ⊙_in s and W ⊙_out 1/s at once
        return Blocked(twice[0], "the layer reads A's output and is also a leaf behind an Add")
    return _pad_meets_conv(graph, affine, plan) or plan


def _pad_meets_conv(graph: Graph, affine: Affine, plan: Plan) -> Blocked | None:
    """TensorFlow 2.21 with oneDNN fuses ``Pad → Conv2D`` and drops a padding of the batch or
    channel axis (an error, or silently a smaller batch). Bypassing A must not make such a Pad
    feed a Conv2D directly (through Identity, which Grappler removes)."""
    def skip_identities(tensor):
        while graph.producer(tensor).op in PASS_THROUGH:
            tensor = graph.data_inputs(graph.producer(tensor))[0]
        return tensor

    pad = graph.producer(skip_identities(affine.input(graph)))
    pads = graph.const(graph.data_inputs(pad)[1]) if pad.op in ("Pad", "PadV2") else None
    if pads is None or pads.shape != (4, 2):
        return None
    y = canonical(affine.output)
    for sink in plan.sinks:
        layer = graph.nodes[sink.layer]
        if layer.op != "Conv2D" or canonical(skip_identities(layer.input[0])) != y:
            continue
        spatial = (2, 3) if (layer.attr["data_format"].s or b"NHWC").startswith(b"NC") else (1, 2)
        if any(np.any(pads[axis] != 0) for axis in range(4) if axis not in spatial):
            return Blocked(layer.name, f"{pad.name} pads the batch or channel axis: without A "
                                       "between them, TensorFlow's oneDNN Pad+Conv2D fusion drops "
                                       "that padding")
    return None


def _down(graph: Graph, tensor: str, demand: Demand, plan: Plan, seen: set[str],
          padded: bool) -> Blocked | None:
    """Adds to ``plan`` the sinks (and leaves) that absorb ``demand`` applied to ``tensor``."""
    producer = split_tensor(tensor)[0]
    if graph.is_fetched(tensor):
        return Blocked(producer, "its output is a function output")
    consumers = graph.value_consumers(tensor)
    if not consumers:
        return Blocked(producer, "its output has no consumer")
    for node in consumers:
        if node.name in seen:
            return Blocked(node.name, "reached twice")
        seen.add(node.name)
        blocked = _down_into(graph, node, tensor, demand, plan, seen, padded)
        if blocked is not None:
            return blocked
    return None


def _down_into(graph: Graph, node, tensor: str, demand: Demand, plan: Plan, seen: set[str],
               padded: bool) -> Blocked | None:
    op = node.op
    inputs = graph.data_inputs(node)
    reads = [i for i, t in enumerate(inputs) if canonical(t) == canonical(tensor)]
    out = canonical(node.name)
    if op in LAYOUTS:
        if reads != [0]:
            return Blocked(node.name, "A feeds the layer's weight")
        return _sink(graph, node, tensor, demand, plan, padded)
    if op in PASS_THROUGH or _float_cast(node):
        return _down(graph, out, demand, plan, seen, padded)
    if op in ("SpaceToBatchND", "BatchToSpaceND"):
        if reads != [0]:
            return Blocked(node.name, f"A feeds the shape operands of {op}")
        return _down(graph, out, demand, plan, seen, padded or _pads(graph, node))
    if op in RESHAPES or op == "Transpose":
        if reads != [0]:
            return Blocked(node.name, f"A feeds the shape operand of {op}")
        mapped = axis_in_to_out(graph, node, demand.axis)
        if mapped is None and op == "Reshape":
            flat = _flatten(graph, node, demand)
            if flat is not None:
                return _down(graph, out, flat, plan, seen, padded)
        if mapped is None:
            return Blocked(node.name, f"{op} does not keep the channel axis intact")
        return _down(graph, out, demand.with_axis(*mapped), plan, seen, padded)
    if op in ("AvgPool", "AvgPool3D", "MaxPool", "MaxPool3D"):
        if demand.axis is not None and demand.axis != _format_axis(node, demand.rank):
            return Blocked(node.name, "pools over the channel axis")
        if op.startswith("MaxPool") and not demand.positive:
            return Blocked(node.name, "MaxPool needs every scale > 0 (a negative γ flips max)")
        return _down(graph, out, demand, plan, seen, padded)
    if op == "Mean":
        if reads != [0]:
            return Blocked(node.name, "A feeds the reduction axes")
        axes = _reduced_axes(graph, node, demand.rank)
        if axes is None:
            return Blocked(node.name, "Mean over unknown axes")
        if demand.axis is None:
            out_rank = demand.rank if node.attr["keep_dims"].b else demand.rank - len(axes)
            return _down(graph, out, demand.with_axis(None, out_rank), plan, seen, padded)
        if demand.axis in axes:
            return Blocked(node.name, "Mean reduces the channel axis")
        if node.attr["keep_dims"].b:
            axis, rank = demand.axis, demand.rank
        else:
            axis = demand.axis - sum(a < demand.axis for a in axes)
            rank = demand.rank - len(axes)
        return _down(graph, out, demand.with_axis(axis, rank), plan, seen, padded)
    if op in ("Pad", "PadV2"):
        pads = _pad_amounts(graph, node)
        if reads != [0] or pads is None:
            return Blocked(node.name, "padding is not a constant zero")
        if demand.axis is not None and np.any(pads[demand.axis] != 0):
            return Blocked(node.name, "pads the channel axis")
        if demand.has_shift:
            return Blocked(node.name, "zero padding after A: the shift cannot fold")
        return _down(graph, out, demand, plan, seen, True)
    if op == "ConcatV2":
        return _down_concat(graph, node, tensor, reads, demand, plan, seen, padded)
    if op in ADDS and len(inputs) == 2 and _const_operand(graph, node) is None:
        return _down_add(graph, node, tensor, reads, demand, plan, seen, padded)
    return Blocked(node.name, f"{op} is not a linear layer nor an op A can pass through")


def _sink(graph: Graph, layer, tensor: str, demand: Demand, plan: Plan,
          padded: bool) -> Blocked | None:
    const = weight_const(graph, layer)
    if const is None:
        return Blocked(layer.name, "its weight is not a constant")
    if layer.op == "MatMul" and layer.attr["transpose_a"].b:
        return Blocked(layer.name, "MatMul with transpose_a")
    if demand.axis is not None and demand.axis != channel_axis(layer, demand.rank):
        return Blocked(layer.name, "A's channel axis is not the layer's input-channel axis")
    w = graph.const(const)
    layout = LAYOUTS[layer.op]
    n_in = layout.in_channels(w, layer)
    shape = graph.shape(tensor)
    if shape is None or (demand.axis is not None and shape[demand.axis] not in (None, n_in)):
        return Blocked(layer.name, "grouped or unknown input channels")
    if demand.s.size not in (1, n_in):
        return Blocked(layer.name, f"A has {demand.s.size} channels, the layer reads {n_in}")
    if demand.has_shift and (padded or pads_input(graph, layer, shape, w)):
        return Blocked(layer.name, "zero padding touches the input: the shift cannot fold "
                                   "(the border outputs would change)")
    s = np.broadcast_to(demand.s, (n_in,)).astype(np.float64)
    t = np.broadcast_to(demand.t, (n_in,)).astype(np.float64)
    plan.sinks.append(Sink(layer.name, s, t))
    return None


def pads_input(graph: Graph, layer, shape: tuple, w: np.ndarray) -> bool:
    """Whether the layer reads zero padding around its input (SAME/EXPLICIT with pads > 0)."""
    if layer.op == "MatMul":
        return False
    padding = layer.attr["padding"].s
    if padding == b"VALID":
        return False
    fmt = layer.attr["data_format"].s or b"NHWC"
    spatial = list(range(2, len(shape))) if fmt.startswith(b"NC") else \
        list(range(1, len(shape) - 1))
    if padding == b"EXPLICIT":
        return bool(np.any(np.asarray(layer.attr["explicit_paddings"].list.i) != 0))
    strides = list(layer.attr["strides"].list.i) or [1] * len(shape)
    dilations = list(layer.attr["dilations"].list.i) or [1] * len(shape)
    for k, axis in enumerate(spatial):
        kernel = w.shape[k]
        size = shape[axis]
        stride, dilation = strides[axis], dilations[axis]
        if kernel == 1:
            continue
        if size is None:
            return True
        out = -(-size // stride)
        if (out - 1) * stride + (kernel - 1) * dilation + 1 - size > 0:
            return True
    return False


def _flatten(graph: Graph, node, demand: Demand) -> Demand | None:
    """A Flatten of ``[N, ..., C]`` to ``[N, K]``: s and t tiled over the spatial positions."""
    src, dst = graph.shape(graph.data_inputs(node)[0]), graph.shape(node.name)
    if src is None or dst is None or len(dst) != 2 or demand.axis != len(src) - 1:
        return None
    if any(d is None for d in src[1:]) or dst[1] not in (None, int(np.prod(src[1:]))):
        return None
    repeats = int(np.prod(src[1:-1]))
    tile = (lambda v: v if v.size == 1 else np.tile(v, repeats))
    return Demand(tile(demand.s), tile(demand.t), 1, 2)


def _down_concat(graph: Graph, node, tensor, reads, demand: Demand, plan: Plan, seen,
                 padded) -> Blocked | None:
    """Past a Concat on the channel axis, A acts on its slice; the other slices see 1·x + 0."""
    if len(reads) != 1:
        return Blocked(node.name, "ConcatV2 reads A's output twice")
    slices = _concat_slices(graph, node, demand.axis, demand.rank)
    if isinstance(slices, str):
        return Blocked(node.name, f"ConcatV2 {slices}")
    total = slices[-1][2]
    s, t = np.ones(total), np.zeros(total)
    _, start, stop = slices[reads[0]]
    s[start:stop] = np.broadcast_to(demand.s, (stop - start,))
    t[start:stop] = np.broadcast_to(demand.t, (stop - start,))
    return _down(graph, canonical(node.name), Demand(s, t, demand.axis, demand.rank), plan,
                 seen, padded)


def _down_add(graph: Graph, node, tensor, reads, demand: Demand, plan: Plan, seen,
              padded) -> Blocked | None:
    """``A(x) + z`` = ``s ⊙ (x + z/s) + t``: z's layers (leaves) absorb 1/s, then A continues
    past the Add."""
    if len(reads) != 1:
        return Blocked(node.name, "Add of A's output with itself")
    shapes = [graph.shape(t) for t in graph.data_inputs(node)]
    if shapes[0] is None or shapes[0] != shapes[1]:
        return Blocked(node.name, "Add broadcasts its operands")
    magnitude = np.abs(demand.s)
    if np.any(magnitude < LEAF_EPS * magnitude.max()) or not np.all(np.isfinite(1 / demand.s)):
        return Blocked(node.name, "a scale is (near) zero: the other operand cannot be divided "
                                  "by it")
    other = graph.data_inputs(node)[1 - reads[0]]
    inverse = Demand(1 / demand.s, np.zeros_like(demand.t), demand.axis, demand.rank)
    leaves = _up(graph, other, node.name, inverse, set())
    if isinstance(leaves, Blocked):
        return Blocked(leaves.node, f"leaf behind {node.name}: {leaves.reason}")
    plan.leaves.extend(leaves)
    return _down(graph, canonical(node.name), demand, plan, seen, padded)
