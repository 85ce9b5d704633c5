"""Verification that checks what it claims (issue 17, item 5): realistic sizes where a signature
leaves dimensions unknown (not 1 x 1 images), ``--input-shape`` / ``input_shapes=``, a tolerance
that follows the precision computed in (mixed_float16 models), and no Cast round trips left where
mixed-precision batch norms were folded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.cli.command import main
from graphfold.convert import input_shapes
from graphfold.errors import BadInput
from graphfold.fold import casts
from graphfold.serving import warmup

from helpers import bn_params, op_counts, weight
from helpers import fused_bn as bn


def _any_size_model(path):
    """Keras 3, ``Input((None, None, 3))``: conv/BN/relu twice, exported (keras-hub's default
    exports leave height and width unknown the same way)."""
    import keras

    from graphfold import examples

    inputs = keras.Input((None, None, 3), name="x")
    x = inputs
    for _ in range(2):
        x = keras.layers.Conv2D(4, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, x)
    examples.randomise(model, np.random.default_rng(0))
    model.export(path, verbose=False)


@pytest.fixture(scope="module")
def any_size(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("any_size") / "m")
    _any_size_model(path)
    return path


def test_unknown_height_and_width_are_verified_on_224_images(any_size, tmp_path):
    result = graphfold.optimize_saved_model(any_size, str(tmp_path / "out"))
    check = result.verification["serving_default"]
    assert check.status == "ok" and check.inputs == {"x": (1, 224, 224, 3)}
    assert check.shape_note is None


def test_input_shape_on_optimize_and_verify(any_size, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["optimize", any_size, out, "--input-shape", "x=2,48,40,3", "--json"]) == 0
    document = capsys.readouterr().out
    assert '"x": [\n' in document and "48" in document
    result = graphfold.verify_saved_models(any_size, out, input_shapes={"x": (1, 33, 17, 3)})
    assert result.verification["serving_default"].inputs == {"x": (1, 33, 17, 3)}
    assert main(["verify", any_size, out, "--input-shape", "x=1,20,20,3"]) == 0
    assert "x[1, 20, 20, 3]" in capsys.readouterr().out


def test_input_shape_on_optimize_repo_reaches_every_version(any_size, tmp_path, capsys):
    """``optimize-repo --input-shape`` verifies each version on that shape (it is an option of
    the run: the records say so, and a re-run with another shape is not "already done")."""
    import json
    import shutil

    repo, dst = tmp_path / "repo", str(tmp_path / "dst")
    for version in ("1", "2"):
        shutil.copytree(any_size, repo / "m" / version)
    argv = ["optimize-repo", str(repo), dst, "--versions", "all", "--jobs", "1", "--json"]
    assert main([*argv, "--input-shape", "x=1,24,20,3"]) == 0
    document = json.loads(capsys.readouterr().out)
    for version in document["versions"]:
        check = version["report"]["signatures"]["serving_default"]["verification"]
        assert check["inputs"] == {"x": [1, 24, 20, 3]}, version["version"]
    assert main([*argv, "--input-shape", "x=1,16,16,3"]) == 0
    again = json.loads(capsys.readouterr().out)
    for version in again["versions"]:
        assert version["status"] == "ok", version
        check = version["report"]["signatures"]["serving_default"]["verification"]
        assert check["inputs"] == {"x": [1, 16, 16, 3]}


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "x=1,64,64,4",
            "--input-shape x=1,64,64,4: input 'x' of signature 'serve' has shape [?, ?, ?, 3]",
        ),
        ("x=1,64,64", "input 'x' of signature"),
        ("image=1,64,64,3", "no signature has an input 'image'"),
        ("x=1,0,64,3", "every dimension must be at least 1"),
        ("x", "expected KEY=D1,D2,..."),
    ],
)
def test_a_shape_the_signature_cannot_take_is_refused(
    any_size, tmp_path, capsys, argument, message
):
    out = str(tmp_path / "out")
    assert main(["optimize", any_size, out, "--input-shape", argument]) == 2
    assert message in capsys.readouterr().err and not os.path.exists(out)


def test_the_warm_up_records_shapes_size_a_signature_verified_on_random_inputs(tmp_path):
    """Two signatures take ``x``; SRC's warm-up records call one with 1 x 50 x 60 x 3 images:
    the other, verified on random inputs, takes that shape too."""
    rng = np.random.default_rng(1)
    w, p = weight((3, 3, 3, 4), rng), bn_params(4, rng)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32, name="x")

    def body(x):
        return {"y": tf.nn.relu(bn(tf.nn.conv2d(x, w, 1, "SAME"), p))}

    module = tf.Module()
    module.a = tf.function(body, input_signature=[spec])
    module.b = tf.function(lambda x: {"z": body(x)["y"] * 2.0}, input_signature=[spec])
    src = str(tmp_path / "src")
    tf.saved_model.save(module, src, signatures={"a": module.a, "b": module.b})
    image = rng.normal(size=(1, 50, 60, 3)).astype("float32")
    warmup.write(os.path.join(src, warmup.PATH), [warmup.build("a", {"x": image})])
    result = graphfold.optimize_saved_model(src, str(tmp_path / "out"))
    assert result.verification["a"].source == "warm-up records (1)"
    assert result.verification["b"].source == "random inputs"
    assert result.verification["b"].inputs == {"x": (1, 50, 60, 3)}


def test_graph_def_file_placeholders_with_unknown_dims(tmp_path):
    rng = np.random.default_rng(2)
    w, p = weight((3, 3, 3, 4), rng), bn_params(4, rng)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="x")
        tf.identity(tf.nn.relu(bn(tf.nn.conv2d(x, w, 1, "SAME"), p)), name="y")
    src = str(tmp_path / "g.pb")
    with open(src, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    from graphfold.serving.graph_def_file import optimize_graph_def_file

    result = optimize_graph_def_file(src, str(tmp_path / "out.pb"))
    assert result.verification["graph"].inputs == {"x": (1, 224, 224, 3)}
    result = optimize_graph_def_file(
        src, str(tmp_path / "out2.pb"), input_shapes={"x": (3, 10, 12, 3)}
    )
    assert result.verification["graph"].inputs == {"x": (3, 10, 12, 3)}
    with pytest.raises(BadInput, match="signature 'graph' has shape"):
        optimize_graph_def_file(src, str(tmp_path / "out3.pb"), input_shapes={"x": (1, 9, 9, 2)})


def test_default_shapes_and_the_memory_budget():
    spec = tf.TensorSpec
    assert input_shapes.default_shape(spec([None, None, None, 3]), 2) == ((2, 224, 224, 3), None)
    assert input_shapes.default_shape(spec([None, 3, None, None]), 1)[0] == (1, 3, 224, 224)
    assert input_shapes.default_shape(spec([None, None, None, None]), 1)[0] == (1, 224, 224, 3)
    assert input_shapes.default_shape(spec([None, None], tf.int32), 1)[0] == (1, 32)
    assert input_shapes.default_shape(spec([None, None, 80]), 1)[0] == (1, 32, 80)
    shape, note = input_shapes.default_shape(spec([None, None, None, 1024]), 1)
    assert shape == (1, 112, 112, 1024) and "not 224" in note and "values per input" in note
    assert np.prod(shape) <= input_shapes.MAX_ELEMENTS


# ---- mixed precision ----------------------------------------------------------------------------


@pytest.fixture
def mixed_float16():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield keras
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _mobilenet_like(keras, seed=0):
    """A small MobileNetV2-like model (conv/BN/ReLU6, inverted residual, dense)."""
    from graphfold import examples

    L = keras.layers
    inputs = keras.Input((32, 32, 3), name="x")
    x = L.ReLU(6.0)(
        L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs))
    )
    for _ in range(2):
        y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(32, 1, use_bias=False)(x)))
        y = L.ReLU(6.0)(
            L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(y))
        )
        y = L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(y))
        x = L.Add()([x, y])
    x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, L.Activation("linear", dtype="float32")(x))
    examples.randomise(model, np.random.default_rng(seed))
    return model


def test_mixed_float16_passes_the_default_check_and_fails_1e_5_with_a_hint(
    mixed_float16, tmp_path, capsys
):
    src = str(tmp_path / "src")
    _mobilenet_like(mixed_float16).export(src, verbose=False)
    result = graphfold.optimize_saved_model(src, str(tmp_path / "out"))
    check = result.verification["serving_default"]
    assert result.verified and len(result["serving_default"].folded) == 7
    assert tf.float16 in check.computation and check.max_rel > 1e-5
    assert {o.tolerance for o in check.outputs} == {2e-2}
    out = str(tmp_path / "strict")
    assert main(["optimize", src, out, "--tolerance", "1e-5"]) == 1
    err = capsys.readouterr().err
    assert "> tolerance 1e-05 (given; set it with --tolerance T)" in err
    assert "failed output(s): serve/output_0, serving_default/output_0" in err
    assert "graphfold inspect" in err
    assert not os.path.exists(out)


def test_the_default_tolerance_follows_outputs_and_computation():
    from graphfold.convert import tolerance

    assert tolerance.default(tf.float32, frozenset({tf.float32})) == (1e-5, "default")
    assert tolerance.default(tf.float32, frozenset({tf.float32, tf.float16})) == (
        2e-2,
        "float16 computation",
    )
    assert tolerance.default(tf.bfloat16, frozenset({tf.float32})) == (6e-2, "bfloat16 output")
    assert tolerance.default(tf.int32, frozenset()) == (1e-5, "default")


def test_cast_round_trips_where_batch_norms_were_are_removed(mixed_float16, monkeypatch):
    from graphfold import examples

    model = _mobilenet_like(mixed_float16)
    fn = examples.concrete(model, (32, 32, 3))
    folded = graphfold.rewrite(fn)
    with monkeypatch.context() as patch:
        patch.setattr(casts, "remove_round_trips", lambda graph: 0)
        kept = graphfold.rewrite(fn)
    removed = op_counts(kept.graph_def)["Cast"] - op_counts(folded.graph_def)["Cast"]
    assert removed == 2 * 7  # a float16 -> float32 -> float16 pair per batch norm
    assert any("7 Cast round trip(s)" in note for note in folded.report.notes)
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), tf.float32)
    np.testing.assert_array_equal(kept(x).numpy(), folded(x).numpy())  # bit for bit


def test_only_exact_round_trips_are_removed():
    """float32 -> float16 -> float32 rounds: it stays; a fetched outer Cast keeps its name."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        h = tf.compat.v1.placeholder(tf.float16, [None, 4], name="h")
        tf.cast(tf.cast(x, tf.float16), tf.float32, name="rounds")
        tf.cast(tf.cast(h, tf.float32), tf.float16, name="exact")
    from graphfold.convert.rewrite import optimize_graph_def

    optimized, report = optimize_graph_def(graph.as_graph_def(), ["x", "h"], ["rounds", "exact"])
    nodes = {n.name: n for n in optimized.node}
    assert nodes["exact"].op == "Identity" and nodes["exact"].input == ["h"]
    assert nodes["rounds"].op == "Cast"
