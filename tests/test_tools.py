"""Smoke tests of the benchmark tools: each main() on one tiny model / graph, output columns only
(no timing assertions: the numbers depend on the machine)."""

import importlib.util
import pathlib
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(
            f"graphfold_tools_{name}", TOOLS / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(TOOLS))


def _table(out: str, first_column: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the Markdown table whose first column is ``first_column``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(cells)
    return header, rows


def test_bench_latency_smoke(capsys, tmp_path):
    tool = _load("bench_latency")
    plot = tmp_path / "latency.png"
    assert (
        tool.main(
            [
                "--models",
                "MobileNetV2",
                "--frameworks",
                "keras3",
                "--batches",
                "1",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--size",
                "32",
                "--json",
                str(tmp_path / "latency.json"),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    header, rows = _table(capsys.readouterr().out, "model")
    for column in (
        "a ms",
        "b ms",
        "c ms",
        "d ms",
        "e ms",
        "b/a",
        "f/a",
        "b/f",
        "b/c",
        "d/c",
        "e/c",
        "BN left b/d/e",
    ):
        assert column in header
    assert len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["model"] == "MobileNetV2" and row["batch"] == "1"
    assert row["BN left b/d/e"].startswith("0/")  # graphfold folds all 52
    assert row["e ms"] == "–"  # the Keras folder needs tf-keras
    float(row["b/c"])
    assert plot.stat().st_size > 0


def test_bench_rewrite_smoke(capsys):
    tool = _load("bench_rewrite")
    assert (
        tool.main(
            [
                "--models",
                "MobileNetV2",
                "--frameworks",
                "keras3",
                "--size",
                "32",
                "--repeats",
                "1",
                "--keras-folder",
                "none",
                "--sizes",
                "300,600",
                "--scaling-repeats",
                "1",
                "--verify-up-to",
                "600",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    header, rows = _table(out, "model")
    for column in ("freeze", "normalize", "plan", "apply", "import", "own", "total"):
        assert column in header
    assert len(rows) == 1 and rows[0][0] == "MobileNetV2"
    header, rows = _table(out, "nodes")
    for column in (
        "normalize",
        "plan",
        "apply",
        "µs/node",
        "vs smallest",
        "GraphDef MiB",
        "tracemalloc peak MiB",
        "RSS growth MiB",
        "max rel err",
    ):
        assert column in header
    assert len(rows) == 2
    for row in rows:
        row = dict(zip(header, row))
        assert float(row["max rel err"]) < 1e-4  # the synthetic graph folds right
    assert dict(zip(header, rows[0]))["vs smallest"] == "1.00"


def test_limit_graph_has_no_batch_norm():
    """The limit (c) removes every batch norm, fused or decomposed."""
    bench = _load("benchlib")
    import numpy as np
    import tensorflow as tf

    from graphfold.convert.freeze import freeze

    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
    params = [tf.constant(rng.uniform(0.5, 1.5, 4).astype("float32")) for _ in range(4)]

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 2], name="x")])
    def fn(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        y = tf.compat.v1.nn.fused_batch_norm(y, *params, is_training=False)[0]
        y = tf.nn.relu(y)
        return tf.nn.batch_normalization(y, params[2], params[3], params[1], params[0], 1e-3)

    frozen = freeze(fn.get_concrete_function())
    assert len(bench.batch_norms(frozen.graph_def)) == 2
    limit, removed = bench.limit_function(frozen)
    assert removed == 2
    ops = {op.type for op in limit.graph.get_operations()}
    assert not ops & {"FusedBatchNormV3", "Mul", "Rsqrt"}, ops
    assert "BiasAdd" in ops  # the BN after the conv became the conv's bias
    x = tf.constant(rng.normal(size=(1, 6, 6, 2)).astype("float32"))
    assert limit(x)[0].shape == (1, 6, 6, 4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_bench_cli_smoke(capsys, tmp_path):
    """One synthetic layer, both weight modes: the reference, optimize (per stage), its output
    and inspect, all exit 0; the targets table of issue 20 for each mode."""
    bench = _load("bench_cli")
    report = tmp_path / "cli.json"
    assert (
        bench.main(
            [
                "--models",
                "",
                "--sizes",
                "1",
                "--cache",
                str(tmp_path),
                "--weights",
                "auto,constants",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    header, rows = _table(out, "model")
    assert header[:3] == ["model", "weights MB", "written as"] and len(rows) == 2
    assert [r[0] for r in rows] == ["1MB (auto)", "1MB (constants)"]
    import json

    document = json.loads(report.read_text())
    auto, constants = document["1MB (auto)"], document["1MB (constants)"]
    assert auto["optimize"]["exit"] == 0 and auto["inspect"]["exit"] == 0
    assert auto["output"]["exit"] == 0 and constants["output"]["exit"] == 0
    assert constants["weights"] == "constants" and "inspect" not in constants
    assert auto["reference"] is not None and constants["reference"] == auto["reference"]
    assert auto["rewritten"] == constants["rewritten"] == 2
    stages = [s["stage"] for s in auto["optimize"]["stages"]]
    assert stages[:5] == ["start-up", "load", "fold", "write", "verify"]
    header, rows = _table(out[out.index("| model | mode |") :], "model")
    targets = {r[1]: dict(zip(header, r)) for r in rows}
    assert set(targets) == {"auto", "constants"}
    assert targets["auto"]["default mode: ≤ reference + 5×"] in ("yes", "**no**")
    assert targets["constants"]["default mode: ≤ reference + 5×"] == "–"
    for row in targets.values():
        assert row["≤ output + 3×"] in ("yes", "**no**")
        float(row["(optimize − output) / weights"])


def test_bench_grouped_smoke(capsys):
    tool = _load("bench_grouped")
    assert tool.main(["--batch", "1", "--calls", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 folded" in out and "before/after: 2/0" in out
    header, rows = _table(out, "round")
    assert header == ["round", "original ms", "graphfold ms", "original / graphfold"]
    assert len(rows) == 1


def test_bench_serving_smoke(capsys, tmp_path):
    """One synthetic layer (1 MB): every variant written, checked folded, and measured through
    TF Serving's path (the C++ harness, built here) and tf.saved_model.load; latency with the
    A/A control; a session configuration. Skips the harness, saying why, without g++."""
    import json
    import shutil

    bench = _load("bench_serving")
    loaders = "serving,python" if shutil.which("g++") else "python"
    report, plot = tmp_path / "serving.json", tmp_path / "serving.png"
    assert (
        bench.main(
            [
                "--models",
                "1MB",
                "--variants",
                "original,freeze,constants,variables,graph",
                "--loaders",
                loaders,
                "--batches",
                "1,2",
                "--rounds",
                "2",
                "--warmup",
                "1",
                "--configs",
                "default,no-mem-opt",
                "--cache",
                str(tmp_path),
                "--json",
                str(report),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    document = json.loads(report.read_text())
    row = document["rows"]["1MB"]
    variants = row["variants"]
    assert variants["original"]["batch_norm_ops"] > 0
    for name in ("constants", "variables", "graph"):
        assert variants[name]["batch_norm_ops"] == 0, variants[name]
    assert variants["constants"]["folded"] == variants["variables"]["folded"] == "1/1"
    assert variants["variables"]["weights"] == "variables"
    assert variants["graph"]["functions"] == 0
    header, rows = _table(out, "model")
    assert len(rows) == 5 * len(loaders.split(","))
    for loader in loaders.split(","):
        for variant, m in row["memory"][loader].items():
            assert m["first_call"]["hwm_mib"] >= m["load"]["hwm_mib"] > 0, (loader, variant)
        pairs = row["latency"][loader]  # each variant beside the original, A/A too
        assert set(pairs) == set(variants) - {"original"} | {bench.AA}
        for name, by_key in pairs.items():
            for key in ("1", "2", "cpu 1", "cpu 2"):  # wall and CPU time per call
                assert set(by_key[key]) == {"original", name}
                assert all(len(t) == 2 and min(t) > 0 for t in by_key[key].values())
    header, rows = _table(out[out.index("| model | loader | batch |") :], "model")
    assert "original (A/A) / original" in header and len(rows) == 4 * len(loaders.split(","))
    assert {r[3] for r in rows} == {"wall", "CPU"}
    if "serving" in loaders:
        assert set(row["configs"]["no-mem-opt"]["memory"]) == set(variants)
        assert "| model | configuration |" in out
    else:
        assert "no C++ compiler" in document["harness"]
    assert plot.stat().st_size > 0


def test_bench_serving_refuses_an_unfolded_copy():
    """A written variant that kept its batch norms (or copied a signature through) is never
    measured: that is how the unfolded "variables" figures of issue 17 were published."""
    bench = _load("bench_serving")
    original = {"batch_norm_ops": 53}
    with pytest.raises(SystemExit, match="not folded"):
        bench.check_folded(
            "m", {"original": original, "variables": {"batch_norm_ops": 53, "unchanged": {}}}
        )
    with pytest.raises(SystemExit, match="not folded"):
        bench.check_folded(
            "m",
            {
                "original": original,
                "constants": {"batch_norm_ops": 0, "unchanged": {"serve": "a lookup table"}},
            },
        )
    bench.check_folded(
        "m", {"original": original, "variables": {"batch_norm_ops": 0, "unchanged": {}}}
    )


@pytest.mark.parametrize("name", [m.name for m in _load("mutants").MUTANTS if m.cheap])
def test_the_cheap_mutants_are_caught(name):
    """Each deliberate breakage of graphfold (``tools/mutants.py``) that CI runs is caught by a
    failing test; an edit whose text moved fails here too (update the mutant with the code)."""
    mutants = _load("mutants")
    [mutant] = [m for m in mutants.MUTANTS if m.name == name]
    result = mutants.run(mutant)
    assert result["caught"], f"{name} survived: {mutant.breaks}\n{result['output']}"


def test_a_mutant_whose_text_moved_is_an_error(tmp_path):
    mutants = _load("mutants")
    (tmp_path / "graphfold" / "convert").mkdir(parents=True)
    (tmp_path / "graphfold" / "convert" / "rewrite.py").write_text("nothing to replace here\n")
    with pytest.raises(
        ValueError,
        match="rewrite-folds-nothing: the text to replace is in "
        "graphfold/convert/rewrite.py 0 times",
    ):
        mutants.apply_edits(str(tmp_path), mutants.MUTANTS[0])


def test_check_serving_compares_what_tf_serving_serves(tmp_path, src):
    """check_serving runs the original and the optimized SavedModel through TF Serving's path
    (the C++ harness' outputs mode) on the same inputs: graphfold's output matches; a model with
    the same signature that computes something else (other weights) is a failure, exit 1; the
    served original equals the loaded original (the harness ran the model). Skips, saying why,
    when the harness cannot be built (building it takes about 15 s here)."""
    import json
    import subprocess

    from graphfold.cli.demo import build_model

    check = _load("check_serving")
    binary, how = _load("bench_serving").harness(str(tmp_path / "bin"))
    if binary is None:
        pytest.skip(f"the serving harness cannot be built: {how}")
    original = src("keras3")
    optimized, other = tmp_path / "optimized", tmp_path / "other"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "graphfold",
            "optimize",
            original,
            str(optimized),
            "--quiet",
            "--weights",
            "constants",
        ],
        check=True,
    )
    build_model(seed=4, input_shape=(16, 16, 3)).export(str(other), verbose=False)
    report = tmp_path / "check.json"
    common = ["--cache", str(tmp_path / "bin"), "--json", str(report)]
    assert check.main([original, str(optimized), "--signature", "serving_default"] + common) == 0
    document = json.loads(report.read_text())
    [result] = document["signatures"].values()
    assert result["status"] == "ok" and result["inputs"] == {"image": [2, 16, 16, 3]}
    [row] = result["outputs"]
    assert row["problem"] is None and row["max_rel"] <= row["tolerance"] == 1e-5
    assert result["served_src_vs_loaded_src"] <= 1e-6
    assert check.main([original, str(other)] + common) == 1
    document = json.loads(report.read_text())
    assert set(document["signatures"]) == {"serve", "serving_default"}
    for result in document["signatures"].values():
        assert result["status"] == "failed" and result["outputs"][0]["max_rel"] > 0.1
        assert "relative error" in result["reason"]


def test_check_serving_refuses_inputs_it_cannot_make(tmp_path):
    """Unknown dimensions other than the batch need --input-shape; string inputs need --inputs;
    a given shape must fit the signature; a tensors file keeps dtypes and strings."""
    import numpy as np
    from tensorflow.core.protobuf import meta_graph_pb2

    check = _load("check_serving")
    signature = meta_graph_pb2.SignatureDef()
    image, text = signature.inputs["image"], signature.inputs["text"]
    image.dtype, text.dtype = 1, 7  # float32, string
    for size in (-1, -1, -1, 3):
        image.tensor_shape.dim.add(size=size)
    with pytest.raises(check.CannotCheck, match="--input-shape image=2,N,N,3"):
        check.input_shape("image", image, 2, {})
    assert check.input_shape("image", image, 2, {"image": (2, 8, 8, 3)}) == (2, 8, 8, 3)
    with pytest.raises(check.CannotCheck, match="does not fit"):
        check.input_shape("image", image, 2, {"image": (2, 8, 8, 4)})
    with pytest.raises(check.CannotCheck, match="give real inputs with --inputs"):
        check.random_feeds(signature, 2, {"image": (2, 8, 8, 3)}, 0)
    feeds = {"image": np.zeros((2, 8, 8, 3), np.float32), "text": np.array([b"a", b"b"])}
    check.write_tensors(str(tmp_path / "given.tensors"), feeds)
    read = check.read_tensors(str(tmp_path / "given.tensors"))
    assert set(read) == {"image", "text"} and list(read["text"]) == [b"a", b"b"]
    assert read["image"].shape == (2, 8, 8, 3) and read["image"].dtype == np.float32


def test_check_serving_without_a_compiler_says_not_checked(tmp_path, monkeypatch, capsys):
    """No harness, no claim: "not checked", exit 0, as bench_serving does."""
    import json

    check = _load("check_serving")
    monkeypatch.setenv("CXX", "no-such-compiler")
    report = tmp_path / "check.json"
    assert (
        check.main(
            [
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--cache",
                str(tmp_path),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "not checked" in out and "no C++ compiler" in out and "match" not in out
    assert json.loads(report.read_text())["status"] == "not checked"
