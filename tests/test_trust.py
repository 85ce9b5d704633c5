"""Never a "yes" for work not done (issue 17): weights written as variables are folded, a crash
is a failure and never a signature "copied through" with exit 0, and the final line says NOT
OPTIMIZED about a signature that was not."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import graphfold
import graphfold.options
from graphfold.cli.command import main
from graphfold.errors import RewriteFailed
from graphfold.examples import keras_module, randomise
from graphfold.fleet import repo_task
from graphfold.serving import saved_model

import savedmodel_fixtures as F
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
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ]
    )
    randomise(model, np.random.default_rng(seed))
    return model


@pytest.mark.parametrize("keep_graph_def", [True, False])
def test_rewrite_with_variables_binds_the_weights_it_did_not_change(keep_graph_def):
    """``rewrite(fn, weights="variables", keep_graph_def=False)`` raised ``pruned(x) takes 1
    positional arguments, got 2``: the weights were let go before the re-import read them."""
    model = _conv_bn_dense(1)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3], tf.float32)
    )
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
    for got in (F.run_tf2(dst, "serving_default", feeds), F.run_tf1(dst, "serving_default", feeds)):
        for name, value in want.items():
            assert rel_err(value, got[name]) <= TOL


def test_a_scalar_variable_is_frozen():
    """``tf.Variable(2.0)`` crashed freezing (``Cannot set flags on array scalars``)."""
    keras = keras_module(False)
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()]
    )
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
    with pytest.raises(
        RewriteFailed,
        match=r"signature 'serv.*': graphfold failed to rewrite "
        r"it \(RuntimeError: boom",
    ):
        graphfold.optimize_saved_model(src("keras3"), str(dst))
    assert not dst.exists() and os.listdir(tmp_path) == []
    assert main(["optimize", src("keras3"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in error_line(err) and "Traceback" not in err
    assert "--verbose" in err and not dst.exists()
    assert main(["optimize", src("keras3"), str(dst), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "_crash" in err and not dst.exists()
    assert main(["inspect", src("keras3")]) == 0  # inspect folds without fold_signature
    monkeypatch.setattr(saved_model, "fold", _crash)
    assert main(["inspect", src("keras3")]) == 1
    assert "RuntimeError: boom" in error_line(capsys.readouterr().err)


def test_a_crash_fails_its_version_in_a_repository(src, tmp_path, monkeypatch):
    """The unit of work of ``optimize-repo`` and the Beam pipeline: a crash fails the version,
    with the error and its traceback in the record; nothing is written."""
    monkeypatch.setattr(saved_model, "fold_signature", _crash)
    task = repo_task.Task(
        "m", "1", src("keras3"), str(tmp_path / "m" / "1"), repo_task.normalized_options()
    )
    record = repo_task.run_task(task)
    assert record["status"] == "failed"
    assert "graphfold failed to rewrite it (RuntimeError: boom" in record["error"]
    assert "_crash" in record["traceback"]
    assert not (tmp_path / "m" / "1").exists()


def test_a_signature_copied_through_is_not_optimized(src, tmp_path, capsys):
    """A signature that captures a lookup table is copied through (exit 0), and the final line
    says NOT OPTIMIZED about it; "verified" speaks of the rewritten signatures only."""
    dst = tmp_path / "out"
    assert (
        main(
            [
                "optimize",
                src("table"),
                str(dst),
                "--signature",
                "lookup",
                "--signature",
                "serving_default",
            ]
        )
        == 0
    )
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        "1 signature(s) rewritten, 1 NOT OPTIMIZED (lookup: it captures 1 resource(s)" in final
        and "2 copied unchanged" in final
        and "; verified;" in final
    )
    assert (
        main(["optimize", src("table"), str(tmp_path / "out2"), "--signature", "lookup", "--json"])
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert document["signatures"]["lookup"]["rewritten"] is False
    assert main(["optimize", src("table"), str(tmp_path / "out3"), "--signature", "lookup"]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0 signature(s) rewritten, 1 NOT OPTIMIZED" in final
    assert "nothing rewritten, nothing to verify" in final and "; verified" not in final


# ---- options act or are refused (issue 17, item 4) -----------------------------------------------


@pytest.fixture(scope="module")
def jpeg_pb(tmp_path_factory):
    """A frozen graph fed JPEG bytes (decoded, then conv -> BN): random strings are not JPEGs,
    so it cannot be verified without real inputs."""
    rng = np.random.default_rng(9)
    with tf.Graph().as_default() as graph:
        data = tf.compat.v1.placeholder(tf.string, [], name="image_bytes")
        x = tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32)[None]
        y = tf.nn.conv2d(x, rng.normal(size=(3, 3, 3, 4)).astype(np.float32), 1, "SAME")
        scale, offset = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
        tf.identity(y * scale + offset, name="y")
    path = tmp_path_factory.mktemp("jpeg_pb") / "frozen.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return str(path)


def test_require_verification_acts_on_a_graph_def_file(jpeg_pb, tmp_path, capsys):
    """It was dropped: the .pb was written, NOT VERIFIED, exit 0."""
    dst = tmp_path / "out.pb"
    assert (
        main(["optimize", jpeg_pb, str(dst), "--output-names", "y", "--require-verification"]) == 1
    )
    err = capsys.readouterr().err
    assert "--require-verification: the graph is NOT VERIFIED" in error_line(err)
    assert not dst.exists() and os.listdir(tmp_path) == []
    assert main(["optimize", jpeg_pb, str(dst), "--output-names", "y"]) == 0  # without it
    assert "NOT VERIFIED" in capsys.readouterr().out and dst.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--warmup", "2"],
        ["--weights", "variables"],
        ["--signature", "serving_default"],
        ["--tag-set", "serve"],
        ["--drop-other-tag-sets"],
    ],
)
def test_a_graph_def_file_refuses_the_options_it_cannot_honour(jpeg_pb, tmp_path, capsys, flags):
    dst = tmp_path / "out.pb"
    assert main(["optimize", jpeg_pb, str(dst), "--output-names", "y", *flags]) == 2
    assert f"{flags[0]}: not supported for a GraphDef file" in error_line(capsys.readouterr().err)
    assert not dst.exists()


def test_a_saved_model_refuses_graph_def_names(src, tmp_path, capsys):
    for command in (["optimize", src("keras3"), str(tmp_path / "out")], ["inspect", src("keras3")]):
        assert main([*command, "--input-names", "x"]) == 2
        assert "--input-names: not supported for" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["verify", "optimize-repo"])
def test_names_of_graph_def_files_are_not_offered_where_nothing_reads_them(
    src, tmp_path, capsys, command
):
    assert main([command, src("keras3"), str(tmp_path / "out"), "--output-names", "y"]) == 2
    assert "unrecognized arguments: --output-names y" in error_line(capsys.readouterr().err)


def test_the_api_refuses_options_in_its_own_words(src, jpeg_pb, tmp_path):
    from graphfold.serving.graph_def_file import optimize_graph_def_file

    with pytest.raises(
        graphfold.options.BadOption,
        match=r"^warmup: not supported for a "
        r"GraphDef file$",
    ):
        optimize_graph_def_file(jpeg_pb, str(tmp_path / "o.pb"), warmup=2)
    with pytest.raises(graphfold.options.BadOption, match=r"^input_names: not supported"):
        graphfold.optimize_saved_model(src("keras3"), str(tmp_path / "o"), input_names=["x"])
    with pytest.raises(graphfold.options.BadOption, match=r"^warmup=0: must be a whole number"):
        graphfold.optimize_saved_model(src("keras3"), str(tmp_path / "o"), warmup=0)
    with pytest.raises(
        graphfold.options.BadOption,
        match=r"^verify=False: cannot be combined "
        r"with require_verification",
    ):
        graphfold.Options(verify=False, require_verification=True)
    with pytest.raises(
        graphfold.options.BadOption,
        match=r"^weights: not supported for "
        r"comparing two SavedModels",
    ):
        graphfold.verify_saved_models(src("keras3"), src("keras3"), weights="variables")
    with pytest.raises(
        graphfold.options.BadOption,
        match=r"^partial: not supported for comparing two SavedModels",
    ):
        graphfold.verify_saved_models(src("keras3"), src("keras3"), partial=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerence'"):
        graphfold.optimize_saved_model(src("keras3"), str(tmp_path / "o"), tolerence=1e-3)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]


def test_options_are_one_value_the_repository_keys_on(src, tmp_path):
    """The same options spelled differently are one key; the record keeps every field."""
    assert repo_task.normalized_options(
        tags="serve", signatures="serving_default"
    ) == graphfold.Options(tags=("serve",), signatures=["serving_default"])
    options = graphfold.Options(tolerance=1e-4, warmup=None)
    result = graphfold.optimize_repository(
        os.path.dirname(os.path.dirname(_one_version_repo(src, tmp_path))),
        tmp_path / "dst",
        options=options,
    )
    assert result.count("ok") == 1
    record = json.load(open(tmp_path / "dst" / "m" / "1" / repo_task.RECORD))
    assert record["options"] == options.to_dict() and record["options"]["tolerance"] == 1e-4


def _one_version_repo(src, tmp_path) -> str:
    import shutil

    version = tmp_path / "repo" / "m" / "1"
    shutil.copytree(src("keras3"), version)
    return str(version)


# ---- verification that cannot pass without checking (issue 17, items 5 and 6) --------------------


@pytest.mark.parametrize("max_rel, accepted", [(5e-5, True), (1e-2, False)])
def test_the_noise_floor_excuses_only_an_error_within_its_multiple(monkeypatch, max_rel, accepted):
    """A floor over the tolerance accepts an error within NOISE_MULTIPLE times it, never more."""
    from graphfold.convert import noise
    from graphfold.convert.verify import OutputError, Verification

    monkeypatch.setattr(noise, "measure", lambda reference, feeds: {"y": 2e-5})
    check = Verification(
        "serving_default",
        "failed",
        1e-5,
        reason="y: too far",
        mismatch=True,
        outputs=[OutputError("y", (1, 4), "float32", max_rel, max_rel, 1e-5)],
        fed=[{"x": np.zeros((1, 4), np.float32)}],
    )
    noise.judge(check, reference=None)
    assert check.noise_floor == 2e-5
    assert (check.status == "ok") is accepted, check.reason


def test_verify_acts_on_require_verification(src, tmp_path, capsys):
    """``graphfold verify`` (and ``verify_saved_models``) of JPEG-bytes signatures without real
    inputs nor warm-up records: NOT VERIFIED; exit 1 with --require-verification."""
    import shutil

    from graphfold.errors import VerificationFailed

    source = str(tmp_path / "jpeg")
    shutil.copytree(src("jpeg"), source)
    shutil.rmtree(os.path.join(source, "assets.extra"))
    args = ["verify", source, source, "-s", "serving_default"]
    assert main(args) == 0
    assert "NOT VERIFIED" in capsys.readouterr().out
    assert main([*args, "--require-verification"]) == 1
    assert "--require-verification: signature(s) serving_default NOT VERIFIED" in error_line(
        capsys.readouterr().err
    )
    with pytest.raises(VerificationFailed, match="^require_verification: signature"):
        graphfold.verify_saved_models(
            source, source, signatures=["serving_default"], require_verification=True
        )


def test_a_batch_norm_it_cannot_read_is_still_counted():
    """A batch norm whose input has an unknown shape (its channel axis cannot be told): nothing
    folds, and the census still lists it, with the reason."""
    rng = np.random.default_rng(11)
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, None, name="x")  # unknown rank
        with tf.name_scope("bn/batchnorm"):
            y = x * rng.uniform(0.5, 2, 4).astype(np.float32) + rng.normal(size=4).astype(
                np.float32
            )
        tf.identity(y, name="y")
    optimized, report = graphfold.optimize_graph_def(graph.as_graph_def(), ["x"], ["y"])
    [entry] = report.batch_norms
    assert not entry.folded and "shape of its input is unknown" in entry.reason
