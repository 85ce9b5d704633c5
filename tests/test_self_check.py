"""``graphfold.rewrite`` checks its own result (issue 17, item 2): the re-imported function
against the original on random inputs, the outcome in the report, ``VerificationFailed`` with
the folded error and the freeze-only noise floor when it fails, ``verify=False`` to skip;
``optimize_saved_model`` verifies the written model and does not pay for a second check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.errors import BadInput, VerificationFailed
from graphfold.fold import tf_quirks

from helpers import bn_params, decomposed_bn, make, random_inputs, rel_err, weight
from helpers import fused_bn as bn


def _conv_bn(rng, spatial=(6, 6)):
    w, p = weight((3, 3, 3, 4), rng), bn_params(4, rng)
    return make(lambda x: tf.nn.relu(bn(tf.nn.conv2d(x, w, 1, "SAME"), p)), [*spatial, 3])


def test_the_outcome_is_in_the_report():
    folded = graphfold.rewrite(_conv_bn(np.random.default_rng(0)))
    check = folded.report.verification
    assert check.status == "ok" and check.inputs == {"x": (1, 6, 6, 3)}
    assert 0 < check.max_rel <= 1e-5 or check.max_rel == 0
    document = folded.report.to_dict()["verification"]
    assert document["status"] == "ok" and document["inputs"] == {"x": [1, 6, 6, 3]}
    json.dumps(folded.report.to_dict())
    assert "verification: rewrite: max abs error" in str(folded.report)


def _miscomputed(monkeypatch):
    """A rewrite that is wrong when TensorFlow runs it: the LeakyRelu workaround switched off
    (the fold then makes Conv2D -> BiasAdd -> AddV2 -> LeakyRelu, which TF 2.21 fuses with
    alpha 0.2)."""
    monkeypatch.setattr(tf_quirks, "QUIRKS", ())
    rng = np.random.default_rng(1)
    w, w2, p = weight((3, 3, 3, 8), rng), weight((1, 1, 3, 8), rng), bn_params(8, rng)
    return make(
        lambda x: tf.nn.leaky_relu(
            decomposed_bn(tf.nn.conv2d(x, w, 1, "SAME"), p) + tf.nn.conv2d(x, w2, 1, "SAME"),
            alpha=0.01,
        ),
        [None, None, 3],
    )


def test_a_wrong_result_raises_with_both_errors(monkeypatch):
    if ".".join(tf.__version__.split(".")[:2]) not in tf_quirks.LEAKY_RELU_FUSION.known_on:
        pytest.skip("needs a TensorFlow that miscomputes the LeakyRelu fusion")
    fn = _miscomputed(monkeypatch)
    with pytest.raises(VerificationFailed) as caught:
        graphfold.rewrite(fn)
    message, folded = str(caught.value), caught.value.result
    check = folded.report.verification
    assert check.status == "failed" and check.max_rel > 1e-2
    assert check.noise_floor is not None and check.noise_floor < 1e-5
    assert f"folded max rel error {check.max_rel:.3g}" in message
    assert f"freeze-only noise floor {check.noise_floor:.3g}" in message
    assert "output_0: relative error" in message and "tolerance=" in message
    assert "verify=False" in message
    # unknown height and width: a quick, not degenerate, size, and the line says so
    assert check.inputs == {"x": (1, 64, 64, 3)} and "64 x 64" in check.line()


def test_verify_false_skips_the_check(monkeypatch):
    if ".".join(tf.__version__.split(".")[:2]) not in tf_quirks.LEAKY_RELU_FUSION.known_on:
        pytest.skip("needs a TensorFlow that miscomputes the LeakyRelu fusion")
    fn = _miscomputed(monkeypatch)
    folded = graphfold.rewrite(fn, verify=False)
    assert folded.report.verification is None
    x = random_inputs(fn, np.random.default_rng(2))[0][0]
    assert rel_err(fn(x), folded(x)) > 1e-2  # what verify=False let through


def test_input_shapes_are_used_and_checked():
    fn = _conv_bn(np.random.default_rng(3), spatial=(None, None))
    folded = graphfold.rewrite(fn, input_shapes={"x": (2, 40, 30, 3)})
    assert folded.report.verification.inputs == {"x": (2, 40, 30, 3)}
    assert folded.report.verification.shape_note is None
    with pytest.raises(
        BadInput,
        match=r"input_shapes x=1,40,40,4: input 'x' of signature "
        r"'rewrite' has shape \[\?, \?, \?, 3\]",
    ):
        graphfold.rewrite(fn, input_shapes={"x": (1, 40, 40, 4)})
    with pytest.raises(BadInput, match="no signature has an input 'image'"):
        graphfold.rewrite(fn, input_shapes={"image": (1, 40, 40, 3)})
    with pytest.raises(BadInput, match="not with verify=False"):
        graphfold.rewrite(fn, verify=False, input_shapes={"x": (1, 40, 40, 3)})


def test_python_values_in_the_signature_are_passed_not_skipped():
    rng = np.random.default_rng(4)
    w, p = weight((1, 1, 3, 4), rng), bn_params(4, rng)

    @tf.function
    def body(x, training=False, scale=2.0):
        y = bn(tf.nn.conv2d(x, w, 1, "VALID"), p)
        return y * scale if not training else y

    fn = body.get_concrete_function(tf.TensorSpec([None, 4, 4, 3], name="x"))
    check = graphfold.rewrite(fn).report.verification
    assert check.status == "ok" and check.inputs == {"x": (1, 4, 4, 3)}


def test_optimize_saved_model_does_not_check_twice(tmp_path, monkeypatch):
    """It verifies the written model; the in-memory check would cost a second run."""
    from graphfold.convert import self_check

    rng = np.random.default_rng(5)
    fn = _conv_bn(rng)
    module = tf.Module()
    module.f = tf.function(fn)
    tf.saved_model.save(module, str(tmp_path / "src"), signatures={"serving_default": fn})

    def refuse(*args, **kwargs):
        raise AssertionError("rewrite's own check ran inside optimize_saved_model")

    monkeypatch.setattr(self_check, "check", refuse)
    for weights in ("constants", "variables"):
        result = graphfold.optimize_saved_model(
            str(tmp_path / "src"), str(tmp_path / f"out_{weights}"), weights=weights
        )
        assert result.verified and result["serving_default"].verification is None
