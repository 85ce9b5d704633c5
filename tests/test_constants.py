"""Constant subgraphs are evaluated with NumPy (graphfold.fold.constants): every evaluator must give
what TensorFlow itself computes for the same op, exactly for integers and to a few ulps for
floats, else folding silently changes the model before any batch norm is touched."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from graphfold.fold.constants import fold_constants
from graphfold.fold.graph import Graph

from helpers import freeze

RNG = np.random.default_rng(77)
F = RNG.normal(size=(2, 3, 4)).astype(np.float32)
I = np.array([[-7, 7, -8, 9], [5, -5, 0, 12]], np.int32)  # noqa: E741 (the integers, beside F and J)
J = np.array([[2, 2, 3, -4], [-3, 3, 7, 5]], np.int32)

CASES = {
    "Div_int_negative": lambda: tf.raw_ops.Div(x=tf.constant(I), y=tf.constant(J)),
    "Div_float": lambda: tf.raw_ops.Div(x=tf.constant(F), y=tf.constant(F[::-1] + 3.0)),
    "RealDiv": lambda: tf.constant(F) / tf.constant(F + 5.0),
    "Rsqrt_f16": lambda: tf.math.rsqrt(tf.constant(np.abs(F) + 0.1, tf.float16)),
    "Rsqrt_f32": lambda: tf.math.rsqrt(tf.constant(np.abs(F) + 0.1)),
    "Sqrt_bf16": lambda: tf.sqrt(tf.cast(tf.constant(np.abs(F)), tf.bfloat16)),
    "Cast_bf16": lambda: tf.cast(tf.constant(F), tf.bfloat16),
    "Cast_int": lambda: tf.cast(tf.constant(F * 10), tf.int32),
    "Squeeze": lambda: tf.squeeze(tf.constant(F[:, :1, :]), axis=[-2]),
    "ExpandDims_negative": lambda: tf.expand_dims(tf.constant(F), -2),
    "ConcatV2_negative": lambda: tf.concat([tf.constant(F), tf.constant(F * 2)], axis=-1),
    "Pack_negative": lambda: tf.stack([tf.constant(F), tf.constant(F * 2)], axis=-1),
    "Prod_keepdims": lambda: tf.reduce_prod(tf.constant(F), axis=[0, 2], keepdims=True),
    "Prod": lambda: tf.reduce_prod(tf.constant(I), axis=1),
    "Tile": lambda: tf.tile(tf.constant(F), [2, 1, 3]),
    "Fill": lambda: tf.fill(tf.constant([2, 3]), tf.constant(1.5)),
    "Transpose": lambda: tf.transpose(tf.constant(F), [2, 0, 1]),
    "Reshape": lambda: tf.reshape(tf.constant(F), [4, -1]),
    "Maximum": lambda: tf.maximum(tf.constant(F), tf.constant(F[::-1])),
    "Sub_Neg_Square": lambda: -tf.square(tf.constant(F) - 1.0),
    "Mul_f16": lambda: tf.constant(F, tf.float16) * tf.constant(F[::-1], tf.float16),
    "Abs_Reciprocal": lambda: tf.math.reciprocal(tf.abs(tf.constant(F)) + 0.5),
}


def _folded_output(body):
    """(value TF computes, value graphfold's constant folding puts in the graph)."""
    want = body().numpy()
    fn = tf.function(body).get_concrete_function()
    frozen = freeze(fn)
    graph = Graph(frozen.graph_def, frozen.shapes, frozen.outputs)
    fold_constants(graph)
    [out] = frozen.outputs
    node = graph.nodes[out]
    while node.op == "Identity":
        node = graph.producer(node.input[0])
    assert node.op == "Const", f"not evaluated: {node.op}"
    return want, graph.const(node.name)


@pytest.mark.parametrize("name", list(CASES))
def test_evaluator_matches_tensorflow(name):
    want, got = _folded_output(CASES[name])
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    if np.issubdtype(want.dtype, np.integer) or want.dtype == bool:
        np.testing.assert_array_equal(got, want)  # integers: exactly
    else:
        # floats: within a few units in the last place (TF's Rsqrt, Reciprocal and reduction
        # order may differ from NumPy's correctly rounded float64 by an ulp)
        eps = {
            tf.float16: 2.0**-10,
            tf.bfloat16: 2.0**-7,
            tf.float32: 2.0**-23,
            tf.float64: 2.0**-52,
        }[tf.as_dtype(want.dtype)]
        np.testing.assert_allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=4 * eps, atol=0
        )


def test_integer_division_by_zero_is_left_to_tensorflow():
    """TF raises at run time; evaluating it to a number would hide the error."""
    fn = tf.function(
        lambda: tf.raw_ops.Div(x=tf.constant(I), y=tf.constant(J * 0))
    ).get_concrete_function()
    frozen = freeze(fn)
    graph = Graph(frozen.graph_def, frozen.shapes, frozen.outputs)
    fold_constants(graph)
    assert any(n.op == "Div" for n in graph.graph_def.node)
