"""``rewrite``: freeze → normalize → (plan → apply) per A → prune → re-import."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Iterable

import tensorflow as tf

from graphfold.convert import self_check
from graphfold.convert.freeze import as_concrete_function, freeze
from graphfold.convert.function import FoldedFunction, bind_weights, import_graph, with_signature
from graphfold.errors import Blocked
from graphfold.fold import apply as apply_
from graphfold.fold import casts, census, tf_quirks
from graphfold.fold.affine import (
    BATCH_NORM_OPS,
    Affine,
    batch_norm_name,
    batch_norm_scope,
    find_affines,
    refresh,
)
from graphfold.fold.constants import fold_constants
from graphfold.fold.decide import decide
from graphfold.fold.graph import Graph, canonical, split_tensor
from graphfold.fold.inline import inline_calls
from graphfold.fold.report import Entry, FoldReport
from graphfold.fold.shapes import PLACEHOLDERS, infer_shapes
from graphfold.fold.weights import Weights

# Unknown height and width of an image in rewrite's own check: smaller than the command's 224
# (input_shapes.IMAGE_SIZE), since every rewrite pays for it; input_shapes= sets any size.
CHECK_IMAGE_SIZE = 64


def rewrite(
    fn,
    *,
    weights: str = "constants",
    keep_graph_def: bool = True,
    verify: bool = True,
    tolerance: float | None = None,
    input_shapes: dict | None = None,
    partial: bool = True,
    allow_ops: Iterable[str] = (),
) -> FoldedFunction:
    """Fold every batch normalization of ``fn`` that can be folded exactly.

    ``fn``: a ConcreteFunction, or a ``tf.function`` with an ``input_signature``. ``fn`` is not
    modified. ``weights``: "constants" (tensors the new function captures, which a SavedModel
    writes as ``Const`` nodes) or "variables" (variables it captures: ``.variables``). Returns a
    ``FoldedFunction`` called like ``fn``, with ``.graph_def`` and ``.report``;
    ``keep_graph_def=False`` lets the weights go once they are bound (then ``.graph_def`` is not
    available). ``partial``: where a batch norm cannot disappear, fold its scale and keep its
    shift as one add (``docs/folding.md``, partial folds); False keeps it whole.

    ``verify``: run the result against ``fn`` once on random inputs (batch 1; unknown
    dimensions from ``input_shapes`` {input name: shape}, else images ``CHECK_IMAGE_SIZE`` high
    and wide, other dimensions ``input_shapes.OTHER_SIZE``), as the command verifies a
    SavedModel; the outcome is ``report.verification``. A relative error over ``tolerance``
    (None: by precision, ``tolerance.py``) that the noise floor does not explain raises
    ``VerificationFailed`` (its ``.result``: the FoldedFunction). ``verify=False`` skips it.
    A function holding ops that reach outside the graph (file, Python, print: ``scan.py``) is
    not run: NOT VERIFIED, naming them, unless ``allow_ops`` names them all.
    """
    concrete = as_concrete_function(fn)
    shapes = self_check.rewrite_shapes(concrete, input_shapes, verify, tolerance)
    concrete, graph_def, held, inputs, outputs, report = fold(concrete, partial=partial)
    stubs = held.names()  # before binding: binding may release the arrays
    bound, variables = bind_weights(held, weights, release=not keep_graph_def)
    function = reimport(concrete, graph_def, stubs, inputs, outputs, report, bound)
    if not keep_graph_def:
        held.keep_only(())
        graph_def = held = None
    folded = FoldedFunction(function, graph_def, report, held, variables)
    if verify:
        self_check.check(folded, concrete, tolerance, shapes, CHECK_IMAGE_SIZE, allow_ops)
    return folded


def reimport(concrete, graph_def, stubs, inputs, outputs, report, extra):
    """``fold``'s result as a ConcreteFunction called like ``concrete``: ``stubs`` (the names of
    the stub constants) are fed the tensors ``extra`` makes when it is traced
    (``function.with_signature``)."""
    clock = time.perf_counter()
    pruned = import_graph(graph_def, inputs, outputs, stubs)
    function = with_signature(pruned, concrete, extra)
    report.seconds["import"] = time.perf_counter() - clock
    return function


def freeze_only(fn) -> FoldedFunction:
    """``fn`` frozen and cleaned up as ``rewrite`` does it (calls inlined, constant subgraphs
    evaluated, unused nodes pruned, the weights as constants), with no batch norm folded: what
    freezing alone gives, so that a speed-up can be told apart from folding's."""
    concrete, graph_def, held, inputs, outputs, report = fold(fn, folding=False)
    bound, _ = bind_weights(held, "constants")
    function = reimport(concrete, graph_def, held.names(), inputs, outputs, report, bound)
    return FoldedFunction(function, graph_def, report, held)


def fold(fn, partial: bool = True, folding: bool = True):
    """Freeze and fold ``fn``, keeping its weights out of the GraphDef: ``(concrete function,
    optimized GraphDef with stub constants, their Weights, input and output tensors, report)``.
    ``folding=False``: freeze and clean up only (``freeze_only``).
    """
    concrete = as_concrete_function(fn)
    seconds = {}
    clock = time.perf_counter()
    frozen = freeze(concrete, Weights())
    seconds["freeze"] = time.perf_counter() - clock
    graph_def, report = _without_gc(
        _optimize_graph_def,
        frozen.graph_def,
        frozen.inputs,
        frozen.outputs,
        frozen.shapes,
        seconds,
        frozen.weights,
        frozen.variables,
        partial,
        folding,
    )
    assert frozen.weights is not None  # freeze was given a Weights
    frozen.weights.keep_only(node.name for node in graph_def.node)
    report.seconds = seconds
    return concrete, graph_def, frozen.weights, frozen.inputs, frozen.outputs, report


def optimize_graph_def(graph_def, inputs, outputs, shapes=None, seconds=None, partial=True):
    """Folds a frozen GraphDef (a copy: ``graph_def`` is not modified).

    ``inputs``: the placeholders fed (``"x"`` or ``"x:0"``); ``outputs``: the tensors fetched
    (``"y"``, ``"split:1"``). Every fetched name computes what it computed before, whatever is
    folded into or after it. ``shapes``: optional static shapes, ``{tensor: (None, 224, 224, 3)}``
    (None for an unknown dimension), e.g. for a placeholder whose shape the graph leaves unknown;
    every other shape is inferred the way TensorFlow's importer infers it (through calls that are
    not inlined, too). ``partial``: as for ``rewrite``. Returns the optimized GraphDef and its
    ``FoldReport``.
    """
    Graph(graph_def, outputs=outputs).validate()
    check_feeds(graph_def, inputs)
    given = {canonical(k): v for k, v in (shapes or {}).items()}
    try:
        inferred, note = infer_shapes(graph_def, given), None
    except (tf.errors.OpError, ValueError, TypeError) as err:  # an op TF does not know, ...
        inferred = {}
        note = (
            f"TensorFlow could not import the graph to infer its shapes "
            f"({str(err).splitlines()[0]}): only the shapes given were used"
        )
    graph_def, report = _without_gc(
        _optimize_graph_def,
        graph_def,
        inputs,
        outputs,
        {**inferred, **given},
        seconds,
        None,
        None,
        partial,
    )
    if note:
        report.notes.append(note)
    return graph_def, report


def _without_gc(function, *args):
    """``function(*args)`` with Python's cyclic GC off meanwhile: the rewrite makes no cycles,
    but its many long-lived objects trigger full collections that walk TensorFlow's whole heap,
    which made the time per node grow with the graph (about 1.9x from 1k to 20k nodes)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return function(*args)
    finally:
        if enabled:
            gc.enable()


def _optimize_graph_def(
    graph_def,
    inputs,
    outputs,
    shapes,
    seconds=None,
    weights=None,
    variables=None,
    partial=True,
    folding=True,
):
    """The rewrite itself, with ``shapes`` known for every tensor. ``weights``: the
    ``graphfold.fold.weights.Weights`` of its stub constants, if it has any; updated to hold
    those of
    the result. ``variables``: ``{Const node: variable name}`` of a frozen function, whence the
    report's layer names. ``folding=False``: normalize and prune only, no affine map planned or
    applied."""
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()
    work = type(graph_def)()
    work.CopyFrom(graph_def)
    graph = Graph(work, shapes, outputs, weights)
    graph.validate()
    ops_before = graph.op_counts()
    layer_names = census.layer_names(graph, variables or {})
    inlined, left = inline_calls(graph)
    notes = [f"nested call {call} left as it is: {why}" for call, why in sorted(left.items())]
    keep = [i.split(":")[0] for i in inputs]
    fold_constants(graph)
    graph.prune(keep=keep)
    affines = census.without_computed_statistics(graph, find_affines(graph)) if folding else []
    missed = (
        census.unrecognised(graph, affines) + census.in_function_bodies(work, skip=inlined)
        if folding
        else []
    )
    quirks = tf_quirks.snapshot(graph)
    seconds["normalize"] = time.perf_counter() - clock

    entries = []
    plan_time = 0.0
    clock = time.perf_counter()
    for affine in affines:
        start = time.perf_counter()
        affine = refresh(graph, affine)
        decision = decide(graph, affine, partial)
        plan_time += time.perf_counter() - start
        if decision.writes:
            apply_.fold(graph, affine, decision.writes)
        elif affine.blocked is None:
            apply_.as_multiply_add(graph, affine)
        entries.extend(_entries(affine, decision))
    notes += _after_folding(graph, quirks)
    graph.prune(keep=keep)
    seconds["plan"] = plan_time
    seconds["apply"] = time.perf_counter() - clock - plan_time
    entries = census.renamed(_merge_parts(entries), layer_names)
    entries = [census.in_user_names(entry, graph.created) for entry in entries]
    report = FoldReport(entries + missed, ops_before, graph.op_counts(), notes)
    return work, report


def _after_folding(graph: Graph, quirks) -> list[str]:
    """The passes over the folded graph: Cast round trips that compute nothing are removed, then
    patterns TensorFlow miscomputes that the fold created are rewritten (``tf_quirks``); notes
    saying what was done."""
    notes = []
    removed = casts.remove_round_trips(graph)
    if removed:
        notes.append(
            f"{removed} Cast round trip(s) that compute nothing removed (e.g. float16 "
            f"-> float32 -> float16 where batch norms were)"
        )
    return notes + tf_quirks.avoid(graph, quirks)


def check_feeds(graph_def, inputs) -> None:
    """Raises ``ValueError`` naming an input that is not a placeholder of the graph."""
    ops = {node.name: node.op for node in graph_def.node}
    for tensor in inputs:
        name = split_tensor(tensor)[0]
        if name not in ops:
            raise ValueError(f"input {tensor!r} is not a node of the graph")
        if ops[name] not in PLACEHOLDERS:
            raise ValueError(f"input {tensor!r} is a {ops[name]} node, not a placeholder")


def _entries(affine: Affine, decision) -> list[Entry]:
    form = affine.form
    if affine.is_batch_norm and form not in BATCH_NORM_OPS:
        form = "decomposed (x*inv+offset)"
    common = dict(
        form=form,
        nodes=list(affine.nodes),
        folded=decision.folded,
        tried=decision.tried,
        partial=decision.partial,
        detail=decision.detail,
    )
    plan = decision.plan
    if not isinstance(plan, Blocked):
        common.update(
            direction=plan.direction,
            absorbed_by=plan.absorbed_by,
            leaves=[leaf.layer for leaf in plan.leaves],
        )
    if not decision.folded:
        reason = "; ".join(f"{d}: {why}" for d, why in decision.tried.items()) or str(plan)
        blocker = plan.node if isinstance(plan, Blocked) else _first_blocker(decision.tried)
        common.update(reason=reason, blocker=blocker)
    names = affine.batch_norms or [affine.nodes[-1]]
    return [Entry(name=name, is_batch_norm=affine.is_batch_norm, **common) for name in names]


def _first_blocker(tried: dict[str, str]) -> str | None:
    """The node of the first reason (``"node: rule"``)."""
    return next(iter(tried.values())).split(": ", 1)[0] if tried else None


def _merge_parts(entries: list[Entry]) -> list[Entry]:
    """One entry per batch-norm layer: a decomposed batch norm with a fetched tensor inside it
    (its multiply, say) is two A's, folded or not on their own; it folded if every part did."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries:
        scopes = [batch_norm_scope(n) for n in entry.nodes] if entry.is_batch_norm else []
        scope = next((s for s in scopes if s and batch_norm_name(s + "/x") == entry.name), None)
        groups.setdefault((entry.name, scope) if scope else (id(entry),), []).append(entry)
    merged = []
    for parts in groups.values():
        first = parts[0]
        if len(parts) > 1:
            first = dataclasses.replace(
                first,
                nodes=[n for p in parts for n in p.nodes],
                folded=all(p.folded for p in parts),
                absorbed_by=list(dict.fromkeys(n for p in parts for n in p.absorbed_by)),
                leaves=list(dict.fromkeys(n for p in parts for n in p.leaves)),
            )
            first.partial = not first.folded and all(p.folded or p.partial for p in parts)
            if not first.folded:
                blocked = [p for p in parts if not p.folded]
                first.direction = None
                first.blocker = blocked[0].blocker
                first.reason = "a fetched tensor splits it in parts; " + "; ".join(
                    f"part {p.nodes[0]}: {p.reason}" for p in blocked
                )
        merged.append(first)
    return merged
