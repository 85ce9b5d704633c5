"""Shared by the benchmark tools: example models at any input size, the batch-norm-free "limit"
graph, TensorFlow's optimize_for_inference, the Keras-level folder (the
``tensorflow-batchnorm-folding`` package, when installed), and a line about the machine.

Nothing here is part of graphfold; the tools import it from their own folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import sys
import types

import numpy as np
import tensorflow as tf

import graphfold
from graphfold import examples
from graphfold.convert.function import import_graph, with_signature
from graphfold.fold import formats
from graphfold.fold.graph import canonical, split_tensor

FRAMEWORKS = {"keras3": False, "tf-keras": True}
FUSED = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
_SCOPE = re.compile(r"^(.*/)?batchnorm(_\d+)?/")


# ---- models -------------------------------------------------------------------------------------
def build(name: str, legacy: bool, size: int | None = None, seed: int = 0):
    """``examples.application`` at another input size when ``size`` is given (for quick runs);
    returns ``(model, size, number of BN layers)``."""
    if size is None:
        return examples.application(name, legacy, seed)
    keras = examples.keras_module(legacy)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    return model, size, examples.randomise(model, np.random.default_rng(seed))


def bn_layers(model) -> int:
    return sum("BatchNormalization" in type(layer).__name__ for layer in examples._layers(model))


# ---- batch norms in a GraphDef ------------------------------------------------------------------
def _constant_nodes(graph_def) -> set[str]:
    """Nodes computed from constants alone (Const, and anything whose data inputs all are)."""
    nodes = {n.name: n for n in graph_def.node}
    constant: set[str] = set()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in nodes:
        stack = [root]
        while stack:
            name = stack[-1]
            if state.get(name) == 2:
                stack.pop()
                continue
            node = nodes[name]
            preds = [split_tensor(t)[0] for t in node.input if not t.startswith("^")]
            pending = [p for p in preds if p in nodes and state.get(p) is None]
            if pending and state.get(name) is None:
                state[name] = 1
                stack.extend(pending)
                continue
            state[name] = 2
            stack.pop()
            if node.op == "Const" or (
                preds and node.op not in ("Placeholder",) and all(p in constant for p in preds)
            ):
                constant.add(name)
    return constant


def batch_norms(graph_def) -> list[tuple[str, str, str]]:
    """Every batch norm in ``graph_def`` as ``(kind, input tensor, output tensor)``: fused ops,
    and decomposed ones (the nodes of one ``.../batchnorm/`` scope that read one non-constant
    tensor from outside the scope and are read from outside through one tensor)."""
    found = []
    for node in graph_def.node:
        if node.op in FUSED or node.op == "BatchNormWithGlobalNormalization":
            found.append((node.op, node.input[0], node.name))
    scopes: dict[str, list] = {}
    for node in graph_def.node:
        match = _SCOPE.match(node.name)
        if match:
            scopes.setdefault(match.group(0), []).append(node)
    if not scopes:
        return found
    constant = _constant_nodes(graph_def)
    readers: dict[str, list[str]] = {}
    for node in graph_def.node:
        for t in node.input:
            if not t.startswith("^"):
                readers.setdefault(canonical(t), []).append(node.name)
    for members in scopes.values():
        names = {n.name for n in members}
        xs = {
            canonical(t)
            for n in members
            for t in n.input
            if not t.startswith("^")
            and split_tensor(t)[0] not in names
            and split_tensor(t)[0] not in constant
        }
        ys = {
            n.name
            for n in members
            if any(r not in names for r in readers.get(canonical(n.name), ()))
        }
        if len(xs) == 1 and len(ys) == 1:
            found.append(("decomposed", xs.pop(), ys.pop()))
    return found


LINEAR = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "MatMul")


def _out_channels(nodes: dict, layer) -> int | None:
    """Output channels of a linear layer, from the shape of its (constant) weight."""
    name = split_tensor(layer.input[1])[0]
    for _ in range(16):
        node = nodes.get(name)
        if node is None or node.op not in ("Const", "Identity"):
            return None
        if node.op == "Const":
            dims = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
            if layer.op == "DepthwiseConv2dNative":
                return dims[2] * dims[3]
            if layer.op == "MatMul":
                return dims[0] if layer.attr["transpose_b"].b else dims[1]
            return dims[-1]
        name = split_tensor(node.input[0])[0]
    return None


def bypass_batch_norms(graph_def, outputs: list[str]):
    """A copy of ``graph_def`` with every batch norm removed, and the outputs renamed accordingly:
    numerically wrong, but exactly the cost of a perfect fold.

    A batch norm that reads a conv/matmul output directly becomes a ``BiasAdd`` of that output
    (a perfect fold leaves the layer a bias, and TensorFlow's remapper fuses Conv2D + BiasAdd +
    Relu into one kernel, which it cannot do for a bare Conv2D + Relu: a plain bypass would be
    slower than a real fold). Any other batch norm is bypassed: its consumers read its input.
    Returns ``(graph_def, outputs, number of batch norms removed)``.
    """
    work = type(graph_def)()
    work.CopyFrom(graph_def)
    found = batch_norms(work)
    nodes = {n.name: n for n in work.node}
    rng = np.random.default_rng(0)
    alias = {}
    for _, x, y in found:
        name, index = split_tensor(x)
        layer = nodes.get(name)
        channels = (
            _out_channels(nodes, layer)
            if layer is not None and layer.op in LINEAR and index == 0
            else None
        )
        if channels is None:
            alias[canonical(y)] = canonical(x)
            continue
        dtype = tf.as_dtype(layer.attr["T"].type)
        const = work.node.add(name=f"{y}/limit_bias", op="Const")
        const.attr["dtype"].type = dtype.as_datatype_enum
        values = rng.normal(0, 0.1, channels).astype(dtype.as_numpy_dtype)
        const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values, dtype=dtype))
        add = work.node.add(name=f"{y}/limit_bias_add", op="BiasAdd", input=[x, const.name])
        add.attr["T"].type = dtype.as_datatype_enum
        add.attr["data_format"].s = formats.bias_format(layer)
        alias[canonical(y)] = add.name

    def resolve(tensor):
        for _ in range(len(alias) + 1):
            if tensor not in alias:
                break
            tensor = alias[tensor]
        return tensor

    for node in work.node:
        for i, t in enumerate(node.input):
            if not t.startswith("^") and canonical(t) in alias:
                node.input[i] = resolve(canonical(t))
    return work, [resolve(canonical(t)) for t in outputs], len(found)


def served(graph_def, frozen, outputs=None, like=None):
    """``graph_def`` re-imported and called the way graphfold's output is: ``import_graph``, then
    traced behind ``like``'s signature (``with_signature``). Called directly, the pruned import
    costs about 1 ms more per call than graphfold's output, which would tilt batch-1 ratios."""
    pruned = import_graph(graph_def, frozen.inputs, outputs or frozen.outputs)
    return pruned if like is None else with_signature(pruned, like)


def frozen_function(frozen, like=None):
    """The frozen graph (cleaned up, see ``cleaned``) re-imported, nothing folded."""
    return served(cleaned(frozen.graph_def, frozen.outputs), frozen, like=like)


def limit_function(frozen, like=None):
    """The BN-free limit: the frozen graph (cleaned up) with every batch norm removed,
    re-imported; with the number of batch norms removed."""
    graph_def, outputs, count = bypass_batch_norms(
        cleaned(frozen.graph_def, frozen.outputs), frozen.outputs
    )
    return served(graph_def, frozen, outputs, like), count


def cleaned(graph_def, outputs=()):
    """A copy of a frozen GraphDef without what freezing leaves behind and graphfold removes too,
    so that the frozen variants differ from graphfold's output by their folding alone:

    - the control edges from ``Const``/``Identity``/``NoOp`` nodes. A frozen ConcreteFunction
      keeps one from every former variable read (now an ``Identity`` of a ``Const``) to a
      ``NoOp`` the outputs depend on. They order nothing any more, but they keep every original
      constant alive and executed on each call, and ``remove_training_nodes`` will not splice an
      ``Identity`` that is a control input, so ``optimize_for_inference`` would fold nothing;
    - those ``Identity`` reads themselves: their consumers read the ``Const`` (graphfold's
      constant evaluation does the same).
    """
    work = type(graph_def)()
    work.CopyFrom(graph_def)
    nodes = {n.name: n for n in work.node}
    pure = {n.name for n in work.node if n.op in ("Const", "Identity", "NoOp")}
    fetched = {split_tensor(t)[0] for t in outputs}
    reads = {}
    for node in work.node:
        if (
            node.op == "Identity"
            and node.name not in fetched
            and node.input
            and not node.input[0].startswith("^")
        ):
            source = nodes.get(split_tensor(node.input[0])[0])
            if source is not None and source.op == "Const" and split_tensor(node.input[0])[1] == 0:
                reads[node.name] = source.name
    for node in work.node:
        if any(t.startswith("^") and t[1:] in pure for t in node.input) or any(
            split_tensor(t)[0] in reads and split_tensor(t)[1] == 0 for t in node.input
        ):
            kept = [t for t in node.input if not (t.startswith("^") and t[1:] in pure)]
            kept = [reads.get(canonical(t), t) if not t.startswith("^") else t for t in kept]
            del node.input[:]
            node.input.extend(kept)
    return work


def optimize_for_inference_function(frozen, like=None):
    """TensorFlow's ``optimize_for_inference`` on the frozen graph (cleaned up, see above),
    re-imported; with the number of batch norms left in its graph."""
    from tensorflow.python.tools import optimize_for_inference_lib as ofi

    names = [split_tensor(t)[0] for t in frozen.inputs]
    outputs = [split_tensor(t)[0] for t in frozen.outputs]
    nodes = {n.name: n for n in frozen.graph_def.node}
    dtypes = [nodes[name].attr["dtype"].type for name in names]
    graph_def = cleaned(frozen.graph_def, frozen.outputs)
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # one warning per batch norm it does not fold
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            graph_def = ofi.optimize_for_inference(graph_def, names, outputs, dtypes)
    finally:
        logger.setLevel(level)
    return served(graph_def, frozen, like=like), len(batch_norms(graph_def))


# ---- the Keras-level folder ---------------------------------------------------------------------
_FOLDER = None


def keras_folder():
    """``fold_batchnormalization_layers`` of the ``tensorflow-batchnorm-folding`` package, bound
    to tf-keras, or None when it is not installed.

    The package calls ``tf.keras``, which is Keras 3 unless TF_USE_LEGACY_KERAS was set before
    TensorFlow resolved it; rather than switch the whole process, its modules get a ``tf`` whose
    ``keras`` is tf_keras (everything else is TensorFlow itself).
    """
    global _FOLDER
    if _FOLDER is not None:
        return _FOLDER or None
    try:
        import tf_keras

        with contextlib.redirect_stdout(io.StringIO()):
            from batch_normalization_folding import folder
    except Exception:  # noqa: BLE001  not installed, or broken
        _FOLDER = False
        return None
    proxy = types.ModuleType("tensorflow_with_tf_keras")
    proxy.__getattr__ = lambda name: getattr(tf, name)
    proxy.keras = tf_keras
    for name, module in list(sys.modules.items()):
        if name.startswith("batch_normalization_folding") and getattr(module, "tf", None) is tf:
            module.tf = proxy
    _FOLDER = folder.fold_batchnormalization_layers
    return _FOLDER


def keras_fold(model):
    """``(folded model, BN layers left)`` by the Keras-level folder, or None (not installed, not
    a tf-keras model, or it failed)."""
    fold = keras_folder()
    if fold is None:
        return None
    import tf_keras

    if not isinstance(model, tf_keras.Model):
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            folded, status = fold(model, verbose=False)
    except Exception as err:  # noqa: BLE001  report and go on
        print(
            f"# keras folder failed on {model.name}: {type(err).__name__}: {err}", file=sys.stderr
        )
        return None
    if status == "failed":
        return None
    return folded, bn_layers(folded)


# ---- the machine --------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, graphfold {graphfold.__version__}"
    )


def median(values):
    return float(np.median(values)) if len(values) else float("nan")
