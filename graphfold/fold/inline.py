"""Inline nested function calls whose bodies are plain linear algebra, so that folds reach them.

Keras 3 runs a grouped ``Conv2D`` (and any layer built with ``jit_compile``) as a
``StatefulPartitionedCall`` of an XLA-compiled function, which freezing leaves as a call: to
the planner it is an opaque op. A call is inlined when its function is in the graph's library,
every op of its body is pure and known to graphfold (the linear layers, the ops of the rule
table, constants, NoOp), and none needs XLA to run on CPU (a 3-D or channels-first
convolution): its nodes are copied into the graph under the call's name, its arguments read the
call's inputs, and the call's consumers read the body's results. The body then runs as ordinary
TensorFlow ops (on CPU, a grouped NHWC Conv2D has a native kernel).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

from graphfold import tf_private
from graphfold.errors import Blocked
from graphfold.fold import formats
from graphfold.fold.affine import BATCH_NORM_OPS, ELEMENTWISE
from graphfold.fold.graph import Graph, canonical, split_tensor, tensor_name
from graphfold.fold.layers import LINEAR
from graphfold.fold.rules import IDENTITIES, RULES
from graphfold.fold.shapes import PLACEHOLDERS, infer_shapes

CALLS = ("StatefulPartitionedCall", "PartitionedCall")
PURE = (
    frozenset(LINEAR)
    | frozenset(RULES)
    | frozenset(ELEMENTWISE)
    | frozenset(BATCH_NORM_OPS)
    | {"Const", "NoOp", "Identity", "Relu", "Relu6", "Shape"}
)


def why_not_inlined(graph: Graph, call) -> Blocked | None:
    """Why graphfold leaves the call ``call`` as it is, or None when it can inline it."""
    name = call.attr["f"].func.name
    function = _library(graph).get(name)
    if function is None:
        return Blocked(call.name, f"its function {name} is not in the graph's library")
    unknown = sorted({n.op for n in function.node_def} - PURE)
    if unknown:
        return Blocked(
            call.name,
            f"its function {name} runs ops graphfold does not fold through ({', '.join(unknown)})",
        )
    for node in function.node_def:
        why = _needs_xla(node)
        if why:
            return Blocked(
                call.name,
                f"its function {name} runs {why}, which TensorFlow's CPU "
                "kernels may not run outside XLA",
            )
    if len(function.signature.output_arg) != len(function.ret):
        return Blocked(call.name, f"its function {name} has outputs graphfold cannot map")
    if len(function.signature.output_arg) != 1 and (
        any(
            graph.is_fetched(tensor_name(call.name, i))
            for i in range(len(function.signature.output_arg))
        )
        or any(f"^{call.name}" in n.input for n in graph.graph_def.node)
    ):
        return Blocked(
            call.name, f"its function {name} has several outputs and the call is fetched or awaited"
        )
    return None


def _needs_xla(node) -> str | None:
    """What in ``node`` only XLA may run on CPU (the call then stays): an op whose table entry
    says so (``Linear.needs_xla``: a 3-D convolution, since Keras 3 runs a grouped Conv3D in such
    a call and TensorFlow's CPU Conv3D has no groups), or a channels-first 2-D op (TensorFlow's
    CPU kernels are channels-last). A grouped NHWC Conv2D runs natively (any stride, dilation or
    padding)."""
    if node.op in LINEAR and LINEAR[node.op].needs_xla:
        return f"a {node.op}"
    if "data_format" in node.attr and formats.channels_first(formats.data_format(node)):
        return f"a {node.op} in {formats.data_format(node).decode()}"
    return None


def inline_calls(graph: Graph) -> tuple[set[str], dict[str, str]]:
    """Inlines every call it can (see the module docstring). Returns the functions inlined, and
    for each call left, why."""
    inlined, left, added = set(), {}, []
    for call in [n for n in graph.graph_def.node if n.op in CALLS]:
        why = why_not_inlined(graph, call)
        if why is None:
            inlined.add(call.attr["f"].func.name)
            added += _inline(graph, call, _library(graph)[call.attr["f"].func.name])
        else:
            left[call.name] = why.reason
    if added:
        _infer_shapes(graph)
    return inlined, left


def _infer_shapes(graph: Graph) -> None:
    """Static shapes after inlining, from TensorFlow's shape inference on the graph
    (``shapes.infer_shapes``): the body's inner tensors (a Keras Conv1D's Squeeze, say) had
    none, and the tensors after a call whose shape TensorFlow could not see through (a
    SavedModel's signature) had none either. A shape already known is kept where inference
    knows less."""
    fed = {
        canonical(n.name): graph.shapes.get(canonical(n.name))
        for n in graph.graph_def.node
        if n.op in PLACEHOLDERS
    }
    try:
        inferred = infer_shapes(graph.graph_def, fed)
    except (tf.errors.OpError, ValueError, TypeError):  # a graph TF cannot import: keep ours
        return
    for tensor, shape in inferred.items():
        if shape is None:
            continue
        known = graph.shapes.get(tensor)
        if known is not None and len(known) == len(shape):
            try:
                shape = tuple(tf.TensorShape(shape).merge_with(tf.TensorShape(known)).as_list())
            except ValueError:
                shape = known
        graph.shapes[tensor] = shape


def linear_body(
    graph: Graph, call: node_def_pb2.NodeDef
) -> tuple[node_def_pb2.NodeDef, int, int] | None:
    """``(layer, data, weight)`` when the call's function computes one linear layer of two of its
    arguments and nothing else (Identity and NoOp aside): the layer's NodeDef in the body, and
    the call's inputs that are its data and its weight. Keras 3 runs a grouped Conv3D so, in an
    XLA call that stays (TensorFlow's CPU Conv3D has no groups): a fold scales the call's weight
    argument and adds its bias after the call, leaving the body as it is."""
    function = _library(graph).get(call.attr["f"].func.name)
    if function is None or len(function.signature.output_arg) != 1 or len(function.ret) != 1:
        return None
    body = {n.name: n for n in function.node_def}
    layers = [n for n in function.node_def if n.op in LINEAR]
    if len(layers) != 1 or any(
        n.op not in IDENTITIES and n.op != "NoOp" for n in function.node_def if n is not layers[0]
    ):
        return None
    layer = layers[0]
    args = [arg.name for arg in function.signature.input_arg]

    def source(tensor: str) -> str:
        """The body tensor behind Identities: an argument name, or ``node`` for output 0."""
        for _ in range(len(body) + 1):
            name, *rest = tensor.split(":")
            if name in args or name not in body:
                return name
            if body[name].op not in IDENTITIES:
                return name if not rest or rest[-1] == "0" else ""  # layers: one output
            tensor = [t for t in body[name].input if not t.startswith("^")][0]
        return ""

    linear = LINEAR[layer.op]
    inputs = [t for t in layer.input if not t.startswith("^")]
    data, weight = source(inputs[linear.data]), source(inputs[linear.weight])
    if (
        source(next(iter(function.ret.values()))) != layer.name
        or data not in args
        or weight not in args
        or data == weight
        or len(args) != len(graph.data_inputs(call))
    ):
        return None
    return layer, args.index(data), args.index(weight)


def _library(graph: Graph) -> dict:
    return {f.signature.name: f for f in graph.graph_def.library.function}


def _inline(graph: Graph, call, function) -> list[str]:
    """Copies ``function``'s body in place of ``call``; returns the names of the copied nodes."""
    prefix = call.name
    inputs = graph.data_inputs(call)
    args = {arg.name: inputs[i] for i, arg in enumerate(function.signature.input_arg)}

    def outer(tensor: str) -> str:
        """A body tensor (``arg``, ``node:out_arg:i``, ``^node``) as a graph tensor."""
        if tensor.startswith("^"):
            name = tensor[1:]
            return "^" + (split_tensor(args[name])[0] if name in args else f"{prefix}/{name}")
        if tensor in args:
            return args[tensor]
        parts = tensor.split(":")
        node = body[parts[0]]
        index = _flat_index(node, parts[1], int(parts[2])) if len(parts) == 3 else 0
        return tensor_name(f"{prefix}/{parts[0]}", index)

    body = {n.name: n for n in function.node_def}
    copied = []
    for node in function.node_def:
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name}"
        copy.ClearField("device")
        del copy.input[:]
        copy.input.extend(outer(t) for t in node.input)
        graph.add_node(copy)
        copied.append(copy.name)
        if node.op in IDENTITIES and node.input and node.input[0] in args:
            graph.shapes[canonical(copy.name)] = graph.shape(args[node.input[0]])
    for i, arg in enumerate(function.signature.output_arg):
        result = outer(function.ret[arg.name])
        shape = graph.shapes.get(tensor_name(call.name, i))
        producer = graph.producer(result)
        while producer.name.startswith(prefix + "/"):  # the result and the Identities behind it
            graph.shapes[canonical(tensor_name(producer.name, split_tensor(result)[1]))] = shape
            if producer.op not in IDENTITIES:
                break
            result_in = graph.data_inputs(producer)[0]
            producer, result = graph.producer(result_in), result_in
        graph.replace_uses(tensor_name(call.name, i), outer(function.ret[arg.name]))
    result = outer(function.ret[function.signature.output_arg[0].name])
    if graph.is_fetched(call.name):  # the fetched name stays valid: an Identity of the result
        graph.become(call, "Identity", [result], tf.as_dtype(call.attr["Tout"].list.type[0]))
    elif any(f"^{call.name}" in n.input for n in graph.graph_def.node):
        # awaited by control edges only: a NoOp that waits for the result (reads no value)
        graph.become(call, "NoOp", [], tf.float32)
        del call.attr["T"]
        call.input.append("^" + split_tensor(result)[0])
    else:
        graph.remove_nodes([call.name])
    return copied


def _flat_index(node, out_arg: str, index: int) -> int:
    """The output number of ``node``'s ``index``-th tensor of output argument ``out_arg``."""
    op_def = tf_private.op_def(node.op)
    assert op_def is not None, f"{node.op} is not a registered op"
    flat = 0
    for arg in op_def.output_arg:
        if arg.name == out_arg:
            return flat + index
        if arg.number_attr:
            flat += node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            flat += len(node.attr[arg.type_list_attr].list.type)
        else:
            flat += 1
    raise ValueError(f"{node.name} ({node.op}) has no output {out_arg}")
