"""Ops that reach outside the graph, found in the protobuf before anything runs.

A model is a program. Before graphfold executes one (verification, warm-up replay, ``graphfold
verify``, the demo's timing, a repository run), it scans what would run for ops that touch the
world outside the graph: files, the network, Python, printing (the list, with the reason for
each: ``graphfold.outside``), and any op the running TensorFlow does not know (a custom kernel).
TensorFlow's own ``saved_model_cli scan`` checks the op set of a whole MetaGraph against
``WriteFile``, ``ReadFile`` and ``PrintV2``; graphfold walks, per signature, the nodes its
outputs depend on (and, in a TF2 SavedModel, the function its object graph binds to it) and
every function they call (a node whose op is a library function, and every attr that names one:
``StatefulPartitionedCall``'s ``f``, ``If``/``While``/``Case`` branches and bodies, a dataset's
map function, func lists), and reports each op with its node and the function that holds it.

Loading a SavedModel runs code too: ``tf.saved_model.load`` calls every resource's
``_create_resource``/``_initialize`` functions and the restore functions of saveable objects (a
TF1 SavedModel: its restore op and its init op). Those are scanned as ``Scan.loading``; a table
filled from the SavedModel's own asset, or a restore from its own ``variables/``, reads the
model's own files and is not held back.

A signature holding such ops is folded and written but not run unless the user allows each op
(``allow_ops``, ``--allow-ops WriteFile,PrintV2``); a model whose loading would run them is not
loaded. graphfold's folding itself never runs a model's op: constant subgraphs are evaluated with
NumPy through an allowlist of pure math (``graphfold.fold.constants.EVALUATORS``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from graphfold.errors import BadInput
from graphfold.options import with_value
from graphfold.outside import OUTSIDE, UNREGISTERED_REASON

# Ops that read a file named by one of their inputs (its index), and load at least: not held
# back when that input is the SavedModel's own file (an asset, its variables/ checkpoint).
OWN_FILE_INPUT = {
    "RestoreV2": 0,
    "Restore": 0,
    "RestoreSlice": 0,
    "InitializeTableFromTextFile": 1,
    "InitializeTableFromTextFileV2": 1,
}
GRAPH = ""  # Finding.function of a node of the top-level graph


@dataclasses.dataclass(frozen=True)
class Finding:
    """An op that reaches outside the graph: the op, its node, the function holding it
    (``GRAPH`` for the top-level graph), and why it is held back."""

    op: str
    node: str
    function: str
    category: str
    reason: str
    model: str = ""  # "SRC" / "DST" when two models are scanned together

    def where(self) -> str:
        owner = f"{self.model}'s " if self.model else ""
        if self.function == GRAPH:
            return f"node '{self.node}' of {owner or 'the '}graph"
        return f"node '{self.node}' in {owner}function '{self.function}'"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Scan:
    """``signatures``: key -> what running that signature would run; ``loading``: what loading
    the model runs."""

    signatures: dict[str, list[Finding]] = dataclasses.field(default_factory=dict)
    loading: list[Finding] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "signatures": {k: [f.to_dict() for f in v] for k, v in sorted(self.signatures.items())},
            "loading": [f.to_dict() for f in self.loading],
        }


def risk(op: str) -> tuple[str, str] | None:
    """``(category, reason)`` when ``op`` reaches outside the graph (or is unknown), else None.
    ``op`` must not be a library function's name (those are walked, not judged)."""
    from tensorflow.python.framework import op_def_registry

    if op in OUTSIDE:
        return OUTSIDE[op]
    if op_def_registry.get(op) is None:
        return "unregistered", UNREGISTERED_REASON
    return None


# ---- walking a graph and its functions ----------------------------------------------------------


def called_functions(node) -> list[str]:
    """Names of the functions a node calls through its attrs (``f``, ``then_branch``,
    ``body``, ``branches``, a dataset's map function, nested in a function's own attrs)."""
    names, pending = [], list(node.attr.values())
    while pending:
        value = pending.pop()
        kind = value.WhichOneof("value")
        if kind == "func":
            names.append(value.func.name)
            pending.extend(value.func.attr.values())
        elif kind == "list":
            for func in value.list.func:
                names.append(func.name)
                pending.extend(func.attr.values())
    return names


class _Walker:
    """Collects the findings of the nodes given and of every function they reach, each
    function once. ``own_files``: (function, tensor source) pairs that are the model's own
    files (``OWN_FILE_INPUT``)."""

    def __init__(
        self, graph_def, own_files: AbstractSet[tuple[str, str]] = frozenset(), model: str = ""
    ):
        self.library = {f.signature.name: f for f in graph_def.library.function}
        self.own_files, self.model = own_files, model
        self.seen: set[str] = set()
        self.findings: list[Finding] = []

    def nodes(self, nodes: Iterable, function: str = GRAPH) -> None:
        by_name = {n.name: n for n in nodes}
        for node in by_name.values():
            if node.op in self.library:
                self.function(node.op)
            else:
                self._judge(node, function, by_name)
            for name in called_functions(node):
                self.function(name)

    def function(self, name: str) -> None:
        if name in self.seen or name not in self.library:
            return
        self.seen.add(name)
        self.nodes(self.library[name].node_def, name)

    def _judge(self, node, function: str, by_name: dict) -> None:
        found = risk(node.op)
        if found is None or self._reads_own_file(node, function, by_name):
            return
        self.findings.append(Finding(node.op, node.name, function, *found, model=self.model))

    def _reads_own_file(self, node, function: str, by_name: dict) -> bool:
        index = OWN_FILE_INPUT.get(node.op)
        if index is None or len(node.input) <= index:
            return False
        return (function, _source(node.input[index], by_name)) in self.own_files


def _node_of(tensor: str) -> str:
    """The node (or function argument) of an input: ``"^a"``, ``"a:1"`` (a graph) or
    ``"a:output:0"`` (a function body) -> ``"a"``."""
    return tensor.lstrip("^").split(":")[0]


def _source(tensor: str, by_name: dict) -> str:
    """The node (or function argument) a tensor comes from, through ``Identity`` nodes."""
    name = _node_of(tensor)
    while name in by_name and by_name[name].op == "Identity" and by_name[name].input:
        name = _node_of(by_name[name].input[0])
    return name


def reachable(graph_def, tensors: Iterable[str]) -> list:
    """The nodes of the top-level graph that ``tensors`` depend on (data and control inputs)."""
    nodes = {n.name: n for n in graph_def.node}
    pending = [_node_of(t) for t in tensors]
    seen: dict[str, object] = {}
    while pending:
        name = pending.pop()
        if name in seen or name not in nodes:
            continue
        seen[name] = nodes[name]
        pending.extend(_node_of(t) for t in nodes[name].input)
    return list(seen.values())


def scan_graph_def(
    graph_def,
    outputs: Iterable[str] | None = None,
    *,
    own_files: AbstractSet = frozenset(),
    model: str = "",
) -> list[Finding]:
    """Findings of what fetching ``outputs`` runs (every node when None)."""
    walker = _Walker(graph_def, own_files, model)
    walker.nodes(graph_def.node if outputs is None else reachable(graph_def, outputs))
    return walker.findings


# ---- SavedModels -----------------------------------------------------------------------------


def scan_meta_graph(meta_graph, keys: Iterable[str], model: str = "") -> Scan:
    """The findings of signatures ``keys`` of a MetaGraphDef, and of what loading it runs.

    A signature is what its SignatureDef's outputs depend on in the graph (what TF1 and TF
    Serving's loader run) and, in a TF2 SavedModel, the functions its object graph names for it
    (what ``tf.saved_model.load`` runs): both, as a crafted model may make them differ."""
    graph_def = meta_graph.graph_def
    functions = _signature_functions(meta_graph)
    scan = Scan()
    for key in keys:
        outputs = [
            name
            for info in meta_graph.signature_def[key].outputs.values()
            for name in _tensor_names(info)
        ]
        walker = _Walker(graph_def, model=model)
        walker.nodes(reachable(graph_def, outputs) if outputs else graph_def.node)
        for name in functions.get(key, ()):
            walker.function(name)
        scan.signatures[key] = walker.findings
    if meta_graph.object_graph_def.nodes:
        scan.loading = _loading_tf2(meta_graph, model)
    else:
        scan.loading = _loading_tf1(meta_graph, model)
    scan.loading += [f for f in _unregistered(graph_def, model) if f not in scan.loading]
    return scan


def _unregistered(graph_def, model: str) -> list[Finding]:
    """Every op of the graph and its library that TensorFlow does not know: loading imports
    every function, and fails on any of them."""
    walker = _Walker(graph_def, model=model)
    walker.nodes(graph_def.node)
    for name in walker.library:
        walker.function(name)
    return [f for f in walker.findings if f.category == "unregistered"]


def _tensor_names(info) -> list[str]:
    """The graph tensors of a TensorInfo: a name, a sparse tensor's three, a composite's."""
    kind = info.WhichOneof("encoding")
    if kind == "coo_sparse":
        sparse = info.coo_sparse
        return [
            sparse.values_tensor_name,
            sparse.indices_tensor_name,
            sparse.dense_shape_tensor_name,
        ]
    if kind == "composite_tensor":
        return [n for part in info.composite_tensor.components for n in _tensor_names(part)]
    return [info.name] if info.name else []


def _signature_functions(meta_graph) -> dict[str, list[str]]:
    """key -> the concrete functions a TF2 SavedModel's object graph binds to that signature
    (the root's ``signatures`` map)."""
    objects = meta_graph.object_graph_def
    if not objects.nodes:
        return {}
    maps = [c.node_id for c in objects.nodes[0].children if c.local_name == "signatures"]
    return {
        c.local_name: _concrete_functions(objects.nodes[c.node_id])
        for node_id in maps
        for c in objects.nodes[node_id].children
    }


LOAD_CHILDREN = ("_create_resource", "_initialize", "_initializer", "_destroy_resource")


def _loading_tf2(meta_graph, model: str) -> list[Finding]:
    """What ``tf.saved_model.load`` runs: each resource's creator, initializer and destroyer,
    and the restore function of each saveable object."""
    objects = meta_graph.object_graph_def
    names = []
    for obj in objects.nodes:
        ids = (
            [c.node_id for c in obj.children if c.local_name in LOAD_CHILDREN]
            if obj.WhichOneof("kind") == "resource"
            else []
        )
        ids += [s.restore_function for s in obj.saveable_objects.values()]
        for i in ids:
            names.extend(_concrete_functions(objects.nodes[i]))
    own = {(name, arg) for name in names for arg in _asset_args(meta_graph, name)}
    walker = _Walker(meta_graph.graph_def, own, model)
    for name in names:
        walker.function(name)
    return walker.findings


def _concrete_functions(obj) -> list[str]:
    kind = obj.WhichOneof("kind")
    if kind == "function":
        return list(obj.function.concrete_functions)
    if kind == "bare_concrete_function":
        return [obj.bare_concrete_function.concrete_function_name]
    return []


def _asset_args(meta_graph, function: str) -> list[str]:
    """The arguments of ``function`` that the loader binds to the SavedModel's assets (its
    captures come last, in ``bound_inputs`` order)."""
    objects = meta_graph.object_graph_def
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    if function not in objects.concrete_functions or function not in library:
        return []
    bound = objects.concrete_functions[function].bound_inputs
    args = library[function].signature.input_arg
    first = len(args) - len(bound)
    return [
        args[first + i].name
        for i, node_id in enumerate(bound)
        if first + i >= 0
        and objects.nodes[node_id].WhichOneof("kind") == "asset"
        and _inside_assets(
            meta_graph.asset_file_def[objects.nodes[node_id].asset.asset_file_def_index].filename
        )
    ]


def _inside_assets(filename: str) -> bool:
    """Whether an asset's file name stays inside ``assets/``: TensorFlow's loader joins it to
    that directory as it is, so an absolute name or a ``..`` reaches any file."""
    return (
        bool(filename)
        and not os.path.isabs(filename)
        and ".." not in filename.replace("\\", "/").split("/")
    )


def _loading_tf1(meta_graph, model: str) -> list[Finding]:
    """What loading a TF1 SavedModel runs: the saver's restore op (reading the SavedModel's own
    ``variables/``) and the init op (its tables filled from the SavedModel's assets)."""
    targets = [meta_graph.saver_def.restore_op_name] if meta_graph.saver_def.restore_op_name else []
    init = meta_graph.signature_def.get("__saved_model_init_op")
    if init is not None:
        targets += [info.name for info in init.outputs.values()]
    for collection in (
        "saved_model_main_op",
        "legacy_init_op",
        "table_initializer",
        "local_variables",
    ):
        if collection in meta_graph.collection_def:
            targets += list(meta_graph.collection_def[collection].node_list.value)
    own = {
        (GRAPH, _node_of(a.tensor_info.name))
        for a in meta_graph.asset_file_def
        if _inside_assets(a.filename)
    }
    if meta_graph.saver_def.filename_tensor_name:
        own.add((GRAPH, _node_of(meta_graph.saver_def.filename_tensor_name)))
    return scan_graph_def(meta_graph.graph_def, targets, own_files=own, model=model)


# ---- the gate: what may run ----------------------------------------------------------------

# ``allowed``: the ops the user allows to run, ``Options.allow_ops`` (checked there: every one
# is in ``OUTSIDE``).


def held_back(findings: Iterable[Finding], allowed: Iterable[str]) -> list[Finding]:
    allowed = frozenset(allowed)
    return [f for f in findings if f.op not in allowed]


def describe(findings: list[Finding], limit: int = 4) -> str:
    """``WriteFile (writes a file) at node 'w' in function 'f'; ...`` (the first ``limit``)."""
    text = "; ".join(f"{f.op} ({f.reason}) at {f.where()}" for f in findings[:limit])
    if len(findings) > limit:
        text += f"; and {len(findings) - limit} more"
    return text


def consent_hint(findings: list[Finding]) -> str:
    """How to let them run, in the caller's words (``--allow-ops X`` or ``allow_ops='X'``)."""
    ops = sorted({f.op for f in findings if f.category != "unregistered"})
    return (
        f"allow them with {with_value('allow_ops', ','.join(ops))}"
        if ops
        else "an unregistered op cannot run in this TensorFlow"
    )


def check_loading(scan: Scan, allowed: Iterable[str], path: str) -> None:
    """Raises ``BadInput`` when loading ``path`` would run ops that are held back."""
    held = held_back(scan.loading, allowed)
    if held:
        raise BadInput(
            f"{path}: loading it would run (or fail on) ops that reach outside the "
            f"graph: {describe(held)}; nothing was loaded ({consent_hint(held)})"
        )


def not_run_reason(held: list[Finding]) -> str:
    """Why a signature was not run: the ops, where they sit, how to consent."""
    return (
        f"not run: it holds ops that reach outside the graph: {describe(held)} "
        f"({consent_hint(held)})"
    )


def gate(
    scans: Iterable[Scan], keys: Iterable[str], allowed: Iterable[str], tolerance: float | None
):
    """``(keys that may run, {key: NOT VERIFIED Verification})`` for ``keys``, a key being held
    back when any of ``scans`` finds an op that is not allowed in what it runs."""
    from graphfold.convert.verify import Verification

    scans = list(scans)
    runnable, skipped = [], {}
    for key in keys:
        held = held_back([f for s in scans for f in s.signatures.get(key, ())], allowed)
        if held:
            skipped[key] = Verification(key, "skipped", tolerance, reason=not_run_reason(held))
        else:
            runnable.append(key)
    return runnable, skipped
