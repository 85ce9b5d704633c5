"""Carry out a decided fold on the graph, and replace unfolded A's by one multiply-add.

``fold`` makes the writes ``decide.compute`` returned (new constants, new biases) and bypasses A;
it decides nothing. A weight or bias constant that anything else reads is cloned, never modified.
A's nodes are bypassed and left for pruning.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphfold.fold.affine import BATCH_NORM_OPS, ELEMENTWISE, Affine
from graphfold.fold.formats import bias_format
from graphfold.fold.graph import Graph, canonical
from graphfold.fold.writes import KeepShift, NewBias, SetConst, Write


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
        graph.created[clone] = const
        graph.set_input(node, index, clone)


def fold(graph: Graph, affine: Affine, writes: list[Write]) -> None:
    """Makes the changes ``decide`` returned for A: new constants and biases; then A is bypassed,
    or (a partial fold) replaced by the one add it keeps."""
    kept = None
    for write in writes:
        if isinstance(write, SetConst):
            _write_const(graph, write.node, write.index, write.const, write.value)
        elif isinstance(write, NewBias):
            add_bias_after(graph, write.site.layer, write.value, like=write.site.node)
        elif isinstance(write, KeepShift):
            kept = write.value
        else:
            raise TypeError(f"unknown write {write!r}")
    if kept is None:
        _bypass(graph, affine)
    else:
        _emit(graph, affine, np.ones_like(kept), kept)


def add_bias_after(graph: Graph, layer, bias: np.ndarray, like=None) -> None:
    """Inserts ``BiasAdd(layer, bias)`` after ``layer`` (a fetched ``layer`` name then names the
    ``BiasAdd``: it still computes the layer's output as it was before the fold), of the dtype
    and data format of ``like`` (the layer inside a call; default ``layer``). The one place a
    fold emits a bias."""
    like = layer if like is None else like
    dtype = graph.dtype(like)
    const = graph.add_const(f"{layer.name}/folded_bias", bias, dtype)
    add = graph.add_op(
        f"{layer.name}/folded_bias_add",
        "BiasAdd",
        [layer.name, const],
        dtype,
        data_format=bias_format(like),
    )
    graph.shapes[add] = graph.shapes.get(canonical(layer.name))
    graph.created.update({const: layer.name, add: layer.name})
    graph.redirect(layer.name, add)


def _bypass(graph: Graph, affine: Affine) -> None:
    """Consumers of A's output read A's input instead (A's nodes become dead)."""
    graph.redirect(affine.output, affine.input(graph))


def as_multiply_add(graph: Graph, affine: Affine) -> None:
    """Replaces A's nodes by ``x * s + t`` (one ``Mul`` and one ``AddV2``; either is omitted when
    it is the identity). A float16/bfloat16 batch-norm op stays as it is: its kernel computes in
    float32, and Grappler pushes a ``Mul`` that follows a conv into the conv's half-precision
    filter at run time (``MulConvPushDown``), the very overflow a refused fold avoided. A chain
    of elementwise ops that would take more ops so (``Sub(k, x)``: ``x * -1 + k``) stays too."""
    if affine.dtype in (tf.float16, tf.bfloat16) and any(
        graph.nodes[name].op in BATCH_NORM_OPS for name in affine.nodes
    ):
        return
    emitted = int(not np.all(affine.s == 1)) + int(not np.all(affine.t == 0))
    if emitted > len(affine.nodes) and all(
        graph.nodes[name].op in ELEMENTWISE for name in affine.nodes
    ):
        return
    _emit(graph, affine, affine.s, affine.t)


def _emit(graph: Graph, affine: Affine, scale: np.ndarray, shift: np.ndarray) -> None:
    """A's nodes replaced by ``x * scale + shift`` (either omitted when it is the identity)."""
    x = affine.input(graph)
    dtype = affine.dtype
    shape = [] if affine.axis is None else [-1] + [1] * (affine.rank - 1 - affine.axis)
    y = x
    base = affine.output
    if not np.all(scale == 1):
        s = graph.add_const(f"{base}/graphfold_scale", scale.reshape(shape), dtype)
        y = graph.add_op(f"{base}/graphfold_mul", "Mul", [y, s], dtype)
        graph.shapes[y] = graph.shapes.get(canonical(affine.output))
        graph.created.update({s: base, y: base})
    if not np.all(shift == 0):
        t = graph.add_const(f"{base}/graphfold_shift", shift.reshape(shape), dtype)
        y = graph.add_op(f"{base}/graphfold_add", "AddV2", [y, t], dtype)
        graph.shapes[y] = graph.shapes.get(canonical(affine.output))
        graph.created.update({t: base, y: base})
    graph.redirect(affine.output, y)
