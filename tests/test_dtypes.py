"""float32, float64, float16 and bfloat16 models: folded weights keep their dtype and the rewrite
matches the original run in the same dtype (relative error 1e-5 / 1e-12 / 1e-2 / 2e-2)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_absorbed,
    assert_close,
    assert_no_batch_norm,
    bias,
    bn_params,
    check_rewrite,
    nodes_of,
    random_inputs,
    randomise_keras_model,
    weight,
)

EPS = 1e-3
DTYPES = {
    "float32": (tf.float32, 1e-5),
    "float64": (tf.float64, 1e-12),
    "float16": (tf.float16, 1e-2),
    "bfloat16": (tf.bfloat16, 2e-2),
}
LAYER_OPS = {"conv2d": "Conv2D", "depthwise_m3": "DepthwiseConv2dNative", "matmul": "MatMul"}


def _build(kind: str, dtype: tf.DType, rng):
    np_dtype = np.float32 if dtype == tf.bfloat16 else dtype.as_numpy_dtype
    cast = lambda a: tf.cast(tf.constant(a.astype(np.float32)), dtype)
    if kind == "conv2d":
        w, c, spec = weight((3, 3, 3, 4), rng, np_dtype), 4, [None, 6, 6, 3]
    elif kind == "depthwise_m3":
        w, c, spec = weight((3, 3, 3, 3), rng, np_dtype), 9, [None, 6, 6, 3]
    else:
        w, c, spec = weight((5, 4), rng, np_dtype), 4, [None, 5]
    b = bias(c, rng, np_dtype)
    gamma, beta, mean, var = bn_params(c, rng, "float32")
    fused = kind != "matmul" and dtype != tf.float64  # FusedBatchNorm* has no float64 kernel

    def fn(x):
        wc, bc = cast(w), cast(b)
        if kind == "conv2d":
            y = tf.nn.conv2d(x, wc, 1, "SAME")
        elif kind == "depthwise_m3":
            y = tf.nn.depthwise_conv2d(x, wc, [1, 1, 1, 1], "SAME")
        else:
            y = tf.matmul(x, wc)
        y = tf.nn.bias_add(y, bc)
        if fused:
            return tf.raw_ops.FusedBatchNormV3(
                x=y,
                scale=gamma,
                offset=beta,
                mean=mean,
                variance=var,
                epsilon=EPS,
                is_training=False,
            )[0]
        return tf.nn.batch_normalization(y, cast(mean), cast(var), cast(beta), cast(gamma), EPS)

    return tf.function(fn).get_concrete_function(tf.TensorSpec(spec, dtype, name="x"))


@pytest.mark.parametrize("kind", list(LAYER_OPS))
@pytest.mark.parametrize("name", list(DTYPES))
def test_hand_built_model_in_every_dtype(name, kind):
    dtype, tol = DTYPES[name]
    rng = np.random.default_rng(len(name) * 10 + len(kind))
    fn = _build(kind, dtype, rng)
    folded = check_rewrite(fn, rng, tol=tol)
    assert_absorbed(folded, "forward", LAYER_OPS[kind])
    [layer] = nodes_of(folded.graph_def, LAYER_OPS[kind])
    assert layer.attr["T"].type == dtype.as_datatype_enum
    # every Const feeding the layer and its bias keeps the model's dtype
    consts = {n.name: n for n in folded.graph_def.node if n.op == "Const"}
    assert tf.as_dtype(consts[layer.input[1]].attr["dtype"].type) == dtype
    for node in nodes_of(folded.graph_def, "BiasAdd"):
        assert tf.as_dtype(consts[node.input[1]].attr["dtype"].type) == dtype
    out = folded.structured_outputs
    assert out.dtype == dtype
    # a second, larger batch
    assert_close(fn, folded, random_inputs(fn, rng, batch=5), tol)


def _keras_model(K, dtype: str):
    inp = K.Input((8, 8, 3), dtype=dtype)
    y = K.layers.Conv2D(4, 3, dtype=dtype, name="conv")(inp)
    y = K.layers.BatchNormalization(dtype=dtype, name="conv_bn")(y)
    y = K.layers.ReLU(dtype=dtype)(y)
    y = K.layers.GlobalAveragePooling2D(dtype=dtype)(y)
    y = K.layers.Dense(5, dtype=dtype, name="dense")(y)
    y = K.layers.BatchNormalization(dtype=dtype, name="dense_bn")(y)
    return K.Model(inp, y)


def _keras_fn(K, dtype: str, seed: int):
    model = _keras_model(K, dtype)
    randomise_keras_model(model, np.random.default_rng(seed))
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3], dtype)
    )


def assert_into_conv_and_dense(folded):
    """conv_bn folded forward into the conv's Conv2D, dense_bn into the Dense's MatMul."""
    report, ops = folded.report, {n.name: n.op for n in folded.graph_def.node}
    assert len(report.batch_norms) == 2 and not report.not_folded, str(report)
    for entry in report.batch_norms:
        layer = "conv" if entry.name.startswith("conv_bn") else "dense"
        assert entry.direction == "forward" and len(entry.absorbed_by) == 1, entry
        assert f"{layer}" in entry.absorbed_by[0].split("/")[-2], entry
        assert ops[entry.absorbed_by[0]] == ("Conv2D" if layer == "conv" else "MatMul"), entry
    assert_no_batch_norm(folded.graph_def)


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_keras_float64_model(framework):
    K = pytest.importorskip(framework)
    fn = _keras_fn(K, "float64", 51)
    folded = check_rewrite(fn, np.random.default_rng(0), tol=1e-12)
    assert_into_conv_and_dense(folded)


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_keras_half_precision_model_folds_every_batch_norm(framework, dtype):
    K = pytest.importorskip(framework)
    fn = _keras_fn(K, dtype, 53)
    folded = check_rewrite(fn, np.random.default_rng(0), tol=DTYPES[dtype][1])
    assert_into_conv_and_dense(folded)
