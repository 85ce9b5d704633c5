"""What must NOT fold forward, and what must stay exact around shared tensors.

A refused A stays as one multiply-add (or, in training mode, as it is), the report says why, the
layer's weight is left as it was, and the rewritten function computes what the original does.
Each graph is built so that backward folding is impossible too (A's output is a function output),
so these tests pin the forward refusal whatever the backward planner does.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold

from helpers import (
    assert_close,
    assert_no_batch_norm,
    bias,
    bn_params,
    check_rewrite,
    freeze,
    make,
    nodes_of,
    op_counts,
    random_inputs,
    rel_err,
    run_graph_def,
    the_entry,
    weight,
    weight_of,
)
from helpers import fused_bn as bn

EPS = 1e-3
SPEC = tf.TensorSpec([None, 6, 6, 3], tf.float32, name="x")


def conv(x, w, b):
    return tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)


def assert_refused(folded, *phrases, multiply_add=True):
    """One A, not folded, whose reason contains every phrase; it stays as a multiply-add."""
    entry = the_entry(folded.report)
    assert not entry.folded, str(folded.report)
    assert entry.direction is None and entry.absorbed_by == []
    for phrase in phrases:
        assert phrase in entry.reason, (phrase, entry.reason)
    if "forward" in entry.tried:
        for phrase in phrases:
            assert phrase in entry.tried["forward"] or phrase in entry.reason
    if multiply_add:
        assert_no_batch_norm(folded.graph_def)
        counts = op_counts(folded.graph_def)
        assert counts["Mul"] == 1 and counts["AddV2"] == 1, counts
    return entry


def assert_weight_untouched(folded, op, w):
    for node in nodes_of(folded.graph_def, op):
        np.testing.assert_array_equal(weight_of(folded.graph_def, node), w)


@pytest.fixture
def rng():
    return np.random.default_rng(99)


@pytest.fixture
def parts(rng):
    return weight((3, 3, 3, 4), rng), bias(4, rng), bn_params(4, rng)


# ---- refusals ------------------------------------------------------------------------------------
def test_conv_output_with_a_second_consumer(parts, rng):
    w, b, p = parts

    def body(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        return {"bn": bn(y, p), "relu": tf.nn.relu(y)}

    folded = check_rewrite(make(body, SPEC), rng)
    entry = assert_refused(folded, "also read by")
    assert "Relu" in entry.tried["forward"]
    assert entry.blocker is not None
    assert_weight_untouched(folded, "Conv2D", w)


def test_conv_output_also_a_function_output(parts, rng):
    w, b, p = parts

    def body(x):
        y = conv(x, w, b)
        return bn(y, p), y

    folded = check_rewrite(make(body, SPEC), rng)
    entry = assert_refused(folded)
    assert "output" in entry.tried["forward"] or "read by" in entry.tried["forward"]
    assert_weight_untouched(folded, "Conv2D", w)


def test_batch_norm_in_training_mode(parts, rng):
    w, b, p = parts
    folded = check_rewrite(make(lambda x: bn(conv(x, w, b), p, training=True), SPEC), rng)
    entry = assert_refused(folded, "training", multiply_add=False)
    assert op_counts(folded.graph_def)["FusedBatchNormV3"] == 1
    [node] = nodes_of(folded.graph_def, "FusedBatchNormV3")
    assert node.attr["is_training"].b
    assert_weight_untouched(folded, "Conv2D", w)
    assert entry.name


def test_batch_norm_statistics_used(parts, rng):
    """Outputs 1-5 of FusedBatchNormV3 read by the function: not a pure affine map."""
    w, b, p = parts
    gamma, beta, mean, var = p

    def body(x):
        y, m, v = tf.raw_ops.FusedBatchNormV3(
            x=conv(x, w, b),
            scale=gamma,
            offset=beta,
            mean=mean,
            variance=var,
            epsilon=EPS,
            is_training=False,
        )[:3]
        return y, m, v

    folded = check_rewrite(make(body, SPEC), rng)
    entry = assert_refused(folded, "outputs 1-5", multiply_add=False)
    assert entry.blocker


def test_batch_norm_on_a_graph_input(rng):
    p = bn_params(3, rng)
    folded = check_rewrite(make(lambda x: bn(x, p), SPEC), rng)
    assert_refused(folded, "graph input")


@pytest.mark.parametrize("layout", ["non_channel_axis", "full_shape"])
def test_constant_that_broadcasts_along_another_axis(layout, rng):
    """A Mul whose constant varies along H (or over everything) is not per-channel."""
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    k = rng.uniform(0.5, 2.0, [6, 1, 1] if layout == "non_channel_axis" else [6, 6, 4])
    k = k.astype(np.float32)
    add = bias(4, rng)
    folded = check_rewrite(make(lambda x: conv(x, w, b) * k + add, SPEC), rng)
    assert not [e for e in folded.report.entries if e.folded], str(folded.report)
    assert_weight_untouched(folded, "Conv2D", w)
    assert op_counts(folded.graph_def)["Mul"] == 1


def test_mul_by_a_non_constant(rng):
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    spec2 = tf.TensorSpec([None, 6, 6, 4], tf.float32, name="gate")
    folded = check_rewrite(make(lambda x, g: conv(x, w, b) * tf.sigmoid(g) + 1.0, SPEC, spec2), rng)
    assert not [e for e in folded.report.entries if e.folded]
    assert_weight_untouched(folded, "Conv2D", w)


def test_weight_that_is_not_a_constant(rng):
    p = bn_params(4, rng)
    wspec = tf.TensorSpec([3, 3, 3, 4], tf.float32, name="w")
    folded = check_rewrite(
        make(lambda x, w: bn(tf.nn.conv2d(x, w, 1, "SAME"), p), SPEC, wspec), rng
    )
    assert_refused(folded, "not a constant")


def test_reshape_that_moves_the_channel_axis(rng):
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    k1 = rng.uniform(0.5, 2.0, 24).astype(np.float32)
    k2 = bias(24, rng)
    folded = check_rewrite(
        make(lambda x: tf.reshape(conv(x, w, b), [-1, 6, 24]) * k1 + k2, SPEC), rng
    )
    entry = assert_refused(folded, "channel axis")
    assert "Reshape" in entry.tried["forward"]
    assert_weight_untouched(folded, "Conv2D", w)


def test_relu_with_a_negative_scale(rng):
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    k = np.array([1.5, -0.7, 2.0, 0.9], np.float32)
    folded = check_rewrite(make(lambda x: tf.nn.relu(conv(x, w, b)) * k, SPEC), rng)
    entry = assert_refused(folded, "Relu", multiply_add=False)
    assert "scale > 0" in entry.reason
    assert op_counts(folded.graph_def)["Mul"] == 1
    assert_weight_untouched(folded, "Conv2D", w)


def test_relu_with_a_shift(parts, rng):
    w, b, _ = parts
    p = bn_params(4, rng, positive=True)
    folded = check_rewrite(
        make(lambda x: bn(tf.nn.relu(conv(x, w, b)), p), SPEC), rng, partial=False
    )  # a partial fold: tests/test_partial.py
    entry = assert_refused(folded, "Relu")
    assert "shift" in entry.reason
    assert_weight_untouched(folded, "Conv2D", w)


def test_max_pool_with_a_negative_scale(rng):
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    gamma, beta, mean, var = bn_params(4, rng, positive=True)
    gamma[2] = -gamma[2]
    folded = check_rewrite(
        make(
            lambda x: bn(tf.nn.max_pool2d(conv(x, w, b), 2, 2, "VALID"), (gamma, beta, mean, var)),
            SPEC,
        ),
        rng,
    )
    entry = assert_refused(folded, "MaxPool")
    assert "scale > 0" in entry.reason
    assert_weight_untouched(folded, "Conv2D", w)


def test_zero_pad_with_a_shift(parts, rng):
    w, b, p = parts
    folded = check_rewrite(
        make(lambda x: bn(tf.pad(conv(x, w, b), [[0, 0], [1, 1], [1, 1], [0, 0]]), p), SPEC),
        rng,
        partial=False,
    )  # a partial fold: tests/test_partial.py
    entry = assert_refused(folded, "shift")
    assert "Pad" in entry.tried["forward"] or "pad" in entry.tried["forward"]
    assert_weight_untouched(folded, "Conv2D", w)


def test_non_zero_pad_value(rng):
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    k = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    folded = check_rewrite(
        make(
            lambda x: (
                tf.pad(conv(x, w, b), [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=2.0) * k
            ),
            SPEC,
        ),
        rng,
    )
    entry = assert_refused(folded, "pad", multiply_add=False)
    assert_weight_untouched(folded, "Conv2D", w)
    assert entry


def test_activation_between_layer_and_batch_norm(parts, rng):
    w, b, p = parts
    folded = check_rewrite(make(lambda x: bn(tf.nn.tanh(conv(x, w, b)), p), SPEC), rng)
    entry = assert_refused(folded, "Tanh")
    assert_weight_untouched(folded, "Conv2D", w)
    assert entry


# ---- float16 / bfloat16 overflow -----------------------------------------------------------------
def _overflow_fn(rng):
    """s = γ/√(σ²+ε) is huge; W·s overflows float16 although the BN output does not."""
    w = np.full((1, 1, 3, 4), 1000.0, np.float16)
    gamma = np.full(4, 50.0, np.float32)
    beta, mean = bias(4, rng), np.zeros(4, np.float32)
    var = np.full(4, 1e-4, np.float32)

    def body(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        return tf.raw_ops.FusedBatchNormV3(
            x=y, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=1e-5, is_training=False
        )[0]

    return make(body, tf.TensorSpec([None, 4, 4, 3], tf.float16))


def test_fold_that_would_overflow_float16_is_refused(rng):
    folded = check_rewrite(_overflow_fn(rng), run=False)
    entry = the_entry(folded.report)
    assert not entry.folded
    assert "overflow" in entry.reason, entry.reason
    assert_weight_untouched(folded, "Conv2D", np.full((1, 1, 3, 4), 1000.0, np.float16))


def test_refused_float16_overflow_stays_finite_at_run_time(rng):
    fn = _overflow_fn(rng)
    folded = check_rewrite(fn, run=False)
    x = tf.constant(np.full((2, 4, 4, 3), 1e-3, np.float16))
    want, got = fn(x).numpy().astype(np.float64), folded(x).numpy().astype(np.float64)
    assert np.all(np.isfinite(want)) and np.all(np.isfinite(got))
    assert np.abs(want - got).max() <= 1e-2 * np.abs(want).max()


# ---- shared tensors stay exact -------------------------------------------------------------------
def test_batch_norm_output_also_a_function_output_still_folds(parts, rng):
    w, b, p = parts

    def body(x):
        y = bn(conv(x, w, b), p)
        return {"bn": y, "act": tf.nn.relu(y)}

    folded = check_rewrite(make(body, SPEC), rng)
    [entry] = folded.report.batch_norms
    assert entry.folded and entry.direction == "forward"
    assert_no_batch_norm(folded.graph_def)


@pytest.mark.parametrize("holder", ["constant", "variable"])
def test_weight_shared_by_two_layers_each_with_its_batch_norm(holder, rng):
    """One weight constant read by two Conv2D: each fold gets its own clone."""
    w_np, b1, b2 = weight((3, 3, 3, 4), rng), bias(4, rng), bias(4, rng)
    p1, p2 = bn_params(4, rng), bn_params(4, rng)
    w = tf.constant(w_np) if holder == "constant" else tf.Variable(w_np)

    def body(x):
        return {"a": bn(conv(x, w, b1), p1), "b": bn(conv(tf.nn.relu(x), w, b2), p2)}

    folded = check_rewrite(make(body, SPEC), rng)
    assert len(folded.report.folded) == 2, str(folded.report)
    assert_no_batch_norm(folded.graph_def)
    convs = nodes_of(folded.graph_def, "Conv2D")
    assert len(convs) == 2
    weights = [weight_of(folded.graph_def, c) for c in convs]
    scales = [p[0].astype(np.float64) / np.sqrt(p[3].astype(np.float64) + EPS) for p in (p1, p2)]
    for s in scales:
        assert any(np.allclose(wf, w_np * s, rtol=1e-6, atol=1e-7) for wf in weights)
    if holder == "variable":
        np.testing.assert_array_equal(w.numpy(), w_np)


def test_weight_shared_with_a_layer_without_batch_norm(rng):
    """The second reader of the weight must still see the original values."""
    w, b1, b2 = weight((3, 3, 3, 4), rng), bias(4, rng), bias(4, rng)
    p = bn_params(4, rng)

    def body(x):
        return bn(conv(x, w, b1), p), conv(x, w, b2)

    folded = check_rewrite(make(body, SPEC), rng)
    assert len(folded.report.folded) == 1
    weights = [weight_of(folded.graph_def, c) for c in nodes_of(folded.graph_def, "Conv2D")]
    assert sum(np.array_equal(x, w) for x in weights) == 1
    s = p[0].astype(np.float64) / np.sqrt(p[3].astype(np.float64) + EPS)
    assert sum(np.allclose(x, w * s, rtol=1e-6) for x in weights) == 1


def test_bias_shared_by_two_layers(rng):
    w1, w2, b = weight((3, 3, 3, 4), rng), weight((3, 3, 3, 4), rng), bias(4, rng)
    p = bn_params(4, rng)
    b = tf.constant(b)

    def body(x):
        return bn(conv(x, w1, b), p), conv(x, w2, b)

    folded = check_rewrite(make(body, SPEC), rng)
    assert len(folded.report.folded) == 1
    [bias_unfolded] = [
        n
        for n in nodes_of(folded.graph_def, "BiasAdd")
        if weight_of(folded.graph_def, _producer(folded.graph_def, n.input[0])) is not None
        and np.array_equal(weight_of(folded.graph_def, _producer(folded.graph_def, n.input[0])), w2)
    ]
    np.testing.assert_array_equal(weight_of(folded.graph_def, bias_unfolded), b.numpy())


def _producer(graph_def, tensor):
    return {n.name: n for n in graph_def.node}[tensor.split(":")[0]]


def test_fn_is_not_modified_and_still_runs(parts, rng):
    """Explicit check of the promise: rewriting leaves ``fn`` (graph and outputs) untouched."""
    w, b, p = parts
    fn = make(lambda x: bn(conv(x, w, b), p), SPEC)
    before = fn.graph.as_graph_def()
    inputs = random_inputs(fn, rng)
    want = fn(*inputs[0]).numpy()
    folded = check_rewrite(fn, rng)
    assert fn.graph.as_graph_def() == before
    assert "FusedBatchNormV3" in {n.op for n in fn.graph.as_graph_def().node}
    np.testing.assert_array_equal(fn(*inputs[0]).numpy(), want)
    assert_close(fn, folded, inputs)


@pytest.mark.parametrize("form", ["fused", "decomposed"])
@pytest.mark.parametrize("also_fetched", [None, "Conv2D", "BiasAdd"])
def test_optimize_graph_def_with_the_batch_norm_node_itself_fetched(form, also_fetched, parts, rng):
    """``optimize_graph_def`` called with the BN node (no Identity after it) as the output, and
    maybe the layer's own output too: the fetched names stay valid and exact."""
    w, b, p = parts
    gamma, beta, mean, var = p

    def body(x):
        y = conv(x, w, b)
        if form == "fused":
            return bn(y, p)
        return tf.nn.batch_normalization(y, mean, var, beta, gamma, EPS)

    frozen = freeze(make(body, SPEC))
    [identity] = [n for n in frozen.graph_def.node if n.name == frozen.outputs[0]]
    outputs = [identity.input[0]] + ([also_fetched] if also_fetched else [])
    optimized, report = graphfold.optimize_graph_def(
        frozen.graph_def, frozen.inputs, outputs, frozen.shapes
    )
    [entry] = report.batch_norms
    assert entry.folded == (also_fetched is None), str(report)
    feed = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    want = run_graph_def(frozen.graph_def, frozen.inputs, outputs, [feed])
    got = run_graph_def(optimized, frozen.inputs, outputs, [feed])
    for a, g in zip(want, got):
        assert rel_err(a, g) <= 1e-5
