"""``graphfold optimize-repo SRC_BASE DST_BASE``: every model and version of a TF Serving model
repository, in parallel; a progress bar over versions, a summary table, exit 0 / 1 / 2.

Everything after ``--`` is passed to Beam as pipeline options (``--runner beam``).
"""

from __future__ import annotations

import contextlib
import sys

from graphfold import cli
from graphfold.render import format_table

EXIT_FAILED = 1


class _RepoParser(cli._Parser):
    """Keeps what follows ``--`` (argparse hands it to a sub-parser) as ``beam_args``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        beam_args = []
        if "--" in args:
            cut = args.index("--")
            args, beam_args = args[:cut], args[cut + 1:]
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.beam_args = beam_args
        return namespace, extras


def add_parser(commands) -> None:
    """Registers ``optimize-repo`` on the ``graphfold`` command's sub-parsers."""
    repo = commands.add_parser(
        "optimize-repo", help="optimize every model/version of a TF Serving model repository",
        description="Optimize every <model>/<version>/ SavedModel under SRC_BASE into the same "
                    "path under DST_BASE, in parallel, as `graphfold optimize` does each one. "
                    "Versions already optimized from the same source are skipped. Arguments "
                    "after `--` are Beam pipeline options (with --runner beam).")
    repo.__class__ = _RepoParser
    repo.add_argument("src", metavar="SRC_BASE", help="model repository to read (never written)")
    repo.add_argument("dst", metavar="DST_BASE", help="model repository to write")
    repo.add_argument("--models", type=_names, metavar="A,B",
                      help="comma-separated model names (default: every model)")
    repo.add_argument("--versions", default="latest", metavar="latest|all|N",
                      help="latest (default, as TF Serving serves), all, or the N highest")
    repo.add_argument("--jobs", "-j", type=cli._positive, metavar="N",
                      help="worker processes (default: the number of cores)")
    repo.add_argument("--force", action="store_true",
                      help="redo versions already optimized from the same source")
    repo.add_argument("--isolate", action="store_true",
                      help="a fresh process per version (output byte-identical to `graphfold "
                           "optimize`; costs a TensorFlow start, a few seconds, per version)")
    repo.add_argument("--runner", choices=("local", "beam"), default="local",
                      help="local worker processes (default) or an Apache Beam pipeline "
                           "(DirectRunner unless the options after -- say otherwise)")
    repo.add_argument("--model-config", metavar="FILE",
                      help="write TF Serving's model_config_list for DST_BASE to FILE")
    cli._common(repo)
    repo.add_argument("--no-verify", dest="verify", action="store_false",
                      help="do not compare the results with the originals")
    repo.add_argument("--tolerance", type=cli._non_negative, default=1e-5, metavar="T",
                      help="largest relative error max|a-b|/max|a| accepted (default 1e-5)")
    repo.add_argument("--batch", type=cli._positive, default=1, metavar="N",
                      help="size of an unknown batch dimension in verification (default 1)")
    repo.add_argument("--weights", choices=("auto", "constants", "variables"), default="auto",
                      help="where the folded weights go (as for optimize; default auto)")
    repo.add_argument("--require-verification", action="store_true",
                      help="a signature left NOT VERIFIED fails its version (as for optimize)")
    repo.add_argument("--warmup", type=cli._warmup_count, metavar="N",
                      help="write N TF Serving warm-up requests per signature (as for optimize)")
    repo.add_argument("--drop-other-tag-sets", action="store_true",
                      help="write only the chosen tag set of SavedModels that hold several")
    cli._output(repo)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise cli.argparse.ArgumentTypeError(f"expected model names, got {text!r}")
    return names


def cmd_optimize_repo(args, console: cli.Console) -> int:
    from graphfold.repository import optimize_repository
    with _progress(console) as (on_plan, on_result):
        result = optimize_repository(
            args.src, args.dst, models=args.models, versions=args.versions, jobs=args.jobs,
            force=args.force, isolate=args.isolate, runner=args.runner,
            pipeline_args=args.beam_args, model_config=args.model_config,
            on_plan=on_plan, on_result=on_result, signatures=args.signatures,
            tags=args.tag_set, verify=args.verify, tolerance=args.tolerance, batch=args.batch,
            weights=args.weights, require_verification=args.require_verification,
            warmup=args.warmup, drop_other_tag_sets=args.drop_other_tag_sets)
    console.print(summary_table(result.records))
    console.print()
    failed = [f"{r['model']}/{r['version']}" for r in result.failed]
    code = EXIT_FAILED if failed else cli.EXIT_OK
    console.json({"command": "optimize-repo", "status": "failed" if failed else "ok",
                  "exit_code": code, **result.to_dict()})
    console.print(f"{args.dst}: {result.count('ok')} optimized, {result.count('skipped')} "
                  f"already done, {len(failed)} failed, of {len(result.records)} version(s) "
                  f"in {result.seconds:.1f}s ({args.runner}"
                  f"{f', {result.jobs} jobs' if result.jobs else ''}); report "
                  f"{result.report_path}")
    if result.model_config:
        console.progress(f"TF Serving model config written to {result.model_config}")
    if failed:
        console.error(f"{len(failed)} version(s) failed: {', '.join(failed)}")
    return code


def summary_table(records: list[dict]) -> str:
    rows = [("model", "version", "status", "batch norms folded", "ops before -> after",
             "verified", "seconds / error")]
    for r in records:
        folded = "-" if r.get("batch_norms") is None else f"{r['folded']}/{r['batch_norms']}"
        ops = "-" if r.get("ops_before") is None else f"{r['ops_before']} -> {r['ops_after']}"
        verified = {True: "yes", False: "no", None: "-"}[r.get("verified")]
        last = r["error"] if r["status"] == "failed" else \
            ("-" if r.get("seconds") is None else f"{r['seconds']:.1f}")
        rows.append((r["model"], r["version"], r["status"], folded, ops, verified, last))
    return format_table(rows)


def line(record: dict) -> str:
    """One progress line for a finished version."""
    name = f"{record['model']}/{record['version']}"
    if record["status"] == "failed":
        return f"{name}: failed: {record['error']}"
    text = f"{name}: {record['status']}"
    if record.get("batch_norms") is not None:
        text += (f", {record['folded']} of {record['batch_norms']} batch norms folded, ops "
                 f"{record['ops_before']} -> {record['ops_after']}")
    if record["status"] == "ok":
        text += f", {'verified' if record.get('verified') else 'not verified'}, " \
                f"{record['seconds']:.1f}s"
    return text


@contextlib.contextmanager
def _progress(console: cli.Console):
    """``(on_plan, on_result)``: a rich progress bar over versions when stderr is a terminal,
    else one plain line per finished version (none with --quiet)."""
    state = {"done": 0, "total": 0, "bar": None}
    bar = None
    if not console.quiet and console.err.isatty():
        try:
            from rich.console import Console as RichConsole
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            bar = Progress(TextColumn("optimizing"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TextColumn("{task.description}"),
                           console=RichConsole(file=console.err), transient=False)
        except ImportError:
            bar = None

    def on_plan(tasks) -> None:
        state["total"] = len(tasks)
        if bar is not None:
            bar.start()
            state["bar"] = bar.add_task("", total=len(tasks))
        else:
            console.progress(f"{len(tasks)} version(s) found")

    def on_result(record: dict) -> None:
        state["done"] += 1
        if bar is not None:
            bar.update(state["bar"], advance=1,
                       description=f"{record['model']}/{record['version']} {record['status']}")
            if record["status"] == "failed":
                from rich.text import Text
                bar.console.print(Text(line(record), style="red"))
        else:
            console.progress(f"[{state['done']}/{state['total']}] {line(record)}")

    try:
        yield on_plan, on_result
    finally:
        if bar is not None:
            bar.stop()
