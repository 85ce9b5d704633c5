"""Batch norms whose mean and variance are computed from the input (issue 19).

``tf.nn.batch_normalization(y, *tf.nn.moments(y, axes), β, γ, ε)`` (training mode, instance or
layer norm written this way) is ``y * inv + (β - μ·inv)`` with μ, σ² and so inv computed from y:
s and t change with the input, so it is no per-channel affine map and cannot fold. The report
says so (not "a fetched tensor splits it in parts"), the graph keeps its ops, and the outputs are
the original's. A Keras batch norm called with ``training=True`` also updates its moving
statistics: freezing refuses it, saying so.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.errors import NotFreezable

from helpers import assert_close, op_counts, the_entry, weight

EPS = 1e-3
SPEC = tf.TensorSpec([None, 6, 6, 3], tf.float32, name="x")


def _normalized(axes, keepdims, seed):
    """conv → ``tf.nn.batch_normalization`` with the moments of the conv's output over ``axes``."""
    rng = np.random.default_rng(seed)
    w = tf.constant(weight((3, 3, 3, 8), rng))
    gamma = tf.constant(rng.normal(0, 1, 8).astype("float32"))  # mixed signs
    beta = tf.constant(rng.normal(0, 1, 8).astype("float32"))

    @tf.function
    def fn(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        mean, variance = tf.nn.moments(y, axes, keepdims=keepdims)
        return tf.nn.batch_normalization(y, mean, variance, beta, gamma, EPS)

    return fn.get_concrete_function(SPEC)


def _assert_left_as_it_is(fn, seed):
    """Not folded, for the true reason; no op more than before; the original's outputs."""
    folded = graphfold.rewrite(fn)
    report = folded.report
    entry = the_entry(report)
    assert len(report.batch_norms) == 1 and report.not_folded == [entry], str(report)
    assert not entry.folded and not entry.partial
    for phrase in (
        "computed from the input",
        "not constants",
        "batch statistics",
        "the tensor it normalizes",
    ):
        assert phrase in entry.reason, (phrase, entry.reason)
    assert "splits it in parts" not in entry.reason and "not a linear layer" not in entry.reason
    before, after = report.ops_before, report.ops_after
    assert sum(after.values()) <= sum(before.values()), (before, after)
    assert all(after.get(op, 0) <= n for op, n in before.items()), (before, after)
    assert set(after) <= set(before), (before, after)
    assert sum(op_counts(folded.graph_def).values()) <= sum(before.values())
    rng = np.random.default_rng(seed)
    for batch in (1, 4):
        x = rng.normal(0, 1, (batch, 6, 6, 3)).astype("float32")
        assert assert_close(fn, folded, (x,), tol=1e-5) <= 1e-5
    return entry


def test_training_mode_batch_norm_with_moments_is_explained_and_kept():
    entry = _assert_left_as_it_is(_normalized([0, 1, 2], False, 0), 1)
    # it names the statistics and the tensor they are computed from
    assert "mean moments/Squeeze" in entry.reason and "variance moments/Squeeze_1" in entry.reason
    assert "computed from Conv2D" in entry.reason


def test_layer_norm_like_moments_over_the_channel_axis_is_explained_and_kept():
    _assert_left_as_it_is(_normalized([3], True, 2), 3)


def test_instance_norm_like_moments_over_the_positions_is_explained_and_kept():
    _assert_left_as_it_is(_normalized([1, 2], True, 4), 5)


def test_scale_fed_from_another_input_is_explained_and_kept():
    """Conditional batch norm: constant μ, σ², β but γ fed in (``gamma``), so s is no constant."""
    rng = np.random.default_rng(8)
    w = tf.constant(weight((3, 3, 3, 8), rng))
    mean, beta = (tf.constant(rng.normal(0, 1, 8).astype("float32")) for _ in range(2))
    variance = tf.constant(rng.uniform(0.5, 2, 8).astype("float32"))

    @tf.function
    def fn(x, gamma):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        return tf.nn.batch_normalization(y, mean, variance, beta, gamma, EPS)

    fn = fn.get_concrete_function(SPEC, tf.TensorSpec([8], tf.float32, name="gamma"))
    folded = graphfold.rewrite(fn)
    entry = the_entry(folded.report)
    assert not entry.folded and not entry.partial, str(folded.report)
    assert "computed in the graph, not constants (gamma" in entry.reason, entry.reason
    assert "splits it in parts" not in entry.reason
    assert sum(folded.report.ops_after.values()) <= sum(folded.report.ops_before.values())
    x = rng.normal(0, 1, (2, 6, 6, 3)).astype("float32")
    gamma = rng.normal(0, 1, 8).astype("float32")
    assert assert_close(fn, folded, (x, gamma), tol=1e-5) <= 1e-5


def test_unfolded_subtraction_from_a_constant_is_not_made_a_multiply_add():
    """``k - x**2`` (s = -1) folds nowhere; as ``x * -1 + k`` it would take one op more."""
    k = tf.constant(np.random.default_rng(6).normal(0, 1, 3).astype("float32"))

    @tf.function
    def fn(x):
        return k - tf.math.square(x)

    fn = fn.get_concrete_function(SPEC)
    folded = graphfold.rewrite(fn)
    report = folded.report
    assert report.ops_after == report.ops_before, str(report)
    assert op_counts(folded.graph_def)["Sub"] == 1
    x = np.random.default_rng(7).normal(0, 1, (2, 6, 6, 3)).astype("float32")
    assert assert_close(fn, folded, (x,), tol=1e-5) <= 1e-5


def _keras_training(keras):
    inputs = keras.Input((6, 6, 3))
    y = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(y)
    model = keras.Model(inputs, y)

    @tf.function
    def fn(x):
        return model(x, training=True)

    return fn.get_concrete_function(SPEC)


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "tf-keras"])
def test_keras_batch_norm_called_with_training_true_is_refused_saying_why(legacy):
    keras = pytest.importorskip("tf_keras") if legacy else tf.keras
    fn = _keras_training(keras)
    with pytest.raises(NotFreezable) as raised:
        graphfold.rewrite(fn)
    reason = str(raised.value)
    for phrase in ("training=True", "batch statistics", "not constants", "moving statistics"):
        assert phrase in reason, (phrase, reason)
    assert "/bn" in reason  # it names the writes
