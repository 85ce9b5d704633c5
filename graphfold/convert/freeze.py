"""Freeze a ConcreteFunction to a GraphDef with TensorFlow's own machinery.

Variables become constants and calls are inlined (``convert_variables_to_constants_v2``); control
flow (``If``/``While``) stays functional, its bodies in the GraphDef's function library.
"""

from __future__ import annotations

import contextlib
import dataclasses

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from graphfold.errors import NotFreezable
from graphfold.fold.graph import canonical
from graphfold.fold.shapes import CALL_OPS, infer_shapes
from graphfold.fold.weights import Weights, as_placeholders, stub
from graphfold.tf_private import freeze_with_values, freeze_without_reading

WRITES = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")


@dataclasses.dataclass
class Frozen:
    graph_def: graph_pb2.GraphDef
    inputs: list[str]  # placeholder tensors, in the flat order of the signature
    outputs: list[str]  # fetched tensors, in the flat order of the outputs
    shapes: dict[str, tuple | None]  # static shape of every tensor in the frozen graph
    weights: Weights | None = None  # values of the stub constants (see graphfold.fold.weights)
    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    """``{Const node: the name of the variable it froze}`` (``conv1_bn/gamma``): the path of the
    Keras layer that owns it, which the report's names come from."""


def as_concrete_function(fn) -> tf.types.experimental.ConcreteFunction:
    """``fn`` itself if it is a ConcreteFunction; the concrete function of a ``tf.function``
    with an ``input_signature``; else a clear error."""
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
        return fn
    if isinstance(fn, tf.types.experimental.PolymorphicFunction):
        if fn.input_signature is None:
            raise TypeError(
                "a tf.function needs an input_signature to be rewritten; pass "
                "fn.get_concrete_function(...) instead"
            )
        return fn.get_concrete_function()
    raise TypeError(f"expected a ConcreteFunction or a tf.function, got {type(fn).__name__}")


def _shape_of(tensor, known: tf.TensorShape | None = None) -> tuple | None:
    """The static shape of ``tensor``, completed by ``known`` (the shape the same tensor has in
    the original function) where the two agree."""
    shape = tensor.shape
    if known is not None and not shape.is_fully_defined():
        with contextlib.suppress(ValueError):
            shape = shape.merge_with(known)
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
        raise NotFreezable(
            f"it captures {others} resource(s) other than variables (a lookup "
            "table, ...), which cannot be frozen into constants"
        )
    graph_def = fn.graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    writers = [n.name for n in nodes if n.op in WRITES]
    if writers:
        raise NotFreezable(_why_writes(writers, nodes))


def _why_writes(writers: list[str], nodes) -> str:
    """Why a function that assigns to variables (``writers``) cannot be frozen, naming the
    writes, and a batch norm in training mode where a writer's scope holds one (a fused op with
    ``is_training`` or the ``moments`` of the decomposed form)."""
    named = ", ".join(writers[:3]) + (f" and {len(writers) - 3} more" if len(writers) > 3 else "")
    scopes = {w.rpartition("/")[0] + "/" for w in writers}
    training = any(
        n.name.startswith(tuple(scopes))
        and ("/moments/" in n.name or n.op.startswith("FusedBatchNorm") and n.attr["is_training"].b)
        for n in nodes
    )
    if training:
        return (
            f"it assigns to variables ({named}): a batch norm in training mode (called with "
            "training=True) normalises with batch statistics, the mean and variance of its "
            "input, not constants, and updates its moving statistics; variables that change "
            "cannot be frozen into constants (call it with training=False)"
        )
    return (
        f"it assigns to variables ({named}: a batch norm in training mode updating its "
        "moving statistics, ...), which cannot be frozen into constants"
    )


def freeze(fn: tf.types.experimental.ConcreteFunction, weights: Weights | None = None) -> Frozen:
    """The frozen GraphDef of ``fn`` (``fn`` itself is left as it was).

    With ``weights``, no weight is copied into the GraphDef: each variable becomes a stub
    ``Const`` whose value is a read-only view of the variable's buffer, held in ``weights``, and
    so does every other constant of ``weights.threshold`` bytes or more.
    """
    check_freezable(fn)
    if weights is None:
        frozen_fn, graph_def = freeze_with_values(fn)
        frozen_graph = frozen_fn.graph
    else:
        graph_def = _freeze_without_weights(fn, weights)
        frozen_graph = tf.Graph()
        with frozen_graph.as_default():
            tf.graph_util.import_graph_def(as_placeholders(graph_def, weights.names()), name="")
    # Freezing changes the signature of a call that is not inlined (an XLA-compiled function,
    # e.g. Keras' grouped Conv2D on CPU): its outputs, and everything after them, lose their
    # static shapes in the frozen graph. Same node name, same tensor: take them from ``fn``.
    original = {
        canonical(f"{op.name}:{i}"): out.shape
        for op in fn.graph.get_operations()
        for i, out in enumerate(op.outputs)
    }
    shapes = {}
    for op in frozen_graph.get_operations():
        for i, out in enumerate(op.outputs):
            name = canonical(f"{op.name}:{i}")
            shapes[name] = _shape_of(out, original.get(name))
    if weights is None:
        inputs = [canonical(t.name) for t in frozen_fn.inputs]
        outputs = [canonical(t.name) for t in frozen_fn.outputs]
    else:  # the names convert_variables_to_constants_v2 gives them: those of fn's own graph
        captured = {id(t) for t in fn.graph.internal_captures}
        inputs = [canonical(t.name) for t in fn.inputs if id(t) not in captured]
        outputs = [canonical(t.name) for t in fn.outputs]
    if any(node.op in CALL_OPS and shapes.get(node.name) is None for node in graph_def.node):
        # A call left in place (an XLA-compiled function) whose output shapes neither graph
        # knows (a loaded SavedModel): infer them from its body, and everything after them.
        inferred = infer_shapes(graph_def, {t: shapes.get(t) for t in inputs})
        shapes = {t: _better(shape, inferred.get(t)) for t, shape in shapes.items()}
    return Frozen(graph_def, inputs, outputs, shapes, weights, variable_names(fn))


def variable_names(fn: tf.types.experimental.ConcreteFunction) -> dict[str, str]:
    """``{capture placeholder: variable name}`` (without ``:0``) for each variable ``fn``
    captures; freezing gives each such placeholder's ``Const`` the placeholder's name. Empty when
    the variables' owner is gone (TensorFlow then refuses to list them; their handles still
    freeze)."""
    try:
        by_handle = {id(v.handle): v for v in fn.variables}
    except AssertionError:  # "Called a function referencing variables which have been
        return {}  # deleted"
    names = {}
    for captured, placeholder in zip(fn.captured_inputs, fn.graph.internal_captures):
        variable = by_handle.get(id(captured))
        if variable is not None:
            names[placeholder.op.name] = variable.name.split(":")[0]
    return names


def _better(a: tuple | None, b: tuple | None) -> tuple | None:
    """The shape of the two that knows more dimensions."""
    if a is None or b is None:
        return a if b is None else b
    return b if sum(d is not None for d in b) > sum(d is not None for d in a) else a


def _freeze_without_weights(fn, weights: Weights) -> graph_pb2.GraphDef:
    graph_def, variables = freeze_without_reading(fn)
    for node in graph_def.node:
        if node.op != "Const":
            continue
        value = node.attr["value"].tensor
        if node.name in variables:
            variable = variables[node.name]
            array = weights.put_variable(node.name, variable)
            stub(value, array, variable.dtype)
        elif value.tensor_content and len(value.tensor_content) >= weights.threshold:
            array = tf.make_ndarray(value)
            weights.put(node.name, array)
            stub(value, array, tf.as_dtype(value.dtype))
    return graph_def
