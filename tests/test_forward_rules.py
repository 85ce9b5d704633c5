"""Forward folding (docs/folding.md §3), one small hand-built ``tf.nn`` graph per rule.

Every graph has random batch-norm statistics and random, non-zero biases; every test compares the
rewritten function with the original on random inputs (relative error <= 1e-5 for float32) and
asserts what the report says was folded, and into which layer. NCHW graphs are compared through
their NHWC twin (see ``helpers.nhwc_twin``), so they run on any CPU build.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

import graphfold

from helpers import (
    assert_absorbed,
    assert_no_batch_norm,
    bias,
    bn_params,
    check_rewrite,
    folded_entries,
    freeze,
    frozen_graph_def,
    fused_bn,
    nhwc_twin,
    nodes_of,
    op_counts,
    randomise_keras_model,
    rel_err,
    run_graph_def,
    run_nhwc_twin,
    weight,
    weight_of,
)

EPS = 1e-3
H = W = 6
C_IN = 3
K_IN = 5  # MatMul input features

LAYER_OPS = {
    "conv2d": "Conv2D",
    "depthwise_m1": "DepthwiseConv2dNative",
    "depthwise_m3": "DepthwiseConv2dNative",
    "matmul": "MatMul",
    "matmul_transpose_b": "MatMul",
    "conv1d": "Conv2D",
}
AFFINE_OPS = ("Mul", "RealDiv", "Sub", "Add", "AddV2", "Rsqrt")


# ---- building blocks -----------------------------------------------------------------------------
class Layer:
    """A linear layer with random weights (and bias): ``apply(x)``, its output channel count, the
    input signature and the expected folded weight ``scaled(s)``."""

    def __init__(self, kind: str, rng, fmt: str = "NHWC", with_bias: bool = True):
        self.kind, self.fmt, self.with_bias = kind, fmt, with_bias
        nchw = fmt in ("NCHW", "NCW")
        if kind == "conv2d":
            self.w = weight((3, 3, C_IN, 4), rng)
            self.out = 4
            self.spec = [None, C_IN, H, W] if nchw else [None, H, W, C_IN]
        elif kind.startswith("depthwise"):
            m = int(kind[-1])
            self.w = weight((3, 3, C_IN, m), rng)
            self.out = C_IN * m
            self.spec = [None, C_IN, H, W] if nchw else [None, H, W, C_IN]
        elif kind == "matmul":
            self.w = weight((K_IN, 4), rng)
            self.out = 4
            self.spec = [None, K_IN]
        elif kind == "matmul_transpose_b":
            self.w = weight((4, K_IN), rng)
            self.out = 4
            self.spec = [None, K_IN]
        elif kind == "conv1d":
            self.w = weight((3, C_IN, 4), rng)
            self.out = 4
            self.spec = [None, C_IN, 7] if nchw else [None, 7, C_IN]
        else:
            raise ValueError(kind)
        self.b = bias(self.out, rng)
        self.rank = {"matmul": 2, "matmul_transpose_b": 2, "conv1d": 3}.get(kind, 4)
        self.op = LAYER_OPS[kind]

    @property
    def axis(self) -> int:
        return 1 if self.fmt in ("NCHW", "NCW") else self.rank - 1

    def apply(self, x):
        w = tf.constant(self.w)
        if self.kind == "conv2d":
            y = tf.nn.conv2d(x, w, 1, "SAME", data_format=self.fmt)
        elif self.kind.startswith("depthwise"):
            y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME", data_format=self.fmt)
        elif self.kind == "matmul":
            y = tf.matmul(x, w)
        elif self.kind == "matmul_transpose_b":
            y = tf.matmul(x, w, transpose_b=True)
        else:
            y = tf.nn.conv1d(x, w, 1, "SAME", data_format=self.fmt)
        if not self.with_bias:
            return y
        if self.rank == 2:
            return y + tf.constant(self.b)  # AddV2 of a constant: the layer's bias
        if self.kind == "conv1d":
            return y + tf.constant(self.b.reshape(self.channel_shape()))
        return tf.nn.bias_add(y, tf.constant(self.b), data_format=self.fmt)

    def channel_shape(self) -> list[int]:
        """Shape of a per-channel constant that broadcasts on the channel axis."""
        if self.axis == self.rank - 1:
            return [self.out]
        return [self.out] + [1] * (self.rank - 2)

    def scaled(self, s: np.ndarray) -> np.ndarray:
        """W ⊙_out s (docs/folding.md §2), computed independently of graphfold."""
        w = self.w.astype(np.float64)
        if self.kind.startswith("depthwise"):
            return w * s.reshape(w.shape[2], w.shape[3])
        if self.kind == "matmul_transpose_b":
            return w * s[:, None]
        return w * s

    def fmt_for_bn(self) -> str:
        return "NCHW" if self.fmt in ("NCHW", "NCW") else "NHWC"


def _const(v, shape):
    return tf.constant(np.asarray(v, np.float32).reshape(shape))


def bn_scale_shift(params, eps=EPS):
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def apply_form(form: str, y, layer: Layer, rng):
    """Applies the A of ``form`` to ``y``; returns (output, s, t) with the expected s and t."""
    c, shape, fmt = layer.out, layer.channel_shape(), layer.fmt_for_bn()
    params = bn_params(c, rng)
    s, t = bn_scale_shift(params)
    gamma, beta, mean, var = params
    if form in ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"):
        op = getattr(tf.raw_ops, form)
        out = op(
            x=y,
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            data_format=fmt,
            is_training=False,
        )[0]
        return out, s, t
    if form == "nn.batch_normalization":
        with tf.name_scope("my_bn"):
            out = tf.nn.batch_normalization(
                y,
                _const(mean, shape),
                _const(var, shape),
                _const(beta, shape),
                _const(gamma, shape),
                EPS,
            )
        return out, s, t
    k1 = (rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)).astype(np.float32)
    k2 = rng.normal(0, 1, c).astype(np.float32)
    k1d, k2d = k1.astype(np.float64), k2.astype(np.float64)
    if form == "mul_add":
        return y * _const(k1, shape) + _const(k2, shape), k1d, k2d
    if form == "const_mul_const_add":  # constants on the left of Mul and Add
        return tf.add(_const(k2, shape), tf.multiply(_const(k1, shape), y)), k1d, k2d
    if form == "mul_raw_add":  # "Add", not "AddV2"
        return tf.raw_ops.Add(x=y * _const(k1, shape), y=_const(k2, shape)), k1d, k2d
    if form == "mul_sub":
        return y * _const(k1, shape) - _const(k2, shape), k1d, -k2d
    if form == "sub_from_const":  # Sub(k, x): s = -1, t = k
        return _const(k2, shape) - y, -np.ones(c), k2d
    if form == "mul_sub_from_const":
        return tf.subtract(_const(k2, shape), y * _const(k1, shape)), -k1d, k2d
    if form == "realdiv_add":
        return y / _const(k1, shape) + _const(k2, shape), 1 / k1d, k2d
    if form == "mul_biasadd":
        return tf.nn.bias_add(y * _const(k1, shape), k2, data_format=fmt), k1d, k2d
    if form == "scalar_mul_add":  # a scalar broadcasts to every channel
        return y * tf.constant(-2.5) + _const(k2, shape), np.full(c, -2.5), k2d
    if form == "mul":
        return y * _const(k1, shape), k1d, np.zeros(c)
    raise ValueError(form)


def build(layer: Layer, form: str, rng, *, between=None, variables: bool = False):
    """A ConcreteFunction computing ``form(between(layer(x)))`` and the expected (s, t)."""
    expected = {}
    store = {}
    if variables:
        store["w"] = tf.Variable(layer.w)

    def fn(x):
        y = layer.apply(x)
        if between is not None:
            y = between(y)
        out, s, t = apply_form(form, y, layer, np.random.default_rng(store.setdefault("seed", 7)))
        expected["s"], expected["t"] = s, t
        return out

    concrete = tf.function(fn).get_concrete_function(
        tf.TensorSpec(layer.spec, tf.float32, name="x")
    )
    return concrete, expected["s"], expected["t"]


def the_layer_node(graph_def, layer: Layer):
    nodes = nodes_of(graph_def, layer.op)
    assert len(nodes) == 1, [n.name for n in nodes]
    return nodes[0]


def assert_single_forward_fold(folded, layer: Layer, *, batch_norm: bool | None = True):
    entries = folded_entries(folded.report, batch_norm)
    assert len(entries) == 1, str(folded.report)
    entry = entries[0]
    assert entry.direction == "forward"
    layer_node = the_layer_node(folded.graph_def, layer)
    assert entry.absorbed_by == [layer_node.name]
    assert not folded.report.not_folded, str(folded.report)
    assert_no_batch_norm(folded.graph_def)
    return entry


def assert_no_affine_left(graph_def):
    """Nothing of A survives: no Mul/Sub/RealDiv/Add/Rsqrt (the layer bias is a BiasAdd or one
    AddV2 of a constant)."""
    counts = op_counts(graph_def)
    assert counts["Mul"] == counts["Sub"] == counts["RealDiv"] == counts["Rsqrt"] == 0, counts
    assert counts["BiasAdd"] + counts["AddV2"] + counts["Add"] <= 1, counts


# ---- every layer op × FusedBatchNormV3 (or its decomposed form for MatMul) × bias ----------------
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "kind", ["conv2d", "depthwise_m1", "depthwise_m3", "matmul", "matmul_transpose_b"]
)
def test_layer_then_batch_norm_nhwc(kind, with_bias):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{with_bias}".encode()))
    layer = Layer(kind, rng, "NHWC", with_bias)
    form = "nn.batch_normalization" if layer.rank == 2 else "FusedBatchNormV3"
    fn, s, t = build(layer, form, rng)
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer)
    assert_no_affine_left(folded.graph_def)
    # The folded weight is W ⊙_out s, whatever the layout.
    got = weight_of(folded.graph_def, the_layer_node(folded.graph_def, layer))
    np.testing.assert_allclose(got, layer.scaled(s), rtol=1e-6, atol=1e-7)
    # A bias exists exactly once and equals s ⊙ b + t.
    expected_bias = s * (layer.b if with_bias else 0) + t
    consts = [
        n
        for n in folded.graph_def.node
        if n.op == "Const"
        and tuple(n.attr["value"].tensor.tensor_shape.dim)
        and n.attr["value"].tensor.tensor_shape.dim[0].size == layer.out
        and len(n.attr["value"].tensor.tensor_shape.dim) == 1
    ]
    biases = [tf.make_ndarray(n.attr["value"].tensor) for n in consts]
    assert any(np.allclose(b, expected_bias, rtol=1e-5, atol=1e-6) for b in biases), biases


# ---- every A form after a Conv2D (NHWC) and after a MatMul ---------------------------------------
BN_FORMS = ["FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "nn.batch_normalization"]
ELEMENTWISE_FORMS = [
    "mul_add",
    "const_mul_const_add",
    "mul_raw_add",
    "mul_sub",
    "sub_from_const",
    "mul_sub_from_const",
    "realdiv_add",
    "mul_biasadd",
    "scalar_mul_add",
    "mul",
]


@pytest.mark.parametrize("form", BN_FORMS + ELEMENTWISE_FORMS)
def test_every_affine_form_after_conv2d(form):
    rng = np.random.default_rng(11)
    layer = Layer("conv2d", rng, "NHWC", with_bias=True)
    fn, s, t = build(layer, form, rng)
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer, batch_norm=form in BN_FORMS or None)
    assert_no_affine_left(folded.graph_def)
    got = weight_of(folded.graph_def, the_layer_node(folded.graph_def, layer))
    np.testing.assert_allclose(got, layer.scaled(s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["nn.batch_normalization"] + ELEMENTWISE_FORMS)
@pytest.mark.parametrize("kind", ["matmul", "matmul_transpose_b"])
def test_every_affine_form_after_matmul(kind, form):
    rng = np.random.default_rng(12)
    layer = Layer(kind, rng, "NHWC", with_bias=True)
    fn, s, t = build(layer, form, rng)
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer, batch_norm=form in BN_FORMS or None)
    assert_no_affine_left(folded.graph_def)


def test_tf_nn_batch_normalization_is_counted_as_a_batch_norm():
    """tf.nn.batch_normalization is a batch-norm layer as the user wrote it (docs/folding.md §7)."""
    rng = np.random.default_rng(13)
    layer = Layer("conv2d", rng, "NHWC")
    fn, _, _ = build(layer, "nn.batch_normalization", rng)
    folded = check_rewrite(fn, rng)
    [entry] = folded.report.batch_norms
    assert entry.name == "my_bn" and entry.folded and entry.form.startswith("decomposed")


def test_tf_nn_batch_normalization_without_name_scope_is_a_batch_norm():
    """At the top level of a tf.function, tf.nn.batch_normalization's nodes are
    ``batchnorm/mul_1`` etc.: still one batch-norm layer, reported as such."""
    rng = np.random.default_rng(14)
    layer = Layer("conv2d", rng, "NHWC")
    gamma, beta, mean, var = bn_params(layer.out, rng)

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        return tf.nn.batch_normalization(layer.apply(x), mean, var, beta, gamma, EPS)

    folded = check_rewrite(fn.get_concrete_function(), rng)
    assert_absorbed(folded, "forward", "Conv2D")


def test_chain_of_batch_norm_and_elementwise_ops_merges_into_one_affine():
    rng = np.random.default_rng(15)
    layer = Layer("conv2d", rng, "NHWC")
    gamma, beta, mean, var = bn_params(layer.out, rng)
    k1, k2 = bias(layer.out, rng), bias(layer.out, rng)

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        y = tf.raw_ops.FusedBatchNormV3(
            x=layer.apply(x),
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            is_training=False,
        )[0]
        return (y * k1 - k2) / 3.0

    folded = check_rewrite(fn.get_concrete_function(), rng)
    assert_single_forward_fold(folded, layer)
    assert_no_affine_left(folded.graph_def)
    [entry] = folded.report.entries
    assert entry.form == "FusedBatchNormV3" and len(entry.nodes) >= 4, entry


def _layer_then_fused_batch_norm(layer, gamma, beta, mean, var):
    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32, name="x")])
    def fn(x):
        return tf.raw_ops.FusedBatchNormV3(
            x=layer.apply(x),
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            is_training=False,
        )[0]

    return fn


def test_batch_norm_with_global_normalization():
    """``BatchNormWithGlobalNormalization`` cannot be built (GraphDef version > 9) nor run on CPU
    by TF 2.x, so the GraphDef is edited by hand and the rewrite compared with NumPy."""
    rng = np.random.default_rng(16)
    layer = Layer("conv2d", rng, "NHWC")
    for scale_after in (True, False):
        gamma, beta, mean, var = bn_params(layer.out, rng)
        fn = _layer_then_fused_batch_norm(layer, gamma, beta, mean, var)
        frozen = freeze(fn.get_concrete_function())
        graph_def = frozen.graph_def
        [fused] = nodes_of(graph_def, "FusedBatchNormV3")
        x, g_in, b_in, m_in, v_in = fused.input[:5]
        bngn = node_def_pb2.NodeDef(
            name=fused.name,
            op="BatchNormWithGlobalNormalization",
            input=[x, m_in, v_in, b_in, g_in],
        )
        bngn.attr["T"].type = tf.float32.as_datatype_enum
        bngn.attr["variance_epsilon"].f = EPS
        bngn.attr["scale_after_normalization"].b = scale_after
        fused.CopyFrom(bngn)
        original = graph_def.SerializeToString()
        optimized, report = graphfold.optimize_graph_def(
            graph_def, frozen.inputs, frozen.outputs, frozen.shapes
        )
        assert graph_def.SerializeToString() == original, "the input GraphDef was modified"
        [entry] = report.batch_norms
        assert entry.folded and entry.direction == "forward", str(report)
        assert entry.form == "BatchNormWithGlobalNormalization"
        assert_no_batch_norm(optimized)
        feed = rng.normal(size=[2] + layer.spec[1:]).astype(np.float32)
        [got] = run_graph_def(optimized, frozen.inputs, frozen.outputs, [feed])
        conv = tf.nn.bias_add(tf.nn.conv2d(feed, layer.w, 1, "SAME"), layer.b).numpy()
        g = gamma.astype(np.float64) if scale_after else 1.0
        want = (conv - mean) / np.sqrt(var.astype(np.float64) + EPS) * g + beta
        assert rel_err(want, got) <= 1e-5


# ---- NCHW, compared through the NHWC twin --------------------------------------------------------
def _nchw_check(layer: Layer, form: str, rng):
    fn, s, t = build(layer, form, rng)
    folded = check_rewrite(fn, rng, run=False)
    assert_single_forward_fold(folded, layer, batch_norm=form in BN_FORMS or None)
    assert_no_affine_left(folded.graph_def)
    node = the_layer_node(folded.graph_def, layer)
    assert node.attr["data_format"].s == b"NCHW"  # still an NCHW layer
    np.testing.assert_allclose(
        weight_of(folded.graph_def, node),
        layer.scaled(s).reshape(weight_of(folded.graph_def, node).shape),
        rtol=1e-6,
        atol=1e-7,
    )
    feed = rng.normal(size=[3] + layer.spec[1:]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5
    return folded


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["conv2d", "depthwise_m1", "depthwise_m3"])
def test_layer_then_batch_norm_nchw(kind, with_bias):
    rng = np.random.default_rng(zlib.crc32(f"{kind}{with_bias}nchw".encode()))
    layer = Layer(kind, rng, "NCHW", with_bias)
    folded = _nchw_check(layer, "FusedBatchNormV3", rng)
    if not with_bias:
        # The new bias must be added on the channel axis of an NCHW tensor.
        [bias_add] = nodes_of(folded.graph_def, "BiasAdd")
        assert bias_add.attr["data_format"].s == b"NCHW"


@pytest.mark.parametrize(
    "form",
    [
        "FusedBatchNorm",
        "FusedBatchNormV2",
        "nn.batch_normalization",
        "mul_add",
        "sub_from_const",
        "mul_biasadd",
        "realdiv_add",
    ],
)
def test_affine_forms_nchw(form):
    rng = np.random.default_rng(21)
    _nchw_check(Layer("conv2d", rng, "NCHW"), form, rng)


def test_conv1d_ncw():
    """tf.nn.conv1d with NCW is ExpandDims(axis 2) → Conv2D NCHW → Squeeze."""
    rng = np.random.default_rng(22)
    _nchw_check(Layer("conv1d", rng, "NCW"), "mul_add", rng)


def test_nhwc_twin_is_faithful():
    """The twin used above computes what an NHWC model computes (so the NCHW checks can fail)."""
    rng = np.random.default_rng(23)
    layer = Layer("depthwise_m3", rng, "NCHW")
    fn, s, t = build(layer, "FusedBatchNormV3", rng)
    feed = rng.normal(size=[2] + layer.spec[1:]).astype(np.float32)
    [twin] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    nhwc = tf.nn.depthwise_conv2d(feed.transpose(0, 2, 3, 1), layer.w, [1, 1, 1, 1], "SAME")
    want = ((nhwc.numpy() + layer.b) * s + t).transpose(0, 3, 1, 2)
    assert rel_err(want, twin) <= 1e-5
    # and a wrong fold (scale on the wrong axis of W) is detected:
    graph_def = frozen_graph_def(fn)
    folded = graphfold.rewrite(fn).graph_def
    node = nodes_of(folded, "DepthwiseConv2dNative")[0]
    bad = nhwc_twin(folded)
    for n in bad.node:
        if n.op == "Const" and n.name == _weight_const_name(folded, node):
            w = tf.make_ndarray(n.attr["value"].tensor)
            n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(w[:, :, ::-1, :].copy()))
    frozen = freeze(fn)
    [wrong] = run_graph_def(bad, frozen.inputs, frozen.outputs, [feed])
    [right] = run_nhwc_twin(fn, graph_def, [feed])
    assert rel_err(right, wrong) > 1e-2


def _weight_const_name(graph_def, layer_node):
    nodes = {n.name: n for n in graph_def.node}
    tensor = layer_node.input[1]
    while nodes[tensor].op != "Const":
        tensor = nodes[tensor].input[0]
    return tensor


# ---- through ops between L and A -----------------------------------------------------------------
def _pass_through_case(between, form="FusedBatchNormV3", kind="conv2d", positive=False, seed=30):
    rng = np.random.default_rng(seed)
    layer = Layer(kind, rng, "NHWC")
    if positive:
        # FusedBatchNormV3 with γ > 0: every scale positive.
        def pos_form(y, layer=layer, rng=rng):
            gamma, beta, mean, var = bn_params(layer.out, rng, positive=True)
            return tf.raw_ops.FusedBatchNormV3(
                x=y,
                scale=gamma,
                offset=beta,
                mean=mean,
                variance=var,
                epsilon=EPS,
                is_training=False,
            )[0]

        fn = tf.function(lambda x: pos_form(between(layer.apply(x)))).get_concrete_function(
            tf.TensorSpec(layer.spec, tf.float32)
        )
    else:
        fn, _, _ = build(layer, form, rng, between=between)
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer, batch_norm=form in BN_FORMS or None)
    return folded


def test_through_identity():
    _pass_through_case(tf.identity)


def test_through_reshape_keeping_channels():
    layer_shape = [-1, H * W, 4]
    folded = _pass_through_case(lambda y: tf.reshape(y, layer_shape), form="mul_add")
    assert op_counts(folded.graph_def)["Reshape"] == 1


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_through_avg_pool(padding):
    _pass_through_case(lambda y: tf.nn.avg_pool2d(y, 3, 2, padding))


@pytest.mark.parametrize("keepdims", [True, False])
def test_through_mean(keepdims):
    form = "FusedBatchNormV3" if keepdims else "mul_add"
    _pass_through_case(lambda y: tf.reduce_mean(y, axis=[1, 2], keepdims=keepdims), form=form)


def test_through_max_pool_with_positive_scale():
    _pass_through_case(lambda y: tf.nn.max_pool2d(y, 2, 2, "SAME"), positive=True)


def test_through_relu_with_positive_scale_and_zero_shift():
    rng = np.random.default_rng(31)
    layer = Layer("conv2d", rng, "NHWC")
    k = rng.uniform(0.5, 2.0, layer.out).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        return tf.nn.relu(layer.apply(x)) * k

    folded = check_rewrite(fn.get_concrete_function(), rng)
    assert_single_forward_fold(folded, layer, batch_norm=None)
    assert op_counts(folded.graph_def)["Relu"] == 1


def test_through_zero_pad_with_zero_shift():
    rng = np.random.default_rng(32)
    layer = Layer("conv2d", rng, "NHWC")
    k = (rng.uniform(0.5, 2.0, layer.out) * [1, -1, 1, -1]).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        return tf.pad(layer.apply(x), [[0, 0], [1, 2], [2, 1], [0, 0]]) * k

    folded = check_rewrite(fn.get_concrete_function(), rng)
    assert_single_forward_fold(folded, layer, batch_norm=None)


def test_conv1d_nwc():
    """tf.nn.conv1d (ExpandDims → Conv2D → Squeeze) followed by a decomposed batch norm."""
    rng = np.random.default_rng(33)
    layer = Layer("conv1d", rng, "NWC")
    fn, s, t = build(layer, "nn.batch_normalization", rng)
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer)
    assert_no_affine_left(folded.graph_def)


def test_variables_become_constants_and_fold():
    """Weights held in tf.Variables (ReadVariableOp → Identity after freezing)."""
    rng = np.random.default_rng(34)
    layer = Layer("depthwise_m3", rng, "NHWC")
    gamma, beta, mean, var = (tf.Variable(p) for p in bn_params(layer.out, rng))
    w = tf.Variable(layer.w)
    b = tf.Variable(layer.b)

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        y = tf.nn.bias_add(tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "VALID"), b)
        return tf.raw_ops.FusedBatchNormV3(
            x=y, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=EPS, is_training=False
        )[0]

    folded = check_rewrite(fn.get_concrete_function(), rng)
    assert_single_forward_fold(folded, layer)
    # The variables themselves are untouched.
    np.testing.assert_array_equal(w.numpy(), layer.w)
    np.testing.assert_array_equal(b.numpy(), layer.b)


def test_gamma_zero_makes_a_constant_channel():
    """γ = 0 makes s = 0 on that channel: forward folding is still exact (docs/folding.md §6)."""
    rng = np.random.default_rng(35)
    layer = Layer("conv2d", rng, "NHWC")
    gamma, beta, mean, var = bn_params(layer.out, rng)
    gamma[1] = 0.0

    @tf.function(input_signature=[tf.TensorSpec(layer.spec, tf.float32)])
    def fn(x):
        return tf.raw_ops.FusedBatchNormV3(
            x=layer.apply(x),
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            is_training=False,
        )[0]

    fn = fn.get_concrete_function()
    folded = check_rewrite(fn, rng)
    assert_single_forward_fold(folded, layer)
    y = folded(tf.random.normal([2] + layer.spec[1:])).numpy()
    np.testing.assert_allclose(y[..., 1], beta[1], rtol=1e-6)


def test_two_batch_norms_in_sequence_both_fold():
    """conv → BN → relu → conv → BN: two independent A's, two roots."""
    rng = np.random.default_rng(36)
    l1, l2 = Layer("conv2d", rng), Layer("conv2d", rng)
    l2.w = weight((3, 3, 4, 4), rng)
    p1, p2 = bn_params(4, rng), bn_params(4, rng)

    def bn(y, p):
        return tf.raw_ops.FusedBatchNormV3(
            x=y, scale=p[0], offset=p[1], mean=p[2], variance=p[3], epsilon=EPS, is_training=False
        )[0]

    @tf.function(input_signature=[tf.TensorSpec(l1.spec, tf.float32)])
    def fn(x):
        y = tf.nn.relu(bn(l1.apply(x), p1))
        return bn(l2.apply(y), p2)

    folded = check_rewrite(fn.get_concrete_function(), rng)
    conv1, conv2 = (n.name for n in nodes_of(folded.graph_def, "Conv2D"))
    assert [(e.direction, e.absorbed_by) for e in folded.report.batch_norms] == [
        ("forward", [conv1]),
        ("forward", [conv2]),
    ], str(folded.report)
    assert_no_batch_norm(folded.graph_def)


# ---- more layer variants -------------------------------------------------------------------------
_fused = fused_bn


CONV_VARIANTS = ["strided_valid", "dilated", "explicit_padding", "depthwise_dilated"]


@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_conv_attributes_do_not_matter(variant):
    rng = np.random.default_rng(zlib.crc32(variant.encode()))
    b, p = bias(4 if variant != "depthwise_dilated" else 6, rng), None
    w = weight((3, 3, 3, 4), rng) if variant != "depthwise_dilated" else weight((3, 3, 3, 2), rng)
    p = bn_params(b.size, rng)

    def body(x):
        if variant == "strided_valid":
            y = tf.nn.conv2d(x, w, 2, "VALID")
        elif variant == "dilated":
            y = tf.nn.conv2d(x, w, 1, "SAME", dilations=2)
        elif variant == "depthwise_dilated":
            y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME", dilations=[2, 2])
        else:
            y = tf.nn.conv2d(x, w, 1, [[0, 0], [1, 2], [0, 1], [0, 0]])
        return _fused(tf.nn.bias_add(y, b), p)

    fn = tf.function(body).get_concrete_function(tf.TensorSpec([None, 9, 9, 3], tf.float32))
    folded = check_rewrite(fn, rng)
    assert_absorbed(
        folded, "forward", "DepthwiseConv2dNative" if variant == "depthwise_dilated" else "Conv2D"
    )


def test_conv3d_then_5d_fused_batch_norm():
    rng = np.random.default_rng(61)
    w, b, p = weight((2, 3, 3, 3, 4), rng), bias(4, rng), bn_params(4, rng)

    def body(x):
        y = tf.nn.bias_add(tf.nn.conv3d(x, w, [1, 1, 1, 1, 1], "SAME"), b)
        gamma, beta, mean, var = p
        return tf.raw_ops.FusedBatchNormV3(
            x=y,
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            data_format="NDHWC",
            is_training=False,
        )[0]

    fn = tf.function(body).get_concrete_function(tf.TensorSpec([None, 4, 5, 5, 3], tf.float32))
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "forward", "Conv3D")
    [conv] = nodes_of(folded.graph_def, "Conv3D")
    s = p[0].astype(np.float64) / np.sqrt(p[3].astype(np.float64) + EPS)
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), w * s, rtol=1e-6, atol=1e-7)


def test_matmul_with_transpose_a():
    rng = np.random.default_rng(62)
    w, b = weight((5, 4), rng), bias(4, rng)
    gamma, beta, mean, var = bn_params(4, rng)

    def body(x):
        y = tf.matmul(x, w, transpose_a=True) + b  # x: [5, N] -> y: [N, 4]
        return tf.nn.batch_normalization(y, mean, var, beta, gamma, EPS)

    fn = tf.function(body).get_concrete_function(tf.TensorSpec([5, None], tf.float32))
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "forward", "MatMul")


def test_nchw_avg_pool_between_conv_and_batch_norm():
    rng = np.random.default_rng(63)
    layer = Layer("conv2d", rng, "NCHW")
    fn, s, t = build(
        layer,
        "FusedBatchNormV3",
        rng,
        between=lambda y: tf.nn.avg_pool2d(y, 2, 2, "VALID", data_format="NCHW"),
    )
    folded = check_rewrite(fn, rng, run=False)
    assert_single_forward_fold(folded, layer)
    feed = rng.normal(size=[2] + layer.spec[1:]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


def test_nchw_keras_style_rank4_constants():
    """Keras 3 BN with axis=1 reshapes its parameters to [1, C, 1, 1]."""
    rng = np.random.default_rng(64)
    layer = Layer("conv2d", rng, "NCHW")
    k1 = rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)
    k2 = rng.normal(size=(1, 4, 1, 1)).astype(np.float32)
    fn = tf.function(lambda x: layer.apply(x) * k1 + k2).get_concrete_function(
        tf.TensorSpec(layer.spec, tf.float32)
    )
    folded = check_rewrite(fn, rng, run=False)
    assert len(folded_entries(folded.report, None)) == 1, str(folded.report)
    feed = rng.normal(size=[2] + layer.spec[1:]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


def test_weight_that_is_also_a_function_output_is_cloned():
    rng = np.random.default_rng(65)
    w, b, p = weight((3, 3, 3, 4), rng), bias(4, rng), bn_params(4, rng)
    wc = tf.constant(w)

    def body(x):
        return _fused(tf.nn.bias_add(tf.nn.conv2d(x, wc, 1, "SAME"), b), p), tf.identity(wc)

    fn = tf.function(body).get_concrete_function(tf.TensorSpec([None, 6, 6, 3], tf.float32))
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "forward", "Conv2D")
    np.testing.assert_array_equal(folded(tf.zeros([1, 6, 6, 3]))[1].numpy(), w)


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_keras_grouped_conv_folds_forward(framework):
    K = pytest.importorskip(framework)
    inp = K.Input((6, 6, 4))
    model = K.Model(
        inp,
        K.layers.BatchNormalization(name="g_bn")(K.layers.Conv2D(6, 3, groups=2, name="g")(inp)),
    )
    randomise_keras_model(model, np.random.default_rng(66))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 6, 6, 4], tf.float32)
    )
    folded = check_rewrite(fn, np.random.default_rng(0))
    # Keras 3 runs a grouped convolution as an XLA-compiled function call, which freezing does
    # not inline: graphfold inlines it (tests/test_grouped.py), and the Conv2D inside absorbs A.
    entry = assert_absorbed(folded, "forward", "Conv2D")
    assert "/g" in entry.absorbed_by[0], entry
