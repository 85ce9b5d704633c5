"""Static shapes of every tensor of a GraphDef, the way TensorFlow's importer infers them.

Where TensorFlow stops (a function call that is not inlined, e.g. an XLA-compiled Keras grouped
convolution, has outputs of unknown shape), the call's output shapes are inferred from its body
(``function_def_to_graph`` with the call's input shapes), and the graph is imported again with
those outputs standing in as placeholders of the inferred shapes, so that what follows the call
is inferred too.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from graphfold.fold.graph import canonical, split_tensor
from graphfold.tf_private import function_body

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
PLACEHOLDERS = ("Placeholder", "PlaceholderWithDefault")
_MAX_ROUNDS = 8


def as_tuple(shape: tf.TensorShape) -> tuple | None:
    return None if shape.rank is None else tuple(shape.as_list())


def infer_shapes(
    graph_def: graph_pb2.GraphDef, overrides: dict[str, tuple | None] | None = None
) -> dict[str, tuple | None]:
    """``{tensor: shape}`` for every tensor of ``graph_def`` (a tuple with None for an unknown
    dimension; None for an unknown rank). ``overrides`` gives the shapes of some tensors: those
    of placeholders (one of unknown shape, say) and calls are fed in their place, the others
    only replace what is inferred for them."""
    known = {canonical(k): v for k, v in (overrides or {}).items()}
    calls = {node.name: node for node in graph_def.node if node.op in CALL_OPS}
    library = {f.signature.name: f for f in graph_def.library.function}
    shapes: dict[str, tuple | None] = {}
    for _ in range(_MAX_ROUNDS):
        shapes = _import_shapes(graph_def, known)
        shapes.update({k: v for k, v in known.items() if k in shapes})
        learned = False
        for name, node in calls.items():
            outputs = _call_output_shapes(node, library, shapes)
            for i, shape in enumerate(outputs or []):
                tensor = canonical(f"{name}:{i}")
                if (
                    shape is not None
                    and _more_known(shape, shapes.get(tensor))
                    and tensor not in known
                ):
                    known[tensor] = shape
                    learned = True
        if not learned:
            break
    return shapes


def _more_known(new: tuple, old: tuple | None) -> bool:
    if old is None:
        return True
    return sum(d is not None for d in new) > sum(d is not None for d in old)


def _import_shapes(graph_def, known: dict[str, tuple | None]) -> dict[str, tuple | None]:
    """Imports ``graph_def`` into a fresh graph, the ``known`` tensors fed by placeholders of
    their shape, and reads every output's static shape."""
    dtypes = _output_dtypes(graph_def, known)
    with tf.Graph().as_default() as graph:
        input_map = {}
        for tensor, shape in known.items():
            if tensor in dtypes:
                input_map[tensor if ":" in tensor else tensor + ":0"] = tf.compat.v1.placeholder(
                    dtypes[tensor], shape
                )
        tf.graph_util.import_graph_def(graph_def, input_map=input_map, name="graphfold_shapes")
        prefix = "graphfold_shapes/"
        shapes = {}
        for op in graph.get_operations():
            if not op.name.startswith(prefix):
                continue
            for i, out in enumerate(op.outputs):
                shapes[canonical(f"{op.name[len(prefix) :]}:{i}")] = as_tuple(out.shape)
    return shapes


def _output_dtypes(graph_def, tensors) -> dict[str, tf.DType]:
    """The dtypes of those ``tensors`` that this module feeds: placeholders' and calls'."""
    wanted = {split_tensor(t)[0] for t in tensors}
    dtypes = {}
    for node in graph_def.node:
        if node.name not in wanted:
            continue
        # ``"key" in attr`` first: reading a missing key of a protobuf map inserts it.
        if node.op in CALL_OPS and "Tout" in node.attr:
            types = [tf.as_dtype(t) for t in node.attr["Tout"].list.type]
        elif node.op in PLACEHOLDERS and "dtype" in node.attr:
            types = [tf.as_dtype(node.attr["dtype"].type)]
        else:
            continue
        for i, dtype in enumerate(types):
            dtypes[canonical(f"{node.name}:{i}")] = dtype
    return {t: dtypes[t] for t in tensors if t in dtypes}


def _call_output_shapes(node, library, shapes) -> list[tuple | None] | None:
    """The output shapes of a function call, inferred from the called function's body with the
    call's input shapes; None when the function is not in the library or inference fails."""
    function = library.get(node.attr["f"].func.name) if "f" in node.attr else None
    if function is None:
        return None
    inputs = [t for t in node.input if not t.startswith("^")]
    input_shapes = [shapes.get(canonical(t)) for t in inputs]
    try:
        body = function_body(function, [tf.TensorShape(s) for s in input_shapes])
    except Exception:  # noqa: BLE001 - a body TensorFlow cannot rebuild: shapes stay unknown
        return None
    return [as_tuple(t.shape) for t in body.outputs]
