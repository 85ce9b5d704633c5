"""Never a "yes" for work not done (issue 17): weights written as variables are folded, a crash
is a failure and never a signature "copied through" with exit 0, and the final line says NOT
OPTIMIZED about a signature that was not."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import graphfold
import savedmodel_fixtures as F
from graphfold import repo_task, saved_model
from graphfold.cli import main
from graphfold.errors import RewriteFailed
from graphfold.examples import keras_module, randomise
from helpers import batch_norm_census, error_line, rel_err

TOL = 1e-5


def _written_batch_norms(path: str) -> int:
    """Batch norms left anywhere in a written SavedModel's graph (its functions included)."""
    return batch_norm_census(saved_model.read_saved_model(path).meta_graphs[0].graph_def)


def _conv_bn_dense(seed: int):
    """Conv -> BN -> Flatten -> Dense: the BN folds into the conv; the dense kernel (2880
    bytes, a stub weight) is left as it was."""
    keras = keras_module(False)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    randomise(model, np.random.default_rng(seed))
    return model


@pytest.mark.parametrize("keep_graph_def", [True, False])
def test_rewrite_with_variables_binds_the_weights_it_did_not_change(keep_graph_def):
    """``rewrite(fn, weights="variables", keep_graph_def=False)`` raised ``pruned(x) takes 1
    positional arguments, got 2``: the weights were let go before the re-import read them."""
    model = _conv_bn_dense(1)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3], tf.float32))
    folded = graphfold.rewrite(fn, weights="variables", keep_graph_def=keep_graph_def)
    assert len(folded.report.folded) == 1 and not folded.report.not_folded
    assert batch_norm_census(folded.function.graph.as_graph_def()) == 0
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32))
    assert rel_err(fn(x), folded(x)) <= TOL


@pytest.mark.parametrize("weights", ["variables", "constants"])
def test_a_keras_export_is_folded_whatever_holds_the_weights(tmp_path, weights):
    """A Keras 3 ``model.export`` with a weight no fold changes: every batch norm is gone from
    the written graph, in both modes (``--weights variables`` copied it through unchanged)."""
    source, dst = str(tmp_path / "export"), str(tmp_path / "out")
    _conv_bn_dense(2).export(source, verbose=False)
    result = graphfold.optimize_saved_model(source, dst, weights=weights)
    assert result.weights == weights and not result.unchanged
    assert result.rewritten == ["serve", "serving_default"]
    assert all(len(result[k].folded) == 1 for k in result)
    assert _written_batch_norms(source) > 0 and _written_batch_norms(dst) == 0
    feeds = F.random_feeds(source, "serving_default", batch=3, seed=2)
    want = F.run_tf2(source, "serving_default", feeds)
    for got in (F.run_tf2(dst, "serving_default", feeds),
                F.run_tf1(dst, "serving_default", feeds)):
        for name, value in want.items():
            assert rel_err(value, got[name]) <= TOL


def test_a_scalar_variable_is_frozen():
    """``tf.Variable(2.0)`` crashed freezing (``Cannot set flags on array scalars``)."""
    keras = keras_module(False)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization()])
    randomise(model, np.random.default_rng(3))
    scale = tf.Variable(-2.5)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32)])
    def fn(x):
        return model(x, training=False) * scale

    folded = graphfold.rewrite(fn)
    assert len(folded.report.folded) == 1
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype(np.float32))
    assert rel_err(fn(x), folded(x)) <= TOL


def _crash(*args, **kwargs):
    raise RuntimeError("boom: an exception no rule expects")


def test_a_crash_is_a_failure_not_a_copy(src, tmp_path, monkeypatch, capsys):
    """Any exception but the named reasons (``NotFreezable``) fails the run: nothing written,
    exit 1, one line naming the signature and the exception, the traceback with --verbose."""
    monkeypatch.setattr(saved_model, "fold_signature", _crash)
    dst = tmp_path / "out"
    with pytest.raises(RewriteFailed, match=r"signature 'serv.*': graphfold failed to rewrite "
                                            r"it \(RuntimeError: boom"):
        graphfold.optimize_saved_model(src("keras3"), str(dst))
    assert not dst.exists() and os.listdir(tmp_path) == []
    assert main(["optimize", src("keras3"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in error_line(err) and "Traceback" not in err
    assert "--verbose" in err and not dst.exists()
    assert main(["optimize", src("keras3"), str(dst), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_crash" in err and not dst.exists()
    assert main(["inspect", src("keras3")]) == 0      # inspect folds without fold_signature
    monkeypatch.setattr(saved_model, "fold", _crash)
    assert main(["inspect", src("keras3")]) == 1
    assert "RuntimeError: boom" in error_line(capsys.readouterr().err)


def test_a_crash_fails_its_version_in_a_repository(src, tmp_path, monkeypatch):
    """The unit of work of ``optimize-repo`` and the Beam pipeline: a crash fails the version,
    with the error and its traceback in the record; nothing is written."""
    monkeypatch.setattr(saved_model, "fold_signature", _crash)
    task = repo_task.Task("m", "1", src("keras3"), str(tmp_path / "m" / "1"),
                          repo_task.normalized_options({}))
    record = repo_task.run_task(task)
    assert record["status"] == "failed"
    assert "graphfold failed to rewrite it (RuntimeError: boom" in record["error"]
    assert "_crash" in record["traceback"]
    assert not (tmp_path / "m" / "1").exists()


def test_a_signature_copied_through_is_not_optimized(src, tmp_path, capsys):
    """A signature that captures a lookup table is copied through (exit 0), and the final line
    says NOT OPTIMIZED about it; "verified" speaks of the rewritten signatures only."""
    dst = tmp_path / "out"
    assert main(["optimize", src("table"), str(dst), "--signature", "lookup",
                 "--signature", "serving_default"]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 signature(s) rewritten, 1 NOT OPTIMIZED (lookup: it captures 1 resource(s)" \
        in final and "2 copied unchanged" in final and "; verified;" in final
    assert main(["optimize", src("table"), str(tmp_path / "out2"), "--signature", "lookup",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["signatures"]["lookup"]["rewritten"] is False
    assert main(["optimize", src("table"), str(tmp_path / "out3"), "--signature",
                 "lookup"]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0 signature(s) rewritten, 1 NOT OPTIMIZED" in final
    assert "nothing rewritten, nothing to verify" in final and "; verified" not in final
