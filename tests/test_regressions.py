"""Regression tests: every bug the differential fuzzer found (``tools/fuzz.py``), and the bug
classes other folding tools shipped, each as the smallest graph that triggers it.

Every test rewrites, compares with the original on random inputs (relative error <= 1e-5), and
asserts what was folded or why not. The seeds named are those of ``tests/graphgen.py`` that fail
with the core as of commit a584384: ``tools/fuzz.py --n 1000 --seed 0`` failed on 142 of 1000
graphs (102 ``k * x``, 30 process aborts, 7 Sub biases, 2 sink-and-leaf layers, 1 bias after a
Concat); with the fixes, none of 4000 fails (docs/reliability.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold

from helpers import (
    assert_absorbed,
    assert_close,
    bias,
    bn_params,
    bn_scale_shift,
    check_rewrite,
    decomposed_bn,
    make,
    nodes_of,
    op_counts,
    random_inputs,
    the_entry,
    weight,
    weight_of,
)
from helpers import fused_bn as bn


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


# ---- found by the fuzzer -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before_conv", "after_conv"])
def test_fuzz_constant_first_operand_k_times_x(rng, where):
    """Seeds 2, 9, 14, 20, 24, ... (rank errors at import): ``k * x`` has its variable operand
    second, but A's input was taken to be operand 0, the constant; the conv then read ``k``."""
    w, k = weight((1, 1, 3, 4), rng), rng.uniform(0.5, 1.5, 3).astype("float32")
    k4 = rng.uniform(0.5, 1.5, 4).astype("float32")
    if where == "before_conv":
        body = lambda x: tf.nn.conv2d(k * x, w, 1, "VALID")
    else:
        body = lambda x: k4 * tf.nn.conv2d(x, w, 1, "VALID")
    folded = check_rewrite(make(body, [4, 4, 3]), rng)
    assert_absorbed(folded, "backward" if where == "before_conv" else "forward", "Conv2D")
    assert "Mul" not in op_counts(folded.graph_def)


def test_fuzz_constant_first_operand_left_as_multiply_add(rng):
    """The same bug, unfolded: ``(k - x) * k`` left as a multiply-add computed ``k * s + t``."""
    k = rng.uniform(0.5, 1.5, 3).astype("float32")
    folded = check_rewrite(make(lambda x: (k - x) * k, [4, 4, 3]), rng)
    assert not any(e.folded for e in folded.report.entries)


def test_fuzz_constant_first_operand_silently_wrong(rng):
    """Seeds 645, 674: ``BN(k + x) + x``: the unfolded A computed ``k * s + t``, shape [C], and
    the Add broadcast it back to [N, H, W, C]: no error, wrong values."""
    k, p = bias(3, rng), bn_params(3, rng)
    folded = check_rewrite(make(lambda x: decomposed_bn(k + x, p) + x, [4, 4, 3]), rng)
    assert not the_entry(folded.report).folded


def test_fuzz_sub_bias_on_the_forward_path(rng):
    """Seeds 155, 166, 235, 321, 391, 638, 931: conv → ``y - b`` → AvgPool (or Identity, Mean,
    MaxPool) → BN. The shift t went into ``b`` as ``s·b + t``; for ``y - b`` it is ``s·b − t``."""
    w, b, p = weight((1, 1, 3, 4), rng), bias(4, rng), bn_params(4, rng)
    folded = check_rewrite(
        make(
            lambda x: bn(tf.nn.avg_pool2d(tf.nn.conv2d(x, w, 1, "VALID") - b, 2, 2, "VALID"), p),
            [4, 4, 3],
        ),
        rng,
    )
    assert_absorbed(folded, "forward", "Conv2D")
    assert "Sub" in op_counts(folded.graph_def)  # the bias stays a Sub, rewritten


@pytest.mark.parametrize("junction", ["add", "concat"])
def test_fuzz_bias_after_add_or_concat(rng, junction):
    """Seed 942 (Concat; the Add case found reading the planner): ``(conv1 ⊕ conv2) + b`` →
    Identity → BN. The bias below the junction was written once per root: the last write won
    (Add: t lost) or the shapes did not match (Concat: ValueError)."""
    w1, w2 = weight((1, 1, 3, 4), rng), weight((3, 3, 3, 4), rng)
    c = 8 if junction == "concat" else 4
    b, p = bias(c, rng), bn_params(c, rng)

    def body(x):
        y1, y2 = tf.nn.conv2d(x, w1, 1, "SAME"), tf.nn.conv2d(x, w2, 1, "SAME")
        y = y1 + y2 if junction == "add" else tf.concat([y1, y2], -1)
        return bn(tf.identity(tf.nn.bias_add(y, b)), p)

    folded = check_rewrite(make(body, [5, 5, 3]), rng)
    assert_absorbed(folded, "forward", "Conv2D", count=2)


def test_bias_between_relu_and_bn_takes_the_shift(rng):
    """With the fix above the bias nearest A absorbs t: conv → Relu → ``+ b`` → Identity → BN
    (γ > 0) now folds (Relu only sees s), exactly."""
    w, b, p = weight((3, 3, 3, 4), rng), bias(4, rng), bn_params(4, rng, positive=True)
    folded = check_rewrite(
        make(
            lambda x: bn(tf.identity(tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME")) + b), p), [5, 5, 3]
        ),
        rng,
    )
    assert_absorbed(folded, "forward", "Conv2D")


def test_fuzz_layer_both_sink_and_leaf(rng):
    """Seeds 531, 661: ``y = BN(x); L(y + P(y))``. P reads A's output
    (a sink: W ⊙_in s) and feeds the Add (a leaf: W ⊙_out 1/s); both writes were computed from
    the original weight and the last one won. Refused."""
    p, wp, wl = bn_params(5, rng), weight((5, 5), rng), weight((5, 3), rng)

    def body(x):
        y = decomposed_bn(x, p)
        return tf.matmul(tf.matmul(y, wp) + y, wl)

    folded = check_rewrite(make(body, [5]), rng)
    entry = the_entry(folded.report)
    assert not entry.folded
    assert "leaf" in entry.tried["backward"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_fuzz_explicit_depthwise_gets_no_new_bias(rng, direction):
    """Seeds 4, 18, 45, 86, 180, ...: the process aborted (``CHECK`` in tensor_format.h). TF's
    oneDNN remapper crashes on DepthwiseConv2dNative(padding=EXPLICIT) → BiasAdd, and a forward
    fold of a BN with a shift inserted exactly that BiasAdd. Refused; the structure is asserted
    before the folded function is called, so a regression fails here instead of aborting."""
    w, p = weight((3, 3, 3, 1), rng), bn_params(3, rng)
    pads = [0, 0, 1, 1, 1, 0, 0, 0] if direction == "forward" else [0] * 8

    def depthwise(x):
        return tf.raw_ops.DepthwiseConv2dNative(
            input=x, filter=w, strides=[1, 1, 1, 1], padding="EXPLICIT", explicit_paddings=pads
        )

    def body(x):  # backward: zero explicit pads, so the shift could fold into a new bias
        return bn(depthwise(x), p) if direction == "forward" else depthwise(bn(x, p))

    fn = make(body, [6, 6, 3])
    folded = check_rewrite(fn, rng, run=False)
    entry = the_entry(folded.report)
    assert not entry.folded and "EXPLICIT" in entry.reason
    (dw,) = nodes_of(folded.graph_def, "DepthwiseConv2dNative")
    readers = [n.op for n in folded.graph_def.node if dw.name in n.input]
    assert "BiasAdd" not in readers and "AddV2" not in readers and "Add" not in readers
    assert_close(fn, folded, random_inputs(fn, rng))


def test_fuzz_partial_fold_puts_no_add_after_an_explicit_depthwise(rng):
    """Seeds 40603, 40792 (process abort, ``tensor_format.h:428``): the forward fold of
    ``DepthwiseConv2dNative(EXPLICIT) → Identity → BN`` is refused (no bias after such a layer),
    and a partial fold kept the shift as an ``AddV2`` after the Identity, which Grappler removes:
    the oneDNN remapper aborted on depthwise → add. The partial fold is refused too."""
    w, p = weight((3, 3, 3, 1), rng), bn_params(3, rng, positive=True)

    def body(x):
        y = tf.raw_ops.DepthwiseConv2dNative(
            input=x,
            filter=w,
            strides=[1, 1, 1, 1],
            padding="EXPLICIT",
            explicit_paddings=[0, 0, 1, 1, 1, 0, 0, 0],
        )
        return bn(tf.identity(y), p)

    fn = make(body, [6, 6, 3])
    folded = check_rewrite(fn, rng, run=False)
    entry = the_entry(folded.report)
    assert not entry.folded and not entry.partial and "EXPLICIT" in entry.reason, entry
    (dw,) = nodes_of(folded.graph_def, "DepthwiseConv2dNative")
    readers = [n for n in folded.graph_def.node if dw.name in n.input]
    readers += [
        m for n in readers if n.op == "Identity" for m in folded.graph_def.node if n.name in m.input
    ]
    assert not [n.op for n in readers if n.op in ("BiasAdd", "AddV2", "Add")], readers
    assert_close(fn, folded, random_inputs(fn, rng))


@pytest.mark.parametrize("axis", ["channel", "batch", "spatial"])
def test_no_batch_or_channel_pad_left_next_to_a_conv(rng, axis):
    """Found investigating seeds 4960, 6110, 6634 (whose original graphs fail to run):
    TensorFlow's oneDNN build fuses ``Pad → Conv2D`` and drops a padding of the batch or channel
    axis. A backward fold of ``Pad → BN → Conv2D`` removed the BN between them: the folded
    function failed ("input depth must be evenly divisible by filter depth") or, for a batch
    padding, silently returned fewer rows. Refused; a spatial padding still folds."""
    pads = {
        "channel": [[0, 0], [1, 1], [1, 1], [0, 1]],
        "batch": [[1, 0], [1, 1], [1, 1], [0, 0]],
        "spatial": [[0, 0], [1, 1], [1, 1], [0, 0]],
    }[axis]
    c = 2 if axis == "channel" else 3
    w, p = weight((1, 1, 3, 4), rng), bn_params(3, rng)
    fn = make(lambda x: tf.nn.conv2d(decomposed_bn(tf.pad(x, pads), p), w, 2, "VALID"), [4, 3, c])
    folded = check_rewrite(fn, rng, run=False)
    entry = the_entry(folded.report)
    (conv,) = nodes_of(folded.graph_def, "Conv2D")
    producer = {n.name: n.op for n in folded.graph_def.node}[conv.input[0].split(":")[0]]
    if axis == "spatial":
        assert entry.folded and entry.direction == "backward" and entry.absorbed_by == [conv.name]
    else:
        assert not entry.folded and "Pad+Conv2D" in entry.tried["backward"]
        assert producer != "Pad"
    assert_close(fn, folded, random_inputs(fn, rng))


# ---- bug classes of other tools ------------------------------------------------------------------
def test_conv_also_used_elsewhere_is_not_folded(rng):
    """PyTorch fx ``fuse`` (#104593) rewrote a conv whose output another op also read."""
    w, b, p = weight((3, 3, 3, 4), rng), bias(4, rng), bn_params(4, rng)

    def body(x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)
        return bn(y, p), tf.nn.relu(y)

    fn = make(body, [5, 5, 3])
    folded = check_rewrite(fn, rng)
    entry = the_entry(folded.report)
    assert not entry.folded and "also read by" in entry.tried["forward"]
    (conv,) = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_array_equal(weight_of(folded.graph_def, conv), w)


def test_shared_weight_constant_is_cloned_not_modified(rng):
    """Two convs read one weight constant; folding BN into one must leave the other as it was."""
    w, p = tf.constant(weight((3, 3, 3, 3), rng)), bn_params(3, rng)

    def body(x):
        return bn(tf.nn.conv2d(x, w, 1, "SAME"), p), tf.nn.conv2d(x, w, 1, "SAME")

    fn = make(body, [5, 5, 3])
    folded = check_rewrite(fn, rng)
    assert the_entry(folded.report).folded
    weights = [weight_of(folded.graph_def, n) for n in nodes_of(folded.graph_def, "Conv2D")]
    assert sum(np.array_equal(v, w.numpy()) for v in weights) == 1


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_transpose_moves_the_channel_axis_and_the_fold_follows_it(rng, direction):
    """onnxruntime (#32228) fused through a Transpose and ignored its ``perm``. NHWC → NCHW moves
    the channel axis: A follows it (a BN in NCHW after it reads axis 1, the conv's axis 3), and
    the fold scales the conv's out- (or in-) channels, not a spatial axis."""
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)
    p3 = bn_params(3, rng)
    if direction == "forward":

        def body(x):
            return bn(tf.transpose(tf.nn.conv2d(x, w, 1, "VALID"), [0, 3, 1, 2]), p, "NCHW")

        shape, s = [5, 5, 3], bn_scale_shift(p)[0]
        want = w * s
    else:

        def body(x):  # x is NCHW
            return tf.nn.conv2d(tf.transpose(bn(x, p3, "NCHW"), [0, 2, 3, 1]), w, 1, "VALID")

        shape, s = [3, 5, 5], bn_scale_shift(p3)[0]
        want = w * s[:, None]
    folded = check_rewrite(make(body, shape), rng)
    assert_absorbed(folded, direction, "Conv2D")
    [conv] = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), want, rtol=1e-6)


def test_transpose_that_swaps_spatial_axes_onto_the_bn_axis_is_refused(rng):
    """A square conv output (4×4×4) transposed [0, 2, 1, 3]: a BN in NCHW then normalises what
    was the conv's axis 2 (a spatial axis), not its channels: it must not fold into the conv."""
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)
    body = lambda x: bn(tf.transpose(tf.nn.conv2d(x, w, 1, "VALID"), [0, 2, 1, 3]), p, "NCHW")
    entry = the_entry(check_rewrite(make(body, [4, 4, 3]), rng).report)
    assert not entry.folded and "not the layer's out-channel axis" in entry.tried["forward"], entry


def test_transpose_with_the_identity_perm_passes(rng):
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)
    folded = check_rewrite(
        make(
            lambda x: bn(tf.transpose(tf.nn.conv2d(x, w, 1, "VALID"), [0, 1, 2, 3]), p), [5, 5, 3]
        ),
        rng,
    )
    assert the_entry(folded.report).folded


def test_zero_gamma_forward_stays_exact(rng):
    """TVM divides by a zero scale. γ = 0 forward: the channel becomes the constant t."""
    w, b = weight((3, 3, 3, 4), rng), bias(4, rng)
    p = bn_params(4, rng)
    p = (np.asarray([1.2, 0.0, -0.7, 0.0], "float32"),) + p[1:]
    folded = check_rewrite(
        make(lambda x: bn(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b), p), [5, 5, 3]), rng
    )
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == "forward"
    (conv,) = nodes_of(folded.graph_def, "Conv2D")
    folded_w = weight_of(folded.graph_def, conv)
    assert np.all(folded_w[..., 1] == 0) and np.all(folded_w[..., 3] == 0)


def test_zero_gamma_backward_without_leaves_stays_exact(rng):
    w, p = weight((4, 3), rng), bn_params(4, rng)
    p = (np.asarray([0.0, 1.1, 0.0, -0.6], "float32"),) + p[1:]
    folded = check_rewrite(make(lambda x: tf.matmul(decomposed_bn(x, p), w), [4]), rng)
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == "backward"


def test_division_by_a_constant_holding_zero_is_not_an_affine_map(rng):
    """``y / k`` with a zero in k is x·inf, not a scale to fold: left alone, same infinities."""
    w = weight((1, 1, 3, 4), rng)
    k = np.asarray([2.0, 0.0, -1.0, 0.5], "float32")
    fn = make(lambda x: tf.nn.conv2d(x, w, 1, "VALID") / k, [4, 4, 3])
    folded = check_rewrite(fn, rng, run=False)
    assert not folded.report.entries
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(folded(x).numpy(), fn(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("gamma0", [0.0, 1e-9])
def test_zero_or_tiny_gamma_with_a_leaf_is_refused(rng, gamma0):
    """Backward through an Add needs the other operand divided by s: s = 0 (or 1e-9 of the
    largest) is refused, never divided by."""
    w1, w2, p = weight((1, 1, 3, 4), rng), weight((1, 1, 4, 2), rng), bn_params(4, rng)
    p = (np.asarray([1.0, gamma0, 0.5, 2.0], "float32"),) + p[1:]

    def body(x, z):
        return tf.nn.conv2d(bn(x, p) + tf.nn.conv2d(z, w1, 1, "VALID"), w2, 1, "VALID")

    folded = check_rewrite(make(body, [4, 4, 4], [4, 4, 3]), rng)
    entry = the_entry(folded.report)
    assert not entry.folded and "zero" in entry.tried["backward"]


@pytest.mark.parametrize("axis", [1, 2, -3])
def test_concat_on_a_spatial_axis_does_not_crash_and_blocks(rng, axis):
    """TF's graph transform tool aborts on an unexpected Concat. Concatenating on H or W is not
    the channel axis: neither direction may pass."""
    w1, w2, p = weight((1, 1, 3, 4), rng), weight((3, 3, 4, 2), rng), bn_params(4, rng)

    def body(x):
        y = tf.concat([tf.nn.conv2d(x, w1, 1, "SAME"), tf.nn.conv2d(x, w1 * 2, 1, "SAME")], axis)
        return tf.nn.conv2d(bn(y, p), w2, 1, "SAME")

    folded = check_rewrite(make(body, [4, 4, 3]), rng)
    entry = the_entry(folded.report)
    assert not entry.folded
    assert "ConcatV2" in entry.tried["forward"] and "channel axis" in entry.tried["forward"]


def test_concat_on_an_unknown_axis_does_not_crash(rng):
    """The concat axis is a function input: unknown when folding."""
    w1, p = weight((1, 1, 3, 3), rng), bn_params(3, rng)

    def body(x, axis):
        y = tf.concat([tf.nn.conv2d(x, w1, 1, "SAME"), tf.nn.conv2d(x, w1, 1, "SAME")], axis)
        return bn(tf.reshape(y, [-1, 4, 8, 3]), p)

    fn = tf.function(body).get_concrete_function(
        tf.TensorSpec([None, 4, 4, 3]), tf.TensorSpec([], tf.int32)
    )
    folded = check_rewrite(fn, rng, run=False)
    assert not the_entry(folded.report).folded
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    assert_close(fn, folded, (x, tf.constant(2)))


def test_concat_of_one_tensor_twice_is_refused(rng):
    w, p = weight((1, 1, 3, 2), rng), bn_params(4, rng)

    def body(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        return bn(tf.concat([y, y], -1), p)

    folded = check_rewrite(make(body, [4, 4, 3]), rng)
    assert not the_entry(folded.report).folded


@pytest.mark.parametrize("shape", ["H11", "HWC", "1H11", "C_on_W"])
def test_broadcast_constants_are_not_per_channel(rng, shape):
    """OpenVINO (#25649) checked broadcast shapes wrongly. A constant that broadcasts along H (or
    H, W and C) is not a per-channel scale, even when H equals the channel count."""
    c = h = 4
    w = weight((1, 1, 3, c), rng)
    k = {
        "H11": rng.uniform(0.5, 1.5, (h, 1, 1)),
        "HWC": rng.uniform(0.5, 1.5, (h, 4, c)),
        "1H11": rng.uniform(0.5, 1.5, (1, h, 1, 1)),
        "C_on_W": rng.uniform(0.5, 1.5, (c,)),
    }[shape].astype("float32")
    if shape == "C_on_W":  # NCHW-shaped data through a [C] constant: that is the W axis

        def body(x):
            y = tf.transpose(tf.nn.conv2d(x, w, 1, "VALID"), [0, 3, 1, 2])  # [N, C, H, W]
            return tf.transpose(y * k, [0, 2, 3, 1])
    else:

        def body(x):
            return tf.nn.conv2d(x, w, 1, "VALID") * k

    fn = make(body, [h, 4, 3])
    folded = check_rewrite(fn, rng)
    assert not any(e.folded for e in folded.report.entries)
    (conv,) = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_array_equal(weight_of(folded.graph_def, conv), w)


def test_per_channel_constant_of_rank_4_folds(rng):
    """The positive control: ``[1, 1, 1, C]`` is per-channel."""
    w = weight((1, 1, 3, 4), rng)
    k = rng.uniform(0.5, 1.5, (1, 1, 1, 4)).astype("float32")
    folded = check_rewrite(make(lambda x: tf.nn.conv2d(x, w, 1, "VALID") * k, [4, 4, 3]), rng)
    (entry,) = folded.report.entries
    assert entry.folded


# ---- float32 range -----------------------------------------------------------------------------
def test_a_folded_float32_weight_past_its_range_is_refused():
    """A weight times a BN scale computed in float64 and cast back: past float32's largest value
    it was cast to inf, and the output became NaN where the original's was finite."""
    w = np.full((3, 2), 1e37, np.float32)
    w[0, 0] = 3e38
    scale, shift = np.array([100.0, 1.5], np.float32), np.array([1.0, -2.0], np.float32)
    fn = make(lambda x: tf.matmul(x, w) * scale + shift, [3])
    x = tf.constant([[1e-3, -2e-3, 5e-4], [-1e-3, 1e-3, 2e-3]], tf.float32)
    folded = graphfold.rewrite(fn)
    entry = folded.report.entries[0]
    assert not entry.folded and "folded weight overflows float32" in entry.reason
    want, got = fn(x).numpy(), folded(x).numpy()
    assert np.all(np.isfinite(got)) and np.array_equal(want, got)


def test_a_bias_sum_past_float32_range_gets_a_bias_of_its_own():
    """Backward into a MatMul whose bias is near float32's largest value: b + W t would be inf,
    so W t goes into a BiasAdd of its own, and (W s x + W t) + b stays finite as the original."""
    w, b = np.array([[1e38]], np.float32), np.array([3e38], np.float32)
    fn = make(lambda x: tf.nn.bias_add(tf.matmul(x * 2.0 + 1.0, w), b), [1])
    folded = graphfold.rewrite(fn)
    entry = folded.report.entries[0]
    assert entry.folded and entry.direction == "backward"
    x = tf.constant([[-1.5], [-1.2]], tf.float32)
    want, got = fn(x).numpy(), folded(x).numpy()
    assert np.all(np.isfinite(want)) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert op_counts(folded.graph_def).get("BiasAdd") == 2
