"""The noise floor of a verification: how far freezing alone, with nothing folded, moves the
outputs.

Some models amplify float rounding (random batch-norm statistics in a deep CSPDarkNet, say): any
change to the order of operations, folding or not, moves their outputs by a visible amount. When
the folded model misses the tolerance, the same inputs are run through the frozen, unfolded graph
(``freeze`` and re-import, exactly what the rewrite starts from); its relative error against the
original is the noise floor. When the floor itself is over the tolerance (freezing alone fails
the check), an error within ``NOISE_MULTIPLE`` times the floor is accepted, and the report says
so: folding added no more error than freezing did. ``tolerance=0`` asks for bit-identical outputs:
no allowance then.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphfold.verify import Verification, compare, _named

NOISE_MULTIPLE = 4.0


def unfolded(fn):
    """``fn`` frozen and re-imported, with nothing folded."""
    from graphfold.freeze import freeze
    from graphfold.function import import_graph, with_signature
    frozen = freeze(fn)
    return with_signature(import_graph(frozen.graph_def, frozen.inputs, frozen.outputs), fn)


def measure(reference, feeds: list[dict]) -> float:
    """Largest relative error of the frozen, unfolded ``reference`` against ``reference`` on
    ``feeds`` (keyword-argument dicts)."""
    baseline = unfolded(reference)
    worst = 0.0
    for feed in feeds:
        kwargs = {k: tf.constant(v) for k, v in feed.items()}
        want, got = _named(reference(**kwargs)), _named(baseline(**kwargs))
        for key, value in want.items():
            if value.dtype == tf.string:
                continue
            worst = max(worst, compare(value.numpy(), np.asarray(got[key]))[1])
    return worst


def judge(check: Verification, reference) -> None:
    """For a check that failed on relative error alone: measure the noise floor and accept the
    error when the floor is over the tolerance and the error within ``NOISE_MULTIPLE`` times it."""
    if check.status != "failed" or not check.mismatch or not check.fed:
        return
    try:
        floor = measure(reference, check.fed)
    except Exception:  # noqa: BLE001 - no floor to compare with: the failure stands
        return
    check.noise_floor = floor
    if check.tolerance > 0 and floor > check.tolerance and \
            check.max_rel <= NOISE_MULTIPLE * floor:
        check.status = "ok"
        check.reason = (f"accepted: relative error {check.max_rel:.3g} is within "
                        f"{NOISE_MULTIPLE:g}x the noise floor {floor:.3g} (freezing with "
                        f"nothing folded moves the outputs that much: the model amplifies "
                        f"float rounding)")
    else:
        check.reason = f"{check.reason} (noise floor {floor:.3g}: freezing alone, nothing " \
                       f"folded)"
