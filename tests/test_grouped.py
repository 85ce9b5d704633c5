"""Grouped Conv2D (filter in-channels × groups = input channels), and the nested XLA call in which
Keras 3 runs it (inlined, so that folds reach the Conv2D inside).

Backward, data channel c = g·(C_in/g) + j scales filter in-index j of group g's outputs only, and
the shift's response sums within the group (docs/folding.md, "Grouped convolutions").
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

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
    randomise_keras_model,
    rel_err,
    run_nhwc_twin,
    shift_free,
    weight,
    weight_of,
)


def grouped_reference(w, s, t, groups):
    """W ⊙_in s and W ⊛ t for a grouped filter, by the definition (loops)."""
    kh, kw, n_in, n_out = w.shape
    per_group = n_out // groups
    new_w, response = w.astype(np.float64).copy(), np.zeros(n_out)
    for o in range(n_out):
        for j in range(n_in):
            c = (o // per_group) * n_in + j
            new_w[:, :, j, o] *= s[c]
            response[o] += w[:, :, j, o].sum() * t[c]
    return new_w, response


def test_forward_into_grouped_conv():
    rng = np.random.default_rng(31)
    w, b, p = weight((3, 3, 2, 6), rng), bias(6, rng), bn_params(6, rng)
    fn = make(lambda x: fused_bn(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b), p), [6, 6, 6])
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "forward", "Conv2D")
    s, _ = bn_scale_shift(p)
    [conv] = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), w * s, rtol=1e-6)


@pytest.mark.parametrize("groups", [2, 3])
def test_backward_into_grouped_conv_scales_each_group_and_sums_the_shift_within_it(groups):
    rng = np.random.default_rng(32)
    w, b, p = weight((3, 3, 2, 2 * groups), rng), bias(2 * groups, rng), bn_params(2 * groups, rng)
    fn = make(
        lambda x: tf.nn.bias_add(tf.nn.conv2d(fused_bn(x, p), w, 1, "VALID"), b), [6, 6, 2 * groups]
    )
    folded = check_rewrite(fn, rng)
    assert_absorbed(folded, "backward", "Conv2D")
    s, t = bn_scale_shift(p)
    want_w, response = grouped_reference(w, s, t, groups)
    [conv] = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), want_w, rtol=1e-6)
    [bias_add] = nodes_of(folded.graph_def, "BiasAdd")
    const = {n.name: n for n in folded.graph_def.node}[bias_add.input[1]]
    np.testing.assert_allclose(
        tf.make_ndarray(const.attr["value"].tensor), b + response, rtol=1e-5, atol=1e-6
    )


def test_backward_into_same_grouped_conv_keeps_the_shift_and_folds_the_scale():
    rng = np.random.default_rng(33)
    w = weight((3, 3, 2, 4), rng)
    net = lambda p: make(lambda x: tf.nn.conv2d(fused_bn(x, p), w, 1, "SAME"), [6, 6, 4])
    assert_not_folded(check_rewrite(net(bn_params(4, rng)), rng, partial=False), "padding")
    assert_absorbed(check_rewrite(net(shift_free(bn_params(4, rng))), rng), "backward", "Conv2D")


def test_grouped_conv_nchw_both_directions():
    rng = np.random.default_rng(34)
    w1, w2 = weight((3, 3, 2, 4), rng), weight((1, 1, 2, 6), rng)
    p1, p2 = bn_params(4, rng), bn_params(4, rng)

    def body(x):
        y = fused_bn(tf.nn.conv2d(x, w1, 1, "SAME", data_format="NCHW"), p1, "NCHW")
        y = tf.nn.relu(y)
        return tf.nn.conv2d(fused_bn(y, p2, "NCHW"), w2, 1, "VALID", data_format="NCHW")

    fn = make(body, [4, 5, 5])
    folded = check_rewrite(fn, rng, run=False)
    directions = {e.name: e.direction for e in folded.report.batch_norms}
    assert sorted(directions.values()) == ["backward", "forward"], str(folded.report)
    feed = rng.normal(size=[2, 4, 5, 5]).astype(np.float32)
    [want] = run_nhwc_twin(fn, frozen_graph_def(fn), [feed])
    [got] = run_nhwc_twin(fn, folded.graph_def, [feed])
    assert rel_err(want, got) <= 1e-5


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_keras_grouped_conv_folds_both_ways(framework):
    """Keras 3 runs each grouped Conv2D in an XLA-compiled nested call: graphfold inlines it."""
    K = pytest.importorskip(framework)
    inp = K.Input((6, 6, 4))
    y = K.layers.BatchNormalization(name="after_bn")(
        K.layers.Conv2D(6, 3, groups=2, name="g1")(inp)
    )
    y = K.layers.Activation("relu")(y)
    y = K.layers.Conv2D(4, 1, groups=2, name="g2")(K.layers.BatchNormalization(name="before_bn")(y))
    model = K.Model(inp, y)
    randomise_keras_model(model, np.random.default_rng(35))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 6, 6, 4], tf.float32)
    )
    folded = check_rewrite(fn, np.random.default_rng(0))
    entries = {e.name.rstrip("_1"): e for e in folded.report.batch_norms}
    assert entries["after_bn"].direction == "forward", str(folded.report)
    assert "g1" in entries["after_bn"].absorbed_by[0]
    assert entries["before_bn"].direction == "backward", str(folded.report)
    assert "g2" in entries["before_bn"].absorbed_by[0]
    assert "StatefulPartitionedCall" not in folded.report.ops_after


def test_a_nested_call_that_cannot_be_inlined_is_named_in_words():
    """A jit_compile function whose body runs an op graphfold does not fold through stays a call;
    the batch norm's reason says it is a nested call, and a note says why it was left."""
    rng = np.random.default_rng(36)
    w, p = weight((3, 3, 3, 4), rng), bn_params(4, rng)

    @tf.function(jit_compile=True)
    def inner(x):
        return tf.sin(tf.nn.conv2d(x, w, 1, "SAME"))

    fn = make(lambda x: fused_bn(inner(x), p), [6, 6, 3])
    folded = check_rewrite(fn, rng)
    if (
        "StatefulPartitionedCall" not in folded.report.ops_before
        and "PartitionedCall" not in folded.report.ops_before
    ):
        pytest.skip("freezing inlined the call")
    assert_not_folded(folded, "nested function call", "could not inline")
    assert any("Sin" in note for note in folded.report.notes), folded.report.notes


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_keras_grouped_conv1d_folds(framework):
    """Keras 3's grouped Conv1D is ExpandDims → grouped Conv2D → Squeeze inside the XLA call: once
    inlined, the body's tensors get their shapes from TensorFlow's shape inference, so the batch
    norm passes the Squeeze and reaches the Conv2D."""
    K = pytest.importorskip(framework)
    inp = K.Input((10, 4))
    model = K.Model(
        inp,
        K.layers.BatchNormalization(name="c1_bn")(K.layers.Conv1D(6, 3, groups=2, name="c1")(inp)),
    )
    randomise_keras_model(model, np.random.default_rng(38))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 10, 4], tf.float32)
    )
    entry = assert_absorbed(check_rewrite(fn, np.random.default_rng(0)), "forward", "Conv2D")
    assert "c1" in entry.absorbed_by[0], entry
