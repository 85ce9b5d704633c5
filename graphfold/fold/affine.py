"""Recognise per-channel affine maps ``A(x) = s ⊙ x + t`` and merge chains of them into one A.

Sources (docs/folding.md §1): ``FusedBatchNorm``/``V2``/``V3`` in inference mode,
``BatchNormWithGlobalNormalization``, and ``Mul``/``RealDiv``/``Add``/``AddV2``/``BiasAdd``/``Sub``
by a constant that broadcasts only along the channel axis (which covers Keras 3's decomposed
``x * inv + offset``). A chain ``A2(A1(x))`` composes to ``(s2 s1) x + (s2 t1 + t2)``. All
arithmetic is float64.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from graphfold.errors import Blocked
from graphfold.fold import formats
from graphfold.fold.graph import Graph, canonical, tensor_name

FLOAT_TYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


@dataclasses.dataclass
class Affine:
    """One A: ``nodes`` (in data order) compute ``s ⊙ x + t`` on channel ``axis`` of a rank-``rank``
    tensor. ``s``/``t`` are float64 vectors of length C, or of length 1 for a scalar."""

    nodes: list[str]
    s: np.ndarray
    t: np.ndarray
    axis: int | None  # None: s and t are scalars, any axis will do
    rank: int
    dtype: tf.DType
    batch_norms: list[str]  # user-facing names of the batch-norm layers inside the chain
    form: str  # "FusedBatchNormV3", "Keras 3 (Mul/Add)", "Mul", ...
    blocked: Blocked | None = None  # set when the group can never be folded (training mode, ...)

    @property
    def is_batch_norm(self) -> bool:
        return bool(self.batch_norms)

    def input(self, graph: Graph) -> str:
        """The tensor A applies to: the first node's variable operand (``k * x`` reads it
        second)."""
        if self.nodes[0] not in graph.nodes:
            return ""
        inputs = graph.data_inputs(graph.nodes[self.nodes[0]])
        variable = [t for t in inputs[:2] if graph.const(t) is None]
        return variable[0] if variable else inputs[0]

    @property
    def output(self) -> str:
        return self.nodes[-1]

    def then(self, other: Affine) -> Affine:
        """The composition ``other ∘ self``."""
        axis = self.axis if self.axis is not None else other.axis
        return Affine(
            nodes=self.nodes + other.nodes,
            s=other.s * self.s,
            t=other.s * self.t + other.t,
            axis=axis,
            rank=self.rank,
            dtype=self.dtype,
            batch_norms=self.batch_norms
            + [b for b in other.batch_norms if b not in self.batch_norms],
            form=_merge_forms(self.form, other.form),
            blocked=self.blocked or other.blocked,
        )


def _merge_forms(a: str, b: str) -> str:
    kinds = [f for f in (a, b) if f not in ELEMENTWISE]
    if kinds:
        return kinds[0]
    return f"{a}+{b}" if a != b else a


def _per_channel(k: np.ndarray, shape: tuple | None) -> tuple[np.ndarray, int | None] | None:
    """``k`` as a per-channel vector and its channel axis in a tensor of ``shape``, or None when
    ``k`` broadcasts along another axis or would enlarge the tensor."""
    if shape is None or k.ndim > len(shape):
        return None
    if k.size == 1:
        return k.reshape(1).astype(np.float64), None
    rank = len(shape)
    aligned = (1,) * (rank - k.ndim) + tuple(k.shape)
    axes = [i for i, d in enumerate(aligned) if d != 1]
    if len(axes) != 1:
        return None
    axis = axes[0]
    if shape[axis] is not None and shape[axis] != aligned[axis]:
        return None
    return k.reshape(-1).astype(np.float64), axis


def batch_norm_scope(node_name: str) -> str | None:
    """The scope of the decomposed batch norm a node belongs to (``model/conv1_bn/batchnorm/mul_1``
    -> ``model/conv1_bn/batchnorm``), or None when the node is not one (tf.nn.batch_normalization
    and Keras 3 name their ops under ``batchnorm``)."""
    parts = node_name.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if re.fullmatch(r"batchnorm(_\d+)?", parts[i]):
            return "/".join(parts[: i + 1])
    return None


def batch_norm_name(node_name: str) -> str | None:
    """The layer name behind a decomposed batch-norm node (``model/conv1_bn/batchnorm/mul_1`` ->
    ``conv1_bn``; a top-level ``batchnorm_2/mul_1`` -> ``batchnorm_2``), or None."""
    scope = batch_norm_scope(node_name)
    if scope is None:
        return None
    parts = scope.split("/")
    return parts[-2] if len(parts) > 1 else parts[-1]


def fused_layer_name(node_name: str) -> str:
    parts = node_name.split("/")
    if len(parts) >= 2 and any(parts[-1].startswith(op) for op in FUSED_BATCH_NORMS):
        return parts[-2]
    return parts[-1]


# ---- the sources of A, one entry per op ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Elementwise:
    """``op(x, k)`` (or ``op(k, x)``, ``x_index`` 1) with k a per-channel constant vector ``v``:
    ``affine(v, x_index)`` gives (s, t), or None when that form is not an A (``x / 0``,
    ``k / x``). ``format_axis``: k's channel axis is the op's ``data_format`` (``BiasAdd``)."""

    affine: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray] | None]
    format_axis: bool = False


def _divide(v, x_index):
    return None if x_index != 0 or np.any(v == 0) else (1 / v, np.zeros_like(v))


def _subtract(v, x_index):
    return (np.ones_like(v), -v) if x_index == 0 else (-np.ones_like(v), v)


def _shift(v, x_index):
    return np.ones_like(v), v


ELEMENTWISE_OPS: dict[str, Elementwise] = {
    "Mul": Elementwise(lambda v, x_index: (v, np.zeros_like(v))),
    "RealDiv": Elementwise(_divide),
    "Add": Elementwise(_shift),
    "AddV2": Elementwise(_shift),
    "BiasAdd": Elementwise(_shift, format_axis=True),
    "Sub": Elementwise(_subtract),
}
ELEMENTWISE = tuple(ELEMENTWISE_OPS)


@dataclasses.dataclass(frozen=True)
class BatchNormOp:
    """A batch-norm op: the inputs holding γ, β, μ, σ² (in that order), its ε attribute, its
    channel axis, and whether it only normalises with its inputs (``fused``: ``is_training``
    and outputs 1-5 exist)."""

    params: tuple[int, int, int, int]
    epsilon: str
    fused: bool


_FUSED = BatchNormOp(params=(1, 2, 3, 4), epsilon="epsilon", fused=True)
BATCH_NORMS: dict[str, BatchNormOp] = {
    "FusedBatchNorm": _FUSED,
    "FusedBatchNormV2": _FUSED,
    "FusedBatchNormV3": _FUSED,
    "BatchNormWithGlobalNormalization": BatchNormOp(
        params=(4, 3, 1, 2), epsilon="variance_epsilon", fused=False
    ),
}
BATCH_NORM_OPS = tuple(BATCH_NORMS)
FUSED_BATCH_NORMS = tuple(op for op, entry in BATCH_NORMS.items() if entry.fused)


def recognise(graph: Graph, node) -> Affine | None:
    """The A computed by ``node`` alone, or None when ``node`` is not an affine op."""
    if node.op in BATCH_NORMS:
        return _batch_norm(graph, node, BATCH_NORMS[node.op])
    entry = ELEMENTWISE_OPS.get(node.op)
    if entry is None:
        return None
    dtype = graph.dtype(node)
    if dtype not in FLOAT_TYPES:
        return None
    inputs = graph.data_inputs(node)
    if len(inputs) != 2:
        return None
    a, b = (graph.const(t) for t in inputs)
    if (a is None) == (b is None):
        return None
    x_index = 0 if b is not None else 1
    k = b if b is not None else a
    assert k is not None  # exactly one of a, b is a constant
    x = inputs[x_index]
    shape = graph.shape(x)
    per_channel: tuple[np.ndarray, int | None] | None
    if entry.format_axis:
        if shape is None:
            return None
        channel = formats.channel_axis(formats.data_format(node), len(shape))
        per_channel = (k.reshape(-1).astype(np.float64), channel)
    else:
        per_channel = _per_channel(k, shape)
    if per_channel is None or shape is None:  # _per_channel: None for an unknown shape
        return None
    vec, axis = per_channel
    scale_shift = entry.affine(vec, x_index)
    if scale_shift is None:
        return None
    s, t = scale_shift
    name = batch_norm_name(node.name)
    return Affine(
        nodes=[node.name],
        s=s,
        t=t,
        axis=axis,
        rank=len(shape),
        dtype=dtype,
        batch_norms=[name] if name else [],
        form=node.op,
    )


def _batch_norm(graph: Graph, node, op: BatchNormOp) -> Affine | None:
    inputs = graph.data_inputs(node)
    shape = graph.shape(inputs[0])
    rank = len(shape) if shape is not None else 4
    dtype = graph.dtype(node)
    gamma, beta, mean, var = (graph.const(inputs[i]) for i in op.params)
    eps = node.attr[op.epsilon].f
    # every op but the fused ones (BatchNormWithGlobalNormalization) is channels-last
    axis = formats.channel_axis(formats.data_format(node), rank) if op.fused else rank - 1
    blocked = _fused_blocked(graph, node) if op.fused else None
    if (
        "scale_after_normalization" in node.attr
        and not node.attr["scale_after_normalization"].b
        and gamma is not None
    ):
        gamma = np.ones_like(gamma)
    name = fused_layer_name(node.name)
    params = [gamma, beta, mean, var]
    if blocked or any(p is None for p in params):
        return Affine(
            nodes=[node.name],
            s=np.ones(1),
            t=np.zeros(1),
            axis=axis,
            rank=rank,
            dtype=dtype,
            batch_norms=[name],
            form=node.op,
            blocked=blocked or Blocked(node.name, "batch-norm parameters are not constant"),
        )
    gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    with np.errstate(all="ignore"):
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        blocked = blocked or Blocked(
            node.name, "non-finite scale or shift (NaN/Inf or negative variance)"
        )
    return Affine(
        nodes=[node.name],
        s=s,
        t=t,
        axis=axis,
        rank=rank,
        dtype=dtype,
        batch_norms=[name],
        form=node.op,
        blocked=blocked,
    )


def _fused_blocked(graph: Graph, node) -> Blocked | None:
    """Why a fused batch norm computes more than an A: training mode, or its batch statistics
    (outputs 1-5) are read."""
    if node.attr["is_training"].b:
        return Blocked(
            node.name, "training mode (is_training=true): it normalises with batch statistics"
        )
    if any(
        graph.consumers(tensor_name(node.name, i)) or graph.is_fetched(tensor_name(node.name, i))
        for i in range(1, 6)
    ):
        return Blocked(node.name, "outputs 1-5 (batch statistics) are used")
    return None


def find_affines(graph: Graph) -> list[Affine]:
    """Every maximal chain of affine ops, merged, in graph order.

    A chain continues from op1 to op2 when op1's output feeds only op2, is not fetched, and the
    two agree on the channel axis.
    """
    single = {}
    for node in graph.graph_def.node:
        affine = recognise(graph, node)
        if affine is not None:
            single[node.name] = affine
    # next_in_chain[a] = b when b consumes a's output alone.
    nxt, has_prev = {}, set()
    for name, affine in single.items():
        out = canonical(name)
        users = graph.consumers(out)
        if len(users) != 1 or graph.is_fetched(out) or affine.blocked:
            continue
        user = users[0]
        other = single.get(user.name)
        if other is None or other.blocked or not _reads_as_x(graph, user, out):
            continue
        if affine.axis is not None and other.axis is not None and affine.axis != other.axis:
            continue
        if affine.rank != other.rank:
            continue
        nxt[name] = user.name
        has_prev.add(user.name)
    groups = []
    for node in graph.graph_def.node:
        name = node.name
        if name not in single or name in has_prev:
            continue
        group = single[name]
        while name in nxt:
            name = nxt[name]
            group = group.then(single[name])
        groups.append(group)
    return [g for g in groups if g.is_batch_norm or g.blocked or not _is_pure_shift(g)]


def _reads_as_x(graph: Graph, node, tensor: str) -> bool:
    """Whether ``node`` reads ``tensor`` as its variable operand (not as the constant)."""
    inputs = graph.data_inputs(node)
    if node.op in BATCH_NORM_OPS:
        return canonical(inputs[0]) == tensor
    return any(canonical(t) == tensor and graph.const(t) is None for t in inputs)


def _is_pure_shift(group: Affine) -> bool:
    """A bias alone (s = 1): it is a layer's own bias, not something to fold."""
    return bool(np.all(group.s == 1))


def refresh(graph: Graph, affine: Affine) -> Affine:
    """``affine`` recomputed from its nodes as they are now: an earlier fold may have changed a
    bias inside the chain (a backward fold adds ``W ⊛ t`` to the bias that starts it)."""
    if affine.blocked:
        return affine
    parts = [recognise(graph, graph.nodes[name]) for name in affine.nodes]
    if any(p is None or p.blocked for p in parts):
        return affine
    result = parts[0]
    for part in parts[1:]:
        assert result is not None and part is not None  # checked above
        result = result.then(part)
    assert result is not None
    return dataclasses.replace(affine, s=result.s, t=result.t)
