"""The ``graphfold`` command: ``optimize``, ``inspect`` and ``demo``.

Progress goes to stderr, results to stdout (tables, or one JSON document with ``--json``).
Exit codes: 0 ok, 1 verification failed (nothing written), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import warnings

from graphfold.report import format_table

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


class Console:
    """Progress lines on stderr with the elapsed time; results on stdout."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, out=None, err=None):
        self.quiet, self.json_mode = quiet, json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, line: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():6.1f}s] {line}", file=self.err, flush=True)

    def print(self, text: str = "") -> None:
        """Human-readable results: not with --quiet or --json."""
        if not self.quiet and not self.json_mode:
            print(text, file=self.out, flush=True)

    def error(self, message: str) -> None:
        print(f"graphfold: error: {message}", file=self.err, flush=True)

    def json(self, document: dict) -> None:
        if self.json_mode:
            print(dumps(document), file=self.out, flush=True)


def dumps(document: dict) -> str:
    """Strict JSON: an infinite or NaN error is written as the string "inf" / "nan"."""
    return json.dumps(_strict(json.loads(json.dumps(document, default=_jsonable))), indent=2,
                      allow_nan=False)


def _strict(value):
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _jsonable(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that ``main`` returns the exit code."""

    def error(self, message):
        raise _UsageError(f"{message} (see: {self.prog} --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from graphfold import __version__
    parser = _Parser(prog="graphfold",
                     description="Fold batch normalization into Conv2D/DepthwiseConv2D/MatMul "
                                 "weights of TensorFlow SavedModels, exactly.")
    parser.add_argument("--version", action="version", version=f"graphfold {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    opt = commands.add_parser(
        "optimize", help="fold a SavedModel's batch norms into a new SavedModel",
        description="Fold every requested signature of the SavedModel SRC into a new SavedModel "
                    "DST, verify it on random inputs, and write it with a rename.")
    opt.add_argument("src", metavar="SRC", help="SavedModel directory to read (never written)")
    opt.add_argument("dst", metavar="DST", help="SavedModel directory to create")
    _common(opt)
    opt.add_argument("--no-verify", dest="verify", action="store_false",
                     help="do not compare the result with the original")
    opt.add_argument("--tolerance", type=_non_negative, default=1e-5, metavar="T",
                     help="largest relative error max|a-b|/max|a| accepted (default 1e-5)")
    opt.add_argument("--batch", type=_positive, default=1, metavar="N",
                     help="size of an unknown batch dimension in verification (default 1)")
    opt.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    opt.add_argument("--overwrite", action="store_true",
                     help="replace DST if it is an existing SavedModel (or empty directory)")
    opt.add_argument("--verbose", "-v", action="store_true",
                     help="list every batch norm (by default only those not folded)")
    _output(opt)

    ins = commands.add_parser(
        "inspect", help="list every batch norm: folded or not, which way, or why not",
        description="Report what `optimize` would fold in SRC, without writing anything.")
    ins.add_argument("src", metavar="SRC", help="SavedModel directory")
    _common(ins)
    _output(ins)

    demo = commands.add_parser(
        "demo", help="build, optimize, verify and time a small example model",
        description="Build a small residual CNN (depthwise and dense layers, random batch-norm "
                    "statistics), save it as a SavedModel, optimize it, verify it, and compare "
                    "the latency of both.")
    demo.add_argument("--out", metavar="DIR",
                      help="directory for original/ and optimized/ (default: a new temp dir)")
    _output(demo)
    from graphfold.repo_cli import add_parser as add_repo_parser
    add_repo_parser(commands)
    return parser


def _common(parser):
    parser.add_argument("--signature", "-s", action="append", metavar="KEY", dest="signatures",
                        help="signature key to fold (repeatable; default all)")
    parser.add_argument("--tag-set", "--tag_set", default="serve", metavar="TAGS",
                        help="comma-separated tag set of the MetaGraph (default serve)")


def _output(parser):
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress and no tables (errors only)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout instead of tables")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


# ---- rendering ------------------------------------------------------------------------------

def render_reports(result, console: Console, full: bool = True) -> None:
    """Per signature: summary, per-layer table (``full``; else only the layers not folded), op
    table. Signatures with the same graph are shown once."""
    from graphfold.report import FoldReport
    first = same_as(result)
    for key in sorted(result):
        report = result[key]
        console.print(f"== signature '{key}' ==")
        if first[key] != key:
            console.print(f"same graph as '{first[key]}': {report.summary()}")
            console.print()
            continue
        if key in result.unchanged:
            console.print(f"copied through unchanged: {result.unchanged[key]}")
        console.print(report.summary())
        shown_entries = report
        if not full:
            shown_entries = FoldReport([e for e in report.entries if not e.folded and
                                        (e.is_batch_norm or e.reason)], {}, {})
        if shown_entries.entries and (report.batch_norms or not full):
            console.print()
            console.print(_indent(shown_entries.entry_table()))
        if not full and report.folded:
            console.print("(where each one went: graphfold optimize --verbose, or "
                          "graphfold inspect)")
        console.print()
        console.print(_indent(report.op_table()))
        for note in report.notes:
            if key in result.unchanged and note.startswith("signature copied through"):
                continue
            console.print(f"note: {note}")
        console.print()


def same_as(result) -> dict[str, str]:
    """key -> the first key (in sorted order) whose report is the same (itself if none)."""
    first, seen = {}, {}
    for key in sorted(result):
        fingerprint = json.dumps(
            {k: v for k, v in result[key].to_dict().items() if k != "seconds"},
            sort_keys=True, default=str) + str(result.unchanged.get(key))
        fingerprint = re.sub(r" at 0x[0-9a-fA-F]+", "", fingerprint)   # object addresses
        first[key] = seen.setdefault(fingerprint, key)
    return first


def render_verification(result, console: Console) -> None:
    for note in getattr(result, "notes", []):
        console.print(f"note: {note}")
    if not result.verification:
        return
    rows = [("signature", "status", "max abs err", "max rel err", "inputs")]
    for key, check in sorted(result.verification.items()):
        inputs = ", ".join(f"{k}{list(v)}" for k, v in check.inputs.items())
        if check.status == "skipped":
            rows.append((key, "skipped", "-", "-", check.reason or ""))
        else:
            rows.append((key, check.status, f"{check.max_abs:.3g}", f"{check.max_rel:.3g}",
                         inputs))
    tolerance = next(iter(result.verification.values())).tolerance
    console.print(f"verification on random inputs (relative tolerance {tolerance:g}):")
    console.print(_indent(format_table(rows)))
    for key, check in sorted(result.verification.items()):
        if check.status == "failed":
            console.print(f"  {key}: {check.reason}")
    console.print()


def totals(result) -> tuple[int, int, int, int]:
    """(batch norms, folded, ops before, ops after) over distinct signatures (Keras' `serve`
    and `serving_default` count once)."""
    bns = folded = before = after = 0
    first = same_as(result)
    for key, report in result.items():
        if first[key] != key:
            continue
        bns += len(report.batch_norms)
        folded += len(report.folded)
        before += sum(report.ops_before.values())
        after += sum(report.ops_after.values())
    return bns, folded, before, after


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())



# ---- commands -------------------------------------------------------------------------------

def cmd_optimize(args, console: Console) -> int:
    from graphfold.saved_model import (BadInput, VerificationFailed, is_inside,
                                       optimize_saved_model)
    if args.report:
        report_path = os.path.realpath(args.report)
        if os.path.isdir(report_path):
            raise BadInput(f"--report {args.report}: is a directory")
        for name, path in (("SRC", args.src), ("DST", args.dst)):
            if is_inside(report_path, os.path.realpath(path)):
                raise BadInput(f"--report {args.report}: must not be inside {name}")
    failure = None
    try:
        result = optimize_saved_model(
            args.src, args.dst, signatures=args.signatures, tags=args.tag_set,
            verify=args.verify, tolerance=args.tolerance, overwrite=args.overwrite,
            batch=args.batch, progress=console.progress)
    except VerificationFailed as exc:
        result, failure = exc.result, exc
    result.seconds["total"] = console.elapsed()

    render_reports(result, console, full=args.verbose)
    render_verification(result, console)
    document = {"command": "optimize", "status": "ok" if failure is None else
                "verification_failed", "exit_code": EXIT_OK if failure is None else EXIT_VERIFY,
                **result.to_dict()}
    if failure is not None:
        document["error"] = str(failure)
    if args.report:
        _write_json(args.report, document)
        console.progress(f"report written to {args.report}")
    console.json(document)
    if failure is not None:
        console.error(str(failure))
        return EXIT_VERIFY
    bns, folded, before, after = totals(result)
    rewritten = len(result) - len(result.unchanged)
    copied = len(result.all_signatures) - rewritten
    status = "verified" if result.verification else "not verified"
    console.print(f"wrote {args.dst}: {rewritten} signature(s) rewritten, {copied} copied "
                  f"unchanged; {folded} of {bns} batch norms folded; ops {before} -> {after}; "
                  f"{status}; {result.seconds['total']:.1f}s")
    return EXIT_OK


def cmd_inspect(args, console: Console) -> int:
    from graphfold.saved_model import inspect_saved_model
    result = inspect_saved_model(args.src, signatures=args.signatures, tags=args.tag_set,
                                 progress=console.progress)
    result.seconds["total"] = console.elapsed()
    render_reports(result, console)
    bns, folded, before, after = totals(result)
    console.print(f"{args.src}: {len(result)} signature(s); {folded} of {bns} batch norms "
                  f"foldable; ops {before} -> {after} (nothing written)")
    console.json({"command": "inspect", "status": "ok", "exit_code": EXIT_OK,
                  **result.to_dict()})
    return EXIT_OK


def cmd_demo(args, console: Console) -> int:
    from graphfold.demo import run_demo
    return run_demo(args.out, console)


def _write_json(path: str, document: dict) -> None:
    from graphfold.saved_model import BadInput
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.graphfold-tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(dumps(document) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise BadInput(f"--report {path}: cannot write it ({exc.strerror or exc})") from None


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
    except SystemExit as exc:   # --help, --version
        return int(exc.code or 0)
    if args.command is None:
        build_parser().print_usage(sys.stderr)
        console.error("a command is required: optimize, inspect or demo")
        return EXIT_USAGE

    from graphfold.saved_model import GraphfoldError
    from graphfold.repo_cli import cmd_optimize_repo
    commands = {"optimize": cmd_optimize, "inspect": cmd_inspect, "demo": cmd_demo,
                "optimize-repo": cmd_optimize_repo}
    try:
        with _quiet_tensorflow():
            return commands[args.command](args, console)
    except GraphfoldError as exc:
        console.error(str(exc))
        console.json({"command": args.command, "status": "error", "exit_code": exc.exit_code,
                      "error": str(exc)})
        return exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted (nothing was written)")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
