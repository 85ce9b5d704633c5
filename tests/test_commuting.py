"""Exact folds through ops that commute with A (docs/folding.md §8) and the forms that reach them
(issue 19 §1): Dense on rank-3/4 inputs (Tensordot), reshapes that merge positions into the
channel axis, nearest and bilinear resizes, Transpose moving the channel axis, SpaceToBatchND's
alignment padding, and the grouped Conv3D that Keras 3 leaves in an XLA call.

Every test compares the rewritten function with the original on random inputs (random BN
statistics, biases and γ signs) and asserts which layer absorbed what, or why not.
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
    const_value,
    decomposed_bn,
    make,
    nodes_of,
    randomise_keras_model,
    weight,
    weight_of,
)
from helpers import fused_bn as bn

RNG = np.random.default_rng(1919)


def rewrite(body, *shapes):
    return check_rewrite(make(body, *shapes), RNG)


def the_weight(folded, op: str) -> np.ndarray:
    [layer] = nodes_of(folded.graph_def, op)
    return weight_of(folded.graph_def, layer)


def dense(x, w, b):
    """Keras' Dense on a rank > 2 input: Tensordot (Reshape [-1, C] → MatMul → Reshape)."""
    return tf.tensordot(x, w, axes=[[x.shape.rank - 1], [0]]) + b


# ---- Dense on rank-3/4 inputs, and reshapes of the channel axis ---------------------------------
@pytest.mark.parametrize("shape", [[6, 8], [3, 4, 8]])
def test_backward_into_a_dense_layer_on_a_rank_3_or_4_input(shape):
    p, w, b = bn_params(8, RNG), weight((8, 5), RNG), bias(5, RNG)
    folded = rewrite(
        lambda x: dense(bn(x, p) if len(shape) == 3 else decomposed_bn(x, p), w, b), shape
    )
    assert_absorbed(folded, "backward", "MatMul")
    s, _ = bn_scale_shift(p)
    np.testing.assert_allclose(the_weight(folded, "MatMul"), w * s[:, None], rtol=1e-6)


def test_backward_through_a_reshape_that_merges_positions_into_the_channel_axis():
    """(4, 4, 8) → (4, 32): element j of the new last axis is channel j mod 8 (s tiled 4×)."""
    p, w, b = bn_params(8, RNG), weight((32, 5), RNG), bias(5, RNG)
    folded = rewrite(lambda x: dense(tf.reshape(bn(x, p), [-1, 4, 32]), w, b), [4, 4, 8])
    assert_absorbed(folded, "backward", "MatMul")
    s, _ = bn_scale_shift(p)
    np.testing.assert_allclose(the_weight(folded, "MatMul"), w * np.tile(s, 4)[:, None], rtol=1e-6)


def test_a_reshape_that_splits_the_channel_axis_is_refused():
    p, w = bn_params(8, RNG), weight((4, 5), RNG)
    folded = rewrite(
        lambda x: dense(tf.reshape(bn(x, p), [-1, 4, 4, 2, 4]), w, bias(5, RNG)), [4, 4, 8]
    )
    assert_not_folded(folded, "splits the channel axis")


def test_forward_through_a_reshape_that_splits_the_layer_channels():
    """conv (…, 8) → (…, 2, 4) → BN over 4: the conv's out-channel o gets s[o mod 4]."""
    p, w = bn_params(4, RNG), weight((1, 1, 3, 8), RNG)
    folded = rewrite(
        lambda x: bn(tf.reshape(tf.nn.conv2d(x, w, 1, "VALID"), [-1, 5, 10, 4]), p), [5, 5, 3]
    )
    assert_absorbed(folded, "forward", "Conv2D")
    s, _ = bn_scale_shift(p)
    np.testing.assert_allclose(the_weight(folded, "Conv2D"), w * np.tile(s, 2), rtol=1e-6)


def test_forward_through_a_reshape_that_merges_positions_is_refused():
    """conv (…, 4) → (…, 8), a BN over 8: its scale differs within what was one conv channel."""
    p, w = bn_params(8, RNG), weight((1, 1, 3, 4), RNG)
    folded = rewrite(
        lambda x: decomposed_bn(tf.reshape(tf.nn.conv2d(x, w, 1, "VALID"), [-1, 4, 8]), p),
        [4, 4, 3],
    )
    entry = assert_not_folded(folded)
    assert "merges positions into A's channel axis" in entry.tried["forward"], entry


def test_dense_then_transpose_then_a_channels_first_bn():
    """A PyTorch port: Dense → Permute((2, 1)) → BatchNormalization(axis=1)."""
    p, w, b = bn_params(6, RNG), weight((3, 6), RNG), bias(6, RNG)
    gamma, beta, mean, var = (v.reshape(6, 1) for v in p)
    folded = rewrite(
        lambda x: tf.nn.batch_normalization(
            tf.transpose(dense(x, w, b), [0, 2, 1]), mean, var, beta, gamma, 1e-3
        ),
        [10, 3],
    )
    assert_absorbed(folded, "forward", "MatMul")
    s, _ = bn_scale_shift(p)
    np.testing.assert_allclose(the_weight(folded, "MatMul"), w * s, rtol=1e-6)


# ---- resizes -------------------------------------------------------------------------------------
def nearest_by_tile(y):
    """Keras 3's UpSampling2D: ExpandDims → Tile → Reshape, per spatial axis."""
    _, h, w, c = [-1 if d is None else d for d in y.shape]
    y = tf.reshape(tf.tile(tf.expand_dims(y, 2), [1, 1, 2, 1, 1]), [-1, 2 * h, w, c])
    return tf.reshape(tf.tile(tf.expand_dims(y, 3), [1, 1, 1, 2, 1]), [-1, 2 * h, 2 * w, c])


RESIZES = {
    "tile": nearest_by_tile,
    "nearest": lambda y: tf.image.resize(y, [10, 10], method="nearest"),
    "bilinear": lambda y: tf.image.resize(y, [7, 9], method="bilinear"),
}


@pytest.mark.parametrize("resize", sorted(RESIZES))
def test_forward_through_a_resize(resize):
    p, w, b = bn_params(4, RNG), weight((3, 3, 3, 4), RNG), bias(4, RNG)
    folded = rewrite(
        lambda x: bn(RESIZES[resize](tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "VALID"), b)), p),
        [7, 7, 3],
    )
    assert_absorbed(folded, "forward", "Conv2D")
    np.testing.assert_allclose(the_weight(folded, "Conv2D"), w * bn_scale_shift(p)[0], rtol=1e-6)


@pytest.mark.parametrize("resize", sorted(RESIZES))
def test_backward_through_a_resize_with_the_shift(resize):
    p, w = bn_params(3, RNG), weight((3, 3, 3, 4), RNG)
    folded = rewrite(lambda x: tf.nn.conv2d(RESIZES[resize](bn(x, p)), w, 1, "VALID"), [5, 5, 3])
    assert_absorbed(folded, "backward", "Conv2D")
    np.testing.assert_allclose(
        the_weight(folded, "Conv2D"), w * bn_scale_shift(p)[0][:, None], rtol=1e-6
    )


def test_a_tile_of_the_channel_axis_is_refused():
    p, w = bn_params(3, RNG), weight((1, 1, 6, 4), RNG)
    folded = rewrite(
        lambda x: tf.nn.conv2d(tf.tile(bn(x, p), [1, 1, 1, 2]), w, 1, "VALID"), [5, 5, 3]
    )
    entry = assert_not_folded(folded)
    assert "Tile repeats the channel axis" in entry.tried["backward"], entry


# ---- SpaceToBatchND's alignment padding ----------------------------------------------------------
def test_backward_into_a_dilated_valid_depthwise_whose_padding_is_cropped():
    """9×9, rate 2: SpaceToBatchND pads one row and column at the end, BatchToSpaceND crops the
    outputs that read them: the shift folds (into the layer's bias)."""
    p, w = bn_params(3, RNG), weight((3, 3, 3, 1), RNG)
    folded = rewrite(
        lambda x: tf.nn.depthwise_conv2d(bn(x, p), w, [1, 1, 1, 1], "VALID", dilations=[2, 2]),
        [9, 9, 3],
    )
    assert "SpaceToBatchND" in folded.report.ops_before
    assert_absorbed(folded, "backward", "DepthwiseConv2dNative")
    s, t = bn_scale_shift(p)
    np.testing.assert_allclose(
        the_weight(folded, "DepthwiseConv2dNative"), w * s[:, None], rtol=1e-6
    )
    [bias_add] = nodes_of(folded.graph_def, "BiasAdd")  # the shift, W ⊛ t: no padding read
    np.testing.assert_allclose(
        const_value(folded.graph_def, bias_add.input[1]),
        np.einsum("hwcm,c->cm", w.astype(np.float64), t).reshape(-1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_space_to_batch_padding_that_is_not_cropped_still_blocks_the_shift():
    """The same ops by hand, with a crop that keeps outputs reading the padded zeros."""
    p, w = bn_params(3, RNG), weight((3, 3, 3, 1), RNG)

    def body(x):
        y = tf.space_to_batch_nd(bn(x, p), [2, 2], [[0, 1], [0, 1]])
        y = tf.nn.depthwise_conv2d(y, w, [1, 1, 1, 1], "VALID")
        return tf.batch_to_space(y, [2, 2], [[0, 0], [0, 0]])

    entry = assert_not_folded(check_rewrite(make(body, [9, 9, 3]), RNG, partial=False))
    assert "padding" in entry.tried["backward"], entry


# ---- the grouped Conv3D of Keras 3, in an XLA call that stays ------------------------------------
def grouped_conv3d(bn_after: bool):
    K = pytest.importorskip("keras")
    inp = K.Input((4, 6, 6, 4))
    if bn_after:
        out = K.layers.BatchNormalization(name="g3_bn")(
            K.layers.Conv3D(4, 3, groups=2, name="g3")(inp)
        )
    else:
        out = K.layers.Conv3D(4, 1, groups=2, name="g3")(
            K.layers.BatchNormalization(name="g3_bn")(inp)
        )
    model = K.Model(inp, out)
    randomise_keras_model(model, RNG)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 4, 6, 6, 4], tf.float32)
    )
    return model, check_rewrite(fn, RNG)


@pytest.mark.parametrize("bn_after", [True, False])
def test_grouped_conv3d_in_an_xla_call_takes_the_fold_through_its_kernel_argument(bn_after):
    """The call stays (TensorFlow's CPU Conv3D has no groups) and a note says why; the batch
    norm folds into the call's kernel argument (its out axis forward, the grouped in axis
    backward), its shift into a bias after the call (forward) or the layer's bias (backward)."""
    model, folded = grouped_conv3d(bn_after)
    if "StatefulPartitionedCall" not in folded.report.ops_before:
        pytest.skip("this Keras version runs grouped Conv3D without a nested call")
    entry = assert_absorbed(
        folded, "forward" if bn_after else "backward", "StatefulPartitionedCall"
    )
    assert "g3" in entry.absorbed_by[0]
    assert any("Conv3D" in note and "XLA" in note for note in folded.report.notes)
    [call] = nodes_of(folded.graph_def, "StatefulPartitionedCall")
    kernel = model.get_layer("g3").kernel.numpy()
    bn_layer = model.get_layer("g3_bn")
    s = bn_layer.gamma.numpy() / np.sqrt(bn_layer.moving_variance.numpy() + bn_layer.epsilon)
    # backward, grouped: filter in-index j of output o reads data channel (o // 2) · 2 + j
    want = kernel * s if bn_after else kernel * s[np.array([[0, 0, 2, 2], [1, 1, 3, 3]])]
    np.testing.assert_allclose(call_kernel(folded, call), want, rtol=1e-5)


def call_kernel(folded, call) -> np.ndarray:
    """The constant the call reads as an argument (through Identity)."""
    nodes = {n.name: n for n in folded.graph_def.node}
    for tensor in call.input:
        while nodes[tensor].op == "Identity":
            tensor = nodes[tensor].input[0]
        if nodes[tensor].op == "Const":
            return tf.make_ndarray(nodes[tensor].attr["value"].tensor)
    raise AssertionError("the call reads no constant")
