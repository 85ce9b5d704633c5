"""Every batch-norm layer of a frozen graph, whether it can be folded or not.

A tool that says why the rest cannot be folded must never undercount. The affine recogniser
finds the batch norms it can read as ``s ⊙ x + t``; this module counts them by op type and name,
independent of shapes: each fused batch-norm op, and each ``.../batchnorm`` scope of the
decomposed form (Keras 3, ``tf.nn.batch_normalization``), in the graph and in the bodies of the
functions it calls. Each one the recogniser missed becomes a report entry with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

from graphfold.errors import Blocked
from graphfold.fold.affine import (
    BATCH_NORM_OPS,
    ELEMENTWISE,
    Affine,
    batch_norm_name,
    batch_norm_scope,
    fused_layer_name,
)
from graphfold.fold.graph import Graph, canonical
from graphfold.fold.report import Entry
from graphfold.fold.rules import IDENTITIES

# Ops between a frozen variable and the batch norm that reads it (mixed precision casts it).
_READS = IDENTITIES + ("Cast",)

DECOMPOSED = "decomposed (x*inv+offset)"


def batch_norm_layers(nodes) -> dict[str, list]:
    """``{layer key: [nodes]}``: a fused op is its own layer; a decomposed one is its scope's
    nodes other than constants (what computes on the input)."""
    layers = collections.defaultdict(list)
    for node in nodes:
        if node.op in BATCH_NORM_OPS:
            layers[node.name].append(node)
        elif node.op != "Const":
            scope = batch_norm_scope(node.name)
            if scope is not None:
                layers[scope].append(node)
    return dict(layers)


def layers_in_every_body(graph_def) -> list[tuple[str, list]]:
    """``batch_norm_layers`` of the graph and of each function of its library, each on its own
    (two functions may use the same scope names)."""
    found = list(batch_norm_layers(graph_def.node).items())
    for function in graph_def.library.function:
        found += list(batch_norm_layers(function.node_def).items())
    return found


def display_name(key: str, nodes) -> str:
    """The user-facing name of a batch-norm layer (``conv1_bn``)."""
    if any(n.op in BATCH_NORM_OPS for n in nodes):
        return fused_layer_name(key)
    return batch_norm_name(key + "/x") or key


def _layer_key(node_name: str, op: str) -> str | None:
    return node_name if op in BATCH_NORM_OPS else batch_norm_scope(node_name)


def unrecognised(graph: Graph, affines: list[Affine]) -> list[Entry]:
    """An entry (not folded, with the reason) for each batch-norm layer of ``graph`` that none of
    ``affines`` covers."""
    covered = {
        _layer_key(name, graph.nodes[name].op if name in graph.nodes else "")
        for affine in affines
        for name in affine.nodes
    }
    entries = []
    for key, nodes in batch_norm_layers(graph.graph_def.node).items():
        if key in covered:
            continue
        blocker, reason = _why_unrecognised(graph, nodes)
        entries.append(
            Entry(
                name=display_name(key, nodes),
                form=DECOMPOSED,
                nodes=[n.name for n in nodes],
                folded=False,
                reason=reason,
                blocker=blocker,
            )
        )
    return entries


def _why_unrecognised(graph: Graph, nodes) -> tuple[str, str]:
    computed = computed_statistics(graph, nodes)
    if computed is not None:
        return computed.node, str(computed)
    for node in nodes:
        if node.op not in ELEMENTWISE:
            continue
        variable = [t for t in graph.data_inputs(node) if graph.const(t) is None]
        if variable and graph.shape(variable[0]) is None:
            return node.name, (
                f"{node.name}: the shape of its input is unknown, so its channel "
                "axis cannot be told (TensorFlow could not infer it)"
            )
    node = nodes[-1]
    return node.name, (
        f"{node.name}: not a per-channel affine map of constants (a constant "
        "broadcasts along a non-channel axis, or an op that is not a multiply or "
        "an add)"
    )


# ---- batch statistics: a decomposed batch norm whose mean and variance are computed ----------
def computed_statistics(graph: Graph, nodes) -> Blocked | None:
    """Why a decomposed batch norm (``x * inv + (β - μ·inv)``, ``nodes`` its scope) is no A when
    an op of it multiplies or adds two computed tensors: its μ and σ² (or γ, β) are tensors the
    graph computes (``tf.nn.moments`` of x: training mode, instance or layer norm), so s and t
    change with the input. None when every operand but x is a constant."""
    first = next((n for n in nodes if n.op in ELEMENTWISE and _computed_operands(graph, n)), None)
    if first is None:
        return None
    inside = {n.name for n in nodes}
    outside = [
        t
        for n in nodes
        for t in graph.data_inputs(n)
        if graph.const(t) is None and graph.producer(t).name not in inside
    ]
    outside = list(dict.fromkeys(outside))
    roots = [t for t in outside if not any(_feeds(graph, o, t) for o in outside)]
    source = next((t for t in roots if any(_feeds(graph, t, o) for o in outside)), None)
    statistics = [t for t in outside if source is not None and _feeds(graph, source, t)]
    others = [t for t in outside if t != source and t not in statistics]
    elsewhere = f"{', '.join(others)} computed in the graph" if others else ""
    if statistics:
        named = " and ".join(f"{_statistic(graph, t, inside)}{t}" for t in statistics)
        why = f"batch statistics: {named} are computed from {source}, the tensor it normalizes"
        why += f"; {elsewhere}" if elsewhere else ""
        text = f"its scale and shift are computed from the input, not constants ({why})"
    else:
        text = f"its scale and shift are computed in the graph, not constants ({elsewhere})"
    return Blocked(first.name, f"{text}: not a fixed per-channel affine map")


# The decomposed form reads σ² through ``rsqrt(σ² + ε)`` and μ through ``μ · inv``.
_SQUARE_ROOTS = ("Rsqrt", "Sqrt")
_MULTIPLIES = ("Mul",)


def _statistic(graph: Graph, tensor: str, inside: set[str]) -> str:
    """``"variance "`` when ``tensor`` reaches a square root within the batch norm (``σ² + ε``
    then ``Rsqrt``), ``"mean "`` when a multiply reads it (``μ·inv``), else ""."""
    users = [u for u in graph.consumers(tensor) if u.name in inside]
    then = [c for u in users for c in graph.consumers(canonical(u.name))]
    if any(n.op in _SQUARE_ROOTS for n in users + then):
        return "variance "
    return "mean " if any(u.op in _MULTIPLIES for u in users) else ""


def _computed_operands(graph: Graph, node) -> list[str]:
    """Both operands of an elementwise ``node`` when neither is a constant, else []."""
    inputs = graph.data_inputs(node)[:2]
    if len(inputs) == 2 and all(graph.const(t) is None for t in inputs):
        return inputs
    return []


def _feeds(graph: Graph, source: str, tensor: str, limit: int = 64) -> bool:
    """Whether ``source`` is among the ``limit`` nearest ancestors of ``tensor``."""
    seen: set[str] = set()
    frontier = [tensor]
    while frontier and len(seen) < limit:
        node = graph.producer(frontier.pop(0))
        if node.name in seen:
            continue
        seen.add(node.name)
        inputs = graph.data_inputs(node)
        if any(canonical(t) == canonical(source) for t in inputs):
            return True
        frontier += inputs
    return False


def without_computed_statistics(graph: Graph, affines: list[Affine]) -> list[Affine]:
    """``affines`` less those inside a decomposed batch norm whose statistics are computed: such
    a part (``σ² + ε``, ``γ · rsqrt(σ² + ε)``, ``β - μ·inv``) maps the statistics, not the
    data, and rewriting it could only grow the graph; the census reports the layer (its
    ``computed_statistics``)."""
    computed = {
        key
        for key, nodes in batch_norm_layers(graph.graph_def.node).items()
        if not any(n.op in BATCH_NORM_OPS for n in nodes) and computed_statistics(graph, nodes)
    }
    return [a for a in affines if not any(batch_norm_scope(n) in computed for n in a.nodes)]


# ---- names: the Keras layer's, never a node graphfold made -------------------------------------
def layer_names(graph: Graph, variables: dict[str, str]) -> dict[str, str]:
    """``{node of a batch-norm layer: the layer's name}``, from the variables it reads
    (``conv1_bn/gamma`` → ``conv1_bn``; a nested layer keeps its path), where they all name one
    layer. Keras 3's name scopes carry TensorFlow's uniquifying suffix (``conv1_bn_1``), and an
    auto-named layer's scope can be another layer's name: its variables cannot."""
    names: dict[str, str] = {}
    for nodes in batch_norm_layers(graph.graph_def.node).values():
        owners = {
            _variable_read(graph, tensor, variables).rpartition("/")[0]
            for node in nodes
            for tensor in graph.data_inputs(node)
        } - {"", "/"}
        owners.discard("")
        if len(owners) == 1:
            owner = owners.pop()
            names.update((node.name, owner) for node in nodes)
    return names


def _variable_read(graph: Graph, tensor: str, variables: dict[str, str]) -> str:
    """The variable behind ``tensor`` (through Identity and Cast), or ""."""
    for _ in range(8):
        node = graph.producer(tensor)
        if node.name in variables:
            return variables[node.name]
        if node.op not in _READS or not graph.data_inputs(node):
            return ""
        tensor = graph.data_inputs(node)[0]
    return ""


def renamed(entries: list[Entry], names: dict[str, str]) -> list[Entry]:
    """Each batch-norm entry under its layer's name (``layer_names``), where known."""
    for entry in entries:
        known = [names[node] for node in entry.nodes if node in names]
        if entry.is_batch_norm and known:
            entry.name = known[0]
    return entries


def in_user_names(entry: Entry, created: dict[str, str]) -> Entry:
    """``entry`` with every node graphfold created (a folded bias, a multiply-add) in its reason
    and blocker replaced by the node of the original graph it stands for."""
    if not created or entry.reason is None and not entry.tried:
        return entry

    def user(text: str) -> str:
        return _CREATED.sub(lambda m: _origin(m.group(0), created), text)

    return dataclasses.replace(
        entry,
        reason=None if entry.reason is None else user(entry.reason),
        blocker=None if entry.blocker is None else _origin(entry.blocker, created),
        tried={k: user(v) for k, v in entry.tried.items()},
    )


_CREATED = re.compile(r"[^\s:;,()']+/(?:folded_\w+|graphfold_\w+)")


def _origin(name: str, created: dict[str, str]) -> str:
    for _ in range(8):
        if name not in created:
            return name
        name = created[name]
    return name


def in_function_bodies(graph_def, skip=frozenset()) -> list[Entry]:
    """An entry (not folded) for each batch-norm layer inside a function of the graph's library
    (control-flow branches and loop bodies, calls left in place), but those named in ``skip``
    (inlined: their batch norms are in the graph now)."""
    callers = _callers(graph_def)
    entries = []
    for function in graph_def.library.function:
        name = function.signature.name
        if name in skip:
            continue
        how = callers.get(name, "a function call")
        if "_XlaMustCompile" in function.attr and function.attr["_XlaMustCompile"].b:
            how = "an XLA-compiled function call (jit_compile=True) that freezing leaves in place"
        for key, nodes in batch_norm_layers(function.node_def).items():
            entries.append(
                Entry(
                    name=display_name(key, nodes),
                    form=nodes[0].op if nodes[0].op in BATCH_NORM_OPS else DECOMPOSED,
                    nodes=[f"{name}/{n.name}" for n in nodes],
                    folded=False,
                    blocker=name,
                    reason=f"{name}: inside the body of {how}; graphfold does not rewrite function "
                    "bodies",
                )
            )
    return entries


def _callers(graph_def) -> dict[str, str]:
    """``{function name: what calls it}`` in words (``an If branch``, ``a While loop body``)."""
    found: dict[str, str] = {}
    bodies = [graph_def.node] + [f.node_def for f in graph_def.library.function]
    for nodes in bodies:
        for node in nodes:
            for key, value in node.attr.items():
                functions = [value.func] if value.HasField("func") else list(value.list.func)
                for function in functions:
                    found.setdefault(function.name, _role(node.op, key))
    return found


def _loop_part(attr: str) -> str:
    return f"a tf.while_loop {'body' if attr == 'body' else 'condition'}"


# The control-flow ops that call functions: the role of a function (by the op's attribute that
# names it), in words. Any other op naming a function calls it.
_CALLERS: dict[str, Callable[[str], str]] = {
    "If": lambda attr: "a tf.cond branch",
    "StatelessIf": lambda attr: "a tf.cond branch",
    "While": _loop_part,
    "StatelessWhile": _loop_part,
    "Case": lambda attr: "a tf.switch_case branch",
    "StatelessCase": lambda attr: "a tf.switch_case branch",
}


def _role(op: str, attr: str) -> str:
    role = _CALLERS.get(op)
    return f"{role(attr) if role else 'a function call'} ({op})"
