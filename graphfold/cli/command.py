"""The ``graphfold`` command: ``optimize``, ``optimize-repo``, ``verify``, ``inspect`` and ``demo``.

Progress goes to stderr, results to stdout (tables, or one JSON document with ``--json``).
Exit codes: 0 ok, 1 verification failed (nothing written), 2 bad usage or bad input, 130
interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted run writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import warnings
from typing import Any

from graphfold.cli.render import format_table, render_reports, render_scan, render_verification
from graphfold.errors import EXIT_OK, EXIT_USAGE, EXIT_VERIFY
from graphfold.jsonout import dumps
from graphfold.options import MAX_WARMUP, WEIGHTS, Options, spoken_as
from graphfold.version import __version__

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


class Console:
    """Progress lines on stderr with the elapsed time, and a heartbeat while a stage runs
    (``graphfold.progress``); results on stdout."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, out=None, err=None):
        from graphfold.cli.heartbeat import Heartbeat

        self.quiet, self.json_mode = quiet, json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.start = time.perf_counter()
        self.heartbeat = Heartbeat(self.err, lambda: f"[{self.elapsed():6.1f}s]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, event) -> None:
        """Shows a progress event (``graphfold.progress``; a plain string is a ``Note``): a
        ``StageStarted`` starts the heartbeat of its stage, any other is a line."""
        from graphfold.progress import StageStarted, as_event

        event = as_event(event)
        if not self.quiet:
            self.heartbeat.show(
                f"[{self.elapsed():6.1f}s] {event.text}",
                stage=event if isinstance(event, StageStarted) else None,
            )

    def line(self, line: str) -> None:
        """A progress line that starts no stage (no heartbeat thread)."""
        if not self.quiet:
            self.heartbeat.show(f"[{self.elapsed():6.1f}s] {line}")

    def done(self) -> None:
        self.heartbeat.stop()

    def print(self, text: str = "") -> None:
        """Human-readable results: not with --quiet or --json."""
        self.heartbeat.stop()
        if not self.quiet and not self.json_mode:
            print(text, file=self.out, flush=True)

    def error(self, message: str) -> None:
        self.heartbeat.stop()
        print(f"graphfold: error: {message}", file=self.err, flush=True)

    def json(self, document: dict) -> None:
        self.heartbeat.stop()
        if self.json_mode:
            print(dumps(document), file=self.out, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that ``main`` returns the exit code."""

    def error(self, message):
        raise _UsageError(f"{message} (see: {self.prog} --help)")


class _UsageError(Exception):
    pass


# Every argument a message may name, by its command-line flag (``options.spoken_as``).
FLAGS = {
    "signatures": "--signature",
    "tags": "--tag-set",
    "verify": "--no-verify",
    "tolerance": "--tolerance",
    "batch": "--batch",
    "weights": "--weights",
    "require_verification": "--require-verification",
    "warmup": "--warmup",
    "drop_other_tag_sets": "--drop-other-tag-sets",
    "input_names": "--input-names",
    "output_names": "--output-names",
    "inputs": "--inputs",
    "overwrite": "--overwrite",
    "input_shapes": "--input-shape",
    "versions": "--versions",
    "runner": "--runner",
    "jobs": "--jobs",
    "model_config": "--model-config",
    "report": "--report",
    "out": "--out",
    "allow_ops": "--allow-ops",
    "partial": "--no-partial",
}
_GIVEN = argparse.SUPPRESS  # an option flag's default: absent from args unless given


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="graphfold",
        description="Fold batch normalization into Conv2D/DepthwiseConv2D/MatMul "
        "weights of TensorFlow SavedModels, exactly.",
    )
    parser.add_argument("--version", action="version", version=f"graphfold {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _optimize_parser(commands)
    _verify_parser(commands)
    ins = commands.add_parser(
        "inspect",
        help="list every batch norm: folded or not, which way, or why not",
        description="Report what `optimize` would fold in SRC, without writing anything.",
    )
    ins.add_argument("src", metavar="SRC", help="SavedModel directory, or frozen GraphDef file")
    _selection(ins)
    _graph_def_names(ins)
    _partial(ins)
    _consent(ins)
    ins.add_argument("--verbose", "-v", action="store_true", help="show the traceback of a failure")
    _output(ins)
    demo = commands.add_parser(
        "demo",
        help="build, optimize, verify and time a small example model",
        description="Build a small residual CNN (depthwise and dense layers, random batch-norm "
        "statistics), save it as a SavedModel, optimize it, verify it, and compare "
        "the latency of both.",
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        help="directory for original/ and optimized/ (default: a new temp dir)",
    )
    _output(demo)
    add_repo_parser(commands)
    return parser


def _optimize_parser(commands) -> None:
    opt = commands.add_parser(
        "optimize",
        help="fold a SavedModel's batch norms into a new SavedModel",
        description="Fold every requested signature of the SavedModel SRC into a new SavedModel "
        "DST, verify it (on --inputs, else SRC's TF Serving warm-up records, else "
        "random inputs), and write it with a rename. Every file of SRC besides the "
        "graph and the weights is copied as it is. SRC may also be a frozen GraphDef "
        "file (.pb, .pbtxt): then DST is one too (an option a GraphDef file cannot "
        "honour is refused).",
    )
    opt.add_argument(
        "src",
        metavar="SRC",
        help="SavedModel directory, or frozen GraphDef file (.pb, .pbtxt), to read (never written)",
    )
    opt.add_argument("dst", metavar="DST", help="SavedModel directory (or GraphDef file) to create")
    _selection(opt)
    _graph_def_names(opt)
    _writing(opt)
    _consent(opt)
    opt.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    opt.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it is an existing SavedModel (or empty directory)",
    )
    opt.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="list every batch norm (by default only those not folded); the traceback of a failure",
    )
    _real_inputs(opt)
    _output(opt)


def _verify_parser(commands) -> None:
    ver = commands.add_parser(
        "verify",
        help="compare two SavedModels signature by signature",
        description="Run every signature of SRC and DST on the same inputs (given, SRC's "
        "warm-up records, or random) and compare their outputs; writes nothing. "
        "Exit 0 when they agree, 1 when not.",
    )
    ver.add_argument("src", metavar="SRC", help="the reference SavedModel")
    ver.add_argument("dst", metavar="DST", help="the SavedModel to check against it")
    _selection(ver)
    _real_inputs(ver)
    _checking(ver)
    ver.add_argument(
        "--require-verification",
        action="store_true",
        default=_GIVEN,
        help="exit 1 if a signature cannot be verified",
    )
    _consent(ver)
    _output(ver)


def _selection(parser):
    """What a SavedModel's signatures and MetaGraph to read."""
    parser.add_argument(
        "--signature",
        "-s",
        action="append",
        metavar="KEY",
        dest="signatures",
        default=_GIVEN,
        help="signature key to fold (repeatable; default all)",
    )
    parser.add_argument(
        "--tag-set",
        "--tag_set",
        metavar="TAGS",
        dest="tags",
        default=_GIVEN,
        help="comma-separated tag set of the MetaGraph (default serve)",
    )


def _partial(parser):
    parser.add_argument(
        "--no-partial",
        dest="partial",
        action="store_false",
        default=_GIVEN,
        help="where a batch norm cannot disappear, keep it whole (by default its "
        "scale folds and its shift stays as one add: a partial fold)",
    )


def _consent(parser):
    parser.add_argument(
        "--allow-ops",
        "--allow_ops",
        metavar="A,B",
        default=_GIVEN,
        help="ops reaching outside the graph (file, network, Python, print: "
        "WriteFile, PrintV2, ...) that graphfold may run; a signature "
        "holding others is not run (NOT VERIFIED), a model whose loading "
        "runs others is not loaded",
    )


def _graph_def_names(parser):
    parser.add_argument(
        "--input-names",
        "--input_names",
        type=_names,
        metavar="A,B",
        default=_GIVEN,
        help="GraphDef files: the placeholders fed (default: every placeholder)",
    )
    parser.add_argument(
        "--output-names",
        "--output_names",
        type=_names,
        metavar="Y,Z",
        default=_GIVEN,
        help="GraphDef files: the tensors fetched (default: nodes nobody reads)",
    )


def _checking(parser):
    parser.add_argument(
        "--tolerance",
        type=float,
        metavar="T",
        default=_GIVEN,
        help="largest relative error max|a-b|/max|a| accepted (default: by "
        "the lowest precision an output or the model computes in: 1e-5 "
        "for float32, 2e-2 for float16, 6e-2 for bfloat16)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        metavar="N",
        default=_GIVEN,
        help="size of an unknown batch dimension of random inputs (default 1)",
    )


def _writing(parser) -> None:
    """The options of writing an optimized SavedModel (optimize and optimize-repo)."""
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        default=_GIVEN,
        help="do not compare the result with the original",
    )
    _checking(parser)
    _partial(parser)
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=_GIVEN,
        help="where the folded weights go: variables in variables/ (no slower "
        "and no more memory to serve than an original that reads "
        "variables), constants in saved_model.pb (faster at small batches "
        "on CPU, but TF Serving peaks at up to about +8x the weights), or "
        "auto (default): as the original holds its own (variables, or "
        "constants when it reads none)",
    )
    parser.add_argument(
        "--drop-other-tag-sets",
        action="store_true",
        default=_GIVEN,
        help="SRC holds several MetaGraphs: write only the one of --tag-set "
        "(without this flag such a SavedModel is refused)",
    )
    parser.add_argument(
        "--require-verification",
        action="store_true",
        default=_GIVEN,
        help="exit 1 and write nothing if a signature cannot be verified",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        metavar="N",
        default=_GIVEN,
        help=f"write N TF Serving warm-up requests per rewritten signature to "
        f"DST/assets.extra/tf_serving_warmup_requests, from the "
        f"verification inputs (SRC's records are kept; only the missing "
        f"are added; at most {MAX_WARMUP})",
    )


def option_args(args) -> dict:
    """The ``Options`` fields given on the command line (flags left out are absent)."""
    return {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if hasattr(args, f.name)
    }


def _names(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _input_shape_flag(parser):
    parser.add_argument(
        "--input-shape",
        "--input_shape",
        action="append",
        dest="input_shapes",
        type=_shape_entry,
        metavar="KEY=D1,D2,...",
        default=_GIVEN,
        help="shape of the random inputs for KEY where its signature leaves "
        "dimensions unknown, e.g. x=1,224,224,3 (repeatable; default: the "
        "given inputs' or warm-up records' shapes, else 224x224 images)",
    )


def _real_inputs(parser):
    _input_shape_flag(parser)
    parser.add_argument(
        "--inputs",
        action="append",
        metavar="KEY=FILE",
        help="real inputs to verify on, as saved_model_cli run takes them: "
        "'KEY=file.npy;KEY2=file.npz[name]' (repeatable)",
    )
    parser.add_argument(
        "--input_exprs",
        "--input-exprs",
        action="append",
        dest="input_exprs",
        metavar="KEY=EXPR",
        help="real inputs as Python literals: 'KEY=[[1.0, 2.0]]' (repeatable)",
    )


def _shape_entry(text):
    from graphfold.convert.input_shapes import parse_entry

    try:
        return parse_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _output(parser):
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress and no tables (errors only)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of tables"
    )


# ---- commands -------------------------------------------------------------------------------


def cmd_optimize(args, console: Console) -> int:
    from graphfold.serving.graph_def_file import is_graph_def_file, optimize_graph_def_file
    from graphfold.serving.saved_model import (
        VerificationFailed,
        optimize_saved_model,
        weights_tradeoff,
    )

    _check_report_path(args)
    from graphfold.convert.inputs import parse_inputs
    from graphfold.options import GRAPH_DEF_FILE, SAVED_MODEL

    feeds = parse_inputs(args.inputs, args.input_exprs)
    given = option_args(args)
    graph_def_file = is_graph_def_file(args.src)
    (GRAPH_DEF_FILE if graph_def_file else SAVED_MODEL).refuse_unsupported(given)
    optimize = optimize_graph_def_file if graph_def_file else optimize_saved_model
    failure = None
    try:
        result = optimize(
            args.src,
            args.dst,
            options=Options(**given),
            inputs=feeds or None,
            overwrite=args.overwrite,
            progress=console.progress,
        )
    except VerificationFailed as exc:
        result, failure = exc.result, exc
    result.seconds["total"] = console.elapsed()

    _show_optimize_result(result, failure, args, console)
    if failure is not None:
        console.error(str(failure) + _where_to_look(result, args))
        return EXIT_VERIFY
    bns, folded, before, after = result.totals()
    signatures = "" if is_graph_def_file(args.src) else f"{signature_counts(result)}; "
    if result.weights:  # a SavedModel: the trade-off of its weights' mode
        console.print(
            weights_tradeoff(result.weights, chosen=given.get("weights", "auto") == "auto")
        )
    console.print(
        f"wrote {args.dst}: {signatures}{folded} of {bns} batch norms folded; "
        f"ops {before} -> {after}; {verification_status(result)}; "
        f"{result.seconds['total']:.1f}s"
    )
    return EXIT_OK


def _check_report_path(args) -> None:
    """``--report`` names a file outside SRC and DST (``BadInput`` otherwise)."""
    from graphfold.serving.saved_model import BadInput, is_inside

    if not args.report:
        return
    report_path = os.path.realpath(args.report)
    if os.path.isdir(report_path):
        raise BadInput(f"--report {args.report}: is a directory")
    for name, path in (("SRC", args.src), ("DST", args.dst)):
        if is_inside(report_path, os.path.realpath(path)):
            raise BadInput(f"--report {args.report}: must not be inside {name}")


def _show_optimize_result(result, failure, args, console: Console) -> None:
    """The reports, the scan and the verification on the console; the JSON document to
    ``--report`` and ``--json``."""
    render_reports(result, console, full=args.verbose)
    render_scan(result, console, always=False)
    render_verification(result, console)
    document = {
        "command": "optimize",
        "status": "ok" if failure is None else "verification_failed",
        "exit_code": EXIT_OK if failure is None else EXIT_VERIFY,
        **result.to_dict(),
    }
    if failure is not None:
        document["error"] = str(failure)
    if args.report:
        _write_json(args.report, document)
        console.progress(f"report written to {args.report}")
    console.json(document)


def _where_to_look(result, args) -> str:
    """Which outputs failed, and where the details are: appended to a failure's message."""
    bad = sorted(
        {
            f"{key}/{o.name}"
            for key, check in result.verification.items()
            if check.status == "failed"
            for o in check.outputs
            if o.tolerance is not None and not o.max_rel <= o.tolerance
        }
    )
    text = f" [failed output(s): {', '.join(bad)}]" if bad else ""
    if args.command == "verify":
        return f"{text}; every output's errors: --json"
    report = (
        f"the report {args.report}"
        if getattr(args, "report", None)
        else "--report FILE.json (every output's errors)"
    )
    return (
        f"{text}; look at the verification table above, {report}, and `graphfold inspect "
        f"{args.src}` for what was folded where"
    )


def signature_counts(result) -> str:
    """ "2 signature(s) rewritten, 1 NOT OPTIMIZED (key: why), 0 copied unchanged": requested
    signatures rewritten or not, and those not requested (copied as they were)."""
    rewritten = len(result.rewritten)
    copied = len(result.all_signatures) - len(result)
    text = f"{rewritten} signature(s) rewritten"
    if result.unchanged:
        text += (
            f", {len(result.unchanged)} NOT OPTIMIZED ("
            + "; ".join(f"{k}: {why}" for k, why in sorted(result.unchanged.items()))
            + ")"
        )
    return text + f", {copied} copied unchanged"


def verification_status(result, compared: list[str] | None = None) -> str:
    """ "verified", "verified (within noise: ...)", "not verified (--no-verify)",
    "NOT VERIFIED: key (reason)" or "INCONCLUSIVE: key (reason)" for the final line: about the
    rewritten signatures only (a signature copied through was not optimized, whatever its check
    says), or the ``compared`` ones (``graphfold verify``)."""
    rewritten = result.rewritten if compared is None else compared
    if not rewritten:
        return "nothing rewritten, nothing to verify"
    if not result.verification:
        return "not verified (--no-verify)"
    checks = {k: result.verification[k] for k in rewritten if k in result.verification}
    unverified = sorted(
        k for k in rewritten if k not in checks or checks[k].status not in ("ok", "inconclusive")
    )
    inconclusive = sorted(k for k, v in checks.items() if v.status == "inconclusive")
    said = []
    if unverified:
        said.append(
            "NOT VERIFIED: "
            + "; ".join(
                f"{k} ({checks[k].reason if k in checks else 'not checked'})" for k in unverified
            )
        )
    if inconclusive:
        said.append("INCONCLUSIVE: " + "; ".join(f"{k} ({checks[k].reason})" for k in inconclusive))
    if said:
        return "; ".join(said)
    noisy = sorted(k for k, v in checks.items() if v.noise_floor is not None)
    if noisy:
        return f"verified (within the noise floor: {', '.join(noisy)})"
    return "verified"


def cmd_verify(args, console: Console) -> int:
    from graphfold.convert.inputs import parse_inputs
    from graphfold.serving.saved_model import VerificationFailed, verify_saved_models

    feeds = parse_inputs(args.inputs, args.input_exprs)
    options = Options(**option_args(args))
    try:
        result = verify_saved_models(
            args.src, args.dst, options=options, inputs=feeds or None, progress=console.progress
        )
    except VerificationFailed as exc:  # require_verification, and a signature unverified
        result = exc.result
    result.seconds["total"] = console.elapsed()
    render_verification(result, console)
    failed = sorted(k for k, v in result.verification.items() if not v.ok)
    unverified = sorted(result.not_verified + result.inconclusive)
    code = EXIT_VERIFY if failed or (unverified and options.require_verification) else EXIT_OK
    document = {
        "command": "verify",
        "status": "ok" if code == EXIT_OK else "verification_failed",
        "exit_code": code,
        "src": result.src,
        "dst": result.dst,
        "tag_set": list(result.tags),
        "signatures": {
            k: {"verification": v.to_dict()} for k, v in sorted(result.verification.items())
        },
        "notes": list(result.notes),
        "seconds": dict(result.seconds),
    }
    console.json(document)
    if failed:
        console.error(
            f"{args.dst} differs from {args.src} in signature(s) "
            f"{', '.join(failed)}: "
            + "; ".join(result.verification[k].reason or "" for k in failed)
            + _where_to_look(result, args)
        )
    elif code != EXIT_OK:
        console.error(f"--require-verification: signature(s) {', '.join(unverified)} NOT VERIFIED")
    else:
        console.print(
            f"{args.dst} matches {args.src}: {len(result.verification)} "
            f"signature(s); {verification_status(result, sorted(result.verification))}; "
            f"{result.seconds['total']:.1f}s"
        )
    return code


def cmd_inspect(args, console: Console) -> int:
    from graphfold.options import INSPECT_GRAPH_DEF_FILE, INSPECT_SAVED_MODEL
    from graphfold.serving.graph_def_file import inspect_graph_def_file, is_graph_def_file
    from graphfold.serving.saved_model import inspect_saved_model

    given = option_args(args)
    graph_def_file = is_graph_def_file(args.src)
    (INSPECT_GRAPH_DEF_FILE if graph_def_file else INSPECT_SAVED_MODEL).refuse_unsupported(given)
    inspect = inspect_graph_def_file if graph_def_file else inspect_saved_model
    result = inspect(args.src, options=Options(**given), progress=console.progress)
    result.seconds["total"] = console.elapsed()
    render_reports(result, console)
    render_scan(result, console)
    bns, folded, before, after = result.totals()
    console.print(
        f"{args.src}: {len(result)} signature(s); {folded} of {bns} batch norms "
        f"foldable; ops {before} -> {after} (nothing written)"
    )
    console.json({"command": "inspect", "status": "ok", "exit_code": EXIT_OK, **result.to_dict()})
    return EXIT_OK


def cmd_demo(args, console: Console) -> int:
    from graphfold.cli.demo import run_demo

    return run_demo(args.out, console)


def _write_json(path: str, document: dict) -> None:
    from graphfold.errors import BadInput

    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.graphfold-tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(dumps(document) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise BadInput(f"--report {path}: cannot write it ({exc.strerror or exc})") from None


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow, keeping its C++ log lines out of the tables unless the user asked for
    them (``TF_CPP_MIN_LOG_LEVEL`` set below 2): the log level raised, and what TensorFlow
    prints on stderr while it is imported dropped."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] < "2":
        return
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass  # reported, with stderr back, where a command imports it
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextlib.contextmanager
def _quiet_tensorflow():
    """TensorFlow's Python-side warnings would drown the tables: silence them while we run."""
    import logging

    loggers = [logging.getLogger("tensorflow"), logging.getLogger("absl")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``, a container stop), raised like Ctrl-C's
    KeyboardInterrupt so that the same clean-up runs: the staging directory is removed."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- optimize-repo: every model and version of a TF Serving model repository ----------------
# Everything after ``--`` is passed to Beam as pipeline options (``--runner beam``).


class _RepoParser(_Parser):
    """Keeps what follows ``--`` (argparse hands it to a sub-parser) as ``beam_args``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        beam_args = []
        if "--" in args:
            cut = args.index("--")
            args, beam_args = args[:cut], args[cut + 1 :]
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.beam_args = beam_args
        return namespace, extras


def add_repo_parser(commands) -> None:
    """Registers ``optimize-repo`` on the ``graphfold`` command's sub-parsers."""
    repo = commands.add_parser(
        "optimize-repo",
        help="optimize every model/version of a TF Serving model repository",
        description="Optimize every <model>/<version>/ SavedModel under SRC_BASE into the same "
        "path under DST_BASE, in parallel, as `graphfold optimize` does each one. "
        "Versions already optimized from the same source are skipped. Arguments "
        "after `--` are Beam pipeline options (with --runner beam).",
    )
    repo.__class__ = _RepoParser
    repo.add_argument("src", metavar="SRC_BASE", help="model repository to read (never written)")
    repo.add_argument("dst", metavar="DST_BASE", help="model repository to write")
    repo.add_argument(
        "--models",
        type=_names,
        metavar="A,B",
        help="comma-separated model names (default: every model)",
    )
    repo.add_argument(
        "--versions",
        default="latest",
        metavar="latest|all|N",
        help="latest (default, as TF Serving serves), all, or the N highest",
    )
    repo.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="worker processes (default: the number of cores)",
    )
    repo.add_argument(
        "--force", action="store_true", help="redo versions already optimized from the same source"
    )
    repo.add_argument(
        "--isolate",
        action="store_true",
        help="a fresh process per version (output byte-identical to `graphfold "
        "optimize`; costs a TensorFlow start, a few seconds, per version)",
    )
    repo.add_argument(
        "--runner",
        choices=("local", "beam"),
        default="local",
        help="local worker processes (default) or an Apache Beam pipeline "
        "(DirectRunner unless the options after -- say otherwise)",
    )
    repo.add_argument(
        "--model-config",
        metavar="FILE",
        help="write TF Serving's model_config_list for DST_BASE to FILE",
    )
    _selection(repo)
    _writing(repo)
    _input_shape_flag(repo)
    _consent(repo)
    _output(repo)


def cmd_optimize_repo(args, console: Console) -> int:
    from graphfold.fleet.repository import optimize_repository

    with _progress(console) as (on_plan, on_result, on_tick):
        result = optimize_repository(
            args.src,
            args.dst,
            models=args.models,
            versions=args.versions,
            jobs=args.jobs,
            force=args.force,
            isolate=args.isolate,
            runner=args.runner,
            pipeline_args=args.beam_args,
            model_config=args.model_config,
            on_plan=on_plan,
            on_result=on_result,
            on_tick=on_tick,
            options=Options(**option_args(args)),
        )
    console.print(summary_table(result.records))
    console.print()
    failed = [f"{r['model']}/{r['version']}" for r in result.failed]
    code = EXIT_VERIFY if failed else EXIT_OK
    console.json(
        {
            "command": "optimize-repo",
            "status": "failed" if failed else "ok",
            "exit_code": code,
            **result.to_dict(),
        }
    )
    console.print(
        f"{args.dst}: {result.count('ok')} optimized, {result.count('skipped')} "
        f"already done, {len(failed)} failed, of {len(result.records)} version(s) "
        f"in {result.seconds:.1f}s ({args.runner}"
        f"{f', {result.jobs} jobs' if result.jobs else ''}"
        f"{f', {result.worker_start}ed workers' if result.worker_start else ''}); "
        f"report "
        f"{result.report_path}"
    )
    if result.model_config:
        console.progress(f"TF Serving model config written to {result.model_config}")
    if failed:
        console.error(f"{len(failed)} version(s) failed: {', '.join(failed)}")
    return code


def summary_table(records: list[dict]) -> str:
    rows = [
        (
            "model",
            "version",
            "status",
            "batch norms folded",
            "ops before -> after",
            "verified",
            "seconds / error",
        )
    ]
    for r in records:
        folded = "-" if r.get("batch_norms") is None else f"{r['folded']}/{r['batch_norms']}"
        ops = "-" if r.get("ops_before") is None else f"{r['ops_before']} -> {r['ops_after']}"
        verified = {True: "yes", False: "no", None: "-"}[r.get("verified")]
        if r.get("not_optimized"):
            verified += f" ({len(r['not_optimized'])} signature(s) NOT OPTIMIZED)"
        last = (
            r["error"]
            if r["status"] == "failed"
            else ("-" if r.get("seconds") is None else f"{r['seconds']:.1f}")
        )
        rows.append((r["model"], r["version"], r["status"], folded, ops, verified, last))
    return format_table(rows)


def line(record: dict) -> str:
    """One progress line for a finished version."""
    name = f"{record['model']}/{record['version']}"
    if record["status"] == "failed":
        return f"{name}: failed: {record['error']}"
    text = f"{name}: {record['status']}"
    if record.get("batch_norms") is not None:
        text += (
            f", {record['folded']} of {record['batch_norms']} batch norms folded, ops "
            f"{record['ops_before']} -> {record['ops_after']}"
        )
    if record.get("not_optimized"):
        text += ", NOT OPTIMIZED: " + "; ".join(
            f"{k} ({why})" for k, why in record["not_optimized"].items()
        )
    if record["status"] == "ok":
        text += (
            f", {'verified' if record.get('verified') else 'not verified'}, "
            f"{record['seconds']:.1f}s"
        )
    return text


def _rich_bar(console: Console):
    """A ``rich`` progress bar over versions on ``console``'s stderr, or None without rich."""
    try:
        from rich.console import Console as RichConsole
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        return None
    return Progress(
        TextColumn("optimizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=RichConsole(file=console.err),
        transient=False,
        auto_refresh=False,
    )


@contextlib.contextmanager
def _progress(console: Console, every: float = 10.0):
    """``(on_plan, on_result, on_tick)``: a rich progress bar over versions when stderr is a
    terminal, else one plain line per finished version and, while versions run, a line every
    ``every`` seconds (none with --quiet). Drawn from the calling thread (``on_tick``), never
    from a thread of its own: the workers are then forked, not spawned
    (``graphfold.fleet.pool``)."""
    state: dict[str, Any] = {"done": 0, "total": 0, "bar": None, "last": time.perf_counter()}
    bar = None if console.quiet or not console.err.isatty() else _rich_bar(console)

    def on_plan(tasks) -> None:
        state["total"] = len(tasks)
        if bar is not None:
            bar.start()
            state["bar"] = bar.add_task("", total=len(tasks))
            bar.refresh()
        else:
            console.line(f"{len(tasks)} version(s) found")
        state["last"] = time.perf_counter()

    def on_result(record: dict) -> None:
        state["done"] += 1
        if bar is not None:
            bar.update(
                state["bar"],
                advance=1,
                description=f"{record['model']}/{record['version']} {record['status']}",
            )
            if record["status"] == "failed":
                from rich.text import Text

                bar.console.print(Text(line(record), style="red"))
            bar.refresh()
        else:
            console.line(f"[{state['done']}/{state['total']}] {line(record)}")
        state["last"] = time.perf_counter()

    def on_tick() -> None:
        if bar is not None:
            bar.refresh()
        elif time.perf_counter() - state["last"] >= every:
            console.line(
                f"  ... still optimizing: {state['done']} of {state['total']} version(s) done"
            )
            state["last"] = time.perf_counter()

    try:
        yield on_plan, on_result, on_tick
    finally:
        if bar is not None:
            bar.stop()


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    quiet = "--quiet" in argv or "-q" in argv
    console = Console(quiet=quiet, json_mode=json_mode)
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        console.error(str(exc))
        console.json({"status": "error", "exit_code": EXIT_USAGE, "error": str(exc)})
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    if args.command is None:
        build_parser().print_usage(sys.stderr)
        console.error("a command is required: optimize, optimize-repo, verify, inspect or demo")
        return EXIT_USAGE

    from graphfold.errors import GraphfoldError

    _import_tensorflow_quietly()
    commands = {
        "optimize": cmd_optimize,
        "verify": cmd_verify,
        "inspect": cmd_inspect,
        "demo": cmd_demo,
        "optimize-repo": cmd_optimize_repo,
    }
    try:
        with _quiet_tensorflow(), _sigterm_as_interrupt(), spoken_as(FLAGS):
            try:
                return commands[args.command](args, console)
            finally:
                console.done()
    except GraphfoldError as exc:
        console.error(str(exc))
        if exc.__cause__ is not None and getattr(args, "verbose", False):
            import traceback

            traceback.print_exception(exc.__cause__, file=console.err)
        elif exc.__cause__ is not None and hasattr(args, "verbose"):
            print("(its traceback: run again with --verbose)", file=console.err, flush=True)
        console.json(
            {
                "command": args.command,
                "status": "error",
                "exit_code": exc.exit_code,
                "error": str(exc),
            }
        )
        return exc.exit_code
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        outcome = (
            f"{args.dst} was written just before"
            if getattr(exc, "written", False)
            else "nothing was written"
        )
        console.error(f"{what} ({outcome})")
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
