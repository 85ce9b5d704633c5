"""Serving latency: graphfold against the original, the batch-norm-free limit and the other tools.

    python tools/bench_latency.py [--models ResNet50,...] [--frameworks keras3,tf-keras]
        [--batches 1,16] [--repeats 30] [--warmup 3] [--size N] [--out F.md] [--json F.json]
        [--plot F.png]

For each keras.applications model (random BN statistics) and batch size, the median latency of

  a  the original ConcreteFunction with its variables (the graph a SavedModel serves);
  b  graphfold.rewrite(fn);
  c  the limit: the same frozen graph with every batch norm removed: bypassed (its consumers
     read its input) or, right after a conv/matmul, replaced by a BiasAdd, the bias a perfect
     fold leaves (TF fuses Conv2D+BiasAdd+Relu, not a bare Conv2D+Relu); numerically wrong, but
     it costs what a perfect fold would, and no exact fold can beat it;
  d  TensorFlow's optimize_for_inference on the frozen graph;
  e  the Keras-level folder (PyPI ``tensorflow-batchnorm-folding``, tf-keras models only), when
     installed; its folded Keras model frozen and re-imported like c and d (served with its
     variables instead, it would pay what a pays over a frozen graph);
  f  for reference, the frozen graph re-imported without any folding (what freezing alone
     gives).

The frozen variants (c, d, e, f) differ from b by their folding alone: each first loses what
freezing leaves behind and graphfold removes too (``benchlib.cleaned``: the control edges from
constants that a frozen ConcreteFunction keeps from every former variable read, with which
optimize_for_inference folds nothing, and the ``Identity`` reads of constants), and each is
called the way graphfold's output is (``import_graph``, then ``with_signature``; the pruned
import called directly costs about 1 ms more per call).

Every variant is warmed up, then the runs are interleaved (one call of each per round, in a new
random order each round) in this one process, so that load on the machine hits them alike.
Prints a Markdown table: median milliseconds per call, the ratios b/a, f/a (freezing alone),
b/f (folding on top of freezing), b/c, d/c, e/c, f/c, b/d, b/e (each the median over the rounds
of the two variants' times in the same round), how many batch norms b, d, e left, and their
largest error relative to a. ``--from-json`` redoes the table and the plot from a ``--json`` file
of an earlier run, without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402
from graphfold.convert.freeze import freeze  # noqa: E402

import benchlib  # noqa: E402

MODELS = "ResNet50,MobileNetV2,EfficientNetB0,DenseNet121"
VARIANTS = ("a", "b", "c", "d", "e", "f")
LABELS = {
    "a": "original",
    "b": "graphfold",
    "c": "BN-free limit",
    "d": "optimize_for_inference",
    "e": "keras folder",
    "f": "frozen, not folded",
}
# f/a: what freezing alone gives; b/f: what folding gives on top (b/a ~ f/a x b/f)
RATIOS = ("b/a", "f/a", "b/f", "b/c", "d/c", "e/c", "f/c", "b/d", "b/e")
COLUMNS = [
    "model",
    "framework",
    "batch",
    "a ms",
    "b ms",
    "c ms",
    "d ms",
    "e ms",
    "f ms",
    *RATIOS,
    "BN left b/d/e",
    "max rel err b/d/e",
]


def _first_output(result):
    if isinstance(result, dict):
        result = result[sorted(result)[0]]
    while isinstance(result, (list, tuple)):
        result = result[0]
    return result


def variants(name: str, legacy: bool, size: int | None) -> tuple[dict, dict, int]:
    """``{variant: callable}``, ``{variant: BN left}`` and the input size for one model."""
    model, size, _ = benchlib.build(name, legacy, size)
    fn = examples.concrete(model, (size, size, 3))
    frozen = freeze(fn)
    calls = {"a": fn}
    left = {}
    folded = graphfold.rewrite(fn)
    calls["b"] = folded.function
    left["b"] = len(folded.report.not_folded)
    calls["c"], _ = benchlib.limit_function(frozen, like=fn)
    try:
        calls["d"], left["d"] = benchlib.optimize_for_inference_function(frozen, like=fn)
    except Exception as err:  # noqa: BLE001  a tool that fails is a result too
        print(
            f"# optimize_for_inference failed on {name}: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
    if legacy:
        keras_folded = benchlib.keras_fold(model)
        if keras_folded is not None:
            folded_fn = examples.concrete(keras_folded[0], (size, size, 3))
            calls["e"] = benchlib.frozen_function(freeze(folded_fn), like=folded_fn)
            left["e"] = keras_folded[1]
    calls["f"] = benchlib.frozen_function(frozen, like=fn)
    return calls, left, size


def measure(
    calls: dict, x: tf.Tensor, repeats: int, warmup: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: one call of each per round, in a new random
    order each round (a fixed rotation would always run b right after a, whose memory traffic
    left b a few percent slower at batch 1)."""
    for call in calls.values():
        for _ in range(warmup):
            np.asarray(_first_output(call(x)))
    times = {k: [] for k in calls}
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for key in rng.permutation(list(calls)):
            start = time.perf_counter()
            np.asarray(_first_output(calls[key](x)))
            times[key].append(time.perf_counter() - start)
    return times


def errors(calls: dict, x: tf.Tensor) -> dict[str, float]:
    want = np.asarray(_first_output(calls["a"](x)), np.float64)
    scale = np.abs(want).max() or 1.0
    return {
        k: float(np.abs(np.asarray(_first_output(calls[k](x)), np.float64) - want).max() / scale)
        for k in ("b", "d", "e")
        if k in calls
    }


def _ms(value):
    return "–" if value is None else f"{value * 1e3:.1f}"


def paired_ratio(times: dict, num: str, den: str) -> float | None:
    """Median over the rounds of ``num``'s time over ``den``'s in the same round: the two ran
    back to back, so a busy spell on the machine slows both (steadier than a ratio of medians)."""
    if num not in times or den not in times:
        return None
    return benchlib.median([n / d for n, d in zip(times[num], times[den])])


def _fmt_ratio(value):
    return "–" if value is None else f"{value:.3f}"


def markdown_row(r: dict) -> str:
    med = r["median"]
    get = med.get
    left = "/".join(str(r["left"].get(k, "–")) for k in ("b", "d", "e"))
    err = "/".join(f"{r['error'][k]:.0e}" if k in r["error"] else "–" for k in ("b", "d", "e"))
    cells = [r["model"], r["framework"], str(r["batch"])]
    cells += [_ms(get(k)) for k in VARIANTS]
    cells += [_fmt_ratio(r["ratios"].get(k)) for k in RATIOS]
    cells += [left, err]
    return "| " + " | ".join(cells) + " |"


def header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n" + "|" + "---|" * len(COLUMNS)


def plot(rows: list[dict], path: str) -> None:
    """Per batch size: median latency per model for a-f (log scale), and each variant's time over
    the limit's (the paired ratio; 1 is the limit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(15, 3.8 * len(batches) + 0.8), squeeze=False)
    colors = {
        "a": "#7f7f7f",
        "b": "#1f77b4",
        "c": "#2ca02c",
        "d": "#ff7f0e",
        "e": "#9467bd",
        "f": "#c7c7c7",
    }
    width = 0.8 / len(VARIANTS)
    for (ax, rel), batch in zip(axes, batches):
        sub = [r for r in rows if r["batch"] == batch]
        for i, k in enumerate(VARIANTS):
            xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(sub))]
            ms = [r["median"].get(k, float("nan")) * 1e3 for r in sub]
            ratio = [
                paired_ratio(r["times"], k, "c") if k in r["times"] else float("nan") for r in sub
            ]
            ax.bar(xs, ms, width, label=f"{k}: {LABELS[k]}", color=colors[k])
            rel.bar(xs, ratio, width, color=colors[k])
        for a in (ax, rel):
            a.set_xticks(range(len(sub)))
            a.set_xticklabels([f"{r['model']}\n{r['framework']}" for r in sub], fontsize=7)
            a.grid(axis="y", alpha=0.3)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("median latency (ms, log)")
        ax.set_title(f"batch {batch}: latency")
        rel.axhline(1.0, color="#2ca02c", linestyle="--", linewidth=1)
        rel.set_ylim(0.8, max(1.6, rel.get_ylim()[1]))
        rel.set_ylabel("time / limit (c)")
        rel.set_title(f"batch {batch}: relative to the BN-free limit")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(VARIANTS), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ratios(times: dict) -> dict:
    ratios = {q: paired_ratio(times, *q.split("/")) for q in RATIOS}
    return {q: v for q, v in ratios.items() if v is not None}


def replay(args) -> int:
    with open(args.from_json) as f:
        document = json.load(f)
    print(f"# {document['machine']} (from {args.from_json})")
    lines = [header()]
    for row in document["rows"]:
        row["ratios"] = _ratios(row["times"])
        lines.append(markdown_row(row))
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.plot:
        plot(document["rows"], args.plot)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--frameworks", default="keras3,tf-keras")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="calls of each variant first")
    parser.add_argument("--size", type=int, help="input size instead of the model's own")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--json", help="also write every timing (JSON) to this file")
    parser.add_argument("--plot", help="also draw the medians (PNG, needs matplotlib)")
    parser.add_argument("--from-json", help="no measuring: the table and plot of a --json file")
    args = parser.parse_args(argv)
    if args.from_json:
        return replay(args)

    print(f"# {benchlib.machine()}")
    folder = "installed" if benchlib.keras_folder() else "not installed: e skipped"
    print(
        f"# tensorflow-batchnorm-folding: {folder}; median of {args.repeats} interleaved "
        f"rounds after {args.warmup} warm-up calls; ratios: median of per-round ratios"
    )
    print(header(), flush=True)
    lines, rows = [header()], []
    rng = np.random.default_rng(0)
    for framework in args.frameworks.split(","):
        for name in args.models.split(","):
            calls, left, size = variants(name, benchlib.FRAMEWORKS[framework], args.size)
            for batch in (int(b) for b in args.batches.split(",")):
                x = tf.constant(rng.normal(size=(batch, size, size, 3)).astype("float32"))
                times = measure(calls, x, args.repeats, args.warmup)
                row = dict(
                    model=name,
                    framework=framework,
                    batch=batch,
                    left=left,
                    median={k: benchlib.median(v) for k, v in times.items()},
                    ratios=_ratios(times),
                    error=errors(calls, x),
                    times=times,
                )
                rows.append(row)
                lines.append(markdown_row(row))
                print(lines[-1], flush=True)
            del calls
            examples.keras_module(benchlib.FRAMEWORKS[framework]).backend.clear_session()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": benchlib.machine(), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
