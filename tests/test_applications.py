"""keras.applications ResNet50 (53 batch norms) and MobileNetV2 (52), Keras 3 and tf-keras,
weights=None with randomised BN statistics and biases: every BN folds, none is left, and the
outputs agree to 1e-5. Each model is built and rewritten once (module-scoped fixture)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import (
    assert_close,
    assert_no_batch_norm,
    batch_norm_census,
    check_rewrite,
    freeze,
    randomise_keras_model,
)

APPLICATIONS = {
    # name: (input size, BN count, layer names the report must show)
    "ResNet50": (64, 53, ["conv1_bn", "conv2_block1_0_bn", "conv5_block3_3_bn"]),
    "MobileNetV2": (
        96,
        52,
        ["bn_Conv1", "expanded_conv_depthwise_BN", "block_16_project_BN", "Conv_1_bn"],
    ),
}
CASES = [(framework, name) for framework in ("keras", "tf_keras") for name in APPLICATIONS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{n}" for f, n in CASES])
def application(request):
    framework, name = request.param
    K = pytest.importorskip(framework)
    size, n_bn, layer_names = APPLICATIONS[name]
    model = getattr(K.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    assert randomise_keras_model(model, np.random.default_rng(2024)) == n_bn
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, size, size, 3], tf.float32, name="x")
    )
    rng = np.random.default_rng(7)
    # check_rewrite: fn's graph and outputs unchanged, report JSON-serialisable, error <= 1e-5
    folded = check_rewrite(fn, rng, batch=2)
    return dict(
        framework=framework,
        name=name,
        fn=fn,
        folded=folded,
        n_bn=n_bn,
        layer_names=layer_names,
        size=size,
    )


def test_every_batch_norm_folds(application):
    report = application["folded"].report
    n_bn = application["n_bn"]
    assert len(report.batch_norms) == n_bn, report.summary()
    assert len(report.folded) == n_bn, str(report)
    assert not report.not_folded


def test_no_batch_norm_op_is_left(application):
    folded = application["folded"]
    assert_no_batch_norm(folded.graph_def)
    assert not any(op.startswith("FusedBatchNorm") for op in folded.report.ops_after)
    if application["framework"] == "tf_keras":
        assert folded.report.ops_before.get("FusedBatchNormV3") == application["n_bn"]
    # as many convolutions as before: folding adds no layer
    for op in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
        assert folded.report.ops_after.get(op, 0) == folded.report.ops_before.get(op, 0), op


def test_outputs_agree(application):
    fn, folded, size = application["fn"], application["folded"], application["size"]
    x = tf.constant(np.random.default_rng(11).normal(size=(2, size, size, 3)), tf.float32)
    err = assert_close(fn, folded, ((x,), {}), tol=1e-5)
    assert err <= 1e-5


def test_report_names_the_keras_layers(application):
    report = application["folded"].report
    text = str(report)
    for layer_name in application["layer_names"]:
        assert layer_name in text, layer_name
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["summary"]["folded"] == application["n_bn"]
    assert len([e for e in as_dict["entries"] if e["is_batch_norm"]]) == application["n_bn"]


def test_report_matches_an_independent_census(application):
    """The report's count equals the batch-norm ops and scopes counted in the frozen graph (and
    the Keras layers counted by ``randomise``)."""
    report = application["folded"].report
    census = batch_norm_census(freeze(application["fn"]).graph_def)
    assert len(report.batch_norms) == census == application["n_bn"], report.summary()
