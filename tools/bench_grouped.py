"""Latency of Keras 3 grouped convolutions before and after graphfold.

    python tools/bench_grouped.py [--batch 8] [--calls 200] [--rounds 3]

Keras 3 runs each grouped ``Conv2D`` as an XLA-compiled nested function call; graphfold inlines
the call (a native grouped ``Conv2D``) and folds the batch norms around it. Times
``examples.SMALL_MODELS["GroupedNet"]`` (random statistics) as the original ConcreteFunction and
as the rewritten one, alternating, median of ``--calls`` calls per round; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402


def median_ms(fn, x, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model, shape, _ = examples.small_model("GroupedNet", legacy=False, seed=0)
    original = examples.concrete(model, shape)
    folded = graphfold.rewrite(original)
    x = tf.constant(np.random.default_rng(0).normal(size=(args.batch, *shape)), tf.float32)
    for fn in (original, folded):
        for _ in range(10):
            fn(x)
    print(
        f"GroupedNet (Keras 3), batch {args.batch}: {folded.report.summary()}; "
        f"StatefulPartitionedCall before/after: "
        f"{folded.report.ops_before.get('StatefulPartitionedCall', 0)}/"
        f"{folded.report.ops_after.get('StatefulPartitionedCall', 0)}"
    )
    print("| round | original ms | graphfold ms | original / graphfold |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        a, b = median_ms(original, x, args.calls), median_ms(folded, x, args.calls)
        print(f"| {r + 1} | {a:.3f} | {b:.3f} | {a / b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
