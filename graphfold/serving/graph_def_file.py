"""Frozen GraphDef files on the command line: ``graphfold optimize model.pb out.pb``.

TF1 frozen graphs (``frozen_inference_graph.pb``, what ``optimize_for_inference`` takes), binary
``.pb`` or text ``.pbtxt``, in and out. Inputs are the graph's placeholders and outputs the nodes
nobody reads unless named (``--input-names``, ``--output-names``); the fold is
``optimize_graph_def``; the result is verified on random inputs built from the placeholders'
dtypes and shapes (an unknown batch dimension takes ``batch``), then written with a rename.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
from collections.abc import Sequence

import tensorflow as tf
from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2

from graphfold.convert import scan as scan_
from graphfold.convert.input_shapes import check as check_shapes
from graphfold.convert.inputs import check as check_feeds
from graphfold.convert.rewrite import optimize_graph_def
from graphfold.convert.tolerance import words as tolerance_words
from graphfold.convert.verify import verify as verify_functions
from graphfold.errors import BadInput, VerificationFailed
from graphfold.fold.graph import split_tensor
from graphfold.fold.shapes import PLACEHOLDERS
from graphfold.options import GRAPH_DEF_FILE, INSPECT_GRAPH_DEF_FILE, BadOption, Options, spelled
from graphfold.progress import Note, SignatureChecked, StageStarted, silent
from graphfold.serving.checking import fix_hint
from graphfold.serving.result import SavedModelResult

KEY = "graph"  # the one "signature" of a GraphDef file, in the report
EXTENSIONS = (".pb", ".pbtxt", ".graphdef")
# Ops that produce nothing worth fetching: never inferred as outputs.
_NOT_OUTPUTS = frozenset(
    {
        "NoOp",
        "Const",
        "Placeholder",
        "PlaceholderWithDefault",
        "Assert",
        "SaveV2",
        "RestoreV2",
        "Print",
        "PrintV2",
        "VarHandleOp",
    }
)


def is_graph_def_file(path: str) -> bool:
    """Whether ``path`` names a GraphDef file (an existing file, or a known extension)."""
    return os.path.isfile(path) or (not os.path.isdir(path) and path.endswith(EXTENSIONS))


def read_graph_def(path: str) -> graph_pb2.GraphDef:
    """The GraphDef in ``path`` (binary, or text for ``.pbtxt``); ``BadInput`` otherwise."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    graph_def = graph_pb2.GraphDef()
    text = path.endswith(".pbtxt")
    try:
        if text:
            text_format.Parse(data.decode("utf-8"), graph_def)
        else:
            graph_def.ParseFromString(data)
    except (pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        kind = "text GraphDef" if text else "binary GraphDef"
        raise BadInput(f"{path}: not a {kind} ({str(exc).splitlines()[0][:120]})") from None
    if not graph_def.node:
        raise BadInput(f"{path}: not a GraphDef (no nodes)")
    return graph_def


def io_names(
    graph_def, inputs: Sequence[str] | None, outputs: Sequence[str] | None
) -> tuple[list[str], list[str], list[str]]:
    """``(inputs, outputs, notes)``: the names given, checked, or inferred (placeholders; nodes
    whose outputs nobody reads), with a note saying what was inferred."""
    nodes = {n.name: n for n in graph_def.node}
    notes = []
    if not inputs:
        inputs = [n.name for n in graph_def.node if n.op in PLACEHOLDERS]
        notes.append(f"inputs inferred (the placeholders): {', '.join(inputs) or 'none'}")
    if not outputs:
        read = {split_tensor(t.lstrip("^"))[0] for n in graph_def.node for t in n.input}
        outputs = [
            n.name for n in graph_def.node if n.name not in read and n.op not in _NOT_OUTPUTS
        ]
        notes.append(f"outputs inferred (nodes nobody reads): {', '.join(outputs) or 'none'}")
        if not outputs:
            raise BadInput(f"no output could be inferred: name them with {spelled('output_names')}")
    for tensor in inputs:
        node = nodes.get(split_tensor(tensor)[0])
        if node is None:
            raise BadInput(f"input {tensor!r} is not a node of the graph")
        if node.op not in PLACEHOLDERS:
            raise BadInput(f"input {tensor!r} is a {node.op} node, not a placeholder")
    for tensor in outputs:
        if split_tensor(tensor)[0] not in nodes:
            raise BadInput(f"output {tensor!r} is not a node of the graph")
    return list(inputs), list(outputs), notes


def input_key(tensor: str) -> str:
    """The keyword an input is fed by (``--inputs KEY=...``): the placeholder's name, with
    every character that is not a letter, digit or ``_`` made ``_`` (``image/raw`` ->
    ``image_raw``)."""
    key = re.sub(r"\W", "_", split_tensor(tensor)[0])
    return key if key[:1].isalpha() or key[:1] == "_" else f"_{key}"


def input_specs(graph_def, inputs: list[str]) -> dict[str, tf.TensorSpec]:
    """``{keyword: TensorSpec}`` from the placeholders' dtypes and shapes."""
    nodes = {n.name: n for n in graph_def.node}
    specs = {}
    for tensor in inputs:
        node = nodes[split_tensor(tensor)[0]]
        shape = tf.TensorShape(node.attr["shape"].shape) if "shape" in node.attr else None
        specs[input_key(tensor)] = tf.TensorSpec(
            shape, tf.as_dtype(node.attr["dtype"].type), name=input_key(tensor)
        )
    return specs


def callable_graph(graph_def, inputs: list[str], outputs: list[str]):
    """A ConcreteFunction taking the placeholders by keyword (``input_key``) and returning
    ``{output: tensor}``, like a SavedModel signature (for verification)."""
    from graphfold.convert.function import import_graph

    pruned = import_graph(graph_def, inputs, outputs)
    specs = input_specs(graph_def, inputs)

    def call(*args):
        return dict(zip(outputs, pruned(*args)))

    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD) for key in specs]
    )
    return tf.function(
        call, input_signature=list(specs.values()), autograph=False
    ).get_concrete_function()


def write_graph_def(graph_def, path: str) -> None:
    """Writes ``graph_def`` to ``path`` (text for ``.pbtxt``) through a temporary file and a
    rename: a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.graphfold-tmp")
    data = (
        text_format.MessageToString(graph_def).encode()
        if path.endswith(".pbtxt")
        else graph_def.SerializeToString()
    )
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise BadInput(f"{path}: cannot write it ({exc.strerror or exc})") from None


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        raise BadInput("DST must not be SRC")
    if os.path.isdir(dst):
        raise BadInput(f"{dst}: is a directory (a GraphDef file is written as a file)")
    if os.path.exists(dst) and not overwrite:
        raise BadInput(f"{dst}: exists (pass {spelled('overwrite')} to replace it)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise BadInput(f"{dst}: its directory does not exist")


@dataclasses.dataclass
class Rewritten:
    """What reading and folding a GraphDef file found."""

    original: graph_pb2.GraphDef
    optimized: graph_pb2.GraphDef
    inputs: list[str]
    outputs: list[str]
    result: SavedModelResult  # the report under ``KEY``, the notes, the scan, the seconds
    scan: scan_.Scan


def _rewrite(src: str, dst: str | None, options: Options, progress) -> Rewritten:
    """The load and fold stages of a GraphDef file."""
    clock = time.perf_counter()
    progress(StageStarted("load", src))
    graph_def = read_graph_def(src)
    inputs, outputs, notes = io_names(graph_def, options.input_names, options.output_names)
    for note in notes:
        progress(Note(note))
    seconds = {"load": time.perf_counter() - clock}
    clock = time.perf_counter()
    progress(StageStarted("fold", f"{len(graph_def.node)} nodes", verb="folding"))
    try:
        optimized, report = optimize_graph_def(graph_def, inputs, outputs, partial=options.partial)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    seconds["rewrite"] = time.perf_counter() - clock
    scan = scan_.Scan({KEY: scan_.scan_graph_def(graph_def, outputs)})
    result = SavedModelResult(
        src,
        dst,
        (),
        reports={KEY: report},
        same_as={KEY: KEY},
        notes=list(notes),
        seconds=seconds,
        all_signatures=[KEY],
        scan=scan,
    )
    progress(Note(f"  {report.summary()}"))
    return Rewritten(graph_def, optimized, inputs, outputs, result, scan)


def inspect_graph_def_file(
    src, *, options: Options | None = None, progress=None, **option_kwargs
) -> SavedModelResult:
    """The fold report of the GraphDef file ``src``; nothing is written. ``options`` (or the
    same as keyword arguments): ``input_names``, ``output_names``, ``partial``. ``progress``:
    called with each progress event (``graphfold.progress``)."""
    options = Options.of(options, **option_kwargs)
    INSPECT_GRAPH_DEF_FILE.refuse_unsupported(options.given())
    return _rewrite(os.fspath(src), None, options, progress or silent).result


def optimize_graph_def_file(
    src,
    dst,
    *,
    options: Options | None = None,
    inputs=None,
    overwrite: bool = False,
    progress=None,
    **option_kwargs,
) -> SavedModelResult:
    """Folds the GraphDef file ``src`` into ``dst`` (``.pbtxt``: text), verified first on
    ``inputs`` (``{input_key: array}``) or on random inputs, then written with a rename.

    ``options`` (or the same as keyword arguments): ``input_names``, ``output_names``,
    ``verify``, ``tolerance``, ``batch``, ``require_verification``, ``allow_ops``,
    ``input_shapes``, ``partial``; any other is refused (``BadInput``). An output that differs
    by more than the tolerance raises ``VerificationFailed``, and so does a graph left NOT
    VERIFIED with ``require_verification``: nothing is written then. A graph whose outputs
    depend on ops reaching outside the graph that ``allow_ops`` does not allow is not run: NOT
    VERIFIED (``graphfold.convert.scan``). ``progress``: called with each progress event."""
    progress = progress or silent
    src, dst = os.fspath(src), os.fspath(dst)
    options = Options.of(options, **option_kwargs)
    GRAPH_DEF_FILE.refuse_unsupported(options.given())
    if inputs and not options.verify:
        raise BadOption(
            "verify", False, "cannot be combined with inputs (they are for the verification)"
        )
    _check_destination(src, dst, overwrite)
    rewritten = _rewrite(src, dst, options, progress)
    result = rewritten.result
    if options.verify:
        _checked(rewritten, options, inputs, progress)
    progress(StageStarted("write", dst))
    write_graph_def(rewritten.optimized, dst)
    result.written = True
    return result


def _checked(rewritten: Rewritten, options: Options, inputs, progress) -> None:
    """The verify stage of a GraphDef file (its check in the result), and its policy:
    ``VerificationFailed``."""
    held = scan_.gate([rewritten.scan], [KEY], options.allow_ops, options.tolerance)[1]
    check = held.get(KEY) or _verify(
        rewritten.original,
        rewritten.optimized,
        rewritten.inputs,
        rewritten.outputs,
        options,
        inputs,
        progress,
    )
    if held:
        progress(SignatureChecked(check))
    rewritten.result.verification[KEY] = check
    if not check.ok:
        raise VerificationFailed(
            f"verification failed: {check.reason}; nothing was written", rewritten.result
        )
    if check.status in ("skipped", "inconclusive") and options.require_verification:
        raise VerificationFailed(
            f"{spelled('require_verification')}: the graph is NOT "
            f"VERIFIED ({check.reason}); nothing was written",
            rewritten.result,
        )


def _verify(original, optimized, names, outputs, options, inputs, progress):
    """The check of ``optimized`` against ``original`` on ``inputs`` or random inputs (of
    ``options.input_shapes`` where given, else realistic sizes for the placeholders' unknown
    dimensions: ``input_shapes.py``)."""
    clock = time.perf_counter()
    specs = input_specs(original, names)
    shapes = check_shapes(options.shapes(), {KEY: specs}).get(KEY, {})
    given = [check_feeds(KEY, specs, inputs)] if inputs else None
    progress(
        StageStarted(
            "verify",
            f"on {'the given' if given else 'random'} inputs "
            f"({tolerance_words(options.tolerance)})",
        )
    )
    check = verify_functions(
        KEY,
        callable_graph(original, names, outputs),
        callable_graph(optimized, names, outputs),
        tolerance=options.tolerance,
        batch=options.batch,
        feeds=given,
        source=spelled("inputs") if given else None,
        shapes=shapes,
    )
    if check.status == "skipped":
        check.reason = f"{check.reason}; {fix_hint()}"
    check.seconds = time.perf_counter() - clock
    progress(SignatureChecked(check))
    return check
