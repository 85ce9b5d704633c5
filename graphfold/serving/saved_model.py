"""SavedModel in, SavedModel out: fold every requested signature, verify, write safely.

``optimize_saved_model(src, dst)`` loads ``src`` with ``tf.saved_model.load``, rewrites each
requested signature with ``graphfold.rewrite``, saves a new SavedModel (same signature keys, input
and output names, dtypes, shapes and method names; the assets) into a temporary directory beside
``dst``, loads that back and compares it with the original (on the inputs given, SRC's TF Serving
warm-up records, or random inputs: ``checking.py``), and only then renames it into place. Every
file of ``src`` besides the graph and the weights is copied as it is (``assets.py``). ``src`` is
only ever read.

A signature that cannot be frozen (one that captures a lookup table, say) is copied through
unchanged, with the reason in its report. Signatures that were not requested are copied through
too.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import tensorflow as tf
from google.protobuf import message as pb_message
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2

from graphfold.convert import scan as scan_
from graphfold.convert.function import FoldedFunction, op_name
from graphfold.convert.rewrite import fold, reimport, rewrite
from graphfold.convert.tolerance import words as tolerance_words
from graphfold.convert.verify import Verification, input_specs
from graphfold.errors import (
    BadInput,
    GraphfoldError,
    NotFreezable,
    RewriteFailed,
    VerificationFailed,
)
from graphfold.fold import census
from graphfold.fold.report import Entry, FoldReport
from graphfold.options import (
    COMPARISON,
    INSPECT_SAVED_MODEL,
    SAVED_MODEL,
    BadOption,
    Options,
    spelled,
)
from graphfold.progress import (
    Note,
    NotOptimized,
    Progress,
    SameFunction,
    SignatureChecked,
    SignatureFolded,
    StageStarted,
    silent,
)
from graphfold.serving import checking, saved_weights
from graphfold.serving import warmup as warmup_
from graphfold.serving.assets import copy_untouched, left_out
from graphfold.serving.result import SavedModelResult
from graphfold.serving.staging import prefix as staging_prefix
from graphfold.serving.staging import remove_stale, signals_deferred

INTERNAL_SIGNATURES = ("__saved_model_init_op", "__saved_model_train_op")
BATCH_NORM_OPS = (
    "FusedBatchNorm",
    "FusedBatchNormV2",
    "FusedBatchNormV3",
    "BatchNormWithGlobalNormalization",
)


# ---- reading and checking the source ---------------------------------------------------------


def read_saved_model(src: str) -> saved_model_pb2.SavedModel:
    """The parsed ``saved_model.pb`` (or ``.pbtxt``) of ``src``, or a clear ``BadInput``."""
    if not os.path.exists(src):
        raise BadInput(f"{src}: no such file or directory")
    if not os.path.isdir(src):
        raise BadInput(
            f"{src}: not a directory (a SavedModel is a directory holding saved_model.pb)"
        )
    pb, pbtxt = os.path.join(src, "saved_model.pb"), os.path.join(src, "saved_model.pbtxt")
    proto = saved_model_pb2.SavedModel()
    if os.path.isfile(pb):
        try:
            with open(pb, "rb") as f:
                data = f.read()
            proto.ParseFromString(data)
        except (pb_message.DecodeError, RuntimeWarning, ValueError) as exc:
            raise BadInput(
                f"{pb}: not a valid SavedModel protobuf (truncated or corrupt: {exc})"
            ) from None
        except OSError as exc:
            raise BadInput(f"{pb}: cannot read it ({exc.strerror or exc})") from None
    elif os.path.isfile(pbtxt):
        try:
            with open(pbtxt, encoding="utf-8") as f:
                text_format.Parse(f.read(), proto)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise BadInput(f"{pbtxt}: not a valid SavedModel text protobuf ({exc})") from None
    else:
        raise BadInput(f"{src}: not a SavedModel (no saved_model.pb in it)")
    if not proto.meta_graphs:
        raise BadInput(f"{src}/saved_model.pb holds no MetaGraph (truncated or corrupt)")
    return proto


def meta_graph_for(proto: saved_model_pb2.SavedModel, src: str, tags: Iterable[str]):
    wanted = set(tags)
    available = [sorted(mg.meta_info_def.tags) for mg in proto.meta_graphs]
    for mg in proto.meta_graphs:
        if set(mg.meta_info_def.tags) == wanted:
            return mg
    shown = "; ".join(",".join(t) for t in available) or "(none)"
    raise BadInput(
        f"{src}: no MetaGraph with tag-set '{','.join(sorted(wanted))}' (available: {shown})"
    )


def signature_keys(meta_graph) -> list[str]:
    return [k for k in meta_graph.signature_def if k not in INTERNAL_SIGNATURES]


def select(available: list[str], requested: Iterable[str] | None, src: str) -> list[str]:
    if not available:
        raise BadInput(
            f"{src}: the SavedModel has no signatures (save it with "
            f"tf.saved_model.save(obj, path, signatures=...) or model.export(path))"
        )
    if requested is None:
        return sorted(available)
    if isinstance(requested, str):
        requested = [requested]
    requested = list(dict.fromkeys(requested))
    if not requested:
        raise BadInput("no signature requested")
    unknown = [k for k in requested if k not in available]
    if unknown:
        raise BadInput(
            f"{src}: unknown signature key {', '.join(map(repr, unknown))} "
            f"(available: {', '.join(sorted(available))})"
        )
    return requested


def load(src: str, tags: Iterable[str]):
    try:
        return tf.saved_model.load(src, tags=list(tags))
    except Exception as exc:  # noqa: BLE001 - TF raises many types here; all mean a bad SavedModel
        raise BadInput(
            f"{src}: TensorFlow cannot load this SavedModel: {_first_line(exc)}"
        ) from None


def release_unread_variables(loaded) -> list[str]:
    """Lets go of the loaded original's lists of variables that none of its functions reads:
    a Keras 3 export tracks a second copy of every weight (``_all_variables``), which loading
    restores like the first, 1x the weights held for nothing while graphfold folds, writes and
    verifies. Only our in-memory object changes (a model saved with it attached no longer
    carries the copy). Returns the names of the attributes dropped."""
    functions = list(loaded.signatures.values())
    for value in vars(loaded).values():
        if isinstance(value, tf.types.experimental.PolymorphicFunction):
            if not hasattr(value, "concrete_functions"):  # what it reads is unknown
                return []
            functions.extend(value.concrete_functions)
    read = {id(v) for fn in functions for v in fn.variables}
    dropped = []
    for name, value in list(vars(loaded).items()):
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, tf.Variable) and id(v) not in read for v in value)
        ):
            delattr(loaded, name)
            dropped.append(name)
    return dropped


# ---- rewriting ------------------------------------------------------------------------------


@dataclasses.dataclass
class Folded:
    """What the fold stage found: key -> ``FoldReport`` for every requested signature; key ->
    why, for those copied through unchanged; key -> the first key that is the same function
    (``same_functions``); and what to save: key -> function, the variables they capture (the
    folded weights as variables), key -> the ``Weights`` of its marked constants (filled into
    the saved model by ``saved_weights.fill``)."""

    reports: dict[str, FoldReport]
    unchanged: dict[str, str]
    same_as: dict[str, str]
    functions: dict = dataclasses.field(default_factory=dict)
    variables: list = dataclasses.field(default_factory=list)
    deferred: dict = dataclasses.field(default_factory=dict)


def rewrite_signatures(
    loaded,
    keys: list[str],
    progress: Progress,
    weights: str = "constants",
    bind: bool = True,
    partial: bool = True,
) -> Folded:
    """Freezes and folds every signature in ``keys`` (``weights``: how the folded functions
    hold theirs: "constants", marked constants filled once saved, or "variables"). Signatures
    that are one function (Keras' ``serve`` and ``serving_default``) are folded once and share
    the result. ``bind=False`` (inspect): fold and report only, no function is built.
    ``partial``: fold the scale of a batch norm that cannot disappear (``rewrite``)."""
    found = Folded({}, {}, same_functions(loaded, keys))
    for key in keys:
        first = found.same_as[key]
        if first != key:
            found.reports[key] = found.reports[first]
            if first in found.unchanged:
                found.unchanged[key] = found.unchanged[first]
            if first in found.functions:  # not with bind=False: nothing was built
                found.functions[key] = found.functions[first]
            progress(SameFunction(key, first))
            continue
        progress(StageStarted("fold", f"signature '{key}'"))
        _fold_one(loaded.signatures[key], key, found, progress, weights, bind, partial)
    return found


def _fold_one(
    fn, key: str, found: Folded, progress: Progress, weights: str, bind: bool, partial: bool
) -> None:
    """Folds one signature into ``found``: its report and function, or why it is copied
    through (``NotFreezable``); any other failure is ``RewriteFailed``."""
    try:
        if bind:
            folded = fold_signature(fn, key, weights, partial)
            report, found.functions[key] = folded.report, folded.function
            found.variables.extend(folded.variables)
            if folded.marked is not None:
                found.deferred[key] = folded.marked
        else:
            report = fold(fn, partial=partial)[-1]
    except NotFreezable as exc:  # an expected reason: the signature is copied through
        found.unchanged[key] = str(exc)
        found.reports[key] = unrewritten_report(fn, str(exc))
        found.functions[key] = fn
        progress(NotOptimized(key, str(exc)))
        return
    except GraphfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 - graphfold's own failure: nothing is written
        raise RewriteFailed(key, exc) from exc
    found.reports[key] = report
    s = report.seconds
    progress(
        SignatureFolded(
            key,
            report.summary(),
            s.get("freeze", 0),
            s.get("normalize", 0) + s.get("plan", 0) + s.get("apply", 0),
            s.get("import", 0) if bind else None,
        )
    )


def fold_signature(fn, key: str, weights: str, partial: bool = True) -> FoldedFunction:
    """``rewrite(fn)`` to be saved under ``key``. With ``weights="constants"``, the function
    holds marked constants and ``.marked`` their values, which ``saved_weights.fill`` writes
    into the saved model (called before that, the function computes with zeros)."""
    if weights != "constants":
        # verify=False: optimize_saved_model verifies the written model instead
        return rewrite(fn, weights=weights, keep_graph_def=False, verify=False, partial=partial)
    concrete, graph_def, held, inputs, outputs, report = fold(fn, partial=partial)
    function = reimport(
        concrete,
        graph_def,
        held.names(),
        inputs,
        outputs,
        report,
        saved_weights.marked_constants(held, key, op_name),
    )
    return FoldedFunction(function, None, report, marked=held)


def same_functions(loaded, keys: list[str]) -> dict[str, str]:
    """key -> the first key (in ``keys`` order) whose signature is the same function: the same
    graph (the calls it makes included), the same captured variables, the same inputs and
    outputs. Read from the loaded functions, before anything is frozen."""
    first: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        first[key] = seen.setdefault(_function_fingerprint(loaded.signatures[key]), key)
    return first


def _function_fingerprint(fn) -> str:
    import hashlib

    graph_def = fn.graph.as_graph_def()
    for node in graph_def.node:  # names of the trace, not of what it computes: a capture's
        node.ClearField("experimental_debug_info")  # is a counter that differs per trace
        if "_user_specified_name" in node.attr:
            del node.attr["_user_specified_name"]
    digest = hashlib.sha256(graph_def.SerializeToString(deterministic=True))
    digest.update(repr([id(t) for t in fn.captured_inputs]).encode())
    digest.update(repr(fn.structured_input_signature).encode())
    digest.update(
        repr(
            tf.nest.map_structure(
                lambda t: (
                    (
                        t.dtype.name,
                        tuple(t.shape.as_list()) if t.shape.rank is not None else None,
                        getattr(t, "name", None),
                    )
                    if hasattr(t, "dtype")
                    else repr(t)
                ),
                fn.structured_outputs,
            )
        ).encode()
    )
    return digest.hexdigest()


# ``weights="auto"`` (the default) writes the folded weights the way the original holds its own:
# as variables when its signatures read variables, as constants when they read none (a frozen
# graph saved as a SavedModel). The result then serves no slower than the original and loads in
# no more memory. Measured through TF Serving's loading path (tools/bench_serving.py,
# docs/benchmarks.md): constants peak at the original's + 5x to 8x the weights on the first
# call (Grappler and the session hold several copies of every constant; written TF1-style, in
# the main graph, the same), variables at or below the original's; constants serve faster at
# small batches on CPU (oneDNN keeps a constant filter's reordering).
PROTOBUF_LIMIT = 2 << 30  # bytes: no protobuf message (saved_model.pb) can be larger


def weight_bytes(loaded, keys: list[str]) -> int:
    """Bytes of the variables the distinct functions among ``keys`` capture, each function
    counted apart (as constants, each would hold its own copy)."""
    first = same_functions(loaded, keys)
    total = 0
    for key in keys:
        if first[key] == key:
            total += sum(
                v.shape.num_elements() * v.dtype.size for v in loaded.signatures[key].variables
            )
    return total


def choose_weights(mode: str, nbytes: int) -> tuple[str, str | None]:
    """``(constants or variables, a note saying why when auto chose constants)``; ``nbytes``:
    the bytes of the variables the rewritten functions read (``weight_bytes``)."""
    if mode == "constants" and nbytes >= PROTOBUF_LIMIT:
        raise BadOption(
            "weights",
            mode,
            f"{nbytes / 2**30:.2f} GiB of weights cannot be "
            f"constants: saved_model.pb would pass protobuf's 2 GiB limit (use "
            f"variables, or auto)",
        )
    if mode != "auto":
        return mode, None
    if nbytes:
        return "variables", None
    return "constants", (
        "the original reads no variable (its weights are constants): the "
        "folded weights are written as constants too"
    )


def weights_tradeoff(mode: str, chosen: bool) -> str:
    """One line for the command's summary: how the weights were written (``chosen``: by auto)
    and what the other mode would give (figures: docs/benchmarks.md)."""
    constants_cost = (
        "TF Serving peaks at up to about +8x the weights on the first call with constants"
    )
    if mode == "variables":
        how = "as the original reads them (auto)" if chosen else "as asked"
        return (
            f"weights: variables, {how}: serves no slower than the original and loads in no "
            f"more memory; --weights constants serves faster at small batches on CPU, but "
            f"{constants_cost}"
        )
    if chosen:
        return (
            "weights: constants, as the original holds them (auto): no slower and no more "
            "memory than the original; --weights variables would load in less but serve "
            "slower at small batches on CPU"
        )
    return (
        f"weights: constants, as asked: fastest at small batches on CPU, but "
        f"{constants_cost}; the default (variables, when the original reads variables) "
        f"loads in no more memory than the original"
    )


def unrewritten_report(fn, reason: str) -> FoldReport:
    """A report for a signature copied through: its batch-norm ops, none folded, and why."""
    graph_def = fn.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    ops = dict(sorted(collections.Counter(n.op for n in nodes).items()))
    entries = [
        Entry(
            name=census.display_name(key, layer),
            form=layer[0].op if layer[0].op in BATCH_NORM_OPS else census.DECOMPOSED,
            nodes=[n.name for n in layer],
            folded=False,
            reason=f"signature copied through unchanged: {reason}",
        )
        for key, layer in census.layers_in_every_body(graph_def)
    ]
    return FoldReport(entries, ops, dict(ops), [f"signature copied through unchanged: {reason}"])


# ---- writing --------------------------------------------------------------------------------


def is_inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_destination(src: str, dst: str, overwrite: bool) -> str:
    """The resolved path to write, after the safety rules; ``BadInput`` when one is broken."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src:
        raise BadInput(f"{dst}: DST is SRC; graphfold never writes over its input")
    if is_inside(real_dst, real_src):
        raise BadInput(f"{dst}: DST is inside SRC; graphfold never writes inside its input")
    if is_inside(real_src, real_dst):
        raise BadInput(f"{dst}: SRC is inside DST; replacing DST would delete SRC")
    if os.path.lexists(dst) or os.path.lexists(real_dst):
        if not overwrite:
            raise BadInput(f"{dst}: already exists (pass {spelled('overwrite')} to replace it)")
        if not os.path.isdir(real_dst):
            raise BadInput(f"{dst}: exists and is not a directory; refusing to replace it")
        if os.listdir(real_dst) and not _looks_like_saved_model(real_dst):
            raise BadInput(
                f"{dst}: exists and is not a SavedModel directory; refusing to replace it"
            )
    return real_dst


def _looks_like_saved_model(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt")
    )


def make_staging_dir(dst: str) -> tuple[str, list[str]]:
    """An empty temporary directory beside ``dst`` (same filesystem: the rename is atomic), and
    the parent directories that had to be created for it (to remove should nothing be written).
    """
    parent = os.path.dirname(dst) or "."
    ancestor, created = parent, []
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        created.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BadInput(f"{dst}: cannot write here ({ancestor} is not a directory)")
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=staging_prefix(dst), dir=parent)
    except OSError as exc:
        _remove_empty(created)
        raise BadInput(f"{dst}: cannot write here ({exc.strerror or exc})") from None
    # mkdtemp makes the directory private (0700): give it the mode of any new directory, so
    # that a server running as another user can read the model once it is renamed into place.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging, created


def _remove_empty(directories: list[str]) -> None:
    """Removes the directories we created (deepest first), if they are still empty."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return


def find_assets(loaded) -> list:
    """Every ``tf.saved_model.Asset`` reachable from the loaded object."""
    try:
        objects = tf.train.TrackableView(loaded).descendants()
    except Exception:  # noqa: BLE001 - an unusual object graph: no assets to keep
        return []
    return [obj for obj in objects if isinstance(obj, tf.saved_model.Asset)]


def save(loaded, functions: dict, path: str, keep_original: bool, variables=()) -> None:
    """Saves ``functions`` as the signatures of a new SavedModel at ``path``, with
    ``variables`` (the folded weights, when they are variables) in its ``variables/``.

    The loaded original is attached when a signature still uses its variables or tables
    (``keep_original``); otherwise only its assets are, so the folded model does not carry
    the original's variables.
    """

    def attempt(attach: bool):
        module = tf.Module()
        module.weights = list(variables)
        if attach:
            module.original = loaded
        else:
            module.assets = find_assets(loaded)
        tf.saved_model.save(module, path, signatures=functions)

    if keep_original:
        attempt(True)
        return
    try:
        attempt(False)
    except Exception:  # noqa: BLE001 - e.g. an untracked resource: keep everything
        _empty_dir(path)
        attempt(True)


def _empty_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


def restore_metadata(path: str, original_meta_graph) -> None:
    """``tf.saved_model.save`` writes one MetaGraph tagged ``serve`` whose signatures are all
    Predict signatures: put back the original tag set and method names (Classify, Regress)."""
    saved_tags, saved_method = {tf.saved_model.SERVING}, tf.saved_model.PREDICT_METHOD_NAME
    if set(original_meta_graph.meta_info_def.tags) == saved_tags and all(
        s.method_name in ("", saved_method) for s in original_meta_graph.signature_def.values()
    ):
        return  # nothing to put back: do not parse (and hold) a saved_model.pb of weights
    proto = read_saved_model(path)
    meta = proto.meta_graphs[0]
    changed = False
    tags = list(original_meta_graph.meta_info_def.tags)
    if sorted(meta.meta_info_def.tags) != sorted(tags):
        del meta.meta_info_def.tags[:]
        meta.meta_info_def.tags.extend(tags)
        changed = True
    for key, original in original_meta_graph.signature_def.items():
        if (
            key in meta.signature_def
            and original.method_name
            and meta.signature_def[key].method_name != original.method_name
        ):
            meta.signature_def[key].method_name = original.method_name
            changed = True
    if not changed:
        return
    saved_weights.write(path, proto.SerializeToString(deterministic=True))


def move_into_place(staging: str, dst: str) -> None:
    """Renames ``staging`` to ``dst``; an existing ``dst`` is replaced only once that works."""
    backup = None
    if os.path.lexists(dst):
        backup = tempfile.mkdtemp(
            prefix=staging_prefix(dst, "old"), dir=os.path.dirname(dst) or "."
        )
        os.rmdir(backup)
        os.rename(dst, backup)
    try:
        os.rename(staging, dst)
    except OSError:
        if backup is not None:
            os.rename(backup, dst)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ---- the entry points -----------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """What the prepare stage read and checked: the MetaGraph to rewrite, the keys requested,
    the scan of their ops, and notes (the tag-set policy, stale staging directories)."""

    src: str
    tags: tuple[str, ...]
    meta: Any
    keys: list[str]
    all_signatures: list[str]
    scan: scan_.Scan
    notes: list[str] = dataclasses.field(default_factory=list)


def read_source(src: str, options: Options) -> tuple[Source, saved_model_pb2.SavedModel]:
    """The requested MetaGraph and signatures of ``src`` with the scan of their ops, and the
    parsed ``saved_model.pb``."""
    proto = read_saved_model(src)
    meta = meta_graph_for(proto, src, options.tags)
    available = signature_keys(meta)
    keys = select(available, options.signatures, src)
    scan = scan_.scan_meta_graph(meta, keys)
    return Source(src, options.tags, meta, keys, sorted(available), scan), proto


def tag_set_policy(proto, source: Source, drop_others: bool) -> list[str]:
    """Notes on the MetaGraphs left out; ``BadInput`` when ``src`` holds several and dropping
    the others was not asked for (graphfold writes only the one of ``tags``)."""
    if len(proto.meta_graphs) <= 1:
        return []
    tags, meta = ",".join(source.tags), source.meta
    others = "; ".join(
        ",".join(mg.meta_info_def.tags) for mg in proto.meta_graphs if mg is not meta
    )
    if not drop_others:
        raise BadInput(
            f"{source.src}: holds {len(proto.meta_graphs)} MetaGraphs (tag-sets: "
            f"{','.join(meta.meta_info_def.tags)}; {others}); graphfold writes "
            f"only tag-set '{tags}': drop the others with "
            f"{spelled('drop_other_tag_sets')}"
        )
    return [
        f"SRC has {len(proto.meta_graphs)} MetaGraphs: only tag-set '{tags}' is written "
        f"to DST (dropped, as asked: {others})"
    ]


def prepare(src: str, dst: str, options: Options, inputs, overwrite: bool) -> tuple[Source, str]:
    """The prepare stage: options checked for a SavedModel, the source read and scanned, the
    tag-set policy applied, the destination checked; ``(source, resolved destination)``."""
    SAVED_MODEL.refuse_unsupported(options.given())
    if inputs and not options.verify:
        raise BadOption(
            "verify", False, "cannot be combined with inputs (they are for the verification)"
        )
    source, proto = read_source(src, options)
    target = check_destination(src, dst, overwrite)
    scan_.check_loading(source.scan, options.allow_ops, src)
    source.notes += tag_set_policy(proto, source, options.drop_other_tag_sets)
    source.notes += [
        f"removed {path}, left behind by an interrupted graphfold run"
        for path in remove_stale(target)
    ]
    return source, target


def load_source(source: Source, progress: Progress):
    """The load stage: ``src`` loaded, every requested signature present, the variables no
    function reads let go (``release_unread_variables``)."""
    progress(StageStarted("load", f"{source.src} (tag-set {','.join(source.tags)})"))
    loaded = load(source.src, source.tags)
    missing = [k for k in source.keys if k not in loaded.signatures]
    if missing:
        raise BadInput(
            f"{source.src}: signature {', '.join(missing)} is in saved_model.pb but "
            f"TensorFlow did not load it"
        )
    release_unread_variables(loaded)
    return loaded


def inspect_saved_model(
    src, *, options: Options | None = None, progress: Progress | None = None, **option_kwargs
) -> SavedModelResult:
    """The fold report of every requested signature of ``src``, and the ops reaching outside
    the graph each one holds (``.scan``); nothing is written, no signature is run.
    ``options`` (or the same as keyword arguments): ``signatures``, ``tags``, ``allow_ops``,
    ``partial`` (loading runs the model's resource initializers: when they hold such ops that
    are not allowed, ``BadInput`` names them and nothing is loaded). ``progress``: called with
    each progress event (``graphfold.progress``; ``str(event)`` is its line)."""
    progress = progress or silent
    src = os.fspath(src)
    options = Options.of(options, **option_kwargs)
    INSPECT_SAVED_MODEL.refuse_unsupported(options.given())
    source = read_source(src, options)[0]
    scan_.check_loading(source.scan, options.allow_ops, src)
    seconds, clock = {}, time.perf_counter()
    progress(StageStarted("load", f"{src} (tag-set {','.join(source.tags)})"))
    loaded = load(src, source.tags)
    seconds["load"], clock = time.perf_counter() - clock, time.perf_counter()
    found = rewrite_signatures(loaded, source.keys, progress, bind=False, partial=options.partial)
    seconds["rewrite"] = time.perf_counter() - clock
    return SavedModelResult(
        src,
        None,
        source.tags,
        reports=found.reports,
        same_as=found.same_as,
        unchanged=found.unchanged,
        seconds=seconds,
        all_signatures=source.all_signatures,
        scan=source.scan,
    )


def optimize_saved_model(
    src,
    dst,
    *,
    options: Options | None = None,
    inputs: dict | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **option_kwargs,
) -> SavedModelResult:
    """Folds the batch norms of every requested signature of the SavedModel ``src`` into a new
    SavedModel ``dst``.

    ``options``: a ``graphfold.Options``, or its fields as keyword arguments (``signatures``,
    ``tags``, ``verify``, ``tolerance``, ``batch``, ``weights``, ``require_verification``,
    ``warmup``, ``drop_other_tag_sets``, ``allow_ops``, ``input_shapes``, ``partial``;
    ``Options`` says what each does).
    Before anything runs, every signature is scanned (``graphfold.convert.scan``): one holding ops
    reaching outside the graph that ``allow_ops`` does not allow is folded and written but not
    run (NOT VERIFIED, naming them; the written graph keeps them), and a SavedModel whose
    loading would run such ops is refused (``BadInput``). Signatures not
    requested are copied through unchanged; so is a requested one that cannot be frozen
    (``NotFreezable``: a lookup table, ...), with the reason. Any other failure raises
    ``RewriteFailed``, and nothing is written. The written model is loaded back and compared
    with the original on ``inputs`` (input key -> array, for every signature that has those
    keys), SRC's TF Serving warm-up records, or random inputs (``checking.py``); a relative
    error over the tolerance raises ``VerificationFailed`` and nothing is written. Every file of
    ``src`` besides the graph, ``variables/`` and ``fingerprint.pb`` is copied into ``dst`` byte
    for byte. ``overwrite``: replace an existing ``dst`` (only a SavedModel or an empty
    directory). ``progress``: called with a typed event (``graphfold.progress``:
    ``StageStarted`` at the start of each stage, ``SignatureFolded``, ``SignatureChecked``,
    ``Note``, ...); ``str(event)`` is a line of text, so ``progress=print`` shows them.

    The stages: ``prepare`` (options, source, tag-set policy, destination) -> ``load_source``
    -> ``rewrite_signatures`` -> ``write_stage`` (save, fill the weights, restore the metadata,
    copy the assets) -> ``verify_stage`` (+ the verification policy, the warm-up records) ->
    ``commit`` (the rename, signals deferred).

    Returns a ``SavedModelResult``: ``.reports`` (signature key -> ``FoldReport``, also read as
    ``result[key]``), ``.same_as``, ``.unchanged``, ``.verification``, ``.seconds``. Raises
    ``BadInput`` for bad paths, SavedModels and options. ``src`` is only read; ``dst`` appears
    (by a rename) only when everything succeeded.
    """
    progress = progress or silent
    src, dst = os.fspath(src), os.fspath(dst)
    options = Options.of(options, **option_kwargs)
    source, target = prepare(src, dst, options, inputs, overwrite)
    result = SavedModelResult(
        src,
        dst,
        source.tags,
        notes=list(source.notes),
        all_signatures=source.all_signatures,
        scan=source.scan,
    )
    staging, created = make_staging_dir(target)
    try:
        _optimize(
            source, Original(source, progress), staging, target, result, options, inputs, progress
        )
        return result
    except KeyboardInterrupt as exc:  # (SIGTERM too, from the CLI): say whether DST was written
        exc.written = result.written  # type: ignore[attr-defined]
        raise
    finally:
        if not result.written:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)


class Original:
    """The loaded original, held by one owner until verification lets it go (``release``) so
    that the written model is loaded back into the memory it held."""

    def __init__(self, source: Source, progress: Progress):
        clock = time.perf_counter()
        self.loaded = load_source(source, progress)
        self.seconds = time.perf_counter() - clock

    def release(self) -> None:
        if self.loaded is not None:
            self.loaded = None
            gc.collect()


def _optimize(
    source: Source,
    original: Original,
    staging: str,
    target: str,
    result: SavedModelResult,
    options: Options,
    inputs,
    progress: Progress,
) -> None:
    """The stages after prepare, each one's findings into ``result``."""
    result.seconds["load"] = original.seconds
    feeds, notes = choose_feeds(source, original.loaded, inputs, options)
    result.notes += notes
    clock = time.perf_counter()
    mode, why = choose_weights(options.weights, weight_bytes(original.loaded, source.keys))
    result.weights = mode
    if why:
        result.notes.append(why)
        progress(Note(why))
    found = rewrite_signatures(
        original.loaded, source.keys, progress, mode, partial=options.partial
    )
    result.reports, result.unchanged, result.same_as = found.reports, found.unchanged, found.same_as
    result.seconds["rewrite"], clock = time.perf_counter() - clock, time.perf_counter()
    result.notes += write_stage(source, original.loaded, found, staging, result.dst, progress)
    del found  # the folded weights: let them go before the written model is loaded
    gc.collect()
    result.seconds["write"] = time.perf_counter() - clock
    if feeds is not None:
        clock = time.perf_counter()
        checks, specs = verify_stage(source, original, staging, feeds, result, options, progress)
        result.verification.update(checks)
        result.seconds["verify"] = time.perf_counter() - clock
        verification_policy(result, options.require_verification)
        if options.warmup:
            result.notes += warmup_stage(
                src=source.src, staging=staging, checks=checks, specs=specs, count=options.warmup
            )
    original.release()
    clock = time.perf_counter()
    commit(staging, target, result, progress)
    result.seconds["rename"] = time.perf_counter() - clock


@dataclasses.dataclass
class Feeds:
    """The inputs verification runs on: key -> given inputs, key -> SRC's warm-up records,
    key -> {input: shape} of random inputs (``checking.py``)."""

    given: dict
    recorded: dict
    shapes: dict


def choose_feeds(
    source: Source, loaded, inputs, options: Options
) -> tuple[Feeds | None, list[str]]:
    """``(the feeds of the verification (None when it is off), notes)``."""
    if not options.verify:
        return None, []
    given = checking.given_feeds(loaded, source.keys, inputs)
    recorded, notes = checking.warmup_feeds(source.src, loaded)
    return Feeds(given, recorded, checking.shapes_for(loaded, source.keys, options.shapes())), notes


def write_stage(
    source: Source, loaded, found: Folded, staging: str, dst: str | None, progress: Progress
) -> list[str]:
    """The write stage: the folded functions (and the signatures not requested, as they are)
    saved into ``staging``, the folded weights filled in, the tag set and method names
    restored, every other file of SRC copied; returns the notes (files not copied)."""
    progress(StageStarted("write", f"a temporary SavedModel beside {dst}"))
    functions = dict(found.functions)
    passthrough = [k for k in loaded.signatures if k not in functions]
    for key in passthrough:
        functions[key] = loaded.signatures[key]
    keep_original = bool(passthrough or found.unchanged)
    try:
        save(loaded, functions, staging, keep_original, found.variables)
        del functions
        saved_weights.fill(staging, found.deferred)
        restore_metadata(staging, source.meta)
        copy_untouched(source.src, staging)
        return [f"{name} of SRC not copied: {why}" for name, why in left_out(source.src).items()]
    except GraphfoldError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BadInput(
            f"{dst}: cannot write the optimized SavedModel: {_first_line(exc)}"
        ) from None


def verify_stage(
    source: Source,
    original: Original,
    staging: str,
    feeds: Feeds,
    result: SavedModelResult,
    options: Options,
    progress: Progress,
) -> tuple[dict[str, Verification], dict]:
    """The verify stage: ``(key -> Verification, key -> input specs of the rewritten
    signatures)``. The original is run first, on the inputs each distinct signature is checked
    on (the same function under two keys is checked once, unless real inputs address both),
    then let go (``original.release``); only then is the written model loaded and run on the
    same inputs. A noise floor, when one is needed, reloads the original."""
    keys, first, tolerance = source.keys, result.same_as, options.tolerance
    distinct = [k for k in keys if first[k] == k or feeds.given.get(k) or feeds.recorded.get(k)]
    distinct, checks = scan_.gate([source.scan], distinct, options.allow_ops, tolerance)
    for check in checks.values():
        progress(SignatureChecked(check))
    progress(
        StageStarted(
            "verify", f"{len(distinct)} distinct signature(s) ({tolerance_words(tolerance)})"
        )
    )
    loaded = original.loaded
    records = checking.record_checks(
        loaded,
        distinct,
        feeds.given,
        feeds.recorded,
        tolerance=tolerance,
        batch=options.batch,
        shapes=feeds.shapes,
    )
    specs = (
        {k: input_specs(loaded.signatures[k]) for k in keys if k not in result.unchanged}
        if options.warmup
        else {}
    )
    del loaded
    original.release()
    written = load(staging, source.tags)
    checks.update(checking.replay_checks(records, written, _reloader(source), progress))
    del written, records
    gc.collect()
    for key in keys:
        if key not in checks:
            checks[key] = dataclasses.replace(checks[first[key]], signature=key)
    return checks, specs


def _reloader(source: Source):
    """key -> the original's signature function, loaded again on first use (the noise floor
    of a failed check: ``noise.judge``)."""
    held: list = []

    def original_of(key: str):
        if not held:
            held.append(load(source.src, source.tags))
        return held[0].signatures[key]

    return original_of


def verification_policy(result: SavedModelResult, require_verification: bool) -> None:
    """``VerificationFailed`` (nothing is written) when a signature failed, or, with
    ``require_verification``, when one is NOT VERIFIED or INCONCLUSIVE."""
    checks, dst = result.verification, result.dst
    failed = [k for k, v in checks.items() if not v.ok]
    if failed:
        raise VerificationFailed(
            "verification failed for signature(s) "
            + ", ".join(failed)
            + ": "
            + "; ".join(f"{k}: {checks[k].reason or ''}" for k in failed)
            + f"; nothing was written to {dst}",
            result,
        )
    unverified = sorted(result.not_verified + result.inconclusive)
    if unverified and require_verification:
        raise VerificationFailed(
            f"{spelled('require_verification')}: signature(s) {', '.join(unverified)} NOT "
            f"VERIFIED ("
            + "; ".join(f"{checks[k].status.upper()}: {checks[k].reason or ''}" for k in unverified)
            + f"); nothing was written to {dst}",
            result,
        )


def warmup_stage(*, src: str, staging: str, checks: dict, specs: dict, count: int) -> list[str]:
    """TF Serving warm-up records for the rewritten signatures (``specs``' keys) written into
    ``staging`` from their verification inputs; returns the notes."""
    records, notes = checking.warmup_records(src, checks, specs, count)
    if records is not None:
        warmup_.write(os.path.join(staging, warmup_.PATH), records)
    return notes


def commit(staging: str, target: str, result: SavedModelResult, progress: Progress) -> None:
    """The commit stage: ``staging`` renamed to ``target``, Ctrl-C and SIGTERM waiting meanwhile
    (DST is never left half-replaced). ``result.written`` is set inside, before a deferred
    signal is raised, so that an interruption still says DST was written."""
    progress(StageStarted("rename", result.dst or ""))
    with signals_deferred():
        try:
            move_into_place(staging, target)
        except OSError as exc:
            raise BadInput(
                f"{result.dst}: cannot move the result into place ({exc.strerror or exc})"
            ) from None
        result.written = True


def _first_line(exc) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- comparing two SavedModels -----------------------------------------------------------------


def _scan_both(metas: dict, keys: list[str], src: str, dst: str, allow_ops) -> list:
    """SRC's and DST's scans for ops reaching outside the graph (``BadInput`` where loading
    either would run one that ``allow_ops`` does not allow)."""
    scans = [
        scan_.scan_meta_graph(
            metas[path], [k for k in keys if k in metas[path].signature_def], model=label
        )
        for path, label in ((src, "SRC"), (dst, "DST"))
    ]
    for path, found in zip((src, dst), scans):
        scan_.check_loading(found, allow_ops, path)
    return scans


def verify_saved_models(
    src, dst, *, options: Options | None = None, inputs=None, progress=None, **option_kwargs
):
    """Compares the SavedModel ``dst`` with ``src``, signature by signature, on the same
    inputs (``inputs``; else SRC's warm-up records; else random). Nothing is written.
    ``options`` (or the same as keyword arguments): ``signatures``, ``tags``, ``tolerance``,
    ``batch``, ``input_shapes``, ``require_verification`` (a signature left NOT VERIFIED or
    INCONCLUSIVE raises ``VerificationFailed``), ``allow_ops`` (a signature of either model
    holding ops reaching outside the graph that are not allowed is not run: NOT VERIFIED; see
    ``optimize_saved_model``). ``progress``: called with each progress event.

    Returns a ``SavedModelResult`` whose ``.verification`` holds a ``Verification`` per
    signature of ``src`` (one missing from ``dst``, or with other input or output keys,
    dtypes or method name, fails)."""
    progress = progress or silent
    src, dst = os.fspath(src), os.fspath(dst)
    options = Options.of(options, **option_kwargs)
    COMPARISON.refuse_unsupported(options.given())
    metas = {
        path: meta_graph_for(read_saved_model(path), path, options.tags) for path in (src, dst)
    }
    keys = select(signature_keys(metas[src]), options.signatures, src)
    scans = _scan_both(metas, keys, src, dst, options.allow_ops)
    result = SavedModelResult(
        src, dst, options.tags, scan=scans[0], all_signatures=sorted(signature_keys(metas[src]))
    )
    progress(StageStarted("load", f"{src} and {dst} (tag-set {','.join(options.tags)})"))
    reference, candidate = load(src, options.tags), load(dst, options.tags)
    given = checking.given_feeds(reference, keys, inputs)
    recorded, notes = checking.warmup_feeds(src, reference)
    result.notes += notes
    feeds = Feeds(given, recorded, checking.shapes_for(reference, keys, options.shapes()))
    comparable, checks = _comparable(metas, src, dst, keys, candidate, options.tolerance)
    comparable, held = scan_.gate(scans, comparable, options.allow_ops, options.tolerance)
    checks.update(held)
    for check in checks.values():
        progress(SignatureChecked(check))
    result.verification.update(checks)
    progress(
        StageStarted(
            "verify", f"{len(comparable)} signature(s) ({tolerance_words(options.tolerance)})"
        )
    )
    result.verification.update(
        checking.run_checks(
            reference,
            candidate,
            comparable,
            feeds.given,
            feeds.recorded,
            tolerance=options.tolerance,
            batch=options.batch,
            progress=progress,
            shapes=feeds.shapes,
        )
    )
    unverified = sorted(result.not_verified + result.inconclusive)
    if options.require_verification and unverified:
        raise VerificationFailed(
            f"{spelled('require_verification')}: signature(s) {', '.join(unverified)} NOT VERIFIED",
            result,
        )
    return result


def _comparable(
    metas: dict, src: str, dst: str, keys: list[str], candidate, tolerance
) -> tuple[list[str], dict[str, Verification]]:
    """The keys whose DST signature can be compared with SRC's, and a failed ``Verification``
    for each of the others (missing, other keys, dtypes or method name, not loaded)."""
    comparable, failed = [], {}
    for key in keys:
        problem = _signature_difference(
            metas[src].signature_def[key], metas[dst].signature_def.get(key)
        )
        if problem is None and key not in candidate.signatures:
            problem = "TensorFlow did not load it from DST"
        if problem:
            failed[key] = Verification(
                key, "failed", tolerance, reason=f"DST's signature: {problem}"
            )
        else:
            comparable.append(key)
    return comparable, failed


def _signature_difference(want, got) -> str | None:
    """What differs between two SignatureDefs (keys, dtypes, method name), or None."""
    if got is None:
        return "missing"
    if want.method_name != got.method_name:
        return f"method name {got.method_name!r}, not {want.method_name!r}"
    for side in ("inputs", "outputs"):
        a, b = getattr(want, side), getattr(got, side)
        if sorted(a) != sorted(b):
            return f"{side} {sorted(b)}, not {sorted(a)}"
        for name in a:
            if a[name].dtype != b[name].dtype:
                return f"{side[:-1]} {name!r} has another dtype"
    return None
