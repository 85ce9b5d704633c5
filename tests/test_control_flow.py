"""tf.cond and tf.while_loop: the rewrite must run and stay exact; a batch norm inside a body may
stay unfolded, and the report lists each with that reason. Batch norms outside still fold."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_close,
    assert_folded_into_layers,
    bias,
    bn_params,
    check_rewrite,
    op_counts,
    randomise_keras_model,
    weight,
)
from helpers import fused_bn as bn

EPS = 1e-3
SPEC = tf.TensorSpec([None, 6, 6, 4], tf.float32, name="x")


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(41)
    return [
        dict(w=weight((3, 3, 4, 4), rng), b=bias(4, rng), p=bn_params(4, rng)) for _ in range(3)
    ]


def conv_bn(x, part):
    return bn(tf.nn.bias_add(tf.nn.conv2d(x, part["w"], 1, "SAME"), part["b"]), part["p"])


def _library_ops(graph_def):
    return {n.op for f in graph_def.library.function for n in f.node_def}


def test_cond_with_batch_norm_in_a_branch(parts):
    rng = np.random.default_rng(42)

    @tf.function(input_signature=[SPEC, tf.TensorSpec([], tf.bool, name="flag")])
    def fn(x, flag):
        h = tf.nn.relu(conv_bn(x, parts[0]))  # outside: folds
        y = tf.cond(
            flag,
            lambda: conv_bn(h, parts[1]),
            lambda: tf.nn.conv2d(h, parts[2]["w"], 1, "SAME") * 0.5,
        )
        return y + 1.0

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    counts = op_counts(folded.graph_def)
    assert counts["If"] + counts["StatelessIf"] == 1, counts
    x = tf.constant(rng.normal(size=(3, 6, 6, 4)), tf.float32)
    for flag in (True, False):
        assert_close(concrete, folded, ((x, tf.constant(flag)), {}))
    report = folded.report
    # the batch norm outside the cond folds; the one in the true branch stays, and is noted
    assert_folded_into_layers(folded, 1)
    assert "FusedBatchNormV3" in _library_ops(folded.graph_def)
    (inside,) = report.not_folded
    assert "cond_true" in inside.reason and "tf.cond branch" in inside.reason, str(report)
    assert len(report.batch_norms) == 2


def test_while_loop_with_batch_norm_in_the_body(parts):
    rng = np.random.default_rng(43)

    @tf.function(input_signature=[SPEC, tf.TensorSpec([], tf.int32, name="steps")])
    def fn(x, steps):
        h = conv_bn(x, parts[0])

        def body(i, y):
            return i + 1, tf.nn.relu(conv_bn(y, parts[1]))

        _, y = tf.while_loop(lambda i, y: i < steps, body, (tf.constant(0), h))
        return conv_bn(y, parts[2])

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    counts = op_counts(folded.graph_def)
    assert counts["While"] + counts["StatelessWhile"] == 1, counts
    x = tf.constant(rng.normal(size=(2, 6, 6, 4)), tf.float32)
    for steps in (0, 1, 3):
        assert_close(concrete, folded, ((x, tf.constant(steps)), {}))
    report = folded.report
    # the batch norms before and after the loop fold into their convs; the body's is listed
    assert_folded_into_layers(folded, 2)
    assert len(report.not_folded) == 1, str(report)
    assert "FusedBatchNormV3" in _library_ops(folded.graph_def)
    (inside,) = report.not_folded
    assert "while_body" in inside.reason and "while_loop body" in inside.reason, str(report)


def test_python_bool_cond_is_traced_away(parts):
    """A Python-level condition leaves no If: everything folds."""
    rng = np.random.default_rng(44)
    use_bn = True

    @tf.function(input_signature=[SPEC])
    def fn(x):
        return tf.cond(tf.constant(use_bn), lambda: conv_bn(x, parts[0]), lambda: x)

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    assert_close(concrete, folded, ((tf.random.normal([2, 6, 6, 4]),), {}))


@pytest.mark.parametrize("form", ["tf.nn", "keras3"])
def test_decomposed_batch_norm_in_a_branch_is_listed_once(parts, form):
    """A decomposed batch norm is three Mul nodes but one layer: the report lists one."""
    rng = np.random.default_rng(45)
    part = parts[1]
    gamma, beta, mean, var = part["p"]
    if form == "keras3":
        keras = pytest.importorskip("keras")
        inp = keras.Input((6, 6, 4))
        model = keras.Model(
            inp,
            keras.layers.BatchNormalization(name="branch_bn")(
                keras.layers.Conv2D(4, 3, padding="same")(inp)
            ),
        )
        randomise_keras_model(model, rng)
        branch = lambda x: model(x, training=False)
    else:
        branch = lambda x: tf.nn.batch_normalization(
            tf.nn.conv2d(x, part["w"], 1, "SAME"), mean, var, beta, gamma, EPS
        )

    @tf.function(input_signature=[SPEC, tf.TensorSpec([], tf.bool, name="flag")])
    def fn(x, flag):
        return tf.cond(flag, lambda: branch(x), lambda: x * 2.0)

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    x = tf.constant(rng.normal(size=(2, 6, 6, 4)), tf.float32)
    for flag in (True, False):
        assert_close(concrete, folded, ((x, tf.constant(flag)), {}))
    (entry,) = folded.report.batch_norms
    assert not entry.folded and "tf.cond branch" in entry.reason, str(folded.report)
    if form == "keras3":
        assert entry.name.startswith("branch_bn")  # Keras 3 scopes may add a _1
