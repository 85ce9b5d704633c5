"""Dense layers beyond MatMul: MatMul with transpose_a, BatchMatMulV2 with a constant weight
(Keras EinsumDense, Dense on a 3-D input under some exports) and Einsum in dense form."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_absorbed,
    assert_not_folded,
    bias,
    bn_params,
    check_rewrite,
    make,
    nodes_of,
    randomise_keras_model,
    weight,
)
from helpers import decomposed_bn as keras_bn


def per_row(k: int, rng):
    """An affine map on axis -2 (a [K, 1] scale and shift): A for data whose channels are rows."""
    sign = np.where(rng.random((k, 1)) < 0.3, -1.0, 1.0)
    return (
        (rng.uniform(0.5, 1.5, (k, 1)) * sign).astype(np.float32),
        rng.normal(size=(k, 1)).astype(np.float32),
    )


# ---- MatMul(transpose_a) -------------------------------------------------------------------------
def test_matmul_transpose_a_forward():
    rng = np.random.default_rng(41)
    w, b, p = weight((5, 4), rng), bias(4, rng), bn_params(4, rng)
    fn = make(
        lambda x: keras_bn(tf.matmul(x, w, transpose_a=True) + b, p), tf.TensorSpec([5, None])
    )
    assert_absorbed(check_rewrite(fn, rng), "forward", "MatMul")


def test_matmul_transpose_a_backward_reads_channels_on_axis_0():
    rng = np.random.default_rng(42)
    w, (k1, k2) = weight((5, 4), rng), per_row(5, rng)
    fn = make(lambda x: tf.matmul(x * k1 + k2, w, transpose_a=True), tf.TensorSpec([5, None]))
    folded = check_rewrite(fn, rng)
    entry = folded.report.entries[0]
    assert entry.folded and entry.direction == "backward", str(folded.report)
    assert entry.absorbed_by == [n.name for n in nodes_of(folded.graph_def, "MatMul")]


# ---- BatchMatMulV2 -------------------------------------------------------------------------------
@pytest.mark.parametrize("adj_y", [False, True])
def test_batch_matmul_forward_and_backward(adj_y):
    rng = np.random.default_rng(43)
    w = weight((6, 5) if adj_y else (5, 6), rng)
    p1, p2, b = bn_params(5, rng), bn_params(6, rng), bias(6, rng)
    forward = make(
        lambda x: keras_bn(tf.nn.bias_add(tf.matmul(x, w, adjoint_b=adj_y), b), p2), [None, 3, 5]
    )
    folded = check_rewrite(forward, rng)
    assert_absorbed(folded, "forward", "BatchMatMulV2")
    backward = make(lambda x: tf.matmul(keras_bn(x, p1), w, adjoint_b=adj_y), [3, 5])
    assert_absorbed(check_rewrite(backward, rng), "backward", "BatchMatMulV2")


def test_batch_matmul_adj_x_backward_reads_channels_on_axis_minus_2():
    rng = np.random.default_rng(44)
    w, (k1, k2) = weight((5, 4), rng), per_row(5, rng)
    fn = make(lambda x: tf.matmul(x * k1 + k2, w, adjoint_a=True), [5, 3])
    folded = check_rewrite(fn, rng)
    entry = folded.report.entries[0]
    assert entry.folded and entry.direction == "backward", str(folded.report)
    assert entry.absorbed_by == [n.name for n in nodes_of(folded.graph_def, "BatchMatMulV2")]


def test_batch_matmul_with_a_batched_weight_is_refused():
    rng = np.random.default_rng(45)
    w, p = weight((2, 5, 4), rng), bn_params(4, rng)
    fn = make(lambda x: keras_bn(tf.matmul(x, w), p), tf.TensorSpec([2, 3, 5]))
    assert_not_folded(check_rewrite(fn, rng), "batch dimensions")


# ---- Einsum --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "equation,shape", [("abc,cd->abd", (5, 4)), ("abc,dc->abd", (4, 5)), ("...c,cd->...d", (5, 4))]
)
def test_einsum_dense_forward_and_backward(equation, shape):
    rng = np.random.default_rng(46)
    w, b = weight(shape, rng), bias(4, rng)
    p_in, p_out = bn_params(5, rng), bn_params(4, rng)
    forward = make(lambda x: keras_bn(tf.einsum(equation, x, w) + b, p_out), [3, 5])
    folded = check_rewrite(forward, rng)
    if not nodes_of(folded.graph_def, "Einsum"):
        pytest.skip("tf.einsum did not produce an Einsum op")
    assert_absorbed(folded, "forward", "Einsum")
    backward = make(lambda x: tf.einsum(equation, keras_bn(x, p_in), w), [3, 5])
    assert_absorbed(check_rewrite(backward, rng), "backward", "Einsum")


def test_einsum_that_is_not_a_dense_layer_is_refused():
    rng = np.random.default_rng(47)
    w, p = weight((5, 2, 2), rng), bn_params(2, rng)
    fn = make(lambda x: keras_bn(tf.einsum("abc,cde->abde", x, w), p), [3, 5])
    folded = check_rewrite(fn, rng)
    if not nodes_of(folded.graph_def, "Einsum"):
        pytest.skip("tf.einsum did not produce an Einsum op")
    assert_not_folded(folded, "not a dense layer")


# ---- Keras ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_keras_einsum_dense_then_batch_norm(framework):
    K = pytest.importorskip(framework)
    if not hasattr(K.layers, "EinsumDense"):
        pytest.skip(f"{framework} has no EinsumDense")
    inp = K.Input((3, 5))
    y = K.layers.EinsumDense("abc,cd->abd", output_shape=(None, 4), bias_axes="d", name="ed")(inp)
    model = K.Model(inp, K.layers.BatchNormalization(name="ed_bn")(y))
    randomise_keras_model(model, np.random.default_rng(48))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 3, 5], tf.float32)
    )
    folded = check_rewrite(fn, np.random.default_rng(0))
    entry = folded.report.batch_norms[0]
    assert entry.folded and entry.direction == "forward", str(folded.report)
    assert "ed" in entry.absorbed_by[0]


@pytest.mark.parametrize(
    "op,shape", [("BatchMatMul", [5]), ("BatchMatMulV2", [3, 5]), ("BatchMatMulV3", [3, 5])]
)
def test_every_batch_matmul_version_folds_both_ways(op, shape):
    """(BatchMatMul V1 does not broadcast: a constant 2-D weight means 2-D data.)"""
    rng = np.random.default_rng(49)
    w, p1, p2 = weight((5, 4), rng), bn_params(5, rng), bn_params(4, rng)
    extra = {"Tout": tf.float32} if op == "BatchMatMulV3" else {}

    def matmul(x):
        return getattr(tf.raw_ops, op)(x=x, y=tf.constant(w), **extra)

    fn = make(lambda x: keras_bn(matmul(keras_bn(x, p1)), p2), shape)
    folded = check_rewrite(fn, rng)
    directions = sorted(e.direction for e in folded.report.batch_norms)
    assert directions == ["backward", "forward"], str(folded.report)
    [layer] = nodes_of(folded.graph_def, op)
    assert all(e.absorbed_by == [layer.name] for e in folded.report.batch_norms)


def test_batch_matmul_v3_of_mixed_dtypes_is_refused():
    """(Checked on the table entry: CPU TensorFlow runs no mixed-dtype BatchMatMulV3.)"""
    from tensorflow.core.framework import node_def_pb2

    from graphfold.fold.layers import LINEAR, Site

    node = node_def_pb2.NodeDef(name="mm", op="BatchMatMulV3")
    for key, dtype in (("Ta", tf.float16), ("Tb", tf.float16), ("Tout", tf.float32)):
        node.attr[key].type = dtype.as_datatype_enum
    site = Site(node, np.ones((5, 4)), (None, 3, 5), (None, 3, 4))
    assert "mixes dtypes" in LINEAR["BatchMatMulV3"].refuse(site).reason
    node.attr["Tout"].type = tf.float16.as_datatype_enum
    assert LINEAR["BatchMatMulV3"].refuse(site) is None
