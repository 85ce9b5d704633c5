"""``graphfold optimize|inspect`` on frozen GraphDef files (.pb, .pbtxt), as TF1 users hold them:
the same fold, report, progress and exit codes as for SavedModels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2

from graphfold.cli.command import main

from helpers import bias, bn_params, rel_err, run_graph_def, weight


def fused(y, p, name):
    gamma, beta, mean, var = (tf.constant(v) for v in p)
    return tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=gamma,
        offset=beta,
        mean=mean,
        variance=var,
        epsilon=1e-3,
        is_training=False,
        name=name,
    )[0]


@pytest.fixture(scope="module")
def frozen_pb(tmp_path_factory):
    """conv -> bias -> BN -> relu -> BN -> 1x1 VALID conv, outputs ``y`` and ``logits``."""
    rng = np.random.default_rng(8)
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="image")
        y = tf.nn.bias_add(
            tf.nn.conv2d(x, weight((3, 3, 3, 6), rng), 1, "SAME", name="conv1"), bias(6, rng)
        )
        y = tf.nn.relu(fused(y, bn_params(6, rng), "bn1"))
        y = tf.nn.conv2d(
            fused(y, bn_params(6, rng), "bn2"), weight((1, 1, 6, 4), rng), 1, "VALID", name="conv2"
        )
        tf.identity(y, name="y")
        tf.reduce_mean(y, [1, 2], name="logits")
    path = tmp_path_factory.mktemp("pb") / "frozen_inference_graph.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return str(path)


def _load(path):
    graph_def = graph_pb2.GraphDef()
    if path.endswith(".pbtxt"):
        text_format.Parse(open(path).read(), graph_def)
    else:
        graph_def.ParseFromString(open(path, "rb").read())
    return graph_def


def _same(src, dst, outputs):
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    want = run_graph_def(_load(src), ["image"], outputs, [x])
    got = run_graph_def(_load(dst), ["image"], outputs, [x])
    for a, g in zip(want, got):
        assert rel_err(a, g) <= 1e-5


def test_optimize_a_pb_inferring_inputs_and_outputs(frozen_pb, tmp_path, capsys):
    dst = str(tmp_path / "out.pb")
    assert main(["optimize", frozen_pb, dst]) == 0
    out, err = capsys.readouterr()
    assert "inputs inferred (the placeholders): image" in err
    assert "outputs inferred (nodes nobody reads): y, logits" in err
    assert "2 batch norms: 2 folded (1 forward, 1 backward)" in out
    assert "verified" in out.splitlines()[-1] and "2 of 2 batch norms folded" in out
    assert not any(n.op == "FusedBatchNormV3" for n in _load(dst).node)
    _same(frozen_pb, dst, ["y", "logits"])
    assert os.listdir(tmp_path) == ["out.pb"]  # no temporary file left


@pytest.mark.parametrize("spelling", ["--input-names", "--input_names"])
def test_named_outputs_on_layers_and_pbtxt_out(frozen_pb, tmp_path, spelling, capsys):
    """Outputs named on a layer (``conv2``, which absorbs a backward shift) stay exact; a
    ``.pbtxt`` destination is written as text."""
    dst = str(tmp_path / "out.pbtxt")
    out_flag = "--output-names" if spelling == "--input-names" else "--output_names"
    assert (
        main(["optimize", frozen_pb, dst, spelling, "image", out_flag, "conv2,logits", "--json"])
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert document["written"] is True
    report = document["signatures"]["graph"]["report"]
    assert report["summary"]["folded"] == 2
    assert open(dst).read().startswith("node {")
    _same(frozen_pb, dst, ["conv2", "logits"])


def test_inspect_a_pb_writes_nothing(frozen_pb, tmp_path, capsys):
    before = sorted(os.listdir(os.path.dirname(frozen_pb)))
    assert main(["inspect", frozen_pb, "--output-names", "y"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 batch norms foldable" in out and "bn1" in out and "bn2" in out
    assert sorted(os.listdir(os.path.dirname(frozen_pb))) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-names", "nope"], "input 'nope' is not a node"),
        (["--input-names", "conv1"], "not a placeholder"),
        (["--output-names", "y,missing"], "output 'missing' is not a node"),
    ],
)
def test_bad_names_exit_2_and_write_nothing(frozen_pb, tmp_path, args, message, capsys):
    dst = tmp_path / "out.pb"
    assert main(["optimize", frozen_pb, str(dst), *args]) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_not_a_graph_def_and_existing_dst(frozen_pb, tmp_path, capsys):
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\x00not a protobuf at all" * 10)
    assert main(["optimize", str(junk), str(tmp_path / "o.pb")]) == 2
    assert "not a binary GraphDef" in capsys.readouterr().err
    text = tmp_path / "junk.pbtxt"
    text.write_text("node { name: ")
    assert main(["inspect", str(text)]) == 2
    assert "not a text GraphDef" in capsys.readouterr().err
    existing = tmp_path / "exists.pb"
    existing.write_bytes(b"keep")
    assert main(["optimize", frozen_pb, str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep"
    assert main(["optimize", frozen_pb, str(existing), "--overwrite", "-q"]) == 0
    _same(frozen_pb, str(existing), ["y"])


def test_a_wrong_rewrite_fails_verification_and_writes_nothing(
    frozen_pb, tmp_path, monkeypatch, capsys
):
    import graphfold.serving.graph_def_file as module

    real = module.optimize_graph_def

    def off(graph_def, inputs, outputs, shapes=None, **kwargs):
        optimized, report = real(graph_def, inputs, outputs, shapes, **kwargs)
        for node in optimized.node:  # spoil one folded weight
            if node.op == "Const" and node.name.startswith("conv2"):
                value = tf.make_ndarray(node.attr["value"].tensor) * 1.01
                node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        return optimized, report

    monkeypatch.setattr(module, "optimize_graph_def", off)
    dst = tmp_path / "out.pb"
    assert main(["optimize", frozen_pb, str(dst), "--output-names", "y"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_verify_on_given_inputs_and_a_wrong_key(frozen_pb, tmp_path, capsys):
    """``--inputs`` in ``saved_model_cli run``'s syntax, keyed by placeholder name."""
    x = np.random.default_rng(3).normal(size=(3, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    dst = tmp_path / "out.pb"
    assert (
        main(
            [
                "optimize",
                frozen_pb,
                str(dst),
                "--output-names",
                "y",
                "--inputs",
                f"image={tmp_path / 'x.npy'}",
                "--json",
            ]
        )
        == 0
    )
    check = json.loads(capsys.readouterr().out)["signatures"]["graph"]["verification"]
    assert check["status"] == "ok" and check["inputs"] == {"image": [3, 8, 8, 3]}
    dst.unlink()
    assert main(["optimize", frozen_pb, str(dst), "--inputs", f"pixels={tmp_path / 'x.npy'}"]) == 2
    assert "'pixels' is not an input" in capsys.readouterr().err
    assert not dst.exists()
