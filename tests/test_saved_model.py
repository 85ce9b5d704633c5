"""graphfold.optimize_saved_model: SavedModel in, SavedModel out, verified, written safely."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import graphfold
from graphfold.convert.verify import compare, random_inputs
from graphfold.serving.saved_model import BadInput, VerificationFailed

import savedmodel_fixtures as F

TOL = 1e-5
BN_OPS = (
    "FusedBatchNorm",
    "FusedBatchNormV2",
    "FusedBatchNormV3",
    "BatchNormWithGlobalNormalization",
)


def _optimize(source, dst, **kwargs):
    before = F.tree_hash(source)
    result = graphfold.optimize_saved_model(source, dst, **kwargs)
    assert F.tree_hash(source) == before, "SRC changed"
    return result


def _assert_same_outputs(source, dst, key, feeds, *, tf1=False):
    want = F.run_tf2(source, key, feeds)
    got = F.run_tf2(dst, key, feeds)
    assert set(got) == set(want)
    runs = [got] + ([F.run_tf1(dst, key, feeds)] if tf1 else [])
    for outputs in runs:
        for name, value in want.items():
            assert outputs[name].dtype == value.dtype, name
            assert outputs[name].shape == value.shape, name
            if value.dtype.kind in "OSU":
                assert (outputs[name] == value).all(), name
            else:
                assert F.rel_err(value, outputs[name]) <= TOL, name


def _no_leftovers(dst):
    parent, name = os.path.split(os.path.abspath(dst))
    assert not [n for n in os.listdir(parent) if n.startswith(f".{name}.graphfold")]


# ---- sources --------------------------------------------------------------------------------


def test_keras3_export_all_signatures_folded_and_exact(src, tmp_path):
    source, dst = src("keras3"), str(tmp_path / "out")
    result = _optimize(source, dst)
    assert sorted(result) == ["serve", "serving_default"]
    for key, report in result.items():
        assert len(report.batch_norms) == 7 and len(report.folded) == 7, report
        assert report.count("backward") == 1
        assert not set(BN_OPS) & set(report.ops_after)
        assert "Rsqrt" not in report.ops_after  # Keras 3's decomposed batch norm is gone
        check = result.verification[key]
        assert check.status == "ok" and check.max_rel <= TOL
    assert result.written and not result.unchanged
    assert F.signature_defs(dst) == F.signature_defs(source)
    feeds = F.random_feeds(source, "serving_default", batch=3, seed=1)
    _assert_same_outputs(source, dst, "serving_default", feeds, tf1=True)
    _assert_same_outputs(source, dst, "serve", feeds)
    # the default writes the folded weights as variables (the original reads variables), each
    # once: not the original's variables carried along (a Keras export stores each twice), and
    # `serve` and `serving_default`, one function, share them
    assert result.weights == "variables"
    size = lambda p: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
    assert size(os.path.join(dst, "variables")) < size(os.path.join(source, "variables")) / 2
    checkpoint = os.path.join(dst, "variables", "variables")
    stem_kernels = [
        name
        for name, shape in tf.train.list_variables(checkpoint)
        if shape == [3, 3, 3, 16] and name.endswith("VARIABLE_VALUE")
    ]
    assert len(stem_kernels) == 1, tf.train.list_variables(checkpoint)
    # readable by others, like any directory the user creates
    probe = tmp_path / "probe"
    probe.mkdir()
    assert os.stat(dst).st_mode & 0o777 == os.stat(probe).st_mode & 0o777
    _no_leftovers(dst)


@pytest.mark.parametrize("name", ["tf_keras", "tf_keras_module"])
def test_tf_keras_saved_models(src, tmp_path, name):
    source, dst = src(name), str(tmp_path / "out")
    result = _optimize(source, dst)
    report = result["serving_default"]
    assert len(report.folded) == len(report.batch_norms) == 3
    assert F.signature_defs(dst) == F.signature_defs(source)
    feeds = F.random_feeds(source, "serving_default", batch=2, seed=2)
    _assert_same_outputs(source, dst, "serving_default", feeds, tf1=True)


def test_module_with_two_signatures_dict_outputs_and_int_input(src, tmp_path):
    source, dst = src("two_signatures"), str(tmp_path / "out")
    result = _optimize(source, dst, batch=3)
    assert sorted(result) == ["predict", "single"]
    assert all(len(r.folded) == 1 for r in result.values())
    assert result.verification["predict"].inputs == {"k": (3,), "x": (3, 6, 6, 2)}
    assert {o.name for o in result.verification["predict"].outputs} == {
        "logits",
        "features",
        "count",
    }
    defs = F.signature_defs(dst)
    assert defs == F.signature_defs(source)
    assert set(defs["predict"][1]) == {"x", "k"}
    assert set(defs["predict"][2]) == {"logits", "features", "count"}
    rng = np.random.default_rng(7)
    feeds = {
        "x": rng.standard_normal((2, 6, 6, 2)).astype("float32"),
        "k": np.array([1, 3], np.int32),
    }
    _assert_same_outputs(source, dst, "predict", feeds, tf1=True)
    _assert_same_outputs(source, dst, "single", {"image": feeds["x"]}, tf1=True)


def test_only_requested_signatures_are_rewritten(src, tmp_path):
    source, dst = src("two_signatures"), str(tmp_path / "out")
    result = _optimize(source, dst, signatures=["single"])
    assert list(result) == ["single"] and list(result.verification) == ["single"]
    assert result.all_signatures == ["predict", "single"]
    assert F.signature_defs(dst) == F.signature_defs(source)  # predict kept as it was
    feeds = {"x": np.ones((1, 6, 6, 2), np.float32), "k": np.array([2], np.int32)}
    _assert_same_outputs(source, dst, "predict", feeds, tf1=True)


def test_lookup_table_copied_through_with_assets_and_training_bn_reported(src, tmp_path):
    source, dst = src("table"), str(tmp_path / "out")
    result = _optimize(source, dst)
    assert "lookup" in result.unchanged and "lookup table" in result.unchanged["lookup"]
    assert any("copied through unchanged" in n for n in result["lookup"].notes)
    train = result["train"]
    assert len(train.batch_norms) == 1 and not train.folded
    assert "training" in train.not_folded[0].reason
    # a Keras 3 batch norm in training mode assigns to its moving statistics: not frozen
    assert "training mode" in result.unchanged["train_keras"]
    assert len(result["serving_default"].folded) == 1
    assert all(v.ok for v in result.verification.values())
    assert os.listdir(os.path.join(dst, "assets")) == ["vocab.txt"]
    assert F.signature_defs(dst) == F.signature_defs(source)
    words = {"words": np.array([b"beta", b"zeta", b"alpha"], dtype=object)}
    assert list(F.run_tf2(dst, "lookup", words)["ids"]) == [1, -1, 0]
    assert list(F.run_tf1(dst, "lookup", words)["ids"]) == [1, -1, 0]
    x = {"x": np.random.default_rng(8).standard_normal((2, 5, 5, 2)).astype("float32")}
    _assert_same_outputs(source, dst, "serving_default", x, tf1=True)
    _assert_same_outputs(source, dst, "train", x)
    v = {"v": np.random.default_rng(9).standard_normal((4, 3)).astype("float32")}
    _assert_same_outputs(source, dst, "train_keras", v, tf1=True)


# ---- verification ---------------------------------------------------------------------------


def test_a_wrong_rewrite_is_caught_and_nothing_is_written(src, tmp_path, monkeypatch):
    real = graphfold.serving.saved_model.fold_signature

    def off_by_one_percent(fn, *args):
        folded = real(fn, *args)
        inner = folded.function
        _, specs = fn.structured_input_signature

        def call(**kwargs):
            return {k: v * 1.01 if v.dtype.is_floating else v for k, v in inner(**kwargs).items()}

        folded.function = tf.function(call).get_concrete_function(**specs)
        return folded

    monkeypatch.setattr(graphfold.serving.saved_model, "fold_signature", off_by_one_percent)
    source, dst = src("two_signatures"), str(tmp_path / "out")
    before = F.tree_hash(source)
    with pytest.raises(VerificationFailed) as info:
        graphfold.optimize_saved_model(source, dst)
    assert "nothing was written" in str(info.value)
    checks = info.value.result.verification
    assert checks["single"].status == "failed" and 0.009 < checks["single"].max_rel < 0.011
    assert not os.path.exists(dst)
    assert F.tree_hash(source) == before
    _no_leftovers(dst)


def test_tolerance_zero_fails_on_float_rounding(src, tmp_path):
    source, dst = src("tf_keras"), str(tmp_path / "new" / "dirs" / "out")
    with pytest.raises(VerificationFailed):
        graphfold.optimize_saved_model(source, dst, tolerance=0.0)
    assert os.listdir(tmp_path) == []  # not even the parent directories it made


def test_no_verify_writes_without_checking(src, tmp_path):
    result = _optimize(src("tf_keras"), str(tmp_path / "out"), verify=False)
    assert result.written and not result.verification


def test_random_inputs_and_compare():
    specs = {
        "f": tf.TensorSpec([None, 3], tf.float32),
        "i": tf.TensorSpec([None, None], tf.int64),
        "b": tf.TensorSpec([2], tf.bool),
        "s": tf.TensorSpec([None], tf.string),
        "h": tf.TensorSpec([None, 2], tf.float16),
    }
    inputs = random_inputs(specs, batch=4)
    assert inputs["f"].shape == (4, 3) and inputs["i"].shape == (4, 32)  # input_shapes.py
    assert inputs["b"].dtype == tf.bool and inputs["s"].dtype == tf.string
    assert inputs["h"].dtype == tf.float16
    assert int(tf.reduce_min(inputs["i"])) >= 0 and int(tf.reduce_max(inputs["i"])) < 4
    assert compare(np.array([2.0, -4.0]), np.array([2.0, -4.5])) == (0.5, 0.125)
    assert compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == (0.0, 0.0)
    assert compare(np.array([b"a"]), np.array([b"b"]))[1] == float("inf")


# ---- safety ---------------------------------------------------------------------------------


def test_overwrite_rules(src, tmp_path):
    source = src("tf_keras")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("not a model")
    with pytest.raises(BadInput, match="already exists"):
        graphfold.optimize_saved_model(source, dst)
    with pytest.raises(BadInput, match="not a SavedModel directory"):
        graphfold.optimize_saved_model(source, dst, overwrite=True)
    assert (dst / "keep.txt").read_text() == "not a model"
    shutil.rmtree(dst)
    _optimize(source, str(dst), verify=False)
    first = F.tree_hash(str(dst))
    _optimize(source, str(dst), overwrite=True)  # a SavedModel: replaced
    assert os.path.isfile(dst / "saved_model.pb") and F.tree_hash(str(dst)) != first
    _no_leftovers(str(dst))


@pytest.mark.parametrize(
    "where, message",
    [
        ("same", "DST is SRC"),
        ("inside", "DST is inside SRC"),
        ("parent", "SRC is inside DST"),
    ],
)
def test_refuses_dst_overlapping_src(src, tmp_path, where, message):
    source = src("two_signatures")
    dst = {
        "same": source,
        "inside": os.path.join(source, "optimized"),
        "parent": os.path.dirname(source),
    }[where]
    before = F.tree_hash(source)
    with pytest.raises(BadInput, match=message):
        graphfold.optimize_saved_model(source, dst, overwrite=True)
    assert F.tree_hash(source) == before


def test_unwritable_dst(src, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BadInput, match="cannot write"):
        graphfold.optimize_saved_model(src("two_signatures"), str(blocker / "out"))
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(BadInput, match="cannot write"):
                graphfold.optimize_saved_model(src("two_signatures"), str(locked / "out"))
        finally:
            locked.chmod(0o700)


# ---- bad input ------------------------------------------------------------------------------


def _corrupt_copy(source, tmp_path, how):
    copy = tmp_path / "bad"
    shutil.copytree(source, copy)
    pb = copy / "saved_model.pb"
    data = pb.read_bytes()
    if how == "truncated":
        pb.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        pb.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif how == "empty":
        pb.write_bytes(b"")
    elif how == "missing":
        pb.unlink()
    return str(copy)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not a valid SavedModel|cannot load"),
        ("garbage", "not a valid SavedModel|cannot load"),
        ("empty", "no MetaGraph"),
        ("missing", "no saved_model.pb"),
    ],
)
def test_corrupt_saved_model(src, tmp_path, how, message):
    bad = _corrupt_copy(src("two_signatures"), tmp_path, how)
    with pytest.raises(BadInput, match=message):
        graphfold.optimize_saved_model(bad, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    _no_leftovers(str(tmp_path / "out"))


def test_bad_paths_keys_and_tags(src, tmp_path):
    source = src("two_signatures")
    out = str(tmp_path / "out")
    with pytest.raises(BadInput, match="no such file"):
        graphfold.optimize_saved_model(str(tmp_path / "nope"), out)
    with pytest.raises(BadInput, match="unknown signature key 'nope'.*available: predict, single"):
        graphfold.optimize_saved_model(source, out, signatures=["nope"])
    with pytest.raises(BadInput, match="tag-set 'gpu'.*available: serve"):
        graphfold.optimize_saved_model(source, out, tags=("gpu",))
    with pytest.raises(BadInput, match="no signatures"):
        graphfold.optimize_saved_model(src("no_signatures"), out)
    assert not os.path.exists(out)


def test_tf1_builder_tag_set_and_method_names_kept(src, tmp_path):
    source, dst = src("tf1"), str(tmp_path / "out")
    result = _optimize(source, dst, tags=("serve", "gpu"))
    assert all(len(r.folded) == 1 for r in result.values())
    defs = F.signature_defs(dst, tags=("serve", "gpu"))
    assert defs == F.signature_defs(source, tags=("serve", "gpu"))
    assert defs["classify"][0] == "tensorflow/serving/classify"
    x = {"x": np.random.default_rng(10).standard_normal((2, 6, 6, 2)).astype("float32")}
    want = F.run_tf1(source, "classify", x, tags=("serve", "gpu"))["scores"]
    got = F.run_tf1(dst, "classify", x, tags=("serve", "gpu"))["scores"]
    assert F.rel_err(want, got) <= TOL
    assert F.rel_err(want, F.run_tf2(dst, "serving_default", x)["scores"]) <= TOL


def test_verify_skips_what_it_cannot_feed_and_fails_a_broken_candidate():
    from graphfold.convert.verify import verify

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s")])
    def parse(s):
        return {"n": tf.strings.to_number(s)}  # random words are not numbers

    check = verify("parse", parse.get_concrete_function(), parse.get_concrete_function())
    assert check.status == "skipped" and check.ok and "fails on random inputs" in check.reason

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32, name="x")])
    def valid_conv(x):  # needs the unknown dim to be 8: 32 fails, then 8
        x = tf.reshape(x, [tf.shape(x)[0], 8, 3])
        return {"y": tf.nn.conv1d(x[..., :1], tf.ones([3, 1, 1]), 1, "VALID")}

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32, name="x")])
    def broken(x):
        x = tf.reshape(x, [tf.shape(x)[0], 8, 3])
        return {"y": tf.nn.conv1d(x[..., :1], tf.ones([3, 1, 1]) * 1.001, 1, "VALID")}

    good = verify(
        "c", valid_conv.get_concrete_function(), valid_conv.get_concrete_function(), batch=2
    )
    assert good.status == "ok" and good.inputs == {"x": (2, 8, 3)}
    assert "unknown dims 8: the original rejects the usual sizes" in good.shape_note
    assert "unknown dims 8" in good.line()
    bad = verify("c", valid_conv.get_concrete_function(), broken.get_concrete_function())
    assert bad.status == "failed" and not bad.ok and 0.0009 < bad.max_rel < 0.0011
