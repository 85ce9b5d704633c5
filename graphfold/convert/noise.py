"""The noise floor of a verification: how far freezing alone, with nothing folded, moves the
outputs.

Some models amplify float rounding (random batch-norm statistics in a deep CSPDarkNet, say): any
change to the order of operations, folding or not, moves their outputs by a visible amount. When
the folded model misses the tolerance, the same inputs are run through the frozen, unfolded graph
(``freeze`` and re-import, exactly what the rewrite starts from); its relative error against the
original, per output, is the noise floor. When an output's floor is itself over its tolerance
(freezing alone fails the check), an error within ``NOISE_MULTIPLE`` times that floor is
accepted, and the report says so: folding added no more error than freezing did.

Accepted is not verified when the floor is large. A floor over ``INCONCLUSIVE_FLOOR`` (1e-3)
accepts errors up to 4e-3 and more, the order of the errors real defects cause in a deep model
(a shift dropped in one layer of fifty, TensorFlow's LeakyRelu fusion: 1e-2 to 1e-1); such a
check is INCONCLUSIVE (random-weight EfficientNetV2S: floor 0.54), never "verified".
``tolerance=0`` asks for bit-identical outputs: no allowance then.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphfold.convert.verify import OutputError, Verification, _named, compare

NOISE_MULTIPLE = 4.0
INCONCLUSIVE_FLOOR = 1e-3


def unfolded(fn):
    """``fn`` frozen and re-imported, with nothing folded."""
    from graphfold.convert.freeze import freeze
    from graphfold.convert.function import import_graph, with_signature

    frozen = freeze(fn)
    return with_signature(import_graph(frozen.graph_def, frozen.inputs, frozen.outputs), fn)


def _call(fn, feed):
    """``fn`` on one fed input: keyword arguments (a dict of arrays), or ``(args, kwargs)``."""
    if isinstance(feed, dict):
        return fn(**{k: tf.constant(v) for k, v in feed.items()})
    args, kwargs = feed
    return fn(*args, **kwargs)


def measure(reference, feeds: list) -> dict[str, float]:
    """Per output, the largest relative error of the frozen, unfolded ``reference`` against
    ``reference`` on ``feeds`` (keyword-argument dicts, or ``(args, kwargs)``)."""
    baseline = unfolded(reference)
    floors: dict[str, float] = {}
    for feed in feeds:
        want, got = _named(_call(reference, feed)), _named(_call(baseline, feed))
        for key, value in want.items():
            if value.dtype == tf.string:
                continue
            error = compare(value.numpy(), np.asarray(got[key]))[1]
            floors[key] = max(floors.get(key, 0.0), error)
    return floors


def _tolerance(output: OutputError) -> float:
    """The tolerance a compared output was held to (every compared output has one)."""
    assert output.tolerance is not None
    return output.tolerance


def judge(check: Verification, reference) -> None:
    """For a check that failed on relative error alone: measure the noise floor and accept the
    error where every output over its tolerance has a floor over that tolerance and an error
    within ``NOISE_MULTIPLE`` times it; INCONCLUSIVE when an accepting floor is over
    ``INCONCLUSIVE_FLOOR``."""
    if check.status != "failed" or not check.mismatch or not check.fed:
        return
    try:
        floors = measure(reference, check.fed)
    except Exception:  # noqa: BLE001 - no floor to compare with: the failure stands
        return
    floor = max(floors.values(), default=0.0)
    check.noise_floor = floor
    over = [o for o in check.outputs if not o.max_rel <= _tolerance(o)]
    accepted = bool(over) and all(
        _tolerance(o) > 0
        and floors.get(o.name, 0.0) > _tolerance(o)
        and o.max_rel <= NOISE_MULTIPLE * floors[o.name]
        for o in over
    )
    if not accepted:
        check.reason = f"{check.reason} (noise floor {floor:.3g}: freezing alone, nothing folded)"
        return
    largest = max(floors[o.name] for o in over)
    said = (
        f"relative error {check.max_rel:.3g} is within {NOISE_MULTIPLE:g}x the noise "
        f"floor {largest:.3g} (freezing with nothing folded moves the outputs that much: "
        f"the model amplifies float rounding)"
    )
    if largest > INCONCLUSIVE_FLOOR:
        check.status = "inconclusive"
        check.reason = (
            f"{said}; a floor over {INCONCLUSIVE_FLOOR:g} lets errors as large as "
            f"real defects through, so the comparison says nothing (random "
            f"weights amplify rounding: verify a trained model, or on real inputs)"
        )
    else:
        check.status = "ok"
        check.reason = f"accepted: {said}"
