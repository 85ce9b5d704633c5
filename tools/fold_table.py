"""Fold table: rewrite keras.applications models (random BN statistics) and tabulate the folds.

    python tools/fold_table.py [--models ResNet50,...] [--frameworks keras3,tf-keras] [--out F]
    python tools/fold_table.py --models UNet,Conv3DNet,GroupedNet     (examples.SMALL_MODELS)
    python tools/fold_table.py --models DenseNet121,ResNet50V2,DenseNet169 --negative-gamma 0

Prints a Markdown table: model | BN layers | folded forward | folded backward | folded split |
partial | not folded | main blockers | max relative error | rewrite seconds. "partial": the
scale folded, the shift left as one add (docs/folding.md §8); "split": scale and shift folded
in opposite directions. ``--negative-gamma``: the share of negative γ (default 0.3; a partial
fold through a ReLU needs every γ > 0).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfold  # noqa: E402
from graphfold import examples  # noqa: E402

FRAMEWORKS = {"keras3": False, "tf-keras": True}


def blocker_kind(reason: str) -> str:
    """The rule part of a reason, without node names: 'Relu is not ...', 'graph input'."""
    parts = []
    for part in reason.split("; "):
        direction, _, rest = part.partition(": ")
        rule = rest.split(": ", 1)[-1]
        rule = re.sub(r"\S*/\S*", "another node", rule)  # drop node names
        rule = re.sub(r"scale <= 0 on channels? [^)]*", "scale <= 0 on some channels", rule)
        parts.append(f"{direction}: {rule}")
    return " / ".join(dict.fromkeys(parts))


def row(
    name: str, legacy: bool, batch: int = 2, seed: int = 0, negative_gamma: float = 0.3
) -> dict:
    if name in examples.SMALL_MODELS:
        model, shape, bn_layers = examples.small_model(name, legacy, seed)
    else:
        model, size, bn_layers = examples.application(name, legacy, seed, negative_gamma)
        shape = (size, size, 3)
    fn = examples.concrete(model, shape)
    start = time.perf_counter()
    folded = graphfold.rewrite(fn)
    seconds = time.perf_counter() - start
    x = np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")
    want, got = fn(x).numpy(), folded(x).numpy()
    error = float(np.abs(want - got).max() / np.abs(want).max())
    report = folded.report
    blockers = collections.Counter(blocker_kind(e.reason) for e in report.not_folded)
    return dict(
        model=name,
        framework="tf-keras" if legacy else "keras3",
        bn_layers=bn_layers,
        found=len(report.batch_norms),
        forward=report.count("forward"),
        backward=report.count("backward"),
        split=report.count("split"),
        partial=len(report.partial),
        not_folded=len(report.not_folded),
        blockers="; ".join(f"{n}× {k}" for k, n in blockers.most_common(3)) or "–",
        error=error,
        seconds=seconds,
    )


HEADER = (
    "| model | framework | BN layers | folded forward | folded backward | folded split | "
    "partial | not folded | main blockers | max relative error | rewrite seconds |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(r: dict) -> str:
    return (
        f"| {r['model']} | {r['framework']} | {r['bn_layers']} | {r['forward']} | "
        f"{r['backward']} | {r['split']} | {r['partial']} | {r['not_folded']} | "
        f"{r['blockers']} | {r['error']:.2e} | {r['seconds']:.1f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(examples.APPLICATIONS))
    parser.add_argument("--frameworks", default="keras3,tf-keras")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument(
        "--negative-gamma",
        type=float,
        default=0.3,
        help="share of negative γ in the randomised batch norms",
    )
    args = parser.parse_args(argv)
    lines = [HEADER]
    print(HEADER, flush=True)
    for framework in args.frameworks.split(","):
        for name in args.models.split(","):
            r = row(name, FRAMEWORKS[framework], negative_gamma=args.negative_gamma)
            if r["found"] != r["bn_layers"]:
                r["blockers"] += f" (report found {r['found']} BNs)"
            lines.append(markdown(r))
            print(lines[-1], flush=True)
            tf.keras.backend.clear_session()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
