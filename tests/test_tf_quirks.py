"""TensorFlow miscomputes some graphs a fold can create (issue 17, item 2): the table of known
miscompilations stays true (each entry's pure-TensorFlow reproduction still fails on the releases
it names), the rewrite never emits such a pattern where the fold made it, and the workaround
survives Grappler: every comparison here runs the folded function as TensorFlow runs it
(``tf.function``, a loaded SavedModel), never only the GraphDef's shape."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.convert.rewrite import optimize_graph_def
from graphfold.fold import tf_quirks

from helpers import (
    assert_close,
    bias,
    bn_params,
    check_rewrite,
    const_value,
    decomposed_bn,
    make,
    nodes_of,
    op_counts,
    random_inputs,
    rel_err,
    run_graph_def,
    weight,
)
from helpers import fused_bn as bn

MISCOMPUTED = 1e-2  # a reproduction's error above this: TensorFlow still miscomputes it


def _release() -> str:
    return ".".join(tf.__version__.split(".")[:2])


@pytest.mark.parametrize(
    "quirk, op",
    [(q, op) for q in tf_quirks.QUIRKS for op in q.ops],
    ids=lambda v: getattr(v, "name", v),
)
def test_the_table_is_true_for_this_tensorflow(quirk, op):
    """The reproduction (no graphfold in it) still miscomputes on the releases the entry names;
    when a release fixes it, or a release not in the table runs, this fails and says what to
    update."""
    error = quirk.reproduce(op)
    release = _release()
    if release in quirk.known_on:
        assert error > MISCOMPUTED, (
            f"TensorFlow {tf.__version__} no longer miscomputes {quirk.name} with {op} "
            f"(relative error {error:.3g}): update graphfold/fold/tf_quirks.py (record the release "
            f"that fixed it; keep the workaround while older releases may serve the artifact)"
        )
    else:
        pytest.fail(
            f"TensorFlow {release} is not in {quirk.name}'s known_on "
            f"{quirk.known_on}: its reproduction with {op} gives relative error "
            f"{error:.3g} ({'still miscomputed' if error > MISCOMPUTED else 'fixed'}): "
            f"record that in graphfold/fold/tf_quirks.py"
        )


# ---- the workaround where the fold makes the pattern ------------------------------------------


def _residual_leaky(rng, conv: str, form: str, alpha: float = 0.01):
    """``leaky_relu(BN(conv(x)) + conv2(x), alpha)``: after the fold, ``conv -> BiasAdd -> AddV2
    -> LeakyRelu``; ``conv2`` (no bias) is the residual operand."""
    c = 8
    if conv == "Conv2D":
        w, w2 = weight((3, 3, 4, c), rng), weight((1, 1, 4, c), rng)
        layer = lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")
        shape = [6, 6, 4]
    else:
        w, w2 = weight((3, 3, 3, 4, c), rng), weight((1, 1, 1, 4, c), rng)
        layer = lambda x, k: tf.nn.conv3d(x, k, [1] * 5, "SAME")
        shape = [4, 6, 6, 4]
    p = bn_params(c, rng)
    norm = bn if form == "fused" and conv == "Conv2D" else decomposed_bn

    def body(x):
        return tf.nn.leaky_relu(norm(layer(x, w), p) + layer(x, w2), alpha=alpha)

    return make(body, shape)


@pytest.mark.parametrize(
    "conv, form", [("Conv2D", "fused"), ("Conv2D", "decomposed"), ("Conv3D", "decomposed")]
)
def test_a_pattern_the_fold_makes_is_written_so_that_tensorflow_computes_it_right(conv, form):
    rng = np.random.default_rng(17)
    fn = _residual_leaky(rng, conv, form)
    folded = check_rewrite(fn, rng)  # run as a tf.function: Grappler has had its say
    counts = op_counts(folded.graph_def)
    assert (
        counts[conv] == 2
        and "BiasAdd" not in counts
        and not nodes_of(folded.graph_def, "FusedBatchNormV3")
    )
    assert folded.report.verification.status == "ok"
    assert any("made by the fold" in n and "AddV2" in n for n in folded.report.notes)


def test_alpha_0_2_is_what_the_fused_kernel_computes_and_is_left_fused():
    rng = np.random.default_rng(3)
    folded = check_rewrite(_residual_leaky(rng, "Conv2D", "fused", alpha=0.2), rng)
    assert op_counts(folded.graph_def)["BiasAdd"] == 1
    assert not any("LeakyRelu" in n for n in folded.report.notes)


def test_a_pattern_the_original_already_has_is_left_as_it_is_and_noted():
    """No batch norm between: the original itself is miscomputed by this TensorFlow, and the
    result must compute what the original computes (on this TensorFlow, the same wrong values):
    the BiasAdd stays, and the report says why."""
    rng = np.random.default_rng(5)
    w, w2, b, p = (
        weight((1, 1, 4, 8), rng),
        weight((1, 1, 4, 8), rng),
        bias(8, rng),
        bn_params(4, rng, positive=True),
    )

    def body(x):
        y = tf.nn.relu(bn(x, p))  # a batch norm elsewhere, folded
        return tf.nn.leaky_relu(
            tf.nn.bias_add(tf.nn.conv2d(y, w, 1, "VALID"), b) + tf.nn.conv2d(y, w2, 1, "VALID"),
            alpha=0.01,
        )

    fn = make(body, [5, 5, 4])
    folded = check_rewrite(fn, rng)
    assert op_counts(folded.graph_def)["BiasAdd"] == 1
    assert any("already in the original" in n for n in folded.report.notes)
    # and the original really is miscomputed here (the reason to keep it): eager differs
    x = random_inputs(fn, rng)[0][0]
    if _release() in tf_quirks.LEAKY_RELU_FUSION.known_on:
        assert rel_err(body(x), fn(x)) > MISCOMPUTED


def test_the_workaround_survives_a_saved_model_round_trip(tmp_path):
    rng = np.random.default_rng(11)
    fn = _residual_leaky(rng, "Conv2D", "decomposed")
    module = tf.Module()
    module.f = graphfold.rewrite(fn).function
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.f})
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    x = random_inputs(fn, rng)[0][0]
    assert rel_err(fn(x), loaded.signatures["serving_default"](x=x)["output_0"]) <= 1e-5


def test_channels_first_bias_becomes_a_c11_constant():
    """NCHW: a BiasAdd's [C] bias is along axis 1; an AddV2 needs it as [C, 1, 1]. CPU cannot run
    NCHW convolutions: the result runs through the NHWC twin (as TensorFlow would, Grappler
    included) against the original's twin."""
    from helpers import nhwc_twin

    rng = np.random.default_rng(23)
    w, w2, p = weight((1, 1, 4, 6), rng), weight((1, 1, 4, 6), rng), bn_params(6, rng)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 4, 5, 7], name="x")
        y = bn(tf.nn.conv2d(x, w, 1, "VALID", data_format="NCHW"), p, data_format="NCHW")
        side = tf.nn.conv2d(x, w2, 1, "VALID", data_format="NCHW")
        tf.identity(tf.nn.leaky_relu(y + side, alpha=0.01), name="y")
    original = graph.as_graph_def()
    optimized, report = optimize_graph_def(original, ["x"], ["y"])
    [add] = [
        n
        for n in optimized.node
        if n.op == "AddV2" and const_value_or_none(optimized, n.input[1]) is not None
    ]
    assert const_value(optimized, add.input[1]).shape == (6, 1, 1)
    assert "BiasAdd" not in op_counts(optimized)
    feed = rng.normal(size=(2, 4, 5, 7)).astype("float32")
    want = run_graph_def(nhwc_twin(original), ["x"], ["y"], [feed])[0]
    got = run_graph_def(nhwc_twin(optimized), ["x"], ["y"], [feed])[0]
    assert rel_err(want, got) <= 1e-5


def const_value_or_none(graph_def, tensor):
    node = {n.name: n for n in graph_def.node}[tensor.split(":")[0]]
    return const_value(graph_def, node.name) if node.op == "Const" else None


# ---- a Keras 3 CSPNet-like model: issue 17's keras-hub CSPNet, small ----------------------------


def test_keras3_cspnet_like_block_with_leaky_relu_0_01():
    """conv -> BN -> residual add -> LeakyReLU(0.01) (keras-hub CSPNet's block): before the
    workaround, the folded function was 1e-1 off the original when run (its GraphDef was right)."""
    import keras

    from graphfold import examples

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.LeakyReLU(negative_slope=0.01)(x)
    for _ in range(2):
        y = keras.layers.Conv2D(8, 1, use_bias=False)(x)
        y = keras.layers.BatchNormalization()(y)
        y = keras.layers.LeakyReLU(negative_slope=0.01)(y)
        y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(y)
        y = keras.layers.BatchNormalization()(y)
        x = keras.layers.LeakyReLU(negative_slope=0.01)(keras.layers.Add()([x, y]))
    model = keras.Model(inputs, x)
    examples.randomise(model, np.random.default_rng(0))
    fn = examples.concrete(model, (16, 16, 3))
    folded = graphfold.rewrite(fn)
    assert len(folded.report.folded) == 5 == len(folded.report.batch_norms)
    assert "FusedBatchNormV3" not in op_counts(folded.graph_def)
    assert_close(fn, folded, random_inputs(fn, np.random.default_rng(1), batch=2))
    assert folded.report.verification.max_rel <= 1e-5
