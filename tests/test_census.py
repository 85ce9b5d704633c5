"""Every batch norm is in the report: an independent census of the frozen graph (by op type and
name scope, ``helpers.batch_norm_census``) against the report, on every SavedModel fixture, on
a grouped convolution whose nested call hides shapes, and on batch norms nested in custom layers
(which ``graphfold.examples.randomise`` must reach)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold import examples
from graphfold.cli.command import main
from graphfold.convert.freeze import freeze
from graphfold.serving.saved_model import inspect_saved_model, read_saved_model

import savedmodel_fixtures as F
from helpers import assert_close, batch_norm_census, random_inputs


@pytest.mark.parametrize("name", sorted(F.BUILDERS))
def test_report_counts_every_batch_norm_of_every_saved_model(name, tmp_path_factory):
    source = F.get(name, tmp_path_factory)
    if name == "no_signatures":
        with pytest.raises(Exception, match="no signatures"):
            inspect_saved_model(source)
        return
    tags = tuple(read_saved_model(source).meta_graphs[0].meta_info_def.tags)
    result = inspect_saved_model(source, tags=tags)
    loaded = tf.saved_model.load(source, tags=list(tags))
    assert len(result), name
    for key, report in result.items():
        fn = loaded.signatures[key]
        graph_def = fn.graph.as_graph_def() if key in result.unchanged else freeze(fn).graph_def
        assert len(report.batch_norms) == batch_norm_census(graph_def), (key, str(report))
        for entry in report.not_folded:
            assert entry.reason, (key, entry)


def _grouped_conv_model(keras, rng, nested_bn=False):
    inp = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="grouped")(inp)
    y = keras.layers.BatchNormalization(name="grouped_bn")(y)
    y = keras.layers.Conv2D(6, 1, name="pointwise")(keras.layers.ReLU()(y))
    y = keras.layers.BatchNormalization(name="pointwise_bn")(y)
    model = keras.Model(inp, y)
    assert examples.randomise(model, rng) == 2
    return model


def test_grouped_conv_export_counts_its_batch_norm(tmp_path, capsys):
    """Keras 3 runs a grouped Conv2D in an XLA-compiled nested call that freezing leaves in
    place; in a loaded export its output has no static shape. The batch norm after it was
    missing from the report ("0 batch norms"): shapes are inferred from the call's body."""
    keras = pytest.importorskip("keras")
    model = _grouped_conv_model(keras, np.random.default_rng(5))
    path = str(tmp_path / "grouped")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # kept alive: fn reads its variables
    fn = loaded.signatures["serving_default"]
    census = batch_norm_census(freeze(fn).graph_def)
    assert census == 2
    folded = graphfold.rewrite(fn)
    report = folded.report
    assert len(report.batch_norms) == 2, str(report)
    (pointwise,) = [e for e in report.batch_norms if e.name.startswith("pointwise_bn")]
    assert pointwise.folded and pointwise.absorbed_by[0].endswith("pointwise_1/convolution"), str(
        report
    )
    grouped = [e for e in report.batch_norms if e.name.startswith("grouped_bn")]
    assert len(grouped) == 1 and (grouped[0].folded or grouped[0].reason), str(report)
    assert_close(fn, folded, random_inputs(fn, np.random.default_rng(1)))

    assert main(["inspect", path, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"batch_norms": 2' in out


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_randomise_reaches_batch_norms_nested_in_custom_layers(framework):
    """keras-hub and Model Garden keep batch norms inside custom layers (not in model.layers):
    randomise must reach every one, with negative γ in its default distribution, and the rewrite
    must report every one."""
    K = pytest.importorskip(framework)

    class ConvBlock(K.layers.Layer):
        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.conv = K.layers.Conv2D(filters, 3, padding="same")
            self.bn = K.layers.BatchNormalization()
            self.inner = Inner(filters)

        def call(self, x, training=False):
            return self.inner(
                tf.nn.relu(self.bn(self.conv(x), training=training)), training=training
            )

    class Inner(K.layers.Layer):
        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.conv = K.layers.Conv2D(filters, 1)
            self.bn = K.layers.BatchNormalization()

        def call(self, x, training=False):
            return self.bn(self.conv(x), training=training)

    inp = K.Input((8, 8, 3))
    model = K.Model(inp, ConvBlock(6, name="block2")(ConvBlock(6, name="block1")(inp)))
    assert not [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert examples.randomise(model, np.random.default_rng(3)) == 4
    bns = [
        layer
        for layer in examples.all_layers(model)
        if type(layer).__name__ == "BatchNormalization"
    ]
    assert len(bns) == 4
    gammas = np.concatenate([bn.get_weights()[0] for bn in bns])
    variances = np.concatenate([bn.get_weights()[3] for bn in bns])
    assert not np.allclose(gammas, 1) and (gammas < 0).any() and not np.allclose(variances, 1)
    for layer in examples.all_layers(model):
        if type(layer).__name__ == "Conv2D":
            assert np.any(layer.get_weights()[1] != 0), layer.name  # biases too

    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3], tf.float32)
    )
    folded = graphfold.rewrite(fn)
    assert len(folded.report.batch_norms) == 4 == batch_norm_census(freeze(fn).graph_def)
    assert len(folded.report.folded) == 4, str(folded.report)
    assert_close(fn, folded, random_inputs(fn, np.random.default_rng(2)))
