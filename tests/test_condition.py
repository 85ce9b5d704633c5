"""The paper's condition (docs/folding.md §3-§5): backward folds, Add/Concat, leaves, pass-through
ops.

Each test builds the smallest tf.nn graph that shows one rule or one refusal, with random BN
statistics and biases, rewrites it, compares with the original on random inputs, and asserts
which layers absorbed each fold, in which direction (or why not).
"""

import numpy as np
import pytest
import tensorflow as tf

from helpers import assert_absorbed, bn_params, check_rewrite, decomposed_bn, make, the_entry
from helpers import fused_bn as bn

RNG = np.random.default_rng(1234)


def const(*shape, low=None, high=None):
    if low is not None:
        return tf.constant(RNG.uniform(low, high, shape).astype("float32"))
    return tf.constant(RNG.normal(size=shape).astype("float32"))


def stats(c, gamma=None):
    """``helpers.bn_params`` from this module's generator, γ > 0 unless given."""
    return bn_params(c, RNG, positive=True, gamma=gamma)


def rewrite(body, *shapes):
    return check_rewrite(make(body, *shapes), RNG)


# ---- backward -----------------------------------------------------------------------------------
def test_backward_into_valid_conv_with_shift_folds():
    p, w, b = stats(3), const(3, 3, 3, 5), const(5)
    folded = rewrite(lambda x: tf.nn.bias_add(tf.nn.conv2d(bn(x, p), w, 1, "VALID"), b), [8, 8, 3])
    assert_absorbed(folded, "backward", "Conv2D")


def test_backward_into_same_3x3_conv_keeps_the_shift():
    p, w = stats(3), const(3, 3, 3, 5)
    folded = rewrite(lambda x: tf.nn.conv2d(bn(x, p), w, 1, "SAME"), [8, 8, 3])
    entry = the_entry(folded)
    assert not entry.folded
    assert "padding" in entry.reason and entry.tried["backward"]


def test_backward_into_same_1x1_conv_folds_the_shift():
    p, w = stats(3), const(1, 1, 3, 5)
    folded = rewrite(lambda x: tf.nn.conv2d(bn(x, p), w, 2, "SAME"), [7, 7, 3])
    assert_absorbed(folded, "backward", "Conv2D")


def test_backward_scale_only_into_same_conv_folds():
    gamma, _, _, var = stats(3)
    folded = rewrite(lambda x: tf.nn.conv2d(x * gamma, const(3, 3, 3, 4), 1, "SAME"), [6, 6, 3])
    assert_absorbed(folded, "backward", "Conv2D")


def test_backward_into_depthwise_with_multiplier_3():
    p, w = stats(4), const(3, 3, 4, 3)
    folded = rewrite(
        lambda x: tf.nn.depthwise_conv2d(bn(x, p), w, [1, 1, 1, 1], "VALID"), [7, 7, 4]
    )
    assert_absorbed(folded, "backward", "DepthwiseConv2dNative")


@pytest.mark.parametrize("transpose_b", [False, True])
def test_backward_into_matmul(transpose_b):
    p = stats(6)
    w = const(4, 6) if transpose_b else const(6, 4)
    folded = rewrite(lambda x: tf.matmul(decomposed_bn(x, p), w, transpose_b=transpose_b), [6])
    assert_absorbed(folded, "backward", "MatMul")


def test_backward_through_flatten_into_dense():
    p, w = stats(3), const(4 * 4 * 3, 5)
    folded = rewrite(lambda x: tf.matmul(tf.reshape(bn(x, p), [-1, 48]), w), [4, 4, 3])
    assert_absorbed(folded, "backward", "MatMul")


def test_backward_into_every_consumer():
    p, w1, w2 = stats(3), const(1, 1, 3, 4), const(3, 5)
    folded = rewrite(
        lambda x: (
            tf.nn.conv2d(decomposed_bn(x, p), w1, 1, "VALID"),
            tf.matmul(tf.reduce_mean(decomposed_bn(x, p), [1, 2]), w2),
        ),
        [5, 5, 3],
    )
    report, nodes = folded.report, {n.name: n.op for n in folded.graph_def.node}
    assert len(report.batch_norms) == 2 and all(
        e.direction == "backward" and len(e.absorbed_by) == 1 for e in report.batch_norms
    ), str(report)
    assert sorted(nodes[e.absorbed_by[0]] for e in report.batch_norms) == ["Conv2D", "MatMul"]


def test_bn_feeding_conv_and_relu_is_refused():
    p, w = stats(3), const(1, 1, 3, 4)

    def body(x):
        y = bn(x, p)
        return tf.nn.conv2d(y, w, 1, "VALID"), tf.nn.relu(y)

    entry = the_entry(rewrite(body, [5, 5, 3]))
    assert not entry.folded
    assert "Relu" in entry.tried["backward"]


def test_backward_through_maxpool_needs_positive_scale():
    p, w = stats(3, gamma=[1.0, -0.5, 2.0]), const(1, 1, 3, 4)
    entry = the_entry(
        rewrite(
            lambda x: tf.nn.conv2d(tf.nn.max_pool2d(bn(x, p), 2, 2, "VALID"), w, 1, "VALID"),
            [6, 6, 3],
        )
    )
    assert not entry.folded and "MaxPool" in entry.reason


def test_backward_through_avgpool_and_concat_with_uneven_channels():
    p, w = stats(3), const(1, 1, 5, 4)

    def body(x, z):
        y = tf.nn.avg_pool2d(bn(x, p), 2, 2, "SAME")
        return tf.nn.conv2d(tf.concat([z, y], axis=-1), w, 1, "VALID")

    assert_absorbed(rewrite(body, [6, 6, 3], [3, 3, 2]), "backward", "Conv2D")


def test_backward_pad_blocks_the_shift():
    p, w = stats(3), const(3, 3, 3, 4)
    entry = the_entry(
        rewrite(
            lambda x: tf.nn.conv2d(
                tf.pad(bn(x, p), [[0, 0], [1, 1], [1, 1], [0, 0]]), w, 1, "VALID"
            ),
            [5, 5, 3],
        )
    )
    assert not entry.folded and "shift" in entry.reason


# ---- leaves -------------------------------------------------------------------------------------
def test_backward_through_add_with_a_leaf():
    p, w1, b1, w2 = stats(4), const(1, 1, 3, 4), const(4), const(1, 1, 4, 5)

    def body(x, z):
        leaf = tf.nn.bias_add(tf.nn.conv2d(z, w1, 1, "VALID"), b1)
        return tf.nn.conv2d(bn(x, p) + leaf, w2, 1, "VALID")

    folded = rewrite(body, [5, 5, 4], [5, 5, 3])
    entry = assert_absorbed(folded, "backward", "Conv2D")
    [conv1, conv2] = [n.name for n in folded.graph_def.node if n.op == "Conv2D"]
    assert entry.absorbed_by == [conv2] and entry.leaves == [conv1], entry


def test_leaf_with_zero_gamma_is_refused():
    p, w1, w2 = stats(4, gamma=[1.0, 0.0, 0.5, 2.0]), const(1, 1, 3, 4), const(1, 1, 4, 5)

    def body(x, z):
        return tf.nn.conv2d(bn(x, p) + tf.nn.conv2d(z, w1, 1, "VALID"), w2, 1, "VALID")

    entry = the_entry(rewrite(body, [5, 5, 4], [5, 5, 3]))
    assert not entry.folded and "zero" in entry.tried["backward"]


def test_add_with_a_nonlinear_operand_is_refused():
    p, w2 = stats(4), const(1, 1, 4, 5)

    def body(x, z):
        return tf.nn.conv2d(bn(x, p) + tf.math.sigmoid(z), w2, 1, "VALID")

    entry = the_entry(rewrite(body, [5, 5, 4], [5, 5, 4]))
    assert not entry.folded and "Sigmoid" in entry.tried["backward"]


# ---- forward through ops ------------------------------------------------------------------------
def test_forward_through_add_of_two_convs():
    p, w1, w2, b1 = stats(4), const(3, 3, 3, 4), const(1, 1, 3, 4), const(4)

    def body(x):
        return bn(
            tf.nn.bias_add(tf.nn.conv2d(x, w1, 1, "SAME"), b1) + tf.nn.conv2d(x, w2, 1, "SAME"), p
        )

    assert_absorbed(rewrite(body, [6, 6, 3]), "forward", "Conv2D", count=2)


def test_forward_through_concat_with_uneven_channels():
    p, w1, w2 = stats(7), const(3, 3, 3, 2), const(1, 1, 3, 5)

    def body(x):
        return bn(
            tf.concat([tf.nn.conv2d(x, w1, 1, "SAME"), tf.nn.conv2d(x, w2, 1, "SAME")], -1), p
        )

    assert_absorbed(rewrite(body, [6, 6, 3]), "forward", "Conv2D", count=2)


def test_forward_through_maxpool_with_negative_gamma_is_refused():
    p, w = stats(3, gamma=[1.0, -1.0, 0.5]), const(3, 3, 2, 3)
    entry = the_entry(
        rewrite(
            lambda x: bn(tf.nn.max_pool2d(tf.nn.conv2d(x, w, 1, "SAME"), 2, 2, "VALID"), p),
            [6, 6, 2],
        )
    )
    assert not entry.folded and "MaxPool" in entry.tried["forward"]


@pytest.mark.parametrize("pool", ["avg", "max", "mean"])
def test_forward_through_pools(pool):
    p, w, b = stats(3, gamma=[1.0, 0.3, 0.5]), const(3, 3, 2, 3), const(3)

    def body(x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
        if pool == "avg":
            y = tf.nn.avg_pool2d(y, 3, 2, "SAME")
        elif pool == "max":
            y = tf.nn.max_pool2d(y, 2, 2, "VALID")
        else:
            y = tf.reduce_mean(y, [1, 2], keepdims=True)
        return bn(y, p)

    assert_absorbed(rewrite(body, [7, 7, 2]), "forward", "Conv2D")


def test_forward_through_relu_with_shift_is_refused_forward():
    p, w = stats(3), const(3, 3, 2, 3)
    entry = the_entry(
        rewrite(lambda x: bn(tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME")), p), [6, 6, 2])
    )
    assert not entry.folded and "Relu" in entry.tried["forward"]


def test_conv_absorbs_bn_before_and_after():
    p1, p2, w = stats(3), stats(4), const(1, 1, 3, 4)
    folded = rewrite(lambda x: bn(tf.nn.conv2d(bn(x, p1), w, 1, "VALID"), p2), [5, 5, 3])
    [conv] = [n.name for n in folded.graph_def.node if n.op == "Conv2D"]
    report = folded.report
    assert sorted((e.direction, tuple(e.absorbed_by)) for e in report.batch_norms) == [
        ("backward", (conv,)),
        ("forward", (conv,)),
    ], str(report)


def test_backward_into_dilated_depthwise_keeps_the_shift_out_of_space_to_batch_padding():
    """A dilated SAME depthwise conv is SpaceToBatchND (zero padding) → depthwise → BatchToSpaceND:
    the scale folds backward, a shift must not."""
    w = const(3, 3, 3, 1)
    scale_only = rewrite(
        lambda x: tf.nn.depthwise_conv2d(
            x * const(3, low=0.5, high=2.0), w, [1, 1, 1, 1], "SAME", dilations=[2, 2]
        ),
        [8, 8, 3],
    )
    assert_absorbed(scale_only, "backward", "DepthwiseConv2dNative")
    p = stats(3)
    entry = the_entry(
        rewrite(
            lambda x: tf.nn.depthwise_conv2d(bn(x, p), w, [1, 1, 1, 1], "SAME", dilations=[2, 2]),
            [8, 8, 3],
        )
    )
    assert not entry.folded and "padding" in entry.tried["backward"]
