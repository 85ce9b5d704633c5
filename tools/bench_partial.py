"""Partial folds against the batch norm they replace and the batch-norm-free limit (γ > 0).

    python tools/bench_partial.py [--models DenseNet121,ResNet50V2,DenseNet169]
        [--frameworks keras3,tf-keras] [--batches 1,16] [--repeats 30] [--warmup 3] [--size N]
        [--out F.md] [--json F.json]
    python tools/bench_partial.py --from-json F.json     (the table again, without measuring)

Pre-activation networks (BN → ReLU → conv) with every γ > 0 (``examples.randomise`` with no
negative γ: otherwise a negative channel blocks the ReLU and no partial fold exists). For each
model and batch size, the median latency of

  a  the original ConcreteFunction with its variables;
  p  graphfold.rewrite(fn): full folds, and partial folds (scale folded, one add of t/s left);
  n  graphfold.rewrite(fn, partial=False): full folds only, the rest one multiply-add each;
  c  the BN-free limit (``benchlib.limit_function``: every batch norm removed, numerically wrong).

Runs are interleaved in one process, in a new random order each round (``bench_latency.measure``);
ratios are medians of per-round ratios (p/c, n/c, p/n, p/a), p/n with a 95% bootstrap interval
of that median and the share of rounds in which p was faster. A partial fold must never be
slower than what it replaces: p/n <= 1 within the interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_latency import measure, paired_ratio  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402
from graphfold.convert.freeze import freeze  # noqa: E402

import benchlib  # noqa: E402

MODELS = "DenseNet121,ResNet50V2,DenseNet169"
RATIOS = ("p/c", "n/c", "p/n", "p/a")
COLUMNS = [
    "model",
    "framework",
    "batch",
    "BN full/partial/left",
    "a ms",
    "p ms",
    "n ms",
    "c ms",
    *RATIOS,
    "p/n 95% interval",
    "rounds p < n",
]


def variants(name: str, legacy: bool, size: int | None):
    """``({variant: callable}, report counts, input size)`` for one model, γ > 0."""
    if size is None:
        model, size, _ = examples.application(name, legacy, 0, negative_gamma=0.0)
    else:
        model = getattr(examples.keras_module(legacy).applications, name)(
            weights=None, input_shape=(size, size, 3), classifier_activation=None
        )
        examples.randomise(model, np.random.default_rng(0), negative_gamma=0.0)
    fn = examples.concrete(model, (size, size, 3))
    partial, whole = graphfold.rewrite(fn), graphfold.rewrite(fn, partial=False)
    report = partial.report
    counts = (len(report.folded), len(report.partial), len(report.not_folded))
    calls = {
        "a": fn,
        "p": partial.function,
        "n": whole.function,
        "c": benchlib.limit_function(freeze(fn), like=fn)[0],
    }
    return calls, counts, size


def _interval(ratios: list[float], draws: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of ``ratios``."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(draws, len(ratios))), axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def row(r: dict) -> str:
    """One table row from a measured ``{model, framework, batch, counts, times}``."""
    times = r["times"]
    med = {k: benchlib.median(v) for k, v in times.items()}
    cells = [r["model"], r["framework"], str(r["batch"]), "/".join(map(str, r["counts"]))]
    cells += [f"{med[k] * 1e3:.1f}" for k in ("a", "p", "n", "c")]
    cells += [f"{paired_ratio(times, *q.split('/')):.3f}" for q in RATIOS]
    ratios = [p / n for p, n in zip(times["p"], times["n"])]
    low, high = _interval(ratios)
    cells += [f"{low:.3f}–{high:.3f}", f"{sum(x < 1 for x in ratios)}/{len(ratios)}"]
    return "| " + " | ".join(cells) + " |"


def _max_error(calls, x) -> str:
    want = np.asarray(calls["a"](x), np.float64)
    errors = [
        np.abs(np.asarray(calls[k](x), np.float64) - want).max() / np.abs(want).max()
        for k in ("p", "n")
    ]
    return "/".join(f"{e:.0e}" for e in errors)


def replay(path: str, out: str | None) -> int:
    with open(path) as f:
        document = json.load(f)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [row(r) for r in document["rows"]]
    print(f"# {document['machine']} (from {path})\n" + "\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
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
    parser.add_argument("--from-json", help="no measuring: the table of a --json file")
    args = parser.parse_args(argv)
    if args.from_json:
        return replay(args.from_json, args.out)
    print(
        f"# {benchlib.machine()}; median of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up calls; ratios: median of per-round ratios"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    rows, rng = [], np.random.default_rng(0)
    for framework in args.frameworks.split(","):
        for name in args.models.split(","):
            calls, counts, size = variants(name, benchlib.FRAMEWORKS[framework], args.size)
            for batch in (int(b) for b in args.batches.split(",")):
                x = tf.constant(rng.normal(size=(batch, size, size, 3)).astype("float32"))
                times = measure(calls, x, args.repeats, args.warmup)
                rows.append(
                    dict(
                        model=name,
                        framework=framework,
                        batch=batch,
                        counts=counts,
                        times=times,
                        error=_max_error(calls, x),
                    )
                )
                lines.append(row(rows[-1]))
                print(lines[-1] + f" max rel err p/n {rows[-1]['error']}", flush=True)
            del calls
            examples.keras_module(benchlib.FRAMEWORKS[framework]).backend.clear_session()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": benchlib.machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
