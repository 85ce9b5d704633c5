"""How a per-channel A travels through each op: the rule table (docs/folding.md §3-4).

One ``Rule`` per op, in the manner of TVM's FoldScaleAxis registry. ``forward(graph, node, d)``
moves a demand ``d`` (A applied to the op's output) up to the op's inputs, as ``Step``s;
``backward(graph, node, reads, d)`` moves A applied to input(s) ``reads`` down to the op's output,
as one ``Next``. Either returns ``Blocked`` when the op does not commute with A. An op without an
entry stops the walk. An entry also carries its op's facts the walkers need (a ``Pad``'s amounts,
a ``BatchToSpaceND``'s crops). Ops that commute with any A (§8: resizes, ``Tile``, ``Transpose``
moving the channel axis, reshapes tiling s) pass both ways; positively homogeneous ones
(``Relu``, ``LeakyRelu``, Keras' PReLU subgraph, ``MaxPool``) pass when every s > 0 (and t = 0
but for ``MaxPool``). The linear layers that absorb A are in ``layers.LINEAR``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework.node_def_pb2 import NodeDef

from graphfold.errors import Blocked
from graphfold.fold import formats
from graphfold.fold.affine import recognise
from graphfold.fold.graph import Graph
from graphfold.fold.layers import LINEAR
from graphfold.fold.shape_values import shape_value


@dataclasses.dataclass
class Demand:
    """What a walk carries: the per-channel s and t as seen at the current tensor, on which
    axis of a tensor of which rank (axis None: scalars, any axis)."""

    s: np.ndarray
    t: np.ndarray
    axis: int | None
    rank: int

    def slice(self, start: int, stop: int) -> Demand:
        def cut(v: np.ndarray) -> np.ndarray:
            return v if v.size == 1 else v[start:stop]

        return Demand(cut(self.s), cut(self.t), self.axis, self.rank)

    def with_axis(self, axis: int | None, rank: int) -> Demand:
        return Demand(self.s, self.t, axis, rank)

    def without_shift(self) -> Demand:
        return Demand(self.s, np.zeros_like(self.t), self.axis, self.rank)

    @property
    def has_shift(self) -> bool:
        return bool(np.any(self.t != 0))

    @property
    def positive(self) -> bool:
        return bool(np.all(self.s > 0))

    def not_positive(self) -> str:
        """Which channels have a scale <= 0, in words (``scale <= 0 on channels 1, 4 of 8``)."""
        bad = np.flatnonzero(~(np.asarray(self.s) > 0))
        listed = ", ".join(str(i) for i in bad[:8]) + (", ..." if bad.size > 8 else "")
        return f"scale <= 0 on channel{'s' if bad.size > 1 else ''} {listed} of {self.s.size}"


@dataclasses.dataclass(frozen=True)
class Step:
    """Forward: continue at ``tensor`` with ``demand``. ``bias``: the op is a constant bias on the
    path, which takes the shift (s ⊙ (y + b) + t = s ⊙ y + (s ⊙ b + t)) with ``taken``'s s and t;
    ``bias_sign`` −1 for ``y − b`` (then b ← s ⊙ b − t)."""

    tensor: str
    demand: Demand
    bias: str | None = None
    taken: Demand | None = None
    bias_sign: float = 1.0
    readers: tuple[str, ...] = ()  # the nodes that read ``tensor`` on the path (default: op)


@dataclasses.dataclass(frozen=True)
class Next:
    """Backward: continue at the op's output with ``demand``; ``pads``: the op adds zero padding
    (no shift may fold below it); ``leaves``: operands whose layers must absorb ``1/s`` first."""

    demand: Demand
    pads: bool = False
    leaves: tuple[tuple[str, Demand], ...] = ()


Forward = Callable[[Graph, NodeDef, Demand], "list[Step] | Blocked"]
Backward = Callable[[Graph, NodeDef, list, Demand], "Next | Blocked"]


@dataclasses.dataclass(frozen=True)
class Rule:
    forward: Forward | None = None
    backward: Backward | None = None
    pad_amounts: Callable[[Graph, NodeDef], np.ndarray | None] | None = None
    """A ``Pad``: its constant pad amounts (None when not constant)."""
    crops: Callable[[Graph, NodeDef], np.ndarray | None] | None = None
    """A ``BatchToSpaceND``: its constant crops (None when not constant)."""


# ---- shared facts --------------------------------------------------------------------------------
def const_operand(graph: Graph, node: NodeDef) -> int | None:
    """The index of the first constant operand of ``node`` (None when it has none)."""
    for i, tensor in enumerate(graph.data_inputs(node)):
        if graph.const(tensor) is not None:
            return i
    return None


def _x(graph, node) -> str:
    return graph.data_inputs(node)[0]


def _only_data(node, reads) -> Blocked | None:
    if reads != [0]:
        return Blocked(node.name, f"A feeds the shape operand(s) of {node.op}")
    return None


def _pads(graph: Graph, node) -> bool:
    """Whether a ``SpaceToBatchND`` adds zero padding."""
    pads = graph.const(graph.data_inputs(node)[2])
    return pads is None or bool(np.any(pads != 0))


# ---- where the channel axis goes through an op that moves axes ----------------------------------
# An axis map ``(graph, node, axis, src, dst) -> int | None`` gives where channel ``axis`` of the
# op's input (shape ``src``) lands in its output (shape ``dst``), or None when the op does not keep
# the channel axis intact.
def _squeeze_axis(graph, node, axis, src, dst):
    listed = list(node.attr["squeeze_dims"].list.i)
    dims = [d % len(src) for d in listed] if listed else [i for i, d in enumerate(src) if d == 1]
    if axis in dims:
        return None
    return axis - sum(d < axis for d in dims)


def _expand_axis(graph, node, axis, src, dst):
    where = graph.const(graph.data_inputs(node)[1])
    if where is None:
        return None
    where = int(where) % len(dst)
    return axis + 1 if where <= axis else axis


def _transpose_axis(graph, node, axis, src, dst):
    """A ``Transpose`` moves the channel axis to where its permutation says (output axis j is
    input axis ``perm[j]``)."""
    perm = graph.const(graph.data_inputs(node)[1])
    if perm is None or len(perm) != len(src):
        return None
    return [int(p) % len(src) for p in perm].index(axis)


def axis_in_to_out(
    graph: Graph, node, axis: int | None, axis_map
) -> tuple[int | None, int] | Blocked:
    """Where channel ``axis`` of the op's input lands in its output, with the output rank; or
    Blocked when the op does not keep the channel axis intact."""
    src, dst = graph.shape(graph.data_inputs(node)[0]), graph.shape(node.name)
    if src is not None and dst is not None:
        if axis is None:
            return None, len(dst)
        mapped = axis_map(graph, node, axis, src, dst)
        if mapped is not None:
            return mapped, len(dst)
    return Blocked(node.name, f"{node.op} does not keep the channel axis intact")


def axis_out_to_in(
    graph: Graph, node, axis: int | None, axis_map
) -> tuple[int | None, int] | Blocked:
    """The inverse of ``axis_in_to_out``."""
    src = graph.shape(graph.data_inputs(node)[0])
    if src is not None:
        if axis is None:
            mapped = axis_in_to_out(graph, node, None, axis_map)
            return mapped if isinstance(mapped, Blocked) else (None, len(src))
        for candidate in range(len(src)):
            mapped = axis_in_to_out(graph, node, candidate, axis_map)
            if not isinstance(mapped, Blocked) and mapped[0] == axis:
                return candidate, len(src)
    return Blocked(node.name, f"{node.op} does not keep the channel axis intact")


# ---- Reshape: the channel axis last on both sides, positions merged into it or split from it ---
def reshape_target(graph: Graph, node) -> tuple | None:
    """A ``Reshape``'s output shape: the inferred one, each unknown dimension completed from the
    static value of the shape operand (``shape_values``: a ``Tensordot``'s ``[-1, C]``)."""
    dst = graph.shape(node.name)
    value = shape_value(graph, graph.data_inputs(node)[1])
    if not isinstance(value, list) or (dst is not None and len(dst) != len(value)):
        return dst
    value = [None if v is None or v < 0 else v for v in value]
    return (
        tuple(value)
        if dst is None
        else tuple(d if d is not None else v for d, v in zip(dst, value))
    )


def _last_axis_repeats(node, c: int | None, d: int | None, forward: bool) -> int | Blocked:
    """A row-major reshape between a last axis of A's ``c`` channels and a last axis of ``d`` on
    the layer's side: when d is a multiple of c, element j of the d-axis is channel j mod c (s
    tiled d/c times)."""
    if c is not None and d is not None and d % c == 0:
        return d // c
    if c is not None and d is not None and c % d == 0:
        why = (
            (
                f"merges positions into A's channel axis (rows of {d} into {c} channels): A's "
                "scale would differ within one channel of the layer"
            )
            if forward
            else (
                f"splits the channel axis ({c} channels into rows of {d}): one channel's scale "
                "would apply to several"
            )
        )
        return Blocked(node.name, f"{node.op} {why}")
    return Blocked(node.name, f"{node.op} does not keep the channel axis intact")


def _tiled(demand: Demand, repeats: int, axis: int, rank: int) -> Demand:
    def tile(v: np.ndarray) -> np.ndarray:
        return v if v.size == 1 or repeats == 1 else np.tile(v, repeats)

    return Demand(tile(demand.s), tile(demand.t), axis, rank)


def _channels(shape: tuple, demand: Demand) -> int | None:
    last = shape[-1]
    return last if last is not None else (demand.s.size if demand.s.size > 1 else None)


def _reshape_up(graph, node, demand):
    x = _x(graph, node)
    src, dst = graph.shape(x), reshape_target(graph, node)
    if src is None or dst is None or (demand.axis is not None and demand.axis != len(dst) - 1):
        return Blocked(node.name, f"{node.op} does not keep the channel axis intact")
    if demand.axis is None:
        return [Step(x, demand.with_axis(None, len(src)))]
    repeats = _last_axis_repeats(node, _channels(dst, demand), src[-1], forward=True)
    if isinstance(repeats, Blocked):
        return repeats
    return [Step(x, _tiled(demand, repeats, len(src) - 1, len(src)))]


def _reshape_down(graph, node, reads, demand):
    """Backward: the channel axis stays last; a Flatten ``[N, ..., C] → [N, K]`` whose K is not
    known statically is taken as ``K = prod(...)·C`` (the layer below checks K)."""
    blocked = _only_data(node, reads)
    if blocked:
        return blocked
    src, dst = graph.shape(_x(graph, node)), reshape_target(graph, node)
    if src is None or dst is None or (demand.axis is not None and demand.axis != len(src) - 1):
        return Blocked(node.name, f"{node.op} does not keep the channel axis intact")
    if demand.axis is None:
        return Next(demand.with_axis(None, len(dst)))
    d = dst[-1]
    if d is None and len(dst) == 2 and all(n is not None for n in src[1:]):
        d = int(np.prod(src[1:]))
    repeats = _last_axis_repeats(node, _channels(src, demand), d, forward=False)
    if isinstance(repeats, Blocked):
        return repeats
    return Next(_tiled(demand, repeats, len(dst) - 1, len(dst)))


def concat_slices(
    graph: Graph, node, axis: int | None, rank: int
) -> list[tuple[str, int, int]] | Blocked:
    """``[(operand, start, stop)]`` when ``node`` concatenates on ``axis``, else why not."""
    inputs = graph.data_inputs(node)
    concat_axis = graph.const(inputs[-1])
    if concat_axis is None or axis is None:
        return Blocked(node.name, f"{node.op} concatenates on an unknown axis")
    if int(concat_axis) % rank != axis:
        return Blocked(node.name, f"{node.op} does not concatenate on the channel axis")
    slices, start = [], 0
    for operand in inputs[:-1]:
        shape = graph.shape(operand)
        if shape is None or shape[axis] is None:
            return Blocked(node.name, f"{node.op} an operand has an unknown channel count")
        slices.append((operand, start, start + shape[axis]))
        start += shape[axis]
    return slices


def _reduced_axes(graph: Graph, node, rank: int) -> list[int] | Blocked:
    axes = graph.const(graph.data_inputs(node)[1])
    if axes is None:
        return Blocked(node.name, "Mean over unknown axes")
    return sorted({int(a) % rank for a in np.atleast_1d(axes)})


def pad_amounts(graph: Graph, node) -> np.ndarray | None:
    """A ``Pad``'s constant amounts (None when they are not constant)."""
    return graph.const(graph.data_inputs(node)[1])


def _zero_pad_v2(graph: Graph, node) -> Blocked | None:
    """A ``PadV2`` pads with its constant value: it must be zero."""
    value = graph.const(graph.data_inputs(node)[2])
    if value is None or np.any(value != 0):
        return Blocked(node.name, "padding is not a constant zero")
    return None


# ---- rules ---------------------------------------------------------------------------------------
def _through(graph, node, demand):
    return [Step(_x(graph, node), demand)]


def _through_down(graph, node, reads, demand):
    return _only_data(node, reads) or Next(demand)


def _cast_check(node) -> Blocked | None:
    """A ``Cast`` between floating-point types (Keras mixed precision computes a half-precision
    layer's batch norm in float32 between two of them): per-channel maps commute with it."""
    if all(tf.as_dtype(node.attr[key].type).is_floating for key in ("SrcT", "DstT")):
        return None
    return Blocked(node.name, "Cast to or from a non-floating type")


def _space_to_batch_up(graph, node, demand):
    if demand.has_shift and _pads(graph, node):
        return Blocked(node.name, "SpaceToBatchND pads with zeros: needs a zero shift")
    return _through(graph, node, demand)


def _space_to_batch_down(graph, node, reads, demand):
    pads = _pads(graph, node) and not _alignment_only(graph, node)
    return _only_data(node, reads) or Next(demand, pads=pads)


def _alignment_only(graph: Graph, node) -> bool:
    """Whether ``SpaceToBatchND → layer → BatchToSpaceND`` (a dilated convolution) pads only at
    the end, to align the size to the rate, and the crop removes every output that read a padded
    zero: the layer has stride 1, ``BatchToSpaceND`` has the same block shape, crops nothing at
    the start and at least the padding at the end (an output q reads up to q + r(k−1) of the
    padded input, whose last kept output reads up to n + pad − 1 − crop)."""
    inputs = graph.data_inputs(node)
    block, pads = graph.const(inputs[1]), graph.const(inputs[2])
    users = graph.value_consumers(node.name)
    if (
        block is None
        or pads is None
        or np.any(pads[:, 0] != 0)
        or len(users) != 1
        or users[0].op not in LINEAR
        or any(s != 1 for s in users[0].attr["strides"].list.i)
    ):
        return False
    after = graph.value_consumers(users[0].name)
    rule = RULES.get(after[0].op) if len(after) == 1 else None
    crops = rule.crops(graph, after[0]) if rule is not None and rule.crops else None
    crop_block = graph.const(after[0].input[1])
    return bool(
        crops is not None
        and crop_block is not None
        and np.array_equal(crop_block, block)
        and crops.shape == pads.shape
        and not np.any(crops[:, 0])
        and np.all(crops[:, 1] >= pads[:, 1])
    )


def _crops(graph: Graph, node) -> np.ndarray | None:
    """A ``BatchToSpaceND``'s constant crops (None when not constant)."""
    return graph.const(graph.data_inputs(node)[2])


def _tile_check(graph, node, demand) -> Blocked | None:
    """``Tile`` copies: it commutes with A unless it repeats the channel axis."""
    multiples = graph.const(graph.data_inputs(node)[1])
    if multiples is None:
        return Blocked(node.name, "Tile by multiples that are not constant")
    if demand.axis is not None and int(multiples[demand.axis]) != 1:
        return Blocked(node.name, "Tile repeats the channel axis")
    return None


def _resize_check(graph, node, demand) -> Blocked | None:
    """An image resize (channels last) makes each output a copy or an affine combination
    (weights summing to 1) of same-channel inputs: it commutes with any per-channel A."""
    if demand.axis is not None and demand.axis != demand.rank - 1:
        return Blocked(node.name, "resizes along A's channel axis")
    return None


def _reshaping(axis_map) -> Rule:
    """The rule of an op that moves axes as ``axis_map`` says."""

    def up(graph, node, demand):
        mapped = axis_out_to_in(graph, node, demand.axis, axis_map)
        if isinstance(mapped, Blocked):
            return mapped
        return [Step(_x(graph, node), demand.with_axis(*mapped))]

    def down(graph, node, reads, demand):
        blocked = _only_data(node, reads)
        if blocked:
            return blocked
        mapped = axis_in_to_out(graph, node, demand.axis, axis_map)
        return mapped if isinstance(mapped, Blocked) else Next(demand.with_axis(*mapped))

    return Rule(up, down)


def _pooling(positive: bool) -> Rule:
    """Pools act per channel: they commute with A when A's axis is the channel axis; a max
    (``positive``) commutes with a positive scale only."""

    def check(graph, node, demand) -> Blocked | None:
        if demand.axis is not None and demand.axis != formats.channel_axis(
            formats.data_format(node), demand.rank
        ):
            return Blocked(node.name, "pools over the channel axis")
        if positive and not demand.positive:
            return Blocked(
                node.name,
                f"MaxPool needs every scale > 0 (a negative γ flips max; {demand.not_positive()})",
            )
        return None

    return Rule(_checked(check, True), _checked(check, False))


def _mean_up(graph, node, demand):
    x = _x(graph, node)
    in_rank = graph.rank(x)
    axes = _reduced_axes(graph, node, in_rank or 0)
    if isinstance(axes, Blocked) or in_rank is None:
        return Blocked(node.name, "Mean over unknown axes")
    if demand.axis is None:
        return [Step(x, demand.with_axis(None, in_rank))]
    if node.attr["keep_dims"].b:
        axis = demand.axis
    else:
        axis = [a for a in range(in_rank) if a not in axes][demand.axis]
    if axis in axes:
        return Blocked(node.name, "Mean reduces the channel axis")
    return [Step(x, demand.with_axis(axis, in_rank))]


def _mean_down(graph, node, reads, demand):
    if reads != [0]:
        return Blocked(node.name, "A feeds the reduction axes")
    axes = _reduced_axes(graph, node, demand.rank)
    if isinstance(axes, Blocked):
        return axes
    keep = node.attr["keep_dims"].b
    if demand.axis is None:
        return Next(demand.with_axis(None, demand.rank if keep else demand.rank - len(axes)))
    if demand.axis in axes:
        return Blocked(node.name, "Mean reduces the channel axis")
    if keep:
        return Next(demand)
    return Next(
        demand.with_axis(demand.axis - sum(a < demand.axis for a in axes), demand.rank - len(axes))
    )


def homogeneous_check(graph, node, demand, what: str | None = None) -> Blocked | None:
    """A positively homogeneous op (``Relu``, ``LeakyRelu``, a ``PReLU``: f(s·x) = s·f(x) for
    s > 0) commutes with A when every scale is > 0 and the shift is zero (a shift stays as one
    add: a partial fold, ``decide.py``)."""
    what = what or node.op
    if not demand.positive:
        return Blocked(node.name, f"{what} needs every scale > 0 ({demand.not_positive()})")
    if demand.has_shift:
        return Blocked(node.name, f"{what} needs a zero shift")
    return None


# ---- Keras' PReLU: relu(x) + k ⊙ relu(−x), a subgraph that acts as one homogeneous op ----------
_PRELU = {"relu": ("Relu",), "negate": ("Neg",), "scale": ("Mul",), "sum": ("Add", "AddV2")}


def _sole_user(graph: Graph, node, ops: tuple[str, ...]):
    """The one consumer of ``node``'s output, if its op is one of ``ops`` and the output is not
    fetched; else None. A node that nothing reads any more (an A already replaced, waiting to be
    pruned) is no consumer."""
    users = [
        u
        for u in graph.value_consumers(node.name)
        if graph.value_consumers(u.name) or graph.is_fetched(u.name)
    ]
    if len(users) != 1 or graph.is_fetched(node.name) or users[0].op not in ops:
        return None
    return users[0]


def prelu_at(graph: Graph, tensor: str) -> tuple[list[str], NodeDef] | None:
    """``(its nodes, its output node)`` when the readers of ``tensor`` are exactly a PReLU
    ``Relu(x) + k ⊙ Relu(Neg(x))`` (k constant: f(s·x) = s·f(x) for s > 0 per channel)."""
    users = graph.value_consumers(tensor)
    positive = [u for u in users if u.op in _PRELU["relu"]]
    negate = [u for u in users if u.op in _PRELU["negate"]]
    if len(users) != 2 or len(positive) != 1 or len(negate) != 1:
        return None
    relu = _sole_user(graph, negate[0], _PRELU["relu"])
    scale = relu and _sole_user(graph, relu, _PRELU["scale"])
    total = scale and _sole_user(graph, scale, _PRELU["sum"])
    if (
        total is None
        or const_operand(graph, scale) is None
        or _sole_user(graph, positive[0], _PRELU["sum"]) is not total
        or graph.shape(total.name) != graph.shape(tensor)
    ):
        return None
    return [positive[0].name, negate[0].name, relu.name, scale.name, total.name], total


def _prelu_up(graph, node, demand) -> list[Step] | Blocked | None:
    """Forward through a PReLU whose output is ``node`` (its final add); None when it is not
    one."""
    inputs = graph.data_inputs(node)
    for operand in inputs:
        relu = graph.producer(operand)
        if relu.op in _PRELU["relu"]:
            x = graph.data_inputs(relu)[0]
            found = prelu_at(graph, x)
            if found is not None and found[1] is node:
                nodes = found[0]
                return homogeneous_check(graph, node, demand, "PReLU") or [
                    Step(x, demand, readers=(nodes[0], nodes[1]))
                ]
    return None


def _pad_check(graph, node, demand, value_check=lambda graph, node: None) -> Blocked | None:
    pads = pad_amounts(graph, node)
    blocked = value_check(graph, node)
    if pads is None or blocked:
        return Blocked(node.name, "padding is not a constant zero")
    if demand.has_shift:
        return Blocked(node.name, "zero padding after A: the shift cannot fold")
    if demand.axis is not None and np.any(pads[demand.axis] != 0):
        return Blocked(node.name, "pads the channel axis")
    return None


def _padding(value_check=lambda graph, node: None) -> Rule:
    """A zero ``Pad``: A passes when its shift is zero and the channel axis is not padded."""

    def check(graph, node, demand):
        return _pad_check(graph, node, demand, value_check)

    def down(graph, node, reads, demand):
        return _only_data(node, reads) or check(graph, node, demand) or Next(demand, pads=True)

    return Rule(_checked(check, True), down, pad_amounts=pad_amounts)


def _add_up(graph, node, demand):
    """A bias (a constant operand) takes the shift; an Add of two tensors passes s to both
    operands and t to the first."""
    if const_operand(graph, node) is not None:
        return _bias_up(graph, node, demand, 1.0)
    prelu = _prelu_up(graph, node, demand)
    if prelu is not None:
        return prelu
    inputs = graph.data_inputs(node)
    shapes = [graph.shape(t) for t in inputs]
    if (
        len(inputs) != 2
        or shapes[0] is None
        or shapes[0] != shapes[1]
        or graph.shape(node.name) != shapes[0]
    ):
        return Blocked(node.name, "Add broadcasts its operands")
    if inputs[0] == inputs[1]:
        return Blocked(node.name, "Add of a tensor with itself")
    return [Step(inputs[0], demand), Step(inputs[1], demand.without_shift())]


def _bias_up(graph, node, demand, sign: float):
    """``x ± b`` (``sign``) with b a per-channel constant: it takes the shift."""
    shift = recognise(graph, node)
    if (
        shift is None
        or shift.blocked
        or not np.all(shift.s == 1)
        or not (shift.axis is None or demand.axis is None or shift.axis == demand.axis)
    ):
        return Blocked(node.name, f"{node.op} is not a per-channel bias on A's axis")
    k = const_operand(graph, node)
    assert k is not None  # recognise found the constant operand
    x = graph.data_inputs(node)[1 - k]
    return [Step(x, demand.without_shift(), bias=node.name, taken=demand, bias_sign=sign)]


def _bias(sign: float) -> Rule:
    return Rule(lambda graph, node, demand: _bias_up(graph, node, demand, sign), None)


def _add_down(graph, node, reads, demand):
    """``A(x) + z`` = ``s ⊙ (x + z/s) + t``: z's layers (leaves) absorb 1/s, then A continues
    past the Add."""
    inputs = graph.data_inputs(node)
    if len(inputs) != 2 or const_operand(graph, node) is not None:
        return Blocked(node.name, f"{node.op} of A's output and a constant")
    if len(reads) != 1:
        return Blocked(node.name, "Add of A's output with itself")
    shapes = [graph.shape(t) for t in inputs]
    if shapes[0] is None or shapes[0] != shapes[1]:
        return Blocked(node.name, "Add broadcasts its operands")
    magnitude = np.abs(demand.s)
    if np.any(magnitude < LEAF_EPS * magnitude.max()) or np.any(demand.s == 0):
        return Blocked(
            node.name, "a scale is (near) zero: the other operand cannot be divided by it"
        )
    inverse = Demand(1 / demand.s, np.zeros_like(demand.t), demand.axis, demand.rank)
    return Next(demand, leaves=((inputs[1 - reads[0]], inverse),))


LEAF_EPS = 1e-6  # refuse a leaf when some |s| < LEAF_EPS · max|s|


def _concat_up(graph, node, demand):
    slices = concat_slices(graph, node, demand.axis, demand.rank)
    if isinstance(slices, Blocked):
        return slices
    operands = [operand for operand, _, _ in slices]
    if len(set(operands)) != len(operands):
        return Blocked(node.name, "ConcatV2 reads one tensor twice")
    return [Step(operand, demand.slice(start, stop)) for operand, start, stop in slices]


def _concat_down(graph, node, reads, demand):
    """Past a Concat on the channel axis, A acts on its slice; the other slices see 1·x + 0."""
    if len(reads) != 1:
        return Blocked(node.name, "ConcatV2 reads A's output twice")
    slices = concat_slices(graph, node, demand.axis, demand.rank)
    if isinstance(slices, Blocked):
        return slices
    total = slices[-1][2]
    s, t = np.ones(total), np.zeros(total)
    _, start, stop = slices[reads[0]]
    s[start:stop] = np.broadcast_to(demand.s, (stop - start,))
    t[start:stop] = np.broadcast_to(demand.t, (stop - start,))
    return Next(Demand(s, t, demand.axis, demand.rank))


def _checked(check, forward: bool):
    """A rule that passes A through unchanged once ``check(graph, node, demand)`` allows it."""
    if forward:
        return lambda graph, node, d: check(graph, node, d) or _through(graph, node, d)
    return lambda graph, node, reads, d: _only_data(node, reads) or check(graph, node, d) or Next(d)


def _refuse(reason: str) -> Rule:
    return Rule(
        lambda graph, node, d: Blocked(node.name, reason),
        lambda graph, node, reads, d: Blocked(node.name, reason),
    )


def _call(node) -> Blocked:
    return Blocked(
        node.name,
        f"a nested function call ({node.attr['f'].func.name}; Keras runs "
        "grouped convolutions and jit_compile layers this way) that "
        "graphfold could not inline, so the batch norm cannot reach the "
        "layer inside it (the report's notes say why)",
    )


_IDENTITY = Rule(_through, _through_down)
_CAST = Rule(
    _checked(lambda g, n, d: _cast_check(n), True), _checked(lambda g, n, d: _cast_check(n), False)
)

IDENTITIES = ("Identity", "Snapshot", "StopGradient")
# a layer's own bias (a per-channel constant add), to which a shift folded backward is added
LAYER_BIAS_OPS = ("BiasAdd", "Add", "AddV2")

RULES: dict[str, Rule] = {
    **{op: _IDENTITY for op in IDENTITIES},
    "Cast": _CAST,
    "BatchToSpaceND": dataclasses.replace(_IDENTITY, crops=_crops),
    "SpaceToBatchND": Rule(_space_to_batch_up, _space_to_batch_down),
    "Reshape": Rule(_reshape_up, _reshape_down),
    "Tile": Rule(_checked(_tile_check, True), _checked(_tile_check, False)),
    "ResizeNearestNeighbor": Rule(_checked(_resize_check, True), _checked(_resize_check, False)),
    "ResizeBilinear": Rule(_checked(_resize_check, True), _checked(_resize_check, False)),
    "Squeeze": _reshaping(_squeeze_axis),
    "ExpandDims": _reshaping(_expand_axis),
    "Transpose": _reshaping(_transpose_axis),
    "AvgPool": _pooling(positive=False),
    "AvgPool3D": _pooling(positive=False),
    "MaxPool": _pooling(positive=True),
    "MaxPool3D": _pooling(positive=True),
    "Mean": Rule(_mean_up, _mean_down),
    "Relu": Rule(_checked(homogeneous_check, True), _checked(homogeneous_check, False)),
    "LeakyRelu": Rule(_checked(homogeneous_check, True), _checked(homogeneous_check, False)),
    "Pad": _padding(),
    "PadV2": _padding(_zero_pad_v2),
    "Add": Rule(_add_up, _add_down),
    "AddV2": Rule(_add_up, _add_down),
    "BiasAdd": _bias(1.0),
    "Sub": _bias(-1.0),
    "ConcatV2": Rule(_concat_up, _concat_down),
    "Placeholder": _refuse("graph input"),
    "StatefulPartitionedCall": Rule(lambda g, n, d: _call(n), lambda g, n, r, d: _call(n)),
    "PartitionedCall": Rule(lambda g, n, d: _call(n), lambda g, n, r, d: _call(n)),
}
