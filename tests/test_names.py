"""What graphfold writes, as the user wrote it (issue 19 §2): report entries named after the Keras
layers (from the variables a batch norm reads), a shift folded into a layer that has a bias added
to that bias (no second bias op), and no reason that names a node graphfold created.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_absorbed,
    bias,
    bn_params,
    bn_scale_shift,
    check_rewrite,
    decomposed_bn,
    make,
    nodes_of,
    op_counts,
    randomise_keras_model,
    weight,
)
from helpers import fused_bn as bn

RNG = np.random.default_rng(1920)


def keras_fn(framework: str, build, shape):
    K = pytest.importorskip(framework)
    inp = K.Input(shape)
    model = K.Model(inp, build(K.layers, inp))
    randomise_keras_model(model, RNG)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, *shape], tf.float32)
    )
    return model, fn


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_report_names_are_the_keras_layer_names(framework):
    """Auto-named layers: Keras 3's name scopes say ``batch_normalization_1`` for the layer
    ``batch_normalization`` (and ``_1_2`` for ``batch_normalization_1``); the report must not."""

    def build(L, x):
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3)(x)))  # forward into the conv
        x = L.Conv2D(3, 1)(L.BatchNormalization(name="named_bn")(x))  # backward into the conv
        return L.BatchNormalization()(L.ReLU()(x))  # not folded

    model, fn = keras_fn(framework, build, (6, 6, 3))
    report = check_rewrite(fn, RNG).report
    bns = [layer.name for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert sorted(e.name for e in report.batch_norms) == sorted(bns), str(report)
    assert report.entry(bns[0]).direction == "forward", str(report)
    assert report.entry("named_bn").direction == "backward", str(report)
    assert not report.entry(bns[-1]).folded, str(report)


def test_a_shift_folded_backward_goes_into_the_dense_layers_own_bias():
    """Dense on a rank-3 input (Tensordot: MatMul → Reshape → bias): b ← b + t·W, in the one
    bias op there is, none added."""
    p, w, b = bn_params(8, RNG), weight((8, 5), RNG), bias(5, RNG)
    fn = make(lambda x: tf.tensordot(decomposed_bn(x, p), w, axes=[[2], [0]]) + b, [6, 8])
    folded = check_rewrite(fn, RNG)
    assert_absorbed(folded, "backward", "MatMul")
    counts = op_counts(folded.graph_def)
    assert counts["BiasAdd"] == 0 and counts["AddV2"] == 1, counts
    _, t = bn_scale_shift(p)
    [add] = nodes_of(folded.graph_def, "AddV2")
    nodes = {n.name: n for n in folded.graph_def.node}
    value = tf.make_ndarray(nodes[add.input[1]].attr["value"].tensor)
    np.testing.assert_allclose(value, b + t @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["bias_add", "add", "add_nchw"])
def test_a_shift_folded_backward_goes_into_a_conv_bias_of_any_form(form):
    p, w, b = bn_params(3, RNG), weight((3, 3, 3, 4), RNG), bias(4, RNG)

    def body(x):
        if form == "add_nchw":  # channels first (run through a transpose: CPU has no NCHW)
            y = tf.transpose(tf.nn.conv2d(bn(x, p), w, 1, "VALID"), [0, 3, 1, 2])
            return y + b.reshape(4, 1, 1)
        y = tf.nn.conv2d(bn(x, p), w, 1, "VALID")
        return tf.nn.bias_add(y, b) if form == "bias_add" else y + b

    folded = check_rewrite(make(body, [6, 6, 3]), RNG)
    assert_absorbed(folded, "backward", "Conv2D")
    before = op_counts(make(body, [6, 6, 3]).graph.as_graph_def())
    after = op_counts(folded.graph_def)
    assert after["BiasAdd"] == before["BiasAdd"] and after["AddV2"] == before["AddV2"], after


def test_no_reason_names_a_node_graphfold_created():
    """bn1 folds backward into the conv, which had no bias: graphfold adds one. bn2, after the
    conv, meets that bias (also read by a Relu): the reason names the conv, not the new node."""
    p1, p2, w = bn_params(3, RNG), bn_params(4, RNG), weight((3, 3, 3, 4), RNG)

    def body(x):
        y = tf.nn.conv2d(bn(x, p1), w, 1, "VALID", name="conv")
        return bn(y, p2), tf.nn.relu(y)

    folded = check_rewrite(make(body, [6, 6, 3]), RNG)
    entries = folded.report.batch_norms
    assert [e.folded for e in entries] == [True, False], str(folded.report)
    assert nodes_of(folded.graph_def, "BiasAdd"), "the backward fold added no bias"
    text = entries[1].reason + " ".join(entries[1].tried.values()) + entries[1].blocker
    assert "folded" not in text and "graphfold" not in text, entries[1]
    assert entries[1].blocker == "conv" and "conv: its output is also read by" in text, entries[1]
