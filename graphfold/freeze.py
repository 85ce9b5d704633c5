"""Freeze a ConcreteFunction to a GraphDef with TensorFlow's own machinery.

Variables become constants and calls are inlined (``convert_variables_to_constants_v2``); control
flow (``If``/``While``) stays functional, its bodies in the GraphDef's function library.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import convert_to_constants

from graphfold.graph import canonical


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


def _shape_of(tensor) -> tuple | None:
    shape = tensor.shape
    if shape.rank is None:
        return None
    return tuple(shape.as_list())


def freeze(fn: tf.types.experimental.ConcreteFunction) -> Frozen:
    """The frozen GraphDef of ``fn`` (``fn`` itself is left as it was)."""
    frozen_fn, graph_def = convert_to_constants.convert_variables_to_constants_v2_as_graph(
        fn, lower_control_flow=False, aggressive_inlining=True)
    shapes = {}
    for op in frozen_fn.graph.get_operations():
        for i, out in enumerate(op.outputs):
            shapes[canonical(f"{op.name}:{i}")] = _shape_of(out)
    inputs = [canonical(t.name) for t in frozen_fn.inputs]
    outputs = [canonical(t.name) for t in frozen_fn.outputs]
    return Frozen(graph_def, inputs, outputs, shapes)
