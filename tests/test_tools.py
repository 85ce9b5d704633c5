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
        spec = importlib.util.spec_from_file_location(f"graphfold_tools_{name}",
                                                      TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module        # dataclasses look their module up there
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
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(cells)
    return header, rows


def test_bench_latency_smoke(capsys, tmp_path):
    tool = _load("bench_latency")
    plot = tmp_path / "latency.png"
    assert tool.main(["--models", "MobileNetV2", "--frameworks", "keras3", "--batches", "1",
                      "--repeats", "2", "--warmup", "1", "--size", "32",
                      "--json", str(tmp_path / "latency.json"), "--plot", str(plot)]) == 0
    header, rows = _table(capsys.readouterr().out, "model")
    for column in ("a ms", "b ms", "c ms", "d ms", "e ms", "b/a", "b/c", "d/c", "e/c",
                   "BN left b/d/e"):
        assert column in header
    assert len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["model"] == "MobileNetV2" and row["batch"] == "1"
    assert row["BN left b/d/e"].startswith("0/")          # graphfold folds all 52
    assert row["e ms"] == "–"                              # the Keras folder needs tf-keras
    float(row["b/c"])
    assert plot.stat().st_size > 0


def test_bench_rewrite_smoke(capsys):
    tool = _load("bench_rewrite")
    assert tool.main(["--models", "MobileNetV2", "--frameworks", "keras3", "--size", "32",
                      "--repeats", "1", "--keras-folder", "none", "--sizes", "300,600",
                      "--scaling-repeats", "1", "--verify-up-to", "600"]) == 0
    out = capsys.readouterr().out
    header, rows = _table(out, "model")
    for column in ("freeze", "normalize", "plan", "apply", "import", "own", "total"):
        assert column in header
    assert len(rows) == 1 and rows[0][0] == "MobileNetV2"
    header, rows = _table(out, "nodes")
    for column in ("normalize", "plan", "apply", "µs/node", "vs smallest",
                   "GraphDef MiB", "tracemalloc peak MiB", "RSS growth MiB", "max rel err"):
        assert column in header
    assert len(rows) == 2
    for row in rows:
        row = dict(zip(header, row))
        assert float(row["max rel err"]) < 1e-4                  # the synthetic graph folds right
    assert dict(zip(header, rows[0]))["vs smallest"] == "1.00"


def test_limit_graph_has_no_batch_norm():
    """The limit (c) removes every batch norm, fused or decomposed."""
    bench = _load("benchlib")
    import numpy as np
    import tensorflow as tf

    from graphfold.freeze import freeze

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
    assert "BiasAdd" in ops                  # the BN after the conv became the conv's bias
    x = tf.constant(rng.normal(size=(1, 6, 6, 2)).astype("float32"))
    assert limit(x)[0].shape == (1, 6, 6, 4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_bench_cli_smoke(capsys, tmp_path):
    """One synthetic layer: the reference, optimize (per stage) and inspect, all exit 0."""
    bench = _load("bench_cli")
    report = tmp_path / "cli.json"
    assert bench.main(["--models", "", "--sizes", "1", "--cache", str(tmp_path),
                       "--json", str(report)]) == 0
    header, rows = _table(capsys.readouterr().out, "model")
    assert header[:3] == ["model", "weights MB", "written as"] and len(rows) == 1
    assert rows[0][0] == "1MB" and rows[0][2] == "constants"
    import json
    row = json.loads(report.read_text())["1MB"]
    assert row["optimize"]["exit"] == 0 and row["inspect"]["exit"] == 0
    stages = [s["stage"] for s in row["optimize"]["stages"]]
    assert stages[:5] == ["start-up", "load", "fold", "write", "verify"]


def test_bench_grouped_smoke(capsys):
    tool = _load("bench_grouped")
    assert tool.main(["--batch", "1", "--calls", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "7 folded" in out and "before/after: 2/0" in out
    header, rows = _table(out, "round")
    assert header == ["round", "original ms", "graphfold ms", "original / graphfold"]
    assert len(rows) == 1


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
    (tmp_path / "graphfold").mkdir()
    (tmp_path / "graphfold" / "rewrite.py").write_text("nothing to replace here\n")
    with pytest.raises(ValueError, match="rewrite-folds-nothing: the text to replace is in "
                                         "graphfold/rewrite.py 0 times"):
        mutants.apply_edits(str(tmp_path), mutants.MUTANTS[0])
