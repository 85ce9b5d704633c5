"""Shared utilities for the graphfold tests.

Random batch-norm parameters (never the default γ=1, β=0, μ=0, σ²=1), random inputs built from a
function's signature, a numerical comparison ``assert_close`` (relative error
``max|a-b| / max|a|``), ``check_rewrite`` that also proves ``fn`` itself was not modified, and an
"NHWC twin" of a GraphDef so that NCHW graphs can be executed on CPU builds that lack NCHW
kernels.
"""

from __future__ import annotations

import collections
import json
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402
from graphfold.convert.freeze import freeze  # noqa: E402

BN_OPS = (
    "FusedBatchNorm",
    "FusedBatchNormV2",
    "FusedBatchNormV3",
    "BatchNormWithGlobalNormalization",
)

TOLERANCE = {tf.float32: 1e-5, tf.float64: 1e-12, tf.float16: 1e-2, tf.bfloat16: 3e-2}


# ---- batch norm ----------------------------------------------------------------------------------
def fused_bn(y, params, data_format="NHWC", training=False, epsilon=1e-3):
    """``FusedBatchNormV3(y)`` with ``params`` = (γ, β, μ, σ²), in inference mode unless
    ``training``."""
    gamma, beta, mean, var = params
    return tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=gamma,
        offset=beta,
        mean=mean,
        variance=var,
        epsilon=epsilon,
        data_format=data_format,
        is_training=training,
    )[0]


def decomposed_bn(y, params, epsilon=1e-3):
    """The decomposed form (Keras 3, ``tf.nn.batch_normalization``): ``y * inv + (β − μ·inv)``."""
    gamma, beta, mean, var = params
    return tf.nn.batch_normalization(y, mean, var, beta, gamma, epsilon)


def make(body, *specs, dtype=tf.float32):
    """The ConcreteFunction of ``body`` for inputs given as ``TensorSpec``s or as shapes without
    the batch dimension (which is then unknown)."""
    return tf.function(body).get_concrete_function(
        *[s if isinstance(s, tf.TensorSpec) else tf.TensorSpec([None, *s], dtype) for s in specs]
    )


# ---- random parameters ---------------------------------------------------------------------------
def bn_params(
    c: int, rng: np.random.Generator, dtype="float32", positive: bool = False, gamma=None
):
    """(γ, β, μ, σ²) for ``c`` channels: γ of magnitude in [0.5, 1.5] with random signs (unless
    ``positive``; or the given ``gamma``), β and μ normal, σ² in [0.2, 2]. Never the identity
    statistics."""
    given = gamma
    gamma = rng.uniform(0.5, 1.5, c)
    if not positive:
        gamma = gamma * np.where(rng.random(c) < 0.3, -1.0, 1.0)
    if given is not None:
        gamma = np.asarray(given, dtype=np.float64)
    beta = rng.normal(0.0, 1.0, c)
    mean = rng.normal(0.0, 1.0, c)
    var = rng.uniform(0.2, 2.0, c)
    params = tuple(np.asarray(v, dtype=np.float64) for v in (gamma, beta, mean, var))
    assert not np.allclose(params[0], 1) and not np.allclose(params[1], 0)
    assert not np.allclose(params[2], 0) and not np.allclose(params[3], 1)
    return tuple(p.astype(dtype) for p in params)


def bias(c: int, rng: np.random.Generator, dtype="float32") -> np.ndarray:
    """A random, clearly non-zero bias."""
    return (rng.normal(0.0, 1.0, c) + np.sign(rng.normal(size=c)) * 0.5).astype(dtype)


def weight(shape, rng: np.random.Generator, dtype="float32") -> np.ndarray:
    fan_in = int(np.prod(shape[:-1])) or 1
    return (rng.normal(0.0, 1.0, shape) / np.sqrt(fan_in)).astype(dtype)


def randomise_keras_model(model, rng: np.random.Generator) -> int:
    """Random BN statistics (30% of γ negative) and biases; returns the number of BN layers."""
    return examples.randomise(model, rng, negative_gamma=0.3)


# ---- inputs and comparison -----------------------------------------------------------------------
def random_inputs(fn, rng: np.random.Generator, batch: int = 2):
    """(args, kwargs) of random tensors for ``fn.structured_input_signature`` (None -> batch)."""
    args, kwargs = fn.structured_input_signature

    def make(spec):
        if not isinstance(spec, tf.TensorSpec):
            return spec  # a Python value traced into the function
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        if spec.dtype == tf.bool:
            return tf.constant(rng.random(shape) < 0.5)
        if spec.dtype.is_integer:
            return tf.constant(rng.integers(0, 4, shape), dtype=spec.dtype)
        return tf.constant(rng.normal(0.0, 1.0, shape), dtype=spec.dtype)

    return tf.nest.map_structure(make, (args, kwargs))


def rel_err(want, got) -> float:
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert want.shape == got.shape, (want.shape, got.shape)
    scale = np.abs(want).max()
    assert np.isfinite(scale) and scale > 0, "reference output is zero or not finite"
    return float(np.abs(want - got).max() / scale)


def _to_numpy(t):
    if t.dtype == tf.bfloat16:
        t = tf.cast(t, tf.float32)
    return t.numpy()


def assert_close(fn, folded, inputs, tol: float | None = None):
    """Calls ``fn`` and ``folded`` on ``inputs`` ((args, kwargs) or a tuple of args) and asserts
    that every output has the same structure, dtype and shape, and relative error <= ``tol``
    (default by dtype). Returns the largest relative error."""
    args, kwargs = inputs if _is_args_kwargs(inputs) else (tuple(inputs), {})
    want = fn(*args, **kwargs)
    got = folded(*args, **kwargs)
    tf.nest.assert_same_structure(want, got)
    worst = 0.0
    for w, g in zip(tf.nest.flatten(want), tf.nest.flatten(got)):
        if w is None or g is None:
            assert w is None and g is None, (w, g)
            continue
        assert w.dtype == g.dtype, (w.dtype, g.dtype)
        assert w.shape == g.shape, (w.shape, g.shape)
        limit = tol if tol is not None else TOLERANCE.get(w.dtype, 0.0)
        if w.dtype.is_floating:
            err = rel_err(_to_numpy(w), _to_numpy(g))
            assert err <= limit, f"relative error {err:.3g} > {limit:.3g}"
            worst = max(worst, err)
        else:
            np.testing.assert_array_equal(w.numpy(), g.numpy())
    return worst


def _is_args_kwargs(inputs) -> bool:
    return (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], (tuple, list))
        and isinstance(inputs[1], dict)
    )


def graph_def_of(fn) -> graph_pb2.GraphDef:
    return fn.graph.as_graph_def()


def check_rewrite(
    fn,
    rng: np.random.Generator | None = None,
    *,
    tol: float | None = None,
    batch: int = 2,
    run: bool = True,
    **options,
):
    """Rewrites ``fn`` (with ``options``: ``partial=False``, ...) and checks that ``fn`` is
    untouched (graph and outputs), that the report is JSON-serialisable, and (if ``run``) that
    the folded function matches ``fn``. Returns folded."""
    rng = rng or np.random.default_rng(1234)
    before = graph_def_of(fn)
    inputs = random_inputs(fn, rng, batch) if run else None
    outputs_before = _flat_numpy(fn(*inputs[0], **inputs[1])) if run else None
    folded = graphfold.rewrite(fn, **options)
    assert graph_def_of(fn) == before, "rewrite modified the original function's graph"
    json.dumps(folded.report.to_dict())
    str(folded.report)
    if run:
        outputs_after = _flat_numpy(fn(*inputs[0], **inputs[1]))
        for a, b in zip(outputs_before, outputs_after):
            np.testing.assert_array_equal(a, b)
        assert_close(fn, folded, inputs, tol)
    return folded


def _flat_numpy(structure):
    return [None if t is None else _to_numpy(t) for t in tf.nest.flatten(structure)]


# ---- graph inspection ----------------------------------------------------------------------------
def op_counts(graph_def) -> collections.Counter:
    return collections.Counter(n.op for n in graph_def.node)


def nodes_of(graph_def, op: str) -> list:
    return [n for n in graph_def.node if n.op == op]


def assert_no_batch_norm(graph_def):
    """No BN op and no node of a decomposed batch norm (``.../batchnorm/...``) is left."""
    left = [n.name for n in graph_def.node if n.op in BN_OPS or "batchnorm/" in n.name]
    assert not left, f"batch-norm nodes left: {left[:5]}"


def batch_norm_census(graph_def) -> int:
    """Batch-norm layers in ``graph_def`` and its function library, counted independently of
    graphfold: each ``FusedBatchNorm*``/``BatchNormWithGlobalNormalization`` op, and each
    distinct ``.../batchnorm`` name scope (Keras 3 and ``tf.nn.batch_normalization`` name their
    decomposed ops so) with a non-constant node in it, per graph body."""
    bodies = [graph_def.node] + [f.node_def for f in graph_def.library.function]
    count = 0
    for nodes in bodies:
        scopes = set()
        for node in nodes:
            if node.op in BN_OPS:
                count += 1
                continue
            match = re.match(r"(.*?(?:^|/)batchnorm(?:_\d+)?)/", node.name)
            if match and node.op != "Const":
                scopes.add(match.group(1))
        count += len(scopes)
    return count


def const_value(graph_def, name: str) -> np.ndarray:
    node = {n.name: n for n in graph_def.node}[name]
    assert node.op == "Const", node.op
    return tf.make_ndarray(node.attr["value"].tensor)


def weight_of(graph_def, layer_node) -> np.ndarray:
    """The constant behind input 1 of ``layer_node`` (through Identity)."""
    nodes = {n.name: n for n in graph_def.node}
    tensor = layer_node.input[1]
    while True:
        node = nodes[tensor.split(":")[0]]
        if node.op == "Const":
            return tf.make_ndarray(node.attr["value"].tensor)
        assert node.op == "Identity", node.op
        tensor = node.input[0]


def folded_entries(report, batch_norm: bool | None = True):
    entries = (
        report.entries
        if batch_norm is None
        else [e for e in report.entries if e.is_batch_norm == batch_norm]
    )
    return [e for e in entries if e.folded]


# ---- running GraphDefs, and the NHWC twin of an NCHW graph ---------------------------------------
def run_graph_def(
    graph_def, inputs: list[str], outputs: list[str], feeds: list
) -> list[np.ndarray]:
    """Imports ``graph_def`` (independently of graphfold's own importer) and runs it."""

    def load():
        tf.graph_util.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(load, [])
    g = wrapped.graph
    full = lambda t: t if ":" in t else t + ":0"
    pruned = wrapped.prune(
        [g.get_tensor_by_name(full(t)) for t in inputs],
        [g.get_tensor_by_name(full(t)) for t in outputs],
    )
    return [_to_numpy(r) for r in pruned(*[tf.constant(f) for f in feeds])]


_NCHW_OPS = (
    "Conv2D",
    "DepthwiseConv2dNative",
    "MaxPool",
    "AvgPool",
    "Conv2DBackpropInput",
    "Conv3DBackpropInputV2",
)
_TRANSPOSED = ("Conv2DBackpropInput", "Conv3DBackpropInputV2")


def nhwc_twin(graph_def) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` in which every NCHW ``Conv2D``/``DepthwiseConv2dNative``/``MaxPool``/
    ``AvgPool``/``Conv2DBackpropInput`` (and every NCDHW ``Conv3DBackpropInputV2``) runs channels
    last between two transposes, with its ``explicit_paddings`` in NHWC order (same values; runs
    on any CPU build). A transposed convolution's data is input 2 and its output shape (input 0)
    is permuted too. ``BiasAdd`` and ``FusedBatchNorm*`` keep NCHW: their CPU kernels support
    it."""
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    del out.node[:]
    to_nhwc = _perm_const(out, "nhwc_twin/to_nhwc", [0, 2, 3, 1])
    to_nchw = _perm_const(out, "nhwc_twin/to_nchw", [0, 3, 1, 2])
    for node in graph_def.node:
        fmt = node.attr["data_format"].s if "data_format" in node.attr else b""
        if node.op not in _NCHW_OPS or fmt not in (b"NCHW", b"NCDHW"):
            out.node.add().CopyFrom(node)
            continue
        dtype = node.attr["T"].type
        data = 2 if node.op in _TRANSPOSED else 0
        rank = 5 if fmt == b"NCDHW" else 4
        last = [0, *range(2, rank), 1]
        if rank == 5:
            to_nhwc = _perm_const(out, node.name + "/nhwc_twin_to_last", last)
            to_nchw = _perm_const(out, node.name + "/nhwc_twin_to_first", [0, 4, 1, 2, 3])
        pre = out.node.add(
            name=node.name + "/nhwc_twin_in", op="Transpose", input=[node.input[data], to_nhwc]
        )
        pre.attr["T"].type = dtype
        pre.attr["Tperm"].type = tf.int32.as_datatype_enum
        inner = out.node.add()
        inner.CopyFrom(node)
        inner.name = node.name + "/nhwc_twin"
        inner.input[data] = pre.name
        inner.attr["data_format"].s = b"NHWC" if rank == 4 else b"NDHWC"
        if node.op in _TRANSPOSED:
            sizes = out.node.add(
                name=node.name + "/nhwc_twin_sizes",
                op="GatherV2",
                input=[
                    node.input[0],
                    _perm_const(out, node.name + "/nhwc_twin_i", last),
                    _perm_const(out, node.name + "/nhwc_twin_a", 0),
                ],
            )
            sizes.attr["Tparams"].type = (
                node.attr["Tshape"].type if "Tshape" in node.attr else tf.int32.as_datatype_enum
            )
            for key in ("Tindices", "Taxis"):
                sizes.attr[key].type = tf.int32.as_datatype_enum
            inner.input[0] = sizes.name
        if "explicit_paddings" in inner.attr and len(inner.attr["explicit_paddings"].list.i) == 8:
            pads = list(inner.attr["explicit_paddings"].list.i)
            del inner.attr["explicit_paddings"].list.i[:]
            inner.attr["explicit_paddings"].list.i.extend(pads[0:2] + pads[4:8] + pads[2:4])
        for key in ("strides", "ksize", "dilations"):
            if key in inner.attr and len(inner.attr[key].list.i) == rank:
                values = list(inner.attr[key].list.i)
                del inner.attr[key].list.i[:]
                inner.attr[key].list.i.extend(values[i] for i in last)
        post = out.node.add(name=node.name, op="Transpose", input=[inner.name, to_nchw])
        post.attr["T"].type = dtype
        post.attr["Tperm"].type = tf.int32.as_datatype_enum
    return out


def _perm_const(graph_def, name, perm):
    node = graph_def.node.add(name=name, op="Const")
    node.attr["dtype"].type = tf.int32.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(perm, np.int32)))
    return name


def run_nhwc_twin(fn, graph_def, feeds) -> list[np.ndarray]:
    """Runs ``graph_def`` (the frozen ``fn`` or a rewrite of it) through its NHWC twin."""
    frozen = freeze(fn)
    return run_graph_def(nhwc_twin(graph_def), frozen.inputs, frozen.outputs, feeds)


def frozen_graph_def(fn) -> graph_pb2.GraphDef:
    return freeze(fn).graph_def


# ---- what folded where ---------------------------------------------------------------------------
def the_entry(report):
    """The one batch-norm entry of ``report`` (or of a folded function's report; the one affine
    entry when there is no batch norm)."""
    report = getattr(report, "report", report)
    entries = report.batch_norms or report.entries
    assert len(entries) == 1, str(report)
    return entries[0]


def assert_absorbed(folded, direction: str, op: str, count: int = 1):
    """The one batch norm folded ``direction`` into ``count`` layers, each an ``op`` node of the
    rewritten graph, and no batch-norm node is left. Returns the entry."""
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == direction, str(folded.report)
    nodes = {n.name: n for n in folded.graph_def.node}
    assert len(entry.absorbed_by) == count, entry.absorbed_by
    for name in entry.absorbed_by:
        assert nodes[name].op == op, (name, nodes[name].op, op)
    assert_no_batch_norm(folded.graph_def)
    return entry


def assert_folded_into_layers(
    folded, count: int, direction: str = "forward", ops=("Conv2D", "MatMul")
):
    """``count`` batch norms folded, each ``direction`` into nodes of the rewritten graph whose op
    is one of ``ops``."""
    report = folded.report
    assert len(report.folded) == count, str(report)
    graph_ops = {n.name: n.op for n in folded.graph_def.node}
    for entry in report.folded:
        assert entry.direction == direction and entry.absorbed_by, (entry, str(report))
        assert all(graph_ops.get(node) in ops for node in entry.absorbed_by), (entry, ops)


def assert_not_folded(folded, *phrases):
    """The one batch norm is not folded, and its reason contains every phrase."""
    entry = the_entry(folded.report)
    assert not entry.folded and entry.absorbed_by == [], str(folded.report)
    for phrase in phrases:
        assert phrase in entry.reason, (phrase, entry.reason)
    return entry


def bn_scale_shift(params, epsilon=1e-3):
    """(s, t) of a batch norm with ``params`` = (γ, β, μ, σ²), in float64."""
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    s = gamma / np.sqrt(var + epsilon)
    return s, beta - mean * s


def shift_free(params):
    """``params`` with β = μ = 0, so that the batch norm's shift t is exactly 0 (a pure scale:
    γ and σ² stay random)."""
    gamma, beta, mean, var = params
    return gamma, np.zeros_like(beta), np.zeros_like(mean), var


def error_line(err: str) -> str:
    """The one ``graphfold: error: ...`` line of a command's stderr."""
    lines = [line for line in err.splitlines() if line.startswith("graphfold: error:")]
    assert len(lines) == 1, err
    return lines[0]
