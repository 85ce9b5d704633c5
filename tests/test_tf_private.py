"""Every private TensorFlow touch point (``graphfold/tf_private.py``) on the running TensorFlow:
a release that moves or changes one fails here, by name."""

import numpy as np
import tensorflow as tf

from graphfold import tf_private


def test_every_touch_point_is_tested_here():
    source = open(__file__).read()
    untested = [
        name
        for name, fn in tf_private.TOUCH_POINTS.items()
        if f"tf_private.{fn.__name__}(" not in source
    ]
    assert not untested, f"no test calls {untested}"


def _function():
    w = tf.Variable(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    s = tf.Variable(3.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def fn(x):
        return tf.einsum("bi,ijk->bjk", x, w) * s

    return fn.get_concrete_function(), w, s


def test_freezing_without_reading_the_variables():
    fn, w, s = _function()
    graph_def, variables = tf_private.freeze_without_reading(fn)
    assert sorted(v.name for v in variables.values()) == sorted([w.name, s.name])
    for name in variables:  # stand-ins: one value and a shape, never the weights
        node = next(n for n in graph_def.node if n.name == name)
        assert node.op == "Const" and len(node.attr["value"].tensor.tensor_content) < 8
    assert not [n for n in graph_def.node if n.op in ("ReadVariableOp", "VarHandleOp")]


def test_freezing_with_values():
    fn, w, _ = _function()
    frozen, graph_def = tf_private.freeze_with_values(fn)
    x = tf.ones([2, 2])
    np.testing.assert_allclose(frozen(x)[0], fn(x), rtol=1e-6)
    assert not [n for n in graph_def.node if n.op in ("ReadVariableOp", "VarHandleOp")]


def test_a_variables_buffer_is_shared_not_copied():
    _, w, s = _function()
    array = tf_private.variable_buffer(w)
    assert np.shares_memory(array, tf_private.variable_buffer(w))
    np.testing.assert_array_equal(array, w.numpy())
    assert np.asarray(tf_private.variable_buffer(s)) == 3.0  # a scalar: a NumPy scalar


def test_registered_op_defs():
    assert [a.name for a in tf_private.op_def("FusedBatchNormV3").output_arg][0] == "y"
    assert tf_private.op_def("NoSuchOpGraphfold") is None


def test_a_function_body_rebuilt_with_input_shapes():
    fn, _, _ = _function()
    library = fn.graph.as_graph_def().library
    assert not library.function  # the einsum is inline: make a nested call
    inner = tf.function(lambda x: tf.nn.relu(x) * 2.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)])
    def outer(x):
        return inner(x)

    function = outer.get_concrete_function().graph.as_graph_def().library.function[0]
    function.arg_attr[0].attr.pop("_output_shapes")  # as a loaded SavedModel's calls are
    body = tf_private.function_body(function, [tf.TensorShape([7, 5])])
    assert body.outputs[0].shape.as_list() == [7, 5]


def test_a_saved_model_fingerprint(tmp_path):
    module = tf.Module()
    module.f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([], tf.float32)])
    tf.saved_model.save(module, str(tmp_path))
    from tensorflow.core.protobuf import fingerprint_pb2

    written, made = (
        fingerprint_pb2.FingerprintDef.FromString(data)
        for data in (
            (tmp_path / "fingerprint.pb").read_bytes(),
            tf_private.saved_model_fingerprint(str(tmp_path)),
        )
    )
    written.ClearField("uuid")
    made.ClearField("uuid")  # a random id per call
    assert made == written and made.saved_model_checksum


def test_whether_the_runtime_started():
    assert tf_private.runtime_started() in (True, False)
    tf.constant(1.0) + 1.0  # an eager op starts it
    assert tf_private.runtime_started() is True
