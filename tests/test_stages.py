"""The optimize run as named stages (issue 18): typed progress events in stage order, the result a
plain object (not a dict) whose one answer to "the same function" the tables use, and
``partial`` (``--no-partial``) acting on every source kind."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold import progress as progress_
from graphfold.cli.command import Console, main
from graphfold.cli.render import render_reports
from graphfold.errors import BadInput
from graphfold.serving.result import SavedModelResult
from graphfold.serving.saved_model import inspect_saved_model

from helpers import bn_params, fused_bn, weight

RNG = np.random.default_rng(1818)


# ---- events -----------------------------------------------------------------------------------
def test_stages_are_typed_events_in_order(src, tmp_path):
    events = []
    result = graphfold.optimize_saved_model(src("keras3"), tmp_path / "out", progress=events.append)
    assert result.written
    assert all(isinstance(e, progress_.Event) for e in events), events
    stages = [e.stage for e in events if isinstance(e, progress_.StageStarted)]
    assert stages == ["load", "fold", "write", "verify", "rename"], stages
    # serve and serving_default: one function, folded once, said so as an event
    [same] = [e for e in events if isinstance(e, progress_.SameFunction)]
    [folded] = [e for e in events if isinstance(e, progress_.SignatureFolded)]
    assert {same.key, same.first} == {"serve", "serving_default"} and folded.key == same.first
    checks = [e for e in events if isinstance(e, progress_.SignatureChecked)]
    assert [c.verification.signature for c in checks] == [same.first]
    assert checks[0].verification is result.verification[same.first]
    # every event reads as today's line
    assert str(events[0]).startswith(f"loading {src('keras3')} (tag-set serve)")
    assert str(folded) == folded.text and folded.text.startswith(f"  '{folded.key}': ")


def test_print_as_progress_prints_lines(src, tmp_path, capsys):
    inspect_saved_model(src("keras3"), progress=print)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("loading ") and "freezing and folding signature" in lines[1]
    assert not any("Event" in line or "StageStarted(" in line for line in lines), lines


def test_the_heartbeat_says_what_the_stage_does():
    err = io.StringIO()
    console = Console(out=io.StringIO(), err=err)
    console.heartbeat.every = 0.05
    console.progress(progress_.StageStarted("verify", "2 distinct signature(s)"))
    import time

    time.sleep(0.2)
    console.progress(progress_.Note("  a result"))  # a result line: the stage goes on
    time.sleep(0.2)
    console.done()
    lines = err.getvalue().splitlines()
    assert lines[0].endswith("verifying 2 distinct signature(s)")
    assert any(line.endswith("a result") for line in lines)
    assert sum("... still verifying (" in line for line in lines) >= 3, lines


# ---- the result -------------------------------------------------------------------------------
def test_the_result_is_not_a_dict_but_reads_like_one(src, tmp_path):
    result = graphfold.optimize_saved_model(src("keras3"), tmp_path / "out")
    assert not isinstance(result, dict) and isinstance(result, SavedModelResult)
    assert isinstance(result.reports, dict) and sorted(result) == sorted(result.reports)
    assert result["serve"] is result.reports["serve"] and len(result) == 2
    assert dict(result.items()) == result.reports
    with pytest.raises(TypeError):
        result["serve"] = None  # read-only
    assert result.same_as == {"serve": "serve", "serving_default": "serve"} or result.same_as == {
        "serve": "serving_default",
        "serving_default": "serving_default",
    }
    document = result.to_dict()
    assert {s["same_as"] for s in document["signatures"].values()} == {min(result.same_as.values())}


def _twins(path: str) -> None:
    """Two signatures of the same architecture with different weights: the same reports, not
    the same function."""
    module = tf.Module()
    module.w = [tf.Variable(weight((3, 3, 3, 4), RNG)) for _ in range(2)]
    module.p = [[tf.Variable(v) for v in bn_params(4, RNG)] for _ in range(2)]

    def body(i):
        return lambda x: {"y": fused_bn(tf.nn.conv2d(x, module.w[i], 1, "SAME"), module.p[i])}

    spec = tf.TensorSpec([None, 6, 6, 3], tf.float32, name="x")
    first = tf.function(body(0), input_signature=[spec])
    second = tf.function(body(1), input_signature=[spec])
    tf.saved_model.save(module, path, signatures={"a": first, "b": second})


def test_render_uses_the_functions_answer_not_the_reports(tmp_path):
    """Two functions with identical reports are two functions: shown and counted apart."""
    path = str(tmp_path / "twins")
    _twins(path)
    result = inspect_saved_model(path)
    assert result.same_as == {"a": "a", "b": "b"}
    a, b = (result["a"].to_dict(), result["b"].to_dict())
    a.pop("seconds"), b.pop("seconds")
    assert a == b  # the reports alone cannot tell them apart
    out = io.StringIO()
    render_reports(result, Console(out=out, err=io.StringIO()))
    assert "same graph as" not in out.getvalue(), out.getvalue()
    assert result.totals()[:2] == (2, 2)
    # and where the functions say "the same", so do the tables
    result.same_as = {"a": "a", "b": "a"}
    out = io.StringIO()
    render_reports(result, Console(out=out, err=io.StringIO()))
    assert "same graph as 'a'" in out.getvalue() and result.totals()[:2] == (1, 1)


# ---- partial ----------------------------------------------------------------------------------
def _pre_activation(path: str) -> None:
    """DenseNet's pre-activation: BN (γ > 0) -> ReLU -> 3x3 SAME conv: the scale folds into the
    conv, the shift cannot pass its zero padding: a partial fold."""
    module = tf.Module()
    module.w = tf.Variable(weight((3, 3, 4, 5), RNG))
    module.p = [tf.Variable(v) for v in bn_params(4, RNG, positive=True)]

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 4], tf.float32, name="x")])
    def serve(x):
        return {"y": tf.nn.conv2d(tf.nn.relu(fused_bn(x, module.p)), module.w, 1, "SAME")}

    tf.saved_model.save(module, path, signatures={"serving_default": serve})


@pytest.fixture(scope="module")
def pre_activation(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("partial") / "model")
    _pre_activation(path)
    return path


def _summary(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    return document["signatures"]["serving_default"]["report"]["summary"]


def test_no_partial_keeps_the_batch_norm_whole(pre_activation, tmp_path, capsys):
    by_default = _summary(capsys, ["inspect", pre_activation])
    assert by_default["partial"] == 1 and by_default["not_folded"] == 0, by_default
    whole = _summary(capsys, ["inspect", pre_activation, "--no-partial"])
    assert whole["partial"] == 0 and whole["not_folded"] == 1, whole
    written = _summary(capsys, ["optimize", pre_activation, str(tmp_path / "out"), "--no-partial"])
    assert written["partial"] == 0 and written["not_folded"] == 1, written
    assert "Mul" in _ops(tmp_path / "out")  # the scale kept in what is written
    folded = _summary(capsys, ["optimize", pre_activation, str(tmp_path / "out2")])
    assert folded["partial"] == 1 and "Mul" not in _ops(tmp_path / "out2"), folded


def _ops(path) -> set[str]:
    graph_def = tf.saved_model.load(str(path)).signatures["serving_default"].graph.as_graph_def()
    return {n.op for f in graph_def.library.function for n in f.node_def}


def test_no_partial_on_a_graph_def_file(tmp_path, capsys):
    p, w = bn_params(4, RNG, positive=True), weight((3, 3, 4, 5), RNG)
    fn = tf.function(lambda x: tf.nn.conv2d(tf.nn.relu(fused_bn(x, p)), w, 1, "SAME"))
    graph_def = fn.get_concrete_function(
        tf.TensorSpec([1, 6, 6, 4], tf.float32)
    ).graph.as_graph_def()
    path = str(tmp_path / "model.pb")
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())
    for argv, partial in ((["--no-partial"], 0), ([], 1)):
        assert (
            main(["optimize", path, str(tmp_path / "out.pb"), "--overwrite", "--json", *argv]) == 0
        )
        summary = json.loads(capsys.readouterr().out)["signatures"]["graph"]["report"]["summary"]
        assert summary["partial"] == partial and summary["not_folded"] == 1 - partial, summary


def test_partial_is_refused_where_it_cannot_act(src, tmp_path):
    with pytest.raises(BadInput, match="partial: not supported for comparing"):
        graphfold.verify_saved_models(src("keras3"), src("keras3"), partial=False)
    with pytest.raises(BadInput, match="partial=1: must be True or False"):
        graphfold.Options(partial=1)


# ---- memory: the original is let go before the written model is loaded ------------------------
def test_the_original_is_let_go_before_the_written_model_is_loaded(src, tmp_path, monkeypatch):
    """Verification runs the original first, on the inputs it will check, then lets it go: the
    written model is loaded into the memory the original held (issue 20's memory target)."""
    import gc
    import weakref

    from graphfold.serving import saved_model

    real, loads = saved_model.load, []

    def load(path, tags):
        if loads:  # the written model, loaded back to be verified
            gc.collect()
            assert loads[0]() is None, "the original is still held"
        loaded = real(path, tags)
        loads.append(weakref.ref(loaded))
        return loaded

    monkeypatch.setattr(saved_model, "load", load)
    result = graphfold.optimize_saved_model(src("keras3"), tmp_path / "out")
    assert len(loads) == 2 and result.verified
    assert result.verification["serving_default"].max_rel <= 1e-5


def test_a_record_written_before_partial_existed_is_still_done(tmp_path):
    """A version optimized before ``partial`` was an option was optimized with partial folds
    (its default): the repository runner skips it, and redoes it for ``partial=False``."""
    import dataclasses

    from graphfold.fleet.repo_task import RECORD, Task, already_done
    from graphfold.options import Options

    dst = tmp_path / "1"
    (dst / "assets.extra").mkdir(parents=True)
    (dst / "saved_model.pb").write_bytes(b"")
    old_options = {k: v for k, v in Options().to_dict().items() if k != "partial"}
    (dst / RECORD).write_text(json.dumps({"source_sha256": "abc", "options": old_options}))
    task = Task("m", "1", str(tmp_path / "src"), str(dst), Options())
    assert already_done(task, "abc") is not None
    assert already_done(dataclasses.replace(task, options=Options(partial=False)), "abc") is None
    assert already_done(task, "other") is None
