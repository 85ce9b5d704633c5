"""``rewrite``: freeze → normalize → (plan → apply) per A → prune → re-import."""

from __future__ import annotations

import collections
import gc
import time

from graphfold import apply as apply_
from graphfold.affine import BATCH_NORM_OPS, Affine, batch_norm_name, find_affines, refresh
from graphfold.constants import fold_constants
from graphfold.freeze import as_concrete_function, freeze
from graphfold.function import FoldedFunction, import_graph, with_signature
from graphfold.graph import Graph
from graphfold.inline import inline_calls
from graphfold.errors import Blocked
from graphfold.plan import plan_backward, plan_forward
from graphfold.report import Entry, FoldReport


def rewrite(fn) -> FoldedFunction:
    """Fold every batch normalization of ``fn`` that can be folded exactly.

    ``fn``: a ConcreteFunction, or a ``tf.function`` with an ``input_signature``. ``fn`` is not
    modified. Returns a ``FoldedFunction`` called like ``fn``, with ``.graph_def`` and ``.report``.
    """
    concrete = as_concrete_function(fn)
    seconds = {}
    clock = time.perf_counter()
    frozen = freeze(concrete)
    seconds["freeze"] = time.perf_counter() - clock

    graph_def, report = optimize_graph_def(frozen.graph_def, frozen.inputs, frozen.outputs,
                                           frozen.shapes, seconds)
    clock = time.perf_counter()
    pruned = import_graph(graph_def, frozen.inputs, frozen.outputs)
    function = with_signature(pruned, concrete)
    seconds["import"] = time.perf_counter() - clock
    report.seconds = seconds
    return FoldedFunction(function, graph_def, report)


def optimize_graph_def(graph_def, inputs, outputs, shapes, seconds=None):
    """Folds a frozen GraphDef (a copy: ``graph_def`` is not modified).

    Returns the optimized GraphDef and its ``FoldReport``.
    """
    # Python's cyclic GC off meanwhile: the rewrite makes no cycles, but its many long-lived
    # objects trigger full collections that walk TensorFlow's whole heap, which made the time per
    # node grow with the graph (about 1.9x from 1k to 20k nodes).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _optimize_graph_def(graph_def, inputs, outputs, shapes, seconds)
    finally:
        if enabled:
            gc.enable()


def _optimize_graph_def(graph_def, inputs, outputs, shapes, seconds=None):
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()
    work = type(graph_def)()
    work.CopyFrom(graph_def)
    graph = Graph(work, shapes, outputs)
    graph.validate()
    ops_before = graph.op_counts()
    inlined, left = inline_calls(graph)
    notes = _control_flow_notes(work, skip=inlined)
    notes += [f"nested call {call} left as it is: {why}" for call, why in sorted(left.items())]
    keep = [i.split(":")[0] for i in inputs]
    fold_constants(graph)
    graph.prune(keep=keep)
    affines = find_affines(graph)
    seconds["normalize"] = time.perf_counter() - clock

    entries = []
    plan_time = 0.0
    clock = time.perf_counter()
    for affine in affines:
        start = time.perf_counter()
        affine = refresh(graph, affine)
        outcome, writes, tried = _decide(graph, affine)
        plan_time += time.perf_counter() - start
        if isinstance(outcome, Blocked):
            if affine.blocked is None:
                apply_.as_multiply_add(graph, affine)
        else:
            apply_.fold(graph, affine, writes)
        entries.extend(_entries(affine, outcome, tried))
    graph.prune(keep=keep)
    seconds["plan"] = plan_time
    seconds["apply"] = time.perf_counter() - clock - plan_time
    report = FoldReport(entries, ops_before, graph.op_counts(), notes)
    return work, report


def _decide(graph: Graph, affine: Affine):
    """``(plan, its computed writes, what each direction met)``: forward first, then backward;
    the plan is the first blocker when neither direction folds."""
    if affine.blocked:
        return affine.blocked, None, {}
    tried, first = {}, None
    for direction, planner in (("forward", plan_forward), ("backward", plan_backward)):
        plan = planner(graph, affine)
        writes = plan if isinstance(plan, Blocked) else apply_.compute(graph, plan)
        if not isinstance(writes, Blocked):
            return plan, writes, tried
        tried[direction] = str(writes)
        first = first or writes
    return first, None, tried


def _entries(affine: Affine, outcome, tried) -> list[Entry]:
    folded = not isinstance(outcome, Blocked)
    form = affine.form
    if affine.is_batch_norm and form not in BATCH_NORM_OPS:
        form = "decomposed (x*inv+offset)"
    common = dict(form=form, nodes=list(affine.nodes), folded=folded, tried=tried)
    if folded:
        common.update(direction=outcome.direction, absorbed_by=outcome.absorbed_by,
                      leaves=[leaf.layer for leaf in outcome.leaves])
    else:
        reason = "; ".join(f"{d}: {why}" for d, why in tried.items()) or str(outcome)
        common.update(reason=reason, blocker=outcome.node)
    names = affine.batch_norms or [affine.nodes[-1]]
    return [Entry(name=name, is_batch_norm=affine.is_batch_norm, **common) for name in names]


def _control_flow_notes(graph_def, skip=frozenset()) -> list[str]:
    """A note for batch norms inside control-flow bodies, which stay unfolded: one count per
    batch-norm layer (a fused op, or the ``.../batchnorm`` scope of a decomposed one, whose
    three Mul nodes are one layer; top-level ``batchnorm/mul`` included)."""
    inside = collections.Counter()
    for function in graph_def.library.function:
        if function.signature.name in skip:
            continue
        layers = set()
        for node in function.node_def:
            if node.op in BATCH_NORM_OPS:
                layers.add(node.name)
            elif node.op == "Mul" and batch_norm_name(node.name) is not None:
                layers.add(node.name.rsplit("/", 1)[0])
        if layers:
            inside[function.signature.name] = len(layers)
    return [f"{count} batch norm(s) inside control-flow function {name} were not folded "
            f"(control-flow bodies are left as they are)" for name, count in sorted(inside.items())]
