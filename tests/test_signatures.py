"""The rewritten function is called exactly like the original and returns the same structure:
dict keys, tuples, positional and keyword arguments, dtypes, static shapes, a None batch dim."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold

from helpers import (
    assert_close,
    assert_folded_into_layers,
    assert_no_batch_norm,
    bias,
    bn_params,
    check_rewrite,
    random_inputs,
    weight,
)
from helpers import fused_bn as bn

EPS = 1e-3


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(5)
    return dict(
        w=weight((3, 3, 3, 4), rng),
        b=bias(4, rng),
        p=bn_params(4, rng),
        wd=weight((4, 6), rng),
        bd=bias(6, rng),
        pd=bn_params(6, rng),
        w2=weight((3, 3, 2, 4), rng),
        p2=bn_params(4, rng),
    )


def conv_bn(x, parts):
    return bn(tf.nn.bias_add(tf.nn.conv2d(x, parts["w"], 1, "SAME"), parts["b"]), parts["p"])


def dense_bn(h, parts):
    return tf.nn.batch_normalization(
        tf.matmul(h, parts["wd"]) + parts["bd"],
        parts["pd"][2],
        parts["pd"][3],
        parts["pd"][1],
        parts["pd"][0],
        EPS,
    )


def test_dict_output_keeps_keys_dtypes_and_static_shapes(parts):
    rng = np.random.default_rng(1)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
    def fn(image):
        y = tf.nn.relu(conv_bn(image, parts))
        logits = dense_bn(tf.reduce_mean(y, axis=[1, 2]), parts)
        return {
            "logits": logits,
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int32),
            "features": y,
        }

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    assert_folded_into_layers(folded, 2)
    assert_no_batch_norm(folded.graph_def)
    out = folded.structured_outputs
    want = concrete.structured_outputs
    assert isinstance(out, dict) and set(out) == {"logits", "classes", "features"}
    for key in want:
        assert out[key].dtype == want[key].dtype, key
        assert out[key].shape.as_list() == want[key].shape.as_list(), key
    assert out["logits"].shape.as_list() == [None, 6]
    assert out["features"].shape.as_list() == [None, 8, 8, 4]
    # and the values returned at run time carry the same keys and dtypes
    result = folded(tf.random.normal([3, 8, 8, 3]))
    assert set(result) == set(want) and result["classes"].dtype == tf.int32
    assert result["features"].shape == (3, 8, 8, 4)
    # the signature can be saved and reloaded
    assert folded.structured_input_signature == concrete.structured_input_signature


def test_tuple_output(parts):
    rng = np.random.default_rng(2)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def fn(x):
        y = conv_bn(x, parts)
        return y, tf.reduce_sum(y, axis=[1, 2, 3]), tf.shape(y)

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    out = folded(tf.random.normal([2, 8, 8, 3]))
    assert isinstance(out, tuple) and len(out) == 3
    assert out[2].dtype == tf.int32
    np.testing.assert_array_equal(out[2].numpy(), [2, 8, 8, 4])
    assert_folded_into_layers(folded, 1)


def test_nested_output_structure(parts):
    rng = np.random.default_rng(3)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def fn(x):
        y = conv_bn(x, parts)
        return {"pair": (y, y * 2.0), "mean": [tf.reduce_mean(y)]}

    folded = check_rewrite(fn.get_concrete_function(), rng)
    out = folded(tf.random.normal([2, 8, 8, 3]))
    assert set(out) == {"pair", "mean"}
    assert isinstance(out["pair"], tuple) and isinstance(out["mean"], list)


def test_none_among_the_outputs(parts):
    """tf.function allows None in its outputs: it is not a fetched tensor, but stays in place."""
    rng = np.random.default_rng(10)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def fn(x):
        y = conv_bn(x, parts)
        return {"y": y, "nothing": None, "z": (None, tf.reduce_sum(y, axis=-1))}

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    out = folded(tf.random.normal([2, 8, 8, 3]))
    assert out["nothing"] is None and out["z"][0] is None
    assert out["z"][1].shape == (2, 8, 8)
    assert_folded_into_layers(folded, 1)


def test_positional_and_keyword_arguments(parts):
    """Two inputs of the same shape and dtype, so a swapped binding would be caught numerically;
    the keyword-only one is named so that it sorts before the positional one."""
    rng = np.random.default_rng(4)

    def fn(zeta, *, alpha):
        return {"z": conv_bn(zeta, parts), "a": conv_bn(alpha, parts) * 3.0 - tf.reduce_mean(zeta)}

    spec = tf.TensorSpec([None, 8, 8, 3], tf.float32)
    concrete = tf.function(fn).get_concrete_function(spec, alpha=spec)
    folded = check_rewrite(concrete, rng)
    zeta, alpha = (tf.constant(rng.normal(size=(2, 8, 8, 3)), tf.float32) for _ in range(2))
    want = concrete(zeta, alpha=alpha)
    got = folded(zeta, alpha=alpha)
    for key in ("z", "a"):
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-4)
    # the two results would differ if the arguments were swapped
    swapped = concrete(alpha, alpha=zeta)
    assert not np.allclose(swapped["a"].numpy(), got["a"].numpy(), atol=1e-3)
    assert not np.allclose(swapped["z"].numpy(), got["z"].numpy(), atol=1e-3)


def test_positional_and_keyword_arguments_of_different_shapes(parts):
    rng = np.random.default_rng(5)

    def fn(image, vector, scale=None):
        h = tf.reduce_mean(conv_bn(image, parts), axis=[1, 2])
        return dense_bn(h + vector, parts) * scale

    concrete = tf.function(fn).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image"),
        vector=tf.TensorSpec([None, 4], tf.float32, name="vector"),
        scale=tf.TensorSpec([], tf.float32, name="scale"),
    )
    folded = check_rewrite(concrete, rng)
    assert_folded_into_layers(folded, 2)
    args, kwargs = random_inputs(concrete, rng, batch=3)
    assert_close(concrete, folded, (args, kwargs))
    image, vector, scale = args
    # called exactly like fn: by keyword, mixed, in any keyword order
    assert_close(concrete, folded, ((), {"scale": scale, "image": image, "vector": vector}))
    assert_close(concrete, folded, ((image,), {"vector": vector, "scale": scale}))
    assert_close(concrete, folded, ((image, vector), {"scale": scale}))
    with pytest.raises(TypeError):
        folded(image, vector, scale, extra=1.0)


def test_python_arguments_and_defaults(parts):
    """Python values (``training=False``, defaults) are part of the structured signature but not
    placeholders: the rewrite must still bind the tensors right."""
    rng = np.random.default_rng(11)

    def fn(x, training=False, scale=2.0, y=None):
        gamma, beta, mean, var = parts["p"]
        h = tf.nn.bias_add(tf.nn.conv2d(x, parts["w"], 1, "SAME"), parts["b"])
        out = (
            tf.raw_ops.FusedBatchNormV3(
                x=h,
                scale=gamma,
                offset=beta,
                mean=mean,
                variance=var,
                epsilon=EPS,
                is_training=training,
            )[0]
            * scale
        )
        return out if y is None else out + tf.reduce_mean(y)

    spec = tf.TensorSpec([None, 8, 8, 3], tf.float32)
    inference = tf.function(fn).get_concrete_function(spec)
    folded = check_rewrite(inference, rng)
    assert_folded_into_layers(folded, 1)
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)), tf.float32)
    assert_close(inference, folded, ((x,), {}))
    assert_close(inference, folded, ((x, False, 2.0, None), {}))

    training = tf.function(fn).get_concrete_function(
        spec, training=True, scale=3.0, y=tf.TensorSpec([None], tf.float32)
    )
    folded = check_rewrite(training, rng)
    [entry] = folded.report.batch_norms
    assert not entry.folded and "training" in entry.reason
    y = tf.constant([1.0, 2.0, 4.0])
    assert_close(training, folded, ((x,), {"training": True, "scale": 3.0, "y": y}))


@pytest.mark.parametrize("batches", [(1, 4, 7)])
def test_none_batch_dimension_accepts_any_batch_size(parts, batches):
    rng = np.random.default_rng(6)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def fn(x):
        y = tf.reshape(conv_bn(x, parts), [tf.shape(x)[0], -1])
        return tf.nn.softmax(y)

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    assert folded.structured_outputs.shape.as_list() == concrete.structured_outputs.shape.as_list()
    for batch in batches:
        inputs = random_inputs(concrete, rng, batch=batch)
        assert_close(concrete, folded, inputs)


def test_unknown_spatial_dims(parts):
    rng = np.random.default_rng(7)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def fn(x):
        return conv_bn(x, parts)

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    assert_folded_into_layers(folded, 1)
    for shape in ([1, 5, 9, 3], [2, 12, 4, 3]):
        x = tf.constant(rng.normal(size=shape), tf.float32)
        assert_close(concrete, folded, ((x,), {}))


def test_tf_function_with_input_signature_is_accepted(parts):
    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def fn(x):
        return conv_bn(x, parts)

    folded = graphfold.rewrite(fn)
    x = tf.random.normal([2, 8, 8, 3])
    assert_close(fn, folded, ((x,), {}))


def test_tf_function_without_input_signature_is_a_clear_error(parts):
    fn = tf.function(lambda x: conv_bn(x, parts))
    with pytest.raises(TypeError, match="input_signature"):
        graphfold.rewrite(fn)


def test_dict_input(parts):
    rng = np.random.default_rng(8)

    def fn(inputs):
        return conv_bn(inputs["b_image"], parts) + tf.reduce_mean(conv_bn(inputs["a_image"], parts))

    spec = tf.TensorSpec([None, 8, 8, 3], tf.float32)
    concrete = tf.function(fn).get_concrete_function({"b_image": spec, "a_image": spec})
    folded = check_rewrite(concrete, rng)
    assert_folded_into_layers(folded, 2)


def test_saved_model_round_trip(parts, tmp_path):
    rng = np.random.default_rng(9)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
    def fn(x):
        y = conv_bn(x, parts)
        return {"y": y, "s": tf.reduce_sum(y, axis=-1)}

    concrete = fn.get_concrete_function()
    folded = check_rewrite(concrete, rng)
    module = tf.Module()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": folded.function})
    loaded = tf.saved_model.load(str(tmp_path))
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)), tf.float32)
    out = loaded.signatures["serving_default"](x=x)
    want = concrete(x)
    assert set(out) == {"y", "s"}
    for key in ("y", "s"):
        np.testing.assert_allclose(out[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-4)
