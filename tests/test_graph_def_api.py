"""``optimize_graph_def`` on TF1-style frozen graphs, as a user holding a ``.pb`` calls it.

Every name the caller fetches (an output on a layer, on its bias, on a batch norm) computes what
it computed before, whatever was folded into or after it; shapes are inferred from the graph when
not given (a placeholder of unknown shape may be given one); bad names are clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold

from helpers import bias, bn_params, rel_err, run_graph_def, weight

EPS = 1e-3


def fused(y, p, name):
    gamma, beta, mean, var = (tf.constant(v) for v in p)
    return tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=gamma,
        offset=beta,
        mean=mean,
        variance=var,
        epsilon=EPS,
        is_training=False,
        name=name,
    )[0]


def tf1_graph(build, shape=(None, 8, 8, 4)):
    """A TF1-style frozen GraphDef: ``build(x)`` on a placeholder ``x``."""
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, shape, name="x")
        build(x)
    return graph.as_graph_def()


def compare(graph_def, optimized, outputs, feed_shape=(2, 8, 8, 4), seed=0):
    """Every requested output of ``optimized`` equals the original's (relative error)."""
    feed = np.random.default_rng(seed).normal(size=feed_shape).astype(np.float32)
    want = run_graph_def(graph_def, ["x"], outputs, [feed])
    got = run_graph_def(optimized, ["x"], outputs, [feed])
    errors = [rel_err(a, g) for a, g in zip(want, got)]
    assert max(errors) <= 1e-5, dict(zip(outputs, errors))
    return errors


@pytest.fixture
def rng():
    return np.random.default_rng(20261202)


def test_backward_fold_into_a_fetched_layer_keeps_its_value(rng):
    """The issue's case: BN -> VALID 1x1 Conv2D named ``conv``, fetched by name. The backward
    fold moves the shift into a BiasAdd after the conv: the name ``conv`` must still give the
    conv's original output (it gave a relative error of 0.37)."""
    p, w = bn_params(4, rng), weight((1, 1, 4, 6), rng)
    graph_def = tf1_graph(lambda x: tf.nn.conv2d(fused(x, p, "bn"), w, 1, "VALID", name="conv"))
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], ["conv"])
    (entry,) = report.batch_norms
    assert entry.folded and entry.direction == "backward" and entry.absorbed_by == ["conv"]
    compare(graph_def, optimized, ["conv"])
    nodes = {n.name: n for n in optimized.node}
    assert nodes["conv"].op == "BiasAdd"  # the fetched name: conv + W ⊛ t
    assert nodes[nodes["conv"].input[0]].op == "Conv2D"
    assert not any(n.op == "FusedBatchNormV3" for n in optimized.node)


@pytest.mark.parametrize(
    "fetch",
    [
        ("conv",),
        ("conv", "bias"),
        ("bias",),
        ("bn",),
        ("bn", "conv"),
        ("bn", "bias"),
        ("conv2",),
        ("bn2", "conv2"),
        ("conv", "bias", "bn", "conv2", "bn2"),
    ],
)
def test_any_fetched_layer_bias_or_batch_norm_stays_exact(rng, fetch):
    """conv -> bias -> BN (forward) -> conv2 (VALID 1x1) -> BN2 (forward) ... and BN before conv2
    backward: whichever of the nodes are fetched, each computes what it did before; what can
    still fold, folds."""
    w, b, p = weight((3, 3, 4, 5), rng), bias(5, rng), bn_params(5, rng)
    w2, p2 = weight((1, 1, 5, 3), rng), bn_params(3, rng)

    def build(x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME", name="conv"), b, name="bias")
        y = fused(y, p, "bn")
        y = tf.nn.conv2d(y, w2, 1, "VALID", name="conv2")
        tf.identity(fused(y, p2, "bn2"), name="out")

    graph_def = tf1_graph(build)
    outputs = list(fetch) + ["out"]
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], outputs)
    compare(graph_def, optimized, outputs)
    assert len(report.batch_norms) == 2
    for entry in report.not_folded:
        assert entry.reason
    bn, bn2 = report.entry("bn"), report.entry("bn2")
    if "bn" in fetch:  # its output is fetched: backward is refused
        assert not bn.folded or bn.direction == "forward"
    if not {"conv", "bias", "bn"} & set(fetch):
        assert bn.folded and bn.direction == "forward" and bn.absorbed_by == ["conv"]
    if not {"conv2", "bn2"} & set(fetch):
        assert bn2.folded and bn2.direction == "forward" and bn2.absorbed_by == ["conv2"]


def test_fetched_layer_after_a_forward_fold_is_refused_not_changed(rng):
    """A layer whose own output is fetched cannot absorb a batch norm after it: the fold is
    refused with the reason, and both names stay exact."""
    w, p = weight((3, 3, 4, 5), rng), bn_params(5, rng)
    graph_def = tf1_graph(lambda x: fused(tf.nn.conv2d(x, w, 1, "SAME", name="conv"), p, "bn"))
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], ["conv", "bn"])
    (entry,) = report.batch_norms
    assert not entry.folded and "function output" in entry.tried["forward"], str(report)
    compare(graph_def, optimized, ["conv", "bn"])


def test_fetched_bias_then_backward_shift_into_a_matmul(rng):
    """Dense layers: BN (decomposed) before a MatMul whose output and BiasAdd are both fetched."""
    w, b = weight((6, 4), rng), bias(4, rng)
    gamma, beta, mean, var = bn_params(6, rng)

    def build(x):
        y = tf.nn.batch_normalization(x, mean, var, beta, gamma, EPS)
        tf.nn.bias_add(tf.matmul(y, w, name="dense"), b, name="dense_bias")

    graph_def = tf1_graph(build, shape=(None, 6))
    outputs = ["dense", "dense_bias"]
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], outputs)
    (entry,) = report.batch_norms
    assert entry.folded and entry.direction == "backward" and entry.absorbed_by == ["dense"]
    compare(graph_def, optimized, outputs, feed_shape=(3, 6))


def test_shapes_are_inferred_when_not_given(rng):
    """``optimize_graph_def(graph_def, inputs, outputs)``: no shapes argument, folds as with."""
    w, p = weight((3, 3, 4, 5), rng), bn_params(5, rng)
    graph_def = tf1_graph(
        lambda x: tf.identity(fused(tf.nn.conv2d(x, w, 1, "SAME"), p, "bn"), name="y")
    )
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], ["y"])
    assert len(report.folded) == 1, str(report)
    compare(graph_def, optimized, ["y"])


def test_a_placeholder_of_unknown_shape_takes_a_given_shape(rng):
    """A placeholder of unknown rank: the decomposed batch norm on it cannot be read as
    per-channel (which axis?): listed, not folded, with the reason; giving the placeholder's
    shape makes it fold (backward, into the 1x1 conv)."""
    w = weight((1, 1, 4, 5), rng)
    gamma, beta, mean, var = bn_params(4, rng)

    def build(x):
        y = tf.nn.batch_normalization(x, mean, var, beta, gamma, EPS)
        tf.identity(tf.nn.conv2d(y, w, 1, "VALID"), name="y")

    graph_def = tf1_graph(build, shape=None)
    optimized, report = graphfold.optimize_graph_def(graph_def, ["x"], ["y"])
    (entry,) = report.batch_norms
    assert not entry.folded and "shape" in entry.reason and "unknown" in entry.reason, str(report)
    compare(graph_def, optimized, ["y"])

    optimized, report = graphfold.optimize_graph_def(
        graph_def, ["x"], ["y"], {"x": (None, 8, 8, 4)}
    )
    (entry,) = report.batch_norms
    assert entry.folded and entry.direction == "backward", str(report)
    compare(graph_def, optimized, ["y"])


@pytest.mark.parametrize(
    "inputs, outputs, message",
    [
        (["nope"], ["y"], "input 'nope' is not a node"),
        (["w"], ["y"], "not a placeholder"),
        (["x"], ["nope"], "output 'nope'"),
    ],
)
def test_bad_names_are_clear_errors(rng, inputs, outputs, message):
    w = weight((1, 1, 4, 5), rng)

    def build(x):
        tf.nn.conv2d(x, tf.constant(w, name="w"), 1, "VALID", name="y")

    graph_def = tf1_graph(build)
    before = graph_def.SerializeToString()
    with pytest.raises(ValueError, match=message):
        graphfold.optimize_graph_def(graph_def, inputs, outputs)
    assert graph_def.SerializeToString() == before


def test_the_caller_graph_def_is_not_modified(rng):
    w, p = weight((1, 1, 4, 6), rng), bn_params(4, rng)
    graph_def = tf1_graph(lambda x: tf.nn.conv2d(fused(x, p, "bn"), w, 1, "VALID", name="conv"))
    before = graph_def.SerializeToString(deterministic=True)
    graphfold.optimize_graph_def(graph_def, ["x"], ["conv"])
    assert graph_def.SerializeToString(deterministic=True) == before
