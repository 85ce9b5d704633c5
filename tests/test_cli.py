"""The graphfold command: optimize, inspect, demo; exit codes; saved_model_cli on the result."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from graphfold.cli.command import main

import savedmodel_fixtures as F
from helpers import error_line

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
# TensorFlow's own command, from the environment the tests run in (a venv need not be activated).
SAVED_MODEL_CLI = (
    shutil.which("saved_model_cli", path=os.path.dirname(sys.executable))
    or shutil.which("saved_model_cli")
    or "saved_model_cli"
)


def test_optimize_prints_tables_progress_and_writes_report(src, tmp_path, capsys):
    source, dst = src("two_signatures"), str(tmp_path / "out")
    report = tmp_path / "reports" / "fold.json"
    before = F.tree_hash(source)
    code = main(["optimize", source, dst, "--report", str(report), "--batch", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert F.tree_hash(source) == before
    # stdout: per-signature summary, layer table, op table (before/after), verification table
    assert "== signature 'predict' ==" in out and "== signature 'single' ==" in out
    assert "1 batch norms: 1 folded (1 forward, 0 backward), 0 not folded" in out
    assert "FusedBatchNormV3  1       0" in out
    assert "op " in out and "before" in out and "after" in out
    assert "verification (relative tolerance by precision: 1e-05 float32" in out and "ok" in out
    assert "random inputs: k[2], x[2, 6, 6, 2]" in out
    assert "into / reason" not in out  # every batch norm folded: no per-layer table
    assert out.rstrip().splitlines()[-1].startswith(f"wrote {dst}: 2 signature(s) rewritten")
    # stderr: progress lines with elapsed time for each stage
    for stage in ("loading", "freezing and folding", "writing", "verifying", "moving it"):
        assert any(
            line.startswith("[") and "s] " in line and stage in line for line in err.splitlines()
        ), stage
    document = json.loads(report.read_text())
    assert document["status"] == "ok" and document["written"] is True
    predict = document["signatures"]["predict"]
    assert predict["report"]["summary"]["folded"] == 1
    assert predict["verification"]["status"] == "ok"
    assert predict["verification"]["max_rel"] <= 1e-5
    assert predict["verification"]["inputs"] == {"k": [2], "x": [2, 6, 6, 2]}
    assert os.path.isfile(os.path.join(dst, "saved_model.pb"))


def test_optimize_verbose_lists_every_batch_norm(src, tmp_path, capsys):
    assert (
        main(["optimize", src("two_signatures"), str(tmp_path / "out"), "--verbose", "--no-verify"])
        == 0
    )
    out, err = capsys.readouterr()
    assert "into / reason" in out and "forward" in out and "Conv2D" in out
    assert "verifying" not in err and "not verified" in out


def test_optimize_json_and_quiet(src, tmp_path, capsys):
    source = src("table")
    code = main(
        [
            "optimize",
            source,
            str(tmp_path / "out"),
            "--json",
            "--quiet",
            "--signature",
            "lookup",
            "--signature",
            "train",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    document = json.loads(out)
    assert document["exit_code"] == 0 and sorted(document["signatures"]) == ["lookup", "train"]
    lookup = document["signatures"]["lookup"]
    assert lookup["rewritten"] is False and "lookup table" in lookup["unchanged_reason"]
    entry = document["signatures"]["train"]["report"]["entries"][0]
    assert entry["folded"] is False and "training" in entry["reason"]
    assert document["all_signatures"] == ["lookup", "serving_default", "train", "train_keras"]


def test_inspect_writes_nothing(src, tmp_path, capsys):
    source = shutil.copytree(src("table"), tmp_path / "model")
    listing = sorted(os.listdir(tmp_path))
    before = F.tree_hash(str(source))
    assert main(["inspect", str(source)]) == 0
    out, _ = capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == listing and F.tree_hash(str(source)) == before
    assert "== signature 'train' ==" in out
    assert "training mode" in out  # the reason
    assert "forward" in out  # the direction
    assert "copied through unchanged" in out and "lookup table" in out
    assert "FusedBatchNormV3" in out and "total" in out  # op counts
    assert "nothing written" in out
    assert main(["inspect", str(source), "--signature", "serving_default", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert list(document["signatures"]) == ["serving_default"]
    assert document["signatures"]["serving_default"]["report"]["summary"]["folded"] == 1


def test_verification_failure_exits_1_and_writes_nothing(src, tmp_path, capsys):
    dst = tmp_path / "out"
    report = tmp_path / "r.json"
    code = main(
        ["optimize", src("tf_keras"), str(dst), "--tolerance", "0", "--report", str(report)]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "verification failed" in error_line(err) and "nothing was written" in err
    assert "failed" in out
    assert not dst.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    document = json.loads(report.read_text())
    assert document["status"] == "verification_failed" and document["written"] is False


def _bad_pb(source, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(source, bad)
    data = (bad / "saved_model.pb").read_bytes()
    (bad / "saved_model.pb").write_bytes(data[: len(data) // 3])
    return str(bad)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_path", "no such file or directory"),
        ("no_pb", "no saved_model.pb"),
        ("corrupt_pb", "not a valid SavedModel protobuf"),
        ("unknown_signature", "unknown signature key"),
        ("unknown_tag_set", "no MetaGraph with tag-set 'train'"),
        ("no_signatures", "has no signatures"),
        ("dst_is_src", "DST is SRC"),
        ("dst_inside_src", "DST is inside SRC"),
        ("dst_exists", "already exists (pass --overwrite"),
        ("dst_unwritable", "cannot write here"),
        ("report_inside_src", "must not be inside SRC"),
        ("bad_batch", "--batch 0: must be a whole number, at least 1"),
        ("bad_tolerance", "argument --tolerance: invalid float value"),
        ("missing_dst", "the following arguments are required: DST"),
        ("no_command", "a command is required"),
        ("unknown_command", "invalid choice: 'fold'"),
    ],
)
def test_bad_input_exits_2_with_one_line_error(src, tmp_path, capsys, case, message):
    source = src("two_signatures")
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "exists").mkdir()
    argv = {
        "missing_path": ["optimize", str(tmp_path / "nope"), out],
        "no_pb": ["optimize", str(tmp_path / "empty"), out],
        "corrupt_pb": ["optimize", _bad_pb(source, tmp_path) if case == "corrupt_pb" else "", out],
        "unknown_signature": ["optimize", source, out, "--signature", "nope"],
        "unknown_tag_set": ["optimize", source, out, "--tag-set", "train"],
        "no_signatures": ["optimize", src("no_signatures"), out],
        "dst_is_src": ["optimize", source, source],
        "dst_inside_src": ["optimize", source, os.path.join(source, "variables", "x")],
        "dst_exists": ["optimize", source, str(tmp_path / "exists")],
        "dst_unwritable": ["optimize", source, str(tmp_path / "file" / "out")],
        "report_inside_src": ["optimize", source, out, "--report", os.path.join(source, "r.json")],
        "bad_batch": ["optimize", source, out, "--batch", "0"],
        "bad_tolerance": ["optimize", source, out, "--tolerance", "tiny"],
        "missing_dst": ["optimize", source],
        "no_command": [],
        "unknown_command": ["fold", source],
    }[case]
    before = F.tree_hash(source)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in error_line(captured.err)
    assert "Traceback" not in captured.err
    assert not os.path.exists(out)
    assert F.tree_hash(source) == before


def test_bad_input_json_document(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope"), "--json"]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["exit_code"] == 2 and "no such file" in document["error"]


def test_python_dash_m_graphfold_subprocess(src, tmp_path):
    dst = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "graphfold", "optimize", src("two_signatures"), str(dst), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["written"] is True
    assert "Traceback" not in run.stderr and "loading" in run.stderr


def test_saved_model_cli_show_and_run(src, tmp_path):
    source, dst = src("keras3"), tmp_path / "out"
    assert main(["optimize", source, str(dst), "--quiet"]) == 0
    show = subprocess.run(
        [SAVED_MODEL_CLI, "show", "--all", "--dir", str(dst)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert show.returncode == 0, show.stderr
    assert "signature_def['serving_default']" in show.stdout
    assert "inputs['image']" in show.stdout and "outputs['output_0']" in show.stdout
    assert "FusedBatchNorm" not in show.stdout and "Rsqrt" not in show.stdout

    x = np.random.default_rng(11).standard_normal((2, 16, 16, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [
            SAVED_MODEL_CLI,
            "run",
            "--dir",
            str(dst),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"image={tmp_path / 'x.npy'}",
            "--outdir",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "res" / "output_0.npy")
    want = F.run_tf2(source, "serving_default", {"image": x})["output_0"]
    assert F.rel_err(want, got) <= 1e-5


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "7 batch norms: 7 folded (6 forward, 1 backward), 0 not folded" in stdout
    assert "latency of 'serving_default'" in stdout
    assert "original" in stdout and "optimized" in stdout and "ms" in stdout
    # the speed-up split: freezing alone, then folding (issue 20)
    assert "frozen, not folded" in stdout and "what freezing alone gives" in stdout
    assert "from freezing, then" in stdout and "from folding)" in stdout
    assert "verification (relative tolerance" in stdout
    assert os.path.isfile(out / "original" / "saved_model.pb")
    assert os.path.isfile(out / "optimized" / "saved_model.pb")
    assert "building the demo model" in stderr
    assert main(["demo", "--out", str(out), "--json", "--quiet"]) == 0  # rerun replaces
    document = json.loads(capsys.readouterr().out)
    latency = document["latency_ms"]
    assert latency["optimized"] > 0 and latency["frozen"] > 0 and latency["original"] > 0
    assert document["signatures"]["serving_default"]["verification"]["max_rel"] <= 1e-5
