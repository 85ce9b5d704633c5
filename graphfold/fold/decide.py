"""Decide each A's fold: plan it, then compute every value it writes, before anything changes.

Forward first, then backward (docs/folding.md §5); a direction folds when its plan (``plan.py``) is
complete and every value it writes (``writes.py``) is finite and within the weight's dtype. When
neither folds A whole, A split into its scale and its shift (§8): both fold the opposite ways
(A disappears), or the scale folds and the shift stays as one add (a partial fold). Nothing here
modifies the graph: ``apply.fold`` carries the writes out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphfold.errors import Blocked
from graphfold.fold.affine import Affine
from graphfold.fold.graph import Graph
from graphfold.fold.layers import LINEAR
from graphfold.fold.plan import Plan, layer_of, plan_backward, plan_forward
from graphfold.fold.rules import IDENTITIES, LEAF_EPS
from graphfold.fold.writes import KeepShift, Write, check_range, compute


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one A becomes: ``plan`` and its ``writes``, or the first ``Blocked`` met; ``tried``:
    for each direction that failed, why. ``partial``: the scale folded and the shift stays as one
    add (``detail`` says where each went; also for a split fold)."""

    plan: Plan | Blocked
    writes: list[Write]
    tried: dict[str, str]
    partial: bool = False
    detail: str | None = None

    @property
    def folded(self) -> bool:
        """A disappears entirely (a partial fold leaves one add)."""
        return not isinstance(self.plan, Blocked) and not self.partial


def decide(graph: Graph, affine: Affine, partial: bool = True) -> Decision:
    """Forward first, then backward; then (``partial``) A split into its scale and its shift
    (``_split``); the plan is the first blocker when nothing folds."""
    if affine.blocked:
        return Decision(affine.blocked, [], {})
    tried: dict[str, str] = {}
    first: Blocked | None = None
    for direction, planner in (("forward", plan_forward), ("backward", plan_backward)):
        found = _planned(graph, planner(graph, affine))
        if not isinstance(found, Blocked):
            return Decision(*found, tried)
        tried[direction] = str(found)
        first = first or found
    finite = np.all(np.isfinite(affine.s)) and np.all(np.isfinite(affine.t))
    if partial and finite and np.any(affine.t != 0):
        split = _split(graph, affine)
        if isinstance(split, Decision):
            return dataclasses.replace(split, tried=tried)
        scale_only = {
            f"scale alone {d}": str(b)
            for d, b in zip(("forward", "backward"), split)
            if str(b) != tried.get(d)
        }
        tried.update(scale_only)
    assert first is not None  # both directions were tried and failed
    return Decision(first, [], tried)


def _planned(graph: Graph, plan: Plan | Blocked) -> tuple[Plan, list[Write]] | Blocked:
    """The plan with its writes, or why not."""
    if isinstance(plan, Blocked):
        return plan
    writes = compute(graph, plan)
    return writes if isinstance(writes, Blocked) else (plan, writes)


# ---- beyond the paper: A split into its scale and its shift (docs/folding.md §8) -----------------
def _split(graph: Graph, affine: Affine) -> Decision | tuple[Blocked, Blocked]:
    """``A(x) = s ⊙ x + t = s ⊙ (x + t/s)``. The scale folds on its own (through ``Relu``,
    ``LeakyRelu``, ``MaxPool`` for s > 0, and past zero padding, which a shift cannot cross);
    then the shift folds the other way (forward ``t/s`` into the layers before A, backward ``t``
    into those after it) and A disappears, or it stays where A was as one add (``x + t/s`` when
    the scale went backward, ``+ t`` when it went forward). When the scale does not fold either:
    why, forward and backward."""
    ones = np.ones_like(affine.s)
    scale = dataclasses.replace(affine, t=np.zeros_like(affine.t))
    tiny = _tiny_scale(affine)
    forward = _planned(graph, plan_forward(graph, scale))
    backward = tiny or _planned(graph, plan_backward(graph, scale))
    if not isinstance(forward, Blocked):
        shift = _planned(graph, plan_backward(graph, dataclasses.replace(affine, s=ones)))
        if not isinstance(shift, Blocked):
            return _joined(forward, shift)
    if not isinstance(backward, Blocked):
        pre = dataclasses.replace(affine, s=ones, t=affine.t / affine.s)
        shift = _planned(graph, plan_forward(graph, pre))
        if not isinstance(shift, Blocked):
            return _joined(backward, shift)
    refused = _add_refused(graph, affine)
    if not isinstance(forward, Blocked):
        kept = refused or _kept(graph, affine, forward, affine.t)
        if isinstance(kept, Decision):
            return kept
        forward = kept
    if not isinstance(backward, Blocked):
        kept = refused or _kept(graph, affine, backward, affine.t / affine.s)
        if isinstance(kept, Decision):
            return kept
        backward = kept
    return forward, backward


def _add_refused(graph: Graph, affine: Affine) -> Blocked | None:
    """Why the one add a partial fold keeps must not follow the node before A (a layer after
    which no bias may be added: ``Linear.refuse_bias``; through Identity, which Grappler
    removes)."""
    producer = graph.producer(affine.input(graph))
    while producer.op in IDENTITIES:
        producer = graph.producer(graph.data_inputs(producer)[0])
    layer = layer_of(graph, producer)
    return None if layer is None else LINEAR[layer[0].op].refuse_bias(layer[0])


def _tiny_scale(affine: Affine) -> Blocked | None:
    """``t/s`` amplifies error where |s| is (near) zero: refused as for leaves."""
    magnitude = np.abs(affine.s)
    if np.any(magnitude < LEAF_EPS * magnitude.max()) or np.any(affine.s == 0):
        return Blocked(affine.output, "a scale is (near) zero: the shift cannot be divided by it")
    return None


def _joined(scale: tuple[Plan, list[Write]], shift: tuple[Plan, list[Write]]) -> Decision:
    """Scale and shift folded in opposite directions: A disappears."""
    (scale_plan, scale_writes), (shift_plan, shift_writes) = scale, shift
    plan = Plan(
        "split",
        roots=scale_plan.roots + shift_plan.roots,
        sinks=scale_plan.sinks + shift_plan.sinks,
        leaves=scale_plan.leaves + shift_plan.leaves,
    )
    detail = (
        f"scale {scale_plan.direction} into {', '.join(scale_plan.absorbed_by)}; shift "
        f"{shift_plan.direction} into {', '.join(shift_plan.absorbed_by)}"
    )
    return Decision(plan, scale_writes + shift_writes, {}, detail=detail)


def _kept(
    graph: Graph, affine: Affine, scale: tuple[Plan, list[Write]], shift: np.ndarray
) -> Decision | Blocked:
    """The scale folded; the shift stays where A was, as one add (of A's dtype: refused when it
    does not hold the shift)."""
    plan, writes = scale
    blocked = check_range(shift, affine.dtype, affine.output, "shift")
    if blocked:
        return blocked
    if plan.direction == "backward":
        where = "before " + ", ".join(n.name for n in graph.value_consumers(affine.output))
        what = "t/s"
    else:
        where, what = "after " + graph.producer(affine.input(graph)).name, "t"
    detail = (
        f"scale {plan.direction} into {', '.join(plan.absorbed_by)}; shift kept {where} as "
        f"one add of {what}"
    )
    return Decision(plan, writes + [KeepShift(shift)], {}, partial=True, detail=detail)
