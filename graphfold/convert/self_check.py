"""``rewrite``'s own check: the folded function against the original on random inputs, under
the verification's rules (``verify.py``: tolerance by precision, ``noise.py``: the freeze-only
noise floor)."""

from __future__ import annotations

from collections.abc import Iterable

from graphfold.convert import input_shapes as input_shapes_
from graphfold.convert import noise, scan
from graphfold.convert.verify import input_labels, verify
from graphfold.errors import BadInput, VerificationFailed
from graphfold.verification import Verification


def rewrite_shapes(concrete, input_shapes, verify: bool, tolerance) -> dict:
    """``rewrite``'s ``input_shapes`` checked against ``concrete``'s inputs (``BadInput``, as
    ``tolerance`` is)."""
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise BadInput(
            f"tolerance must be a non-negative number (or None: by precision), got {tolerance!r}"
        )
    if not verify:
        if input_shapes:
            raise BadInput("input_shapes is for the verification: not with verify=False")
        return {}
    checked = input_shapes_.check(input_shapes, {"rewrite": input_labels(concrete)})
    return checked.get("rewrite", {})


def held_back(concrete, allow_ops) -> Verification | None:
    """A NOT VERIFIED outcome when ``concrete`` holds ops reaching outside the graph that
    ``allow_ops`` does not allow (``scan.py``: the check would run them), else None."""
    held = scan.held_back(scan.scan_graph_def(concrete.graph.as_graph_def()), allow_ops)
    if not held:
        return None
    return Verification("rewrite", "skipped", None, reason=scan.not_run_reason(held))


def check(
    folded, concrete, tolerance, shapes: dict, image_size: int, allow_ops: Iterable[str] = ()
) -> None:
    """``rewrite``'s own check: ``folded`` (a FoldedFunction) against ``concrete`` on random
    inputs (``verify``, ``noise.judge``); the outcome in its report; ``VerificationFailed``
    giving the folded error and the freeze-only noise floor when it fails. Nothing runs when
    ``concrete`` holds ops reaching outside the graph that ``allow_ops`` does not allow: the
    outcome is then NOT VERIFIED, naming them."""
    held = held_back(concrete, allow_ops)
    if held is not None:
        folded.report.verification = held
        return
    check = verify(
        "rewrite",
        concrete,
        folded.function,
        tolerance=tolerance,
        shapes=shapes,
        image_size=image_size,
    )
    noise.judge(check, concrete)
    folded.report.verification = check
    folded.report.seconds["verify"] = check.seconds
    if check.status != "failed":
        return
    floor = "not measured" if check.noise_floor is None else f"{check.noise_floor:.3g}"
    raise VerificationFailed(
        f"rewrite: the folded function does not compute what the original computes: "
        f"{check.reason}; folded max rel error {check.max_rel:.3g}, freeze-only noise floor "
        f"{floor}, on {check.source} "
        + ", ".join(f"{k}{list(v)}" for k, v in check.inputs.items())
        + " (the FoldedFunction is the exception's .result; verify=False skips this check)",
        folded,
    )
