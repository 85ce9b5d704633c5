"""Partial folds (docs/folding.md §8, issue 19 §3): where A cannot disappear, its scale folds and
its shift stays as one add; where the scale and the shift each fold, in opposite directions, A
disappears ("split").

    f(s ⊙ x + t) = s ⊙ f(x + t/s)      for f positively homogeneous (Relu, LeakyRelu, PReLU,
    s ⊙ f(y) + t = f(s ⊙ y) + t         MaxPool) and every s > 0

Every test compares with the original on random inputs (random statistics, biases), and asserts
which layer took the scale, what add stayed (its value), or why nothing folded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    bias,
    bn_params,
    bn_scale_shift,
    check_rewrite,
    const_value,
    decomposed_bn,
    make,
    nodes_of,
    op_counts,
    the_entry,
    weight,
    weight_of,
)
from helpers import fused_bn as bn

RNG = np.random.default_rng(1921)


def positive(c):
    return bn_params(c, RNG, positive=True)


def kept_add(folded, muls: int = 0) -> np.ndarray:
    """The value of the one add a partial fold leaves (and no multiply but the graph's own
    ``muls``)."""
    counts = op_counts(folded.graph_def)
    assert counts["Mul"] == muls and not any(op.startswith("FusedBatchNorm") for op in counts), (
        counts
    )
    [add] = [n for n in nodes_of(folded.graph_def, "AddV2") if "graphfold" in n.name]
    return const_value(folded.graph_def, add.input[1]).reshape(-1)


def assert_partial(folded, direction: str, layer_op: str):
    entry = the_entry(folded.report)
    assert entry.partial and not entry.folded and entry.direction == direction, str(folded.report)
    ops = {n.name: n.op for n in folded.graph_def.node}
    assert [ops[name] for name in entry.absorbed_by] == [layer_op], entry
    assert folded.report.partial == [entry] and not folded.report.folded
    assert "partial" in folded.report.summary() and "partial" in folded.report.entry_table()
    summary = json.loads(json.dumps(folded.report.to_dict()))["summary"]
    assert summary["partial"] == 1 and summary["folded"] == 0 and summary["not_folded"] == 0
    return entry


# ---- A before f before L: the scale into L's in-channels, x + t/s kept -------------------------
ACTIVATIONS = {
    "relu": tf.nn.relu,
    "leaky_relu": lambda y: tf.nn.leaky_relu(y, 0.3),
    "prelu": lambda y: (
        tf.nn.relu(y) + tf.constant(RNG.uniform(-0.5, 0.5, 4), tf.float32) * tf.nn.relu(-y)
    ),
    "max_pool": lambda y: tf.nn.max_pool2d(y, 2, 1, "SAME"),
}


@pytest.mark.parametrize("f", sorted(ACTIVATIONS))
@pytest.mark.parametrize("form", ["fused", "decomposed"])
def test_bn_before_f_before_a_padded_conv_keeps_one_add(f, form):
    """A 3×3 SAME conv: a shift cannot fold through its zero padding, the scale can."""
    p, w = positive(4), weight((3, 3, 4, 5), RNG)
    norm = bn if form == "fused" else decomposed_bn
    folded = check_rewrite(
        make(lambda x: tf.nn.conv2d(ACTIVATIONS[f](norm(x, p)), w, 1, "SAME"), [6, 6, 4]), RNG
    )
    entry = assert_partial(folded, "backward", "Conv2D")
    assert "shift kept before" in entry.detail and "t/s" in entry.detail, entry
    s, t = bn_scale_shift(p)
    [conv] = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), w * s[:, None], rtol=1e-6)
    np.testing.assert_allclose(kept_add(folded, muls=f == "prelu"), t / s, rtol=1e-5)


def test_bn_after_relu_after_conv_keeps_one_add_of_t():
    """Conv → ReLU → BN (the last op): the scale into the conv and its bias, + t after the ReLU."""
    p, w, b = positive(4), weight((3, 3, 3, 4), RNG), bias(4, RNG)
    folded = check_rewrite(
        make(
            lambda x: bn(tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)), p), [6, 6, 3]
        ),
        RNG,
    )
    entry = assert_partial(folded, "forward", "Conv2D")
    assert "shift kept after" in entry.detail, entry
    s, t = bn_scale_shift(p)
    [conv] = nodes_of(folded.graph_def, "Conv2D")
    np.testing.assert_allclose(weight_of(folded.graph_def, conv), w * s, rtol=1e-6)
    np.testing.assert_allclose(kept_add(folded), t, rtol=1e-5)


def test_bn_after_prelu_after_conv():
    p, w = positive(4), weight((3, 3, 3, 4), RNG)
    folded = check_rewrite(
        make(lambda x: bn(ACTIVATIONS["prelu"](tf.nn.conv2d(x, w, 1, "SAME")), p), [6, 6, 3]), RNG
    )
    assert_partial(folded, "forward", "Conv2D")
    np.testing.assert_allclose(kept_add(folded, muls=1), bn_scale_shift(p)[1], rtol=1e-5)


# ---- split: the scale one way, the shift the other; A disappears ---------------------------------
def test_scale_forward_shift_backward():
    """conv → Pad → BN (mixed γ) → MaxPool → 1×1 conv: the Pad stops the shift going forward,
    the negative scale stops going backward through the max; the scale goes forward (past the
    Pad) and the shift backward (through the max, into the second conv's bias)."""
    gamma = np.array([1.0, -0.7, 0.5, 1.2], np.float32)
    p, w1, w2 = bn_params(4, RNG, gamma=gamma), weight((3, 3, 3, 4), RNG), weight((1, 1, 4, 5), RNG)
    pads = [[0, 0], [1, 1], [1, 1], [0, 0]]
    folded = check_rewrite(
        make(
            lambda x: tf.nn.conv2d(
                tf.nn.max_pool2d(
                    bn(tf.pad(tf.nn.conv2d(x, w1, 1, "VALID"), pads), p), 2, 2, "VALID"
                ),
                w2,
                1,
                "VALID",
            ),
            [6, 6, 3],
        ),
        RNG,
    )
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == "split" and len(entry.absorbed_by) == 2, entry
    assert entry.detail.startswith("scale forward into") and "shift backward into" in entry.detail
    counts = op_counts(folded.graph_def)
    assert counts["Mul"] == 0 and counts["AddV2"] == 0 and counts["BiasAdd"] == 1, counts
    assert "1 split" in folded.report.summary()


def test_scale_backward_shift_forward():
    """conv → MaxPool → BN (mixed γ) → 3×3 SAME conv: the scale goes backward (through the
    padding), the shift t/s forward (through the max, into the first conv's bias)."""
    gamma = np.array([1.0, -0.7, 0.5, 1.2], np.float32)
    p, w1, w2 = bn_params(4, RNG, gamma=gamma), weight((3, 3, 3, 4), RNG), weight((3, 3, 4, 5), RNG)
    b1 = bias(4, RNG)
    folded = check_rewrite(
        make(
            lambda x: tf.nn.conv2d(
                bn(
                    tf.nn.max_pool2d(
                        tf.nn.bias_add(tf.nn.conv2d(x, w1, 1, "VALID"), b1), 2, 2, "VALID"
                    ),
                    p,
                ),
                w2,
                1,
                "SAME",
            ),
            [7, 7, 3],
        ),
        RNG,
    )
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == "split", entry
    assert entry.detail.startswith("scale backward into") and "shift forward into" in entry.detail
    s, t = bn_scale_shift(p)
    [add] = nodes_of(folded.graph_def, "BiasAdd")
    np.testing.assert_allclose(const_value(folded.graph_def, add.input[1]), b1 + t / s, rtol=1e-5)


# ---- refusals ------------------------------------------------------------------------------------
def test_a_negative_scale_before_relu_is_refused_naming_the_channels():
    gamma = np.array([1.0, -0.7, 0.5, -1.2], np.float32)
    p, w = bn_params(4, RNG, gamma=gamma), weight((3, 3, 4, 5), RNG)
    folded = check_rewrite(
        make(lambda x: tf.nn.conv2d(tf.nn.relu(bn(x, p)), w, 1, "SAME"), [6, 6, 4]), RNG
    )
    entry = the_entry(folded.report)
    assert not entry.folded and not entry.partial, entry
    assert "scale <= 0 on channels 1, 3 of 4" in entry.reason, entry.reason
    assert op_counts(folded.graph_def)["Mul"] == 1


def test_a_near_zero_scale_is_refused_as_for_leaves():
    gamma = np.array([1.0, 1e-9, 0.5, 1.2], np.float32)
    p, w = bn_params(4, RNG, gamma=gamma), weight((3, 3, 4, 5), RNG)
    folded = check_rewrite(
        make(lambda x: tf.nn.conv2d(tf.nn.relu(bn(x, p)), w, 1, "SAME"), [6, 6, 4]), RNG
    )
    entry = the_entry(folded.report)
    assert not entry.folded and not entry.partial, entry
    assert "near) zero" in entry.tried["scale alone backward"], entry.tried


def test_partial_false_keeps_the_batch_norm_whole():
    p, w = positive(4), weight((3, 3, 4, 5), RNG)
    fn = make(lambda x: tf.nn.conv2d(tf.nn.relu(bn(x, p)), w, 1, "SAME"), [6, 6, 4])
    folded = check_rewrite(fn, RNG, partial=False)
    entry = the_entry(folded.report)
    assert not entry.folded and not entry.partial and entry.absorbed_by == [], entry
    counts = op_counts(folded.graph_def)
    assert counts["Mul"] == 1 and counts["AddV2"] == 1, counts
    np.testing.assert_array_equal(
        weight_of(folded.graph_def, nodes_of(folded.graph_def, "Conv2D")[0]), w
    )


def test_relu_with_zero_shift_is_a_full_backward_fold():
    """t = 0: nothing stays (docs/folding.md §8: already a full fold)."""
    gamma, _, _, var = positive(4)
    scale = gamma / np.sqrt(var + 1e-3)
    w = weight((3, 3, 4, 5), RNG)
    folded = check_rewrite(
        make(lambda x: tf.nn.conv2d(tf.nn.relu(x * scale), w, 1, "SAME"), [6, 6, 4]), RNG
    )
    entry = the_entry(folded.report)
    assert entry.folded and entry.direction == "backward", entry
    assert op_counts(folded.graph_def)["Mul"] == 0


def test_a_kept_shift_that_overflows_float16_is_refused():
    """t/s = 1000 / 0.01: past float16's range. The add would hold inf."""
    gamma, beta = np.full(4, 0.01), np.full(4, 1000.0)
    p = (gamma, beta, np.zeros(4), np.ones(4))
    p = tuple(v.astype(np.float32) for v in p)  # a float16 BN keeps float32 statistics
    w = weight((3, 3, 4, 5), RNG, dtype="float16")
    fn = make(
        lambda x: tf.nn.conv2d(tf.nn.relu(bn(x, p)), w, 1, "SAME"), [6, 6, 4], dtype=tf.float16
    )
    entry = the_entry(check_rewrite(fn, RNG).report)
    assert not entry.folded and not entry.partial, entry
    assert "shift overflows float16" in entry.tried["scale alone backward"], entry.tried
