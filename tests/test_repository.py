"""graphfold optimize-repo: a TF Serving model repository, version by version, in worker
processes and on Beam's DirectRunner; a corrupt version fails alone; a re-run skips what is done.

The repository (tiny models): alpha/1, alpha/2 (a conv + fused batch norm, two signatures),
table/7 (a lookup-table signature that cannot be frozen, copied through), broken/1 (a truncated
saved_model.pb); and things TF Serving ignores: alpha/notes/, .hidden/1/, README.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from graphfold.cli.command import main
from graphfold.fleet import pool
from graphfold.fleet.repository import (
    RECORD,
    REPORT,
    Task,
    already_done,
    find_versions,
    model_config_text,
    normalized_options,
    optimize_repository,
    source_fingerprint,
    write_json,
)
from graphfold.serving.saved_model import BadInput, optimize_saved_model

import savedmodel_fixtures as F

ALL = ["alpha/1", "alpha/2", "broken/1", "table/7"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("repository") / "models"
    F.build_two_signatures(str(base / "alpha" / "1"))
    shutil.copytree(base / "alpha" / "1", base / "alpha" / "2")
    (base / "table").mkdir()
    F.build_table(str(base / "table" / "7"))
    shutil.copytree(base / "alpha" / "1", base / "broken" / "1")
    with open(base / "broken" / "1" / "saved_model.pb", "r+b") as f:
        f.truncate(100)
    (base / "alpha" / "notes").mkdir()
    shutil.copytree(base / "alpha" / "1", base / ".hidden" / "1")
    (base / "README").write_text("not a model\n")
    return str(base)


def _names(records):
    return [f"{r['model']}/{r['version']}" for r in records]


def _status(records):
    return {f"{r['model']}/{r['version']}": r["status"] for r in records}


def _dst_hashes(dst):
    return {
        name: F.tree_hash(os.path.join(dst, name))
        for name in ALL
        if os.path.isdir(os.path.join(dst, name))
    }


def _check_outputs(repo, dst, name, key="predict"):
    """The optimized version computes what the source computes."""
    src = os.path.join(repo, name)
    feeds = F.random_feeds(src, key, batch=2)
    want, got = F.run_tf2(src, key, feeds), F.run_tf2(os.path.join(dst, name), key, feeds)
    for output in want:
        assert F.rel_err(want[output], got[output]) <= 1e-5, (name, output)
    return got


def test_find_versions_follows_tf_serving_layout(repo):
    assert find_versions(repo) == [("alpha", "2"), ("broken", "1"), ("table", "7")]
    assert find_versions(repo, versions="all") == [
        ("alpha", "1"),
        ("alpha", "2"),
        ("broken", "1"),
        ("table", "7"),
    ]
    assert find_versions(repo, models=["alpha"], versions=2) == [("alpha", "1"), ("alpha", "2")]
    with pytest.raises(BadInput, match="no model 'gamma'"):
        find_versions(repo, models=["gamma"])
    with pytest.raises(BadInput, match="latest, all or a positive number"):
        find_versions(repo, versions="newest")
    with pytest.raises(BadInput, match="no <model>/<version>/"):
        find_versions(os.path.join(repo, "alpha", "notes"))


def test_model_config_follows_the_version_policy(tmp_path):
    latest = model_config_text(str(tmp_path), ["a"])
    assert 'name: "a"' in latest and "model_version_policy" not in latest  # TF Serving's default
    assert "latest { num_versions: 3 }" in model_config_text(str(tmp_path), ["a"], 3)
    assert 'name: "q\\"uote"' in model_config_text(str(tmp_path), ['q"uote'])


def test_report_is_strict_json(tmp_path):
    path = str(tmp_path / "report.json")
    write_json(path, {"max_rel": float("nan"), "max_abs": [float("inf")]})  # a failed check
    assert json.loads(open(path).read(), parse_constant=pytest.fail) == {
        "max_rel": "nan",
        "max_abs": ["inf"],
    }


def test_jobs_2_corrupt_version_fails_alone_and_rerun_skips(repo, tmp_path, capsys):
    dst, config = str(tmp_path / "serving"), str(tmp_path / "models.config")
    before = F.tree_hash(repo)
    code = main(
        [
            "optimize-repo",
            repo,
            dst,
            "--versions",
            "all",
            "--jobs",
            "2",
            "--json",
            "--model-config",
            config,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1, err
    document = json.loads(out)
    assert document["failed"] == ["broken/1"] and document["jobs"] == 2
    assert _status(document["versions"]) == {
        "alpha/1": "ok",
        "alpha/2": "ok",
        "broken/1": "failed",
        "table/7": "ok",
    }
    broken = document["versions"][_names(document["versions"]).index("broken/1")]
    assert "not a valid SavedModel protobuf" in broken["error"]
    assert "graphfold: error: 1 version(s) failed: broken/1" in err
    assert "[4/4]" in err  # a progress line per version (not a terminal)
    assert F.tree_hash(repo) == before  # SRC_BASE is only read
    assert not os.path.exists(os.path.join(dst, "broken"))  # nothing half-written

    alpha = document["versions"][0]
    assert (alpha["batch_norms"], alpha["folded"], alpha["verified"]) == (2, 2, True)
    assert alpha["ops_after"] < alpha["ops_before"]
    table = document["versions"][_names(document["versions"]).index("table/7")]
    lookup = table["report"]["signatures"]["lookup"]
    assert lookup["rewritten"] is False and "lookup table" in lookup["unchanged_reason"]
    # every batch norm counted (the census of issue 9: 3, as tests/test_census.py checks on
    # this fixture); train's are not foldable
    assert (table["batch_norms"], table["folded"]) == (3, 1)
    for name in ("alpha/1", "alpha/2"):
        _check_outputs(repo, dst, name)
    _check_outputs(repo, dst, "table/7", key="serving_default")
    record = json.load(open(os.path.join(dst, "alpha", "1", RECORD)))
    assert record["source_sha256"] and record["options"]["tags"] == ["serve"]
    assert json.load(open(os.path.join(dst, REPORT)))["failed"] == ["broken/1"]
    text = open(config).read()
    assert 'name: "alpha"' in text and 'name: "table"' in text and "all {}" in text
    assert f'base_path: "{os.path.abspath(dst)}/alpha"' in text
    assert "left out (no version optimized): broken" in text

    # The same as `graphfold optimize` of that version alone: the same outputs, bit for bit.
    single = str(tmp_path / "single")
    optimize_saved_model(os.path.join(repo, "table", "7"), single)
    feeds = F.random_feeds(single, "serving_default", batch=3, seed=4)
    np.testing.assert_array_equal(
        F.run_tf2(single, "serving_default", feeds)["output_0"],
        F.run_tf2(os.path.join(dst, "table", "7"), "serving_default", feeds)["output_0"],
    )

    # A re-run does nothing but the failed version again (and prints the table).
    done = _dst_hashes(dst)
    code = main(["optimize-repo", repo, dst, "--versions", "all", "--jobs", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert _dst_hashes(dst) == done
    rows = [line.split()[:3] for line in out.splitlines()[2:6]]
    assert rows == [
        ["alpha", "1", "skipped"],
        ["alpha", "2", "skipped"],
        ["broken", "1", "failed"],
        ["table", "7", "skipped"],
    ]
    assert "0 optimized, 3 already done, 1 failed, of 4 version(s)" in out


def test_jobs_1_skips_what_is_done_and_redoes_what_changed(repo, tmp_path):
    src, dst = tmp_path / "models", str(tmp_path / "serving")
    shutil.copytree(os.path.join(repo, "alpha"), src / "alpha")
    seen = []
    result = optimize_repository(src, dst, versions="all", jobs=1, on_result=seen.append)
    assert _status(result.records) == {"alpha/1": "ok", "alpha/2": "ok"}
    assert sorted(_names(seen)) == ["alpha/1", "alpha/2"] and result.jobs == 1
    first = _dst_hashes(dst)

    again = optimize_repository(src, dst, versions="all", jobs=1)
    assert _status(again.records) == {"alpha/1": "skipped", "alpha/2": "skipped"}
    assert again.records[0]["folded"] == 2 and _dst_hashes(dst) == first

    # --force redoes a version already done.
    task = Task(
        "alpha",
        "1",
        str(src / "alpha" / "1"),
        os.path.join(dst, "alpha", "1"),
        normalized_options(),
    )
    fingerprint = source_fingerprint(task.src)
    assert already_done(task, fingerprint)["source_sha256"] == fingerprint
    assert already_done(dataclasses.replace(task, force=True), fingerprint) is None

    # A new source (the same model saved again: other bytes) is redone, the other skipped.
    shutil.rmtree(src / "alpha" / "2")
    F.build_two_signatures(str(src / "alpha" / "2"))
    changed = optimize_repository(src, dst, versions="all", jobs=1)
    assert _status(changed.records) == {"alpha/1": "skipped", "alpha/2": "ok"}
    assert _dst_hashes(dst)["alpha/1"] == first["alpha/1"]

    # Other options give another result: redone, with the options passed through.
    other = optimize_repository(src, dst, jobs=1, verify=False)
    assert _status(other.records) == {"alpha/2": "ok"} and other.records[0]["verified"] is None
    assert "verify" not in other.records[0]["report"]["seconds"]


def _python(*args, check=True, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args], check=check, env=env, capture_output=True, text=True, **kwargs
    )


def test_isolate_is_byte_identical_to_graphfold_optimize(repo, tmp_path):
    """Forked workers (the command: its process has run no TensorFlow operation) and spawned
    ones (this test process has): each version in a fresh process writes what `graphfold
    optimize` writes, byte for byte."""
    assert pool.start_method() == "spawn"  # TensorFlow's runtime runs here
    spawned, forked = str(tmp_path / "spawned"), str(tmp_path / "forked")
    single = str(tmp_path / "single")
    result = optimize_repository(repo, spawned, models=["alpha"], jobs=1, isolate=True)
    assert _status(result.records) == {"alpha/2": "ok"} and result.worker_start == "spawn"
    # the command, with its progress lines (drawn without a thread: the workers are forked)
    done = _python(
        "-m",
        "graphfold",
        "optimize-repo",
        repo,
        forked,
        "--models",
        "alpha",
        "--versions",
        "all",
        "--jobs",
        "2",
        "--isolate",
        "--json",
    )
    assert json.loads(done.stdout)["worker_start"] == "fork"
    assert "[2/2] alpha/" in done.stderr
    _python("-m", "graphfold", "optimize", "-q", os.path.join(repo, "alpha", "2"), single)
    with open(os.path.join(single, "saved_model.pb"), "rb") as f:
        expected = f.read()
    for dst in (spawned, forked):
        with open(os.path.join(dst, "alpha", "2", "saved_model.pb"), "rb") as f:
            assert f.read() == expected, dst
    for name in ("alpha/1", "alpha/2"):
        _check_outputs(repo, forked, name)


def test_the_pool_ticks_while_it_waits():
    import pool_helpers

    ticks = []
    results = dict(
        pool.imap_unordered(
            pool_helpers.slow_square, [2, 3], 2, tick=lambda: ticks.append(1), every=0.05
        )
    )
    assert results == {2: 4, 3: 9} and len(ticks) >= 3


def test_progress_lines_come_from_the_calling_thread(capsys):
    """Optimize-repo's progress (plain lines off a terminal) starts no thread, and says it is
    alive while versions run."""
    import threading

    from graphfold.cli.command import Console, _progress

    console = Console()
    before = threading.active_count()
    with _progress(console, every=0.0) as (on_plan, on_result, on_tick):
        on_plan(["a/1", "b/1"])
        on_tick()
        on_result({"model": "a", "version": "1", "status": "failed", "error": "broken"})
        assert threading.active_count() == before
    err = capsys.readouterr().err
    assert "2 version(s) found" in err and "still optimizing: 0 of 2 version(s) done" in err
    assert "[1/2] a/1: failed: broken" in err


def test_workers_are_forked_only_while_that_is_safe():
    """Forked while TensorFlow's runtime has not started and no other thread runs; then a
    dying forked worker fails its item alone, as a spawned one does."""
    script = """if True:
        import json, threading
        import tensorflow as tf
        from graphfold.fleet import pool
        import pool_helpers
        before = pool.start_method()
        results = dict(pool.imap_unordered(pool_helpers.square_or_crash,
                                           ["segv", 1, "raise", 2, "exit"], 2))
        out = {"before": before, "pids": [v[1] for v in results.values()
                                           if isinstance(v, tuple)],
               "crashes": {k: str(v) for k, v in results.items() if not isinstance(v, tuple)}}
        release = threading.Event()
        thread = threading.Thread(target=release.wait, daemon=True)
        thread.start()
        out["with_a_thread"] = pool.start_method()
        release.set()
        thread.join()
        tf.constant(1.0) + 1.0                       # TensorFlow's runtime starts
        out["after_an_op"] = pool.start_method()
        print(json.dumps(out))
    """
    out = json.loads(_python("-c", script).stdout.strip().splitlines()[-1])
    assert (out["before"], out["with_a_thread"], out["after_an_op"]) == ("fork", "spawn", "spawn")
    assert out["crashes"] == {
        "segv": "the worker process died (killed by SIGSEGV)",
        "raise": "ValueError: no square for you",
        "exit": "the worker process died (exit status 3)",
    }
    assert len(out["pids"]) == 2


def test_usage_errors_exit_2(repo, tmp_path, capsys):
    cases = [
        (["--versions", "newest"], "--versions newest: must be latest, all or a positive number"),
        (["--models", "alpha,gamma"], "no model 'gamma'"),
        (["--jobs", "0"], "--jobs 0: must be a whole number, at least 1"),
        (["--", "--direct_num_workers=2"], "only for --runner beam"),
        (["--warmup", "0"], "--warmup 0: must be a whole number between 1 and 1000"),
        (["--runner", "beam", "--jobs", "2"], "--jobs is for the local runner"),
    ]
    for extra, message in cases:
        assert main(["optimize-repo", repo, str(tmp_path / "out"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert main(["optimize-repo", repo, os.path.join(repo, "out")]) == 2
    assert "DST_BASE is inside SRC_BASE" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_worker_crash_fails_only_its_item():
    import pool_helpers

    items = ["segv", 1, "raise", 2, "exit"]
    results = dict(pool.imap_unordered(pool_helpers.square_or_crash, items, 2))
    assert {k: v[0] for k, v in results.items() if isinstance(v, tuple)} == {1: 1, 2: 4}
    assert isinstance(results["exit"], pool.WorkerDied) and results["exit"].exitcode == 3
    assert "exit status 3" in str(results["exit"])
    assert isinstance(results["segv"], pool.WorkerDied) and "SIGSEGV" in str(results["segv"])
    assert isinstance(results["raise"], pool.WorkerError)
    assert str(results["raise"]) == "ValueError: no square for you"


def test_beam_missing_says_how_to_install(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    monkeypatch.delitem(sys.modules, "graphfold.fleet.beam", raising=False)
    assert main(["optimize-repo", repo, str(tmp_path / "out"), "--runner", "beam"]) == 2
    assert "pip install 'graphfold[beam]'" in capsys.readouterr().err


# ---- Apache Beam ----------------------------------------------------------------------------


def _beam():
    return pytest.importorskip(
        "apache_beam", reason="Apache Beam is not installed (pip install 'graphfold[beam]')"
    )


def test_beam_direct_runner_matches_local(repo, tmp_path, capsys):
    _beam()
    dst = str(tmp_path / "serving")
    code = main(
        ["optimize-repo", repo, dst, "--versions", "all", "--runner", "beam", "--json", "-q"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 1 and document["runner"] == "beam" and document["failed"] == ["broken/1"]
    assert _status(document["versions"]) == {
        "alpha/1": "ok",
        "alpha/2": "ok",
        "broken/1": "failed",
        "table/7": "ok",
    }
    broken = document["versions"][_names(document["versions"]).index("broken/1")]
    assert "not a valid SavedModel protobuf" in broken["error"]
    for name in ("alpha/1", "alpha/2"):
        _check_outputs(repo, dst, name)
    # What the pipeline wrote is found by the local runner: nothing left to do.
    again = optimize_repository(repo, dst, versions="all", jobs=1, models=["alpha", "table"])
    assert set(_status(again.records).values()) == {"skipped"}


def test_beam_transform_in_a_pipeline_is_byte_identical_to_local(repo, tmp_path):
    beam = _beam()
    from apache_beam.testing.util import assert_that, equal_to

    from graphfold.fleet.beam import OptimizeSavedModels

    on_beam, local = str(tmp_path / "beam"), str(tmp_path / "local")
    with beam.Pipeline() as pipeline:
        statuses = (
            pipeline
            | beam.Create([os.path.join(repo, "alpha", "2")])
            | OptimizeSavedModels(repo, on_beam, isolate=True, batch=2)
            | beam.Map(lambda r: (r["model"], r["version"], r["status"]))
        )
        assert_that(statuses, equal_to([("alpha", "2", "ok")]))
    optimize_repository(repo, local, models=["alpha"], jobs=1, isolate=True, batch=2)
    with (
        open(os.path.join(local, "alpha", "2", "saved_model.pb"), "rb") as a,
        open(os.path.join(on_beam, "alpha", "2", "saved_model.pb"), "rb") as b,
    ):
        assert a.read() == b.read()


def test_bench_repo_smoke(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_repo.py"
    spec = importlib.util.spec_from_file_location("graphfold_tools_bench_repo", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--models", "1", "--versions", "2", "--runs", "jobs1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| run |"))
    for column in (
        "wall s",
        "speed-up vs jobs1",
        "median s per version",
        "peak RSS per worker MB",
        "load avg before",
    ):
        assert column in header
    row = next(line for line in out.splitlines() if line.startswith("| jobs1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1.00x" and cells[-2:] == ["2", "0"] and float(cells[5]) > 100
    assert "cores delivered to 1 / 2 spinners" in header
