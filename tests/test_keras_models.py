"""Keras 3 and tf-keras (Keras 2) layers followed by BatchNormalization, with randomised BN
statistics and biases: every BN folds, no BN op is left, and the outputs agree to 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_close,
    assert_no_batch_norm,
    check_rewrite,
    op_counts,
    random_inputs,
    randomise_keras_model,
)

FRAMEWORKS = ["keras", "tf_keras"]


def _bn(K, name, **kwargs):
    return K.layers.BatchNormalization(name=name, **kwargs)


MODELS = {
    # name: (input shape, builder(K, x) -> y, number of BN layers)
    "conv2d": (
        (8, 8, 3),
        lambda K, x: K.layers.ReLU()(
            _bn(K, "conv_bn")(K.layers.Conv2D(4, 3, padding="same", name="conv")(x))
        ),
        1,
    ),
    "conv2d_no_bias_strided": (
        (9, 9, 3),
        lambda K, x: _bn(K, "conv_bn")(
            K.layers.Conv2D(6, 3, strides=2, use_bias=False, name="conv")(x)
        ),
        1,
    ),
    "depthwise": (
        (8, 8, 3),
        lambda K, x: _bn(K, "dw_bn")(K.layers.DepthwiseConv2D(3, depth_multiplier=1, name="dw")(x)),
        1,
    ),
    "depthwise_multiplier_3": (
        (8, 8, 3),
        lambda K, x: _bn(K, "dw_bn")(
            K.layers.DepthwiseConv2D(3, depth_multiplier=3, padding="same", name="dw")(x)
        ),
        1,
    ),
    "separable": (
        (8, 8, 3),
        lambda K, x: _bn(K, "sep_bn")(
            K.layers.SeparableConv2D(5, 3, depth_multiplier=2, name="sep")(x)
        ),
        1,
    ),
    "conv1d": (
        (10, 3),
        lambda K, x: _bn(K, "conv1d_bn")(K.layers.Conv1D(4, 3, name="conv1d")(x)),
        1,
    ),
    "dense": ((6,), lambda K, x: _bn(K, "dense_bn")(K.layers.Dense(4, name="dense")(x)), 1),
    "bn_scale_false": (
        (8, 8, 3),
        lambda K, x: _bn(K, "conv_bn", scale=False)(K.layers.Conv2D(4, 3, name="conv")(x)),
        1,
    ),
    "bn_center_false": (
        (8, 8, 3),
        lambda K, x: _bn(K, "conv_bn", center=False)(K.layers.Conv2D(4, 3, name="conv")(x)),
        1,
    ),
    "dense_bn_scale_false": (
        (6,),
        lambda K, x: _bn(K, "dense_bn", scale=False)(K.layers.Dense(4, name="dense")(x)),
        1,
    ),
    "dense_bn_center_false": (
        (6,),
        lambda K, x: _bn(K, "dense_bn", center=False)(K.layers.Dense(4, name="dense")(x)),
        1,
    ),
    "small_cnn": ((12, 12, 3), lambda K, x: _small_cnn(K, x), 6),
}


def _small_cnn(K, x):
    """Every layer type in one model, with pooling and activations in between."""
    y = K.layers.ReLU()(_bn(K, "c1_bn")(K.layers.Conv2D(8, 3, padding="same", name="c1")(x)))
    y = K.layers.MaxPooling2D(2)(y)
    y = K.layers.ReLU()(_bn(K, "dw_bn")(K.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)))
    y = K.layers.ReLU()(_bn(K, "sep_bn")(K.layers.SeparableConv2D(8, 3, name="sep")(y)))
    y = K.layers.AveragePooling2D(2)(y)
    y = K.layers.Reshape((4, 8))(y)
    y = K.layers.ReLU()(_bn(K, "c1d_bn")(K.layers.Conv1D(6, 2, name="c1d")(y)))
    y = K.layers.Flatten()(y)
    y = K.layers.ReLU()(_bn(K, "d1_bn")(K.layers.Dense(10, name="d1")(y)))
    return _bn(K, "d2_bn")(K.layers.Dense(3, name="d2")(y))


def _build(framework: str, name: str, seed: int = 0):
    K = pytest.importorskip(framework)
    shape, builder, n_bn = MODELS[name]
    inp = K.Input(shape, name="x")
    model = K.Model(inp, builder(K, inp))
    assert randomise_keras_model(model, np.random.default_rng(seed)) == n_bn
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, *shape], tf.float32, name="x")
    )
    return model, fn, n_bn


def assert_into_its_layer(entry, folded):
    """The batch norm named ``<layer>_bn`` folded forward into one linear op of ``<layer>``."""
    from graphfold.fold.layers import LINEAR

    layer = entry.name.split("_bn")[0]
    ops = {n.name: n.op for n in folded.graph_def.node}
    assert entry.direction == "forward" and len(entry.absorbed_by) == 1, entry
    [node] = entry.absorbed_by
    assert f"/{layer}/" in f"/{node}" or f"/{layer}_" in f"/{node}", (layer, node)
    assert ops[node] in LINEAR, (node, ops[node])


def _bn_layer_names(model):
    return [layer.name for layer in model.layers if "BatchNormalization" in type(layer).__name__]


def _check(framework, name):
    model, fn, n_bn = _build(framework, name, seed=len(name))
    folded = check_rewrite(fn, np.random.default_rng(3))
    report = folded.report
    assert len(report.batch_norms) == n_bn, str(report)
    assert len(report.folded) == n_bn and not report.not_folded, str(report)
    assert_no_batch_norm(folded.graph_def)
    for entry in report.batch_norms:  # "<layer>_bn" folded forward into <layer>'s linear op
        assert_into_its_layer(entry, folded)
    assert report.ops_before.get("FusedBatchNormV3", 0) == (
        sum(1 for e in report.batch_norms if e.form == "FusedBatchNormV3")
    )
    assert not any(op.startswith("FusedBatchNorm") for op in report.ops_after)
    # the report names the Keras layers (Keras 3 name scopes carry a "_1" suffix in tf.function)
    names = [e.name for e in report.batch_norms]
    for layer_name in _bn_layer_names(model):
        assert any(n == layer_name or n.startswith(layer_name + "_") for n in names), names
        assert layer_name in str(report)
    # and the folded function agrees on other batch sizes too
    for batch in (1, 5):
        assert_close(fn, folded, random_inputs(fn, np.random.default_rng(batch), batch))
    return folded


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_keras_layer_then_batch_norm(framework, name):
    folded = _check(framework, name)
    counts = op_counts(folded.graph_def)
    # nothing of the batch norm is left: no Mul / Rsqrt / Sub (Keras' decomposed form)
    assert counts["Rsqrt"] == 0 and counts["Sub"] == 0 and counts["Mul"] == 0, counts


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_tf_keras_uses_fused_batch_norm_and_keras3_the_decomposed_form(framework):
    """The two frameworks exercise the two BN forms (a guard on the test matrix itself)."""
    model, fn, _ = _build(framework, "conv2d")
    folded = check_rewrite(fn)
    [entry] = folded.report.batch_norms
    if framework == "tf_keras":
        assert entry.form == "FusedBatchNormV3"
    else:
        assert entry.form.startswith("decomposed")
    assert entry.absorbed_by and all("conv" in node for node in entry.absorbed_by)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dense_on_higher_rank_input(framework, rank):
    """README: Dense on 3-D and 4-D inputs folds."""
    K = pytest.importorskip(framework)
    shape = (5, 6) if rank == 3 else (3, 4, 6)
    inp = K.Input(shape)
    out = _bn(K, "dense_bn")(K.layers.Dense(4, name="dense")(inp))
    model = K.Model(inp, out)
    randomise_keras_model(model, np.random.default_rng(rank))
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, *shape], tf.float32)
    )
    folded = check_rewrite(fn, np.random.default_rng(0))
    [entry] = folded.report.batch_norms
    assert_into_its_layer(entry, folded)
    assert_no_batch_norm(folded.graph_def)
