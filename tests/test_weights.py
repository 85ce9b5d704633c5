"""Weights kept out of the GraphDef while rewriting, written as constants or as variables
(``weights=``), and signatures that are one function folded once."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.cli.command import main
from graphfold.convert.freeze import freeze
from graphfold.serving import saved_model, saved_weights
from graphfold.serving.saved_model import BadInput, read_saved_model

import savedmodel_fixtures as F

TOL = 1e-5


def _largest_const(path: str) -> int:
    """Bytes of the largest constant anywhere in saved_model.pb (graph and functions)."""
    graph_def = read_saved_model(path).meta_graphs[0].graph_def
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return max(
        (len(n.attr["value"].tensor.tensor_content) for n in nodes if n.op == "Const"), default=0
    )


def _batch_norms(path: str) -> int:
    """Batch norms left in a SavedModel's graph and functions (``helpers.batch_norm_census``)."""
    from helpers import batch_norm_census

    return batch_norm_census(read_saved_model(path).meta_graphs[0].graph_def)


def _variables_bytes(path: str) -> int:
    folder = os.path.join(path, "variables")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _assert_same_outputs(source, dst, key):
    feeds = F.random_feeds(source, key, batch=3, seed=2)
    want = F.run_tf2(source, key, feeds)
    for got in (F.run_tf2(dst, key, feeds), F.run_tf1(dst, key, feeds)):
        assert set(got) == set(want)
        for name, value in want.items():
            assert F.rel_err(value, got[name]) <= TOL, name


def test_auto_writes_variables_where_the_original_reads_variables(src, tmp_path):
    """The default (issue 20): an original that reads variables gets variables, folded, which
    serve no slower and load in no more memory than the original (tools/bench_serving.py);
    constants would peak at about +8x the weights in TF Serving."""
    source, dst = src("keras3"), str(tmp_path / "out")
    result = graphfold.optimize_saved_model(source, dst)
    assert result.weights == "variables" and not result.notes
    assert result.written and all(v.status == "ok" for v in result.verification.values())
    # saved_model.pb holds the graph only; the folded weights are in variables/
    assert _largest_const(dst) < 1024
    loaded = tf.saved_model.load(source)
    kernels = sum(
        v.shape.num_elements() * 4
        for v in loaded.signatures["serving_default"].variables
        if len(v.shape) == 4
    )
    assert _variables_bytes(dst) > kernels
    assert _batch_norms(source) == 7 and _batch_norms(dst) == 0  # folded, not copied
    for key in ("serve", "serving_default"):
        _assert_same_outputs(source, dst, key)


def _constants_original(source: str, path: str) -> str:
    """``source`` frozen (``rewrite.freeze_only``: its weights constants, nothing folded) and
    saved: a SavedModel that reads no variable, as a frozen graph saved as one does."""
    from graphfold.convert.rewrite import freeze_only

    loaded = tf.saved_model.load(source)
    frozen = freeze_only(loaded.signatures["serving_default"])
    tf.saved_model.save(tf.Module(), path, signatures={"serving_default": frozen.function})
    return path


def test_auto_keeps_constants_where_the_original_holds_constants(src, tmp_path):
    """An original whose weights are constants already pays for them: auto keeps constants
    (variables could serve it slower on CPU), and says why."""
    source = _constants_original(src("keras3"), str(tmp_path / "frozen"))
    assert not tf.saved_model.load(source).signatures["serving_default"].variables
    dst = str(tmp_path / "out")
    result = graphfold.optimize_saved_model(source, dst)
    assert result.weights == "constants"
    assert any("reads no variable" in note for note in result.notes), result.notes
    assert _largest_const(dst) > 1024
    assert _batch_norms(source) == 7 and _batch_norms(dst) == 0
    _assert_same_outputs(source, dst, "serving_default")


def test_constants_when_asked(src, tmp_path):
    source, dst = src("keras3"), str(tmp_path / "out")
    result = graphfold.optimize_saved_model(source, dst, weights="constants")
    assert result.weights == "constants" and not result.notes
    assert _largest_const(dst) > 1024
    assert _variables_bytes(dst) < _variables_bytes(source) / 4
    assert _batch_norms(dst) == 0


def test_the_summary_states_the_weights_trade_off(src, tmp_path, capsys):
    """One line before the final one: the mode written, and what the other would give."""
    assert main(["optimize", src("keras3"), str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].startswith(f"wrote {tmp_path / 'a'}:")
    assert lines[-2].startswith(
        "weights: variables, as the original reads them (auto): serves "
        "no slower than the original and loads in no more memory;"
    )
    assert "--weights constants serves faster at small batches" in lines[-2]
    assert main(["optimize", src("keras3"), str(tmp_path / "b"), "--weights", "constants"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2].startswith("weights: constants, as asked: fastest at small batches on CPU")
    assert "+8x the weights" in lines[-2]


@pytest.mark.parametrize("name", ["tf_keras", "two_signatures", "table"])
def test_variables_on_every_kind_of_source(src, tmp_path, name):
    """FusedBatchNormV3, a copied-through signature beside a folded one, a lookup table."""
    source, dst = src(name), str(tmp_path / "out")
    result = graphfold.optimize_saved_model(source, dst, weights="variables")
    assert result.weights == "variables" and result.written
    assert all(v.status != "failed" for v in result.verification.values())
    if name == "table":  # a lookup table and a variable-assigning batch norm stay
        assert sorted(result.unchanged) == ["lookup", "train_keras"]
        assert len(result["serving_default"].folded) == 1
    else:
        assert not result.unchanged and _batch_norms(source) > 0 and _batch_norms(dst) == 0
    for key in result:
        if key not in result.unchanged and result.verification[key].status == "ok":
            _assert_same_outputs(source, dst, key)


def test_a_bad_weights_value_is_refused(src, tmp_path, capsys):
    with pytest.raises(
        BadInput, match="weights='bytes': must be one of auto, constants, variables"
    ):
        graphfold.optimize_saved_model(src("keras3"), str(tmp_path / "out"), weights="bytes")
    assert main(["optimize", src("keras3"), str(tmp_path / "out"), "--weights", "bytes"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bytes'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_weights_variables_reports_it(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["optimize", src("keras3"), str(dst), "--weights", "variables", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["weights"] == "variables"
    assert _largest_const(str(dst)) < 1024
    assert all(s["rewritten"] for s in document["signatures"].values())
    assert _batch_norms(str(dst)) == 0


def test_one_function_under_two_keys_is_folded_once(src, tmp_path, monkeypatch):
    """Keras' export: ``serve`` and ``serving_default`` are one function, detected before
    freezing; it is rewritten once and verified once, and both keys get the result."""
    calls = []
    real = saved_model.fold_signature

    def counting(fn, *args):
        calls.append(fn)
        return real(fn, *args)

    monkeypatch.setattr(saved_model, "fold_signature", counting)
    source, dst = src("keras3"), str(tmp_path / "out")
    loaded = tf.saved_model.load(source)
    assert saved_model.same_functions(loaded, ["serve", "serving_default"]) == {
        "serve": "serve",
        "serving_default": "serve",
    }
    result = graphfold.optimize_saved_model(source, dst)
    assert len(calls) == 1
    assert result["serve"] is result["serving_default"]
    assert result.verification["serving_default"].status == "ok"
    _assert_same_outputs(source, dst, "serving_default")


def test_different_functions_are_not_merged(src):
    loaded = tf.saved_model.load(src("two_signatures"))
    assert saved_model.same_functions(loaded, ["predict", "single"]) == {
        "predict": "predict",
        "single": "single",
    }


def test_freezing_copies_no_weight(src):
    """The frozen GraphDef holds stubs; their values are the variables' own buffers."""
    from graphfold.fold.weights import Weights

    loaded = tf.saved_model.load(src("keras3"))
    fn = loaded.signatures["serving_default"]
    weights = Weights()
    frozen = freeze(fn, weights)
    assert len(weights) == len(fn.variables)
    assert (
        max(
            len(n.attr["value"].tensor.tensor_content)
            for n in frozen.graph_def.node
            if n.op == "Const"
        )
        < weights.threshold
    )
    for name in weights.names():
        variable = weights.variable(name)
        assert variable is not None
        assert np.shares_memory(weights.get(name), variable.value()._numpy())  # no copy
        assert not weights.get(name).flags.writeable
    full = freeze(fn)  # the plain frozen graph: the same nodes, values inlined
    assert sorted(n.name for n in full.graph_def.node) == sorted(
        n.name for n in frozen.graph_def.node
    )
    assert weights.inline(frozen.graph_def) == full.graph_def


def test_rewrite_with_variables_matches_the_original():
    keras = graphfold.examples.keras_module(False)
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(32, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    )
    graphfold.examples.randomise(model, np.random.default_rng(5))
    fn = graphfold.examples.concrete(model, (6, 6, 3))
    folded = graphfold.rewrite(fn, weights="variables")
    assert folded.variables and all(isinstance(v, tf.Variable) for v in folded.variables)
    assert {id(v) for v in folded.function.variables} >= {id(v) for v in folded.variables}
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32))
    assert F.rel_err(fn(x), folded(x)) <= TOL
    assert len(folded.report.folded) == 1


def test_inspect_reports_both_keys_of_one_function(src, capsys):
    """inspect folds the shared function once and builds nothing: both keys are reported."""
    from graphfold.serving.saved_model import inspect_saved_model

    result = inspect_saved_model(src("keras3"))
    assert sorted(result) == ["serve", "serving_default"]
    assert result["serve"] is result["serving_default"]
    assert len(result["serve"].folded) == 7
    assert main(["inspect", src("keras3")]) == 0
    assert "same graph as 'serve'" in capsys.readouterr().out


def test_constants_past_the_protobuf_limit_are_refused(src, tmp_path, monkeypatch):
    monkeypatch.setattr(saved_model, "PROTOBUF_LIMIT", 1000)  # bytes: this model is over
    with pytest.raises(BadInput, match="weights='constants': .*cannot be constants.*use variables"):
        graphfold.optimize_saved_model(src("keras3"), str(tmp_path / "out"), weights="constants")
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("name", ["keras3", "two_signatures", "table"])
def test_constants_are_written_into_saved_model_pb_after_saving(src, tmp_path, name):
    """Marked constants (saved empty, filled into saved_model.pb): none is left marked or
    empty, every weight is a constant of its own value, on one function under two keys, two
    functions with weights of the same names, and beside a copied-through signature."""
    source, dst = src(name), str(tmp_path / "out")
    result = graphfold.optimize_saved_model(source, dst, weights="constants")
    assert result.weights == "constants" and result.written
    graph_def = read_saved_model(dst).meta_graphs[0].graph_def
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    assert not [n.name for n in nodes if saved_weights.MARK in n.attr]
    for node in nodes:
        if node.op == "Const":
            value = tf.make_ndarray(node.attr["value"].tensor)  # full, not a bare shape
            tensor = node.attr["value"].tensor
            if value.size > 1 and tensor.dtype == tf.float32.as_datatype_enum:
                assert len(tensor.tensor_content) == value.nbytes, node.name
    for key in result:
        if key not in result.unchanged and result.verification[key].status == "ok":
            _assert_same_outputs(source, dst, key)


def test_filling_refuses_marks_and_weights_that_do_not_match(tmp_path):
    """A marked constant with no value, or a value with no marked constant, is an error: never
    a model that computes with zeros."""
    from graphfold.convert.function import op_name
    from graphfold.fold.weights import Weights

    held = Weights()
    held.put("w", np.arange(600, dtype=np.float32).reshape(20, 30))
    marked = saved_weights.marked_constants(held, "serve", op_name)

    @tf.function(input_signature=[tf.TensorSpec([None, 20], tf.float32, name="x")])
    def serve(x):
        return {"y": tf.matmul(x, marked()[0])}

    module = tf.Module()
    path = str(tmp_path / "m")
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
    saved = open(os.path.join(path, "saved_model.pb"), "rb").read()
    other = Weights()
    other.put("v", np.ones(600, np.float32))
    with pytest.raises(
        RuntimeError,
        match=r"no node for \['serve: v'\].*no value for "
        r"\['serve: w'\]",
    ):
        saved_weights.fill(path, {"serve": other})
    assert open(os.path.join(path, "saved_model.pb"), "rb").read() == saved
    saved_weights.fill(path, {"serve": held})
    assert len(held) == 0  # each array let go once written
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    got = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    np.testing.assert_allclose(got, x @ np.arange(600, dtype=np.float32).reshape(20, 30), rtol=1e-5)


def test_the_original_s_unread_copy_of_the_weights_is_let_go(src, tmp_path):
    """A Keras 3 export tracks every weight twice (``variables`` and ``_all_variables``, both
    restored); optimize drops the copy no function reads (1x the weights, issue 20), and never
    a variable that a signature or another function of the model reads."""
    loaded = tf.saved_model.load(src("keras3"))
    read = {id(v) for v in loaded.signatures["serving_default"].variables}
    assert loaded._all_variables and not {id(v) for v in loaded._all_variables} & read
    assert saved_model.release_unread_variables(loaded) == ["_all_variables"]
    assert not hasattr(loaded, "_all_variables")
    assert {id(v) for v in loaded.variables} == read

    module = tf.Module()
    module.signed = [tf.Variable(np.ones(3, np.float32))]
    module.helper_only = [tf.Variable(np.full(3, 2.0, np.float32))]
    module.unread = [tf.Variable(np.zeros(3, np.float32))]
    module.helper = tf.function(
        lambda x: x * module.helper_only[0], input_signature=[tf.TensorSpec([3], tf.float32)]
    )
    serve = tf.function(
        lambda x: {"y": x * module.signed[0]}, input_signature=[tf.TensorSpec([3], tf.float32)]
    )
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": serve})
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    assert saved_model.release_unread_variables(loaded) == ["unread"]
    assert loaded.signed and loaded.helper_only
    assert loaded.helper(tf.ones(3)).numpy().tolist() == [2.0, 2.0, 2.0]
