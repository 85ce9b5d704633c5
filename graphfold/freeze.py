"""Freeze a ConcreteFunction to a GraphDef with TensorFlow's own machinery.

Variables become constants and calls are inlined (``convert_variables_to_constants_v2``); control
flow (``If``/``While``) stays functional, its bodies in the GraphDef's function library.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import convert_to_constants

from graphfold.errors import NotFreezable
from graphfold.graph import canonical


WRITES = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")


@dataclasses.dataclass
class Frozen:
    graph_def: graph_pb2.GraphDef
    inputs: list[str]                 # placeholder tensors, in the flat order of the signature
    outputs: list[str]                # fetched tensors, in the flat order of the outputs
    shapes: dict[str, tuple | None]   # static shape of every tensor in the frozen graph


def as_concrete_function(fn) -> tf.types.experimental.ConcreteFunction:
    """``fn`` itself if it is a ConcreteFunction; the concrete function of a ``tf.function``
    with an ``input_signature``; else a clear error."""
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        return fn
    if isinstance(fn, tf.types.experimental.PolymorphicFunction):
        if fn.input_signature is None:
            raise TypeError("a tf.function needs an input_signature to be rewritten; pass "
                            "fn.get_concrete_function(...) instead")
        return fn.get_concrete_function()
    raise TypeError(f"expected a ConcreteFunction or a tf.function, got {type(fn).__name__}")


def _shape_of(tensor, known: tf.TensorShape | None = None) -> tuple | None:
    """The static shape of ``tensor``, completed by ``known`` (the shape the same tensor has in
    the original function) where the two agree."""
    shape = tensor.shape
    if known is not None and not shape.is_fully_defined():
        try:
            shape = shape.merge_with(known)
        except ValueError:
            pass
    if shape.rank is None:
        return None
    return tuple(shape.as_list())


def check_freezable(fn: tf.types.experimental.ConcreteFunction) -> None:
    """Raises ``NotFreezable`` naming the problem when ``fn`` captures resources other than
    variables (lookup tables, ...) or assigns to variables (a batch norm in training mode
    updating its moving statistics)."""
    resources = sum(t.dtype == tf.resource for t in fn.captured_inputs)
    others = resources - len(fn.variables)
    if others > 0:
        raise NotFreezable(f"it captures {others} resource(s) other than variables (a lookup "
                           "table, ...), which cannot be frozen into constants")
    graph_def = fn.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    ops.update(n.op for f in graph_def.library.function for n in f.node_def)
    if ops & set(WRITES):
        raise NotFreezable("it assigns to variables (a batch norm in training mode updating its "
                           "moving statistics, ...), which cannot be frozen into constants")


def freeze(fn: tf.types.experimental.ConcreteFunction) -> Frozen:
    """The frozen GraphDef of ``fn`` (``fn`` itself is left as it was)."""
    check_freezable(fn)
    frozen_fn, graph_def = convert_to_constants.convert_variables_to_constants_v2_as_graph(
        fn, lower_control_flow=False, aggressive_inlining=True)
    # Freezing changes the signature of a call that is not inlined (an XLA-compiled function,
    # e.g. Keras' grouped Conv2D on CPU): its outputs, and everything after them, lose their
    # static shapes in the frozen graph. Same node name, same tensor: take them from ``fn``.
    original = {canonical(f"{op.name}:{i}"): out.shape
                for op in fn.graph.get_operations() for i, out in enumerate(op.outputs)}
    shapes = {}
    for op in frozen_fn.graph.get_operations():
        for i, out in enumerate(op.outputs):
            name = canonical(f"{op.name}:{i}")
            shapes[name] = _shape_of(out, original.get(name))
    inputs = [canonical(t.name) for t in frozen_fn.inputs]
    outputs = [canonical(t.name) for t in frozen_fn.outputs]
    return Frozen(graph_def, inputs, outputs, shapes)
