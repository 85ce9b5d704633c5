"""Transposed convolutions (Keras Conv2DTranspose / Conv3DTranspose): Conv2DBackpropInput and
Conv3DBackpropInputV2, forward and backward.

Forward (A after the layer) is always exact. Backward, the scale folds into the filter's in-axis;
the shift folds only where its response map is the same at every output position
(docs/folding.md, "Transposed convolutions"): the tests pin both sides of that line, and that the
map graphfold computes is the one TensorFlow computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from graphfold.fold.layers import Site, transposed_shift_map

from helpers import (
    assert_absorbed,
    assert_not_folded,
    bias,
    bn_params,
    bn_scale_shift,
    check_rewrite,
    frozen_graph_def,
    fused_bn,
    make,
    nodes_of,
    rel_err,
    run_nhwc_twin,
    shift_free,
    the_entry,
    weight,
    weight_of,
)

T2 = "Conv2DBackpropInput"
T3 = "Conv3DBackpropInputV2"


def transpose2d(x, w, size, stride, padding, data_format="NHWC"):
    n = tf.shape(x)[0]
    c = w.shape[2]
    shape = [n, size, size, c] if data_format == "NHWC" else [n, c, size, size]
    return tf.nn.conv2d_transpose(x, w, tf.stack(shape), stride, padding, data_format=data_format)


# ---- forward -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride,padding,size", [(2, "SAME", 12), (2, "VALID", 13), (1, "SAME", 6)])
def test_forward_into_conv2d_transpose(stride, padding, size):
    rng = np.random.default_rng(11)
    w, b, p = weight((3, 3, 4, 3), rng), bias(4, rng), bn_params(4, rng)
    fn = make(
        lambda x: fused_bn(tf.nn.bias_add(transpose2d(x, w, size, stride, padding), b), p),
        [6, 6, 3],
    )
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "forward", T2)
    s, _ = bn_scale_shift(p)
    [layer] = nodes_of(folded.graph_def, T2)
    np.testing.assert_allclose(weight_of(folded.graph_def, layer), w * s[:, None], rtol=1e-6)


def test_forward_into_conv2d_transpose_nchw():
    rng = np.random.default_rng(12)
    w, b, p = weight((3, 3, 4, 3), rng), bias(4, rng), bn_params(4, rng)
    fn = make(
        lambda x: fused_bn(
            tf.nn.bias_add(transpose2d(x, w, 12, 2, "SAME", "NCHW"), b, data_format="NCHW"),
            p,
            "NCHW",
        ),
        [3, 6, 6],
    )
    folded = check_rewrite(fn, rng, run=False)
    assert_absorbed(folded, "forward", T2)
    feed = rng.normal(size=[2, 3, 6, 6]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


def test_forward_into_conv3d_transpose_without_bias():
    rng = np.random.default_rng(13)
    w, p = weight((2, 3, 3, 4, 3), rng), bn_params(4, rng)

    def body(x):
        shape = tf.stack([tf.shape(x)[0], 8, 8, 8, 4])
        y = tf.nn.conv3d_transpose(x, w, shape, [1, 2, 2, 2, 1], "SAME")
        return fused_bn(y, p, "NDHWC")

    folded = check_rewrite(make(body, [4, 4, 4, 3]), rng)
    assert_absorbed(folded, "forward", T3)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_conv3d_transpose_ncdhw(direction):
    """NCDHW (CPU TensorFlow runs it through the NDHWC twin): forward with a shift, backward with
    the scale only."""
    rng = np.random.default_rng(22)
    w = weight((2, 3, 3, 4, 3), rng)
    c = 4 if direction == "forward" else 3
    p = bn_params(c, rng) if direction == "forward" else shift_free(bn_params(c, rng))
    stats = [v.reshape(c, 1, 1, 1) for v in p]

    def bn5(y):
        gamma, beta, mean, var = stats
        return tf.nn.batch_normalization(y, mean, var, beta, gamma, 1e-3)

    def body(x):
        shape = tf.stack([tf.shape(x)[0], 4, 8, 8, 8])
        x = bn5(x) if direction == "backward" else x
        y = tf.nn.conv3d_transpose(x, w, shape, [1, 1, 2, 2, 2], "SAME", data_format="NCDHW")
        return bn5(y) if direction == "forward" else y

    fn = make(body, [3, 4, 4, 4])
    folded = check_rewrite(fn, rng, run=False)
    assert_absorbed(folded, direction, T3)
    feed = rng.normal(size=[2, 3, 4, 4, 4]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


# ---- backward: the scale always, the shift where it is a per-channel bias ------------------------
def test_backward_scale_folds_whatever_the_stride_and_padding():
    rng = np.random.default_rng(14)
    w, p = weight((3, 3, 4, 3), rng), shift_free(bn_params(3, rng))
    fn = make(lambda x: transpose2d(fused_bn(x, p), w, 12, 2, "SAME"), [6, 6, 3])
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "backward", T2)
    s, _ = bn_scale_shift(p)
    [layer] = nodes_of(folded.graph_def, T2)
    np.testing.assert_allclose(weight_of(folded.graph_def, layer), w * s, rtol=1e-6)


def test_backward_scale_nchw():
    rng = np.random.default_rng(15)
    w, p = weight((3, 3, 4, 3), rng), shift_free(bn_params(3, rng))
    fn = make(lambda x: transpose2d(fused_bn(x, p, "NCHW"), w, 12, 2, "SAME", "NCHW"), [3, 6, 6])
    folded = check_rewrite(fn, rng, run=False)
    assert_absorbed(folded, "backward", T2)
    feed = rng.normal(size=[2, 3, 6, 6]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [
        (3, 2, "SAME", 12),  # phases modulo the stride get different taps
        (2, 2, "VALID", 12),  # each output one tap, a different one per phase
        (1, 2, "VALID", 11),  # odd positions get no tap at all
        (3, 1, "VALID", 8),  # the borders get fewer taps
        (3, 1, "SAME", 6),
    ],
)
def test_backward_shift_that_is_a_spatial_map_is_refused(kernel, stride, padding, size):
    rng = np.random.default_rng(16)
    w, p = weight((kernel, kernel, 4, 3), rng), bn_params(3, rng)
    fn = make(lambda x: transpose2d(fused_bn(x, p), w, size, stride, padding), [6, 6, 3])
    folded = check_rewrite(fn, rng, partial=False)
    entry = assert_not_folded(folded, "spatial map, not a per-channel bias")
    assert "graph input" in entry.tried["forward"]
    [layer] = nodes_of(folded.graph_def, T2)
    np.testing.assert_array_equal(weight_of(folded.graph_def, layer), w)


def test_backward_shift_folds_into_a_pointwise_transposed_conv():
    rng = np.random.default_rng(17)
    w, p = weight((1, 1, 4, 3), rng), bn_params(3, rng)
    fn = make(lambda x: transpose2d(fused_bn(x, p), w, 6, 1, "SAME"), [6, 6, 3])
    assert_absorbed(check_rewrite(fn, rng), "backward", T2)


def test_backward_shift_folds_where_every_position_gets_every_tap():
    """Stride 1 and explicit padding of (K-1)·d on both sides of the forward convolution: every
    output position receives every kernel tap, so the shift's map is constant."""
    rng = np.random.default_rng(18)
    w, p = weight((3, 3, 4, 3), rng), bn_params(3, rng)

    def body(x):
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.stack([tf.shape(x)[0], 4, 4, 4]),
            filter=w,
            out_backprop=fused_bn(x, p),
            strides=[1, 1, 1, 1],
            padding="EXPLICIT",
            explicit_paddings=[0, 0, 2, 2, 2, 2, 0, 0],
        )

    assert_absorbed(check_rewrite(make(body, [6, 6, 3]), rng), "backward", T2)


def test_backward_conv3d_transpose_shift_is_refused_and_scale_folds():
    rng = np.random.default_rng(19)
    w = weight((3, 3, 3, 4, 3), rng)

    def net(p):
        def body(x):
            shape = tf.stack([tf.shape(x)[0], 8, 8, 8, 4])
            return tf.nn.conv3d_transpose(
                fused_bn(x, p, "NDHWC"), w, shape, [1, 2, 2, 2, 1], "SAME"
            )

        return make(body, [4, 4, 4, 3])

    assert_not_folded(check_rewrite(net(bn_params(3, rng)), rng, partial=False), "spatial map")
    assert_absorbed(check_rewrite(net(shift_free(bn_params(3, rng))), rng), "backward", T3)
    partial = the_entry(check_rewrite(net(bn_params(3, rng)), rng))  # x + t/s stays
    assert partial.partial and partial.direction == "backward" and "spatial map" in partial.reason
    assert "shift kept before" in partial.detail, partial


# ---- the shift map is TensorFlow's --------------------------------------------------------------
@pytest.mark.parametrize(
    "kernel,stride,dilation,padding,n_in,n_out",
    [
        (3, 2, 1, "SAME", 5, 10),
        (3, 2, 1, "SAME", 5, 9),
        (3, 2, 1, "VALID", 5, 11),
        (4, 3, 1, "VALID", 4, 13),
        (4, 2, 1, "SAME", 3, 6),
        (2, 1, 1, "VALID", 5, 6),
    ],
)
def test_shift_map_matches_tensorflow(kernel, stride, dilation, padding, n_in, n_out):
    """(TensorFlow's CPU kernel runs no dilated transposed convolution: dilation 1 only.)"""
    rng = np.random.default_rng(20)
    w = rng.normal(size=(kernel, kernel, 4, 3))
    t = rng.normal(size=3)
    x = np.broadcast_to(t, (1, n_in, n_in, 3))
    want = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=[1, n_out, n_out, 4],
        filter=w,
        out_backprop=x,
        strides=[1, stride, stride, 1],
        padding=padding,
        dilations=[1, dilation, dilation, 1],
    ).numpy()[0]
    layer = _node(T2, stride, dilation, padding)
    got = transposed_shift_map(Site(layer, w, (None, n_in, n_in, 3), (None, n_out, n_out, 4)), t)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def _node(op, stride, dilation, padding):
    from tensorflow.core.framework import node_def_pb2

    node = node_def_pb2.NodeDef(name="t", op=op)
    node.attr["strides"].list.i.extend([1, stride, stride, 1])
    node.attr["dilations"].list.i.extend([1, dilation, dilation, 1])
    node.attr["padding"].s = padding.encode()
    return node


# ---- Keras --------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
@pytest.mark.parametrize("dims", [2, 3])
def test_keras_conv_transpose_then_batch_norm(framework, dims):
    K = pytest.importorskip(framework)
    rng = np.random.default_rng(21)
    shape = (6, 6, 3) if dims == 2 else (4, 4, 4, 3)
    layer = K.layers.Conv2DTranspose if dims == 2 else K.layers.Conv3DTranspose
    inp = K.Input(shape)
    out = K.layers.BatchNormalization(name="up_bn")(
        layer(4, 3, strides=2, padding="same", name="up")(inp)
    )
    model = K.Model(inp, out)
    from helpers import randomise_keras_model

    randomise_keras_model(model, rng)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((None,) + shape, tf.float32)
    )
    folded = check_rewrite(fn, rng)
    entry = assert_absorbed(folded, "forward", T2 if dims == 2 else T3)
    assert entry.name.startswith("up_bn") and "/up" in entry.absorbed_by[0], entry
