"""A model repository in TF Serving's layout, ``<base>/<model>/<version>/``, optimized version by
version into the same layout under another base.

Each version is one ``optimize_saved_model`` call (report, verification, write by rename), run in
worker processes on this machine (``graphfold.fleet.pool``) or as a Beam pipeline
(``graphfold.fleet.beam``). A written version carries ``assets.extra/graphfold_source.json``: the
sha256 of its source files and the options used. A later run finds it and skips that version
when both still match, so a re-run after a failure does only what is left.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Iterable

from graphfold.errors import BadInput
from graphfold.fleet.repo_task import (  # noqa: F401 - the task's names, re-exported
    RECORD,
    SUMMARY_FIELDS,
    Task,
    already_done,
    failed_record,
    normalized_options,
    quiet_worker,
    read_record,
    run_task,
    source_fingerprint,
    summarise,
    write_json,
    write_record,
)
from graphfold.options import Options, spelled, with_value
from graphfold.serving.saved_model import is_inside

REPORT = "graphfold_repository.json"  # in DST_BASE
VERSION_NAME = re.compile(r"^[0-9]+$")  # what TF Serving loads


# ---- finding the versions -----------------------------------------------------------------------


def find_versions(
    src_base: str, models: Iterable[str] | None = None, versions: str | int = "latest"
) -> list[tuple[str, str]]:
    """``(model, version)`` for every version to optimize under ``src_base``, sorted.

    A model is a directory of ``src_base``; its versions are its subdirectories whose names are
    numbers (as TF Serving reads them). ``versions``: "latest" (the highest number, TF Serving's
    default policy), "all", or N (the N highest, like ``latest { num_versions: N }``).
    """
    if not os.path.isdir(src_base):
        raise BadInput(
            f"{src_base}: not a directory (expected a model repository, <base>/<model>/<version>/)"
        )
    keep = _version_policy(versions)
    found = {}
    for model in sorted(os.listdir(src_base)):
        path = os.path.join(src_base, model)
        if model.startswith(".") or not os.path.isdir(path):
            continue
        numbers = sorted(
            (
                d
                for d in os.listdir(path)
                if VERSION_NAME.match(d) and os.path.isdir(os.path.join(path, d))
            ),
            key=int,
        )
        if numbers:
            found[model] = numbers
    if models is not None:
        models = list(dict.fromkeys(models))
        unknown = [m for m in models if m not in found]
        if unknown:
            raise BadInput(
                f"{src_base}: no model {', '.join(map(repr, unknown))} with a "
                f"numeric version directory (models: "
                f"{', '.join(sorted(found)) or 'none'})"
            )
        found = {m: found[m] for m in models}
    if not found:
        raise BadInput(
            f"{src_base}: no <model>/<version>/ directories (a version is a "
            f"directory named by a number, as TF Serving expects)"
        )
    return [
        (model, version)
        for model in sorted(found)
        for version in (found[model] if keep is None else found[model][-keep:])
    ]


def _version_policy(versions) -> int | None:
    """How many of the highest versions to keep (None: all)."""
    if versions == "all":
        return None
    if versions == "latest":
        return 1
    try:
        count = int(versions)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise BadInput(
            f"{with_value('versions', versions)}: must be latest, all or a positive number"
        )
    return count


def check_bases(src_base: str, dst_base: str) -> None:
    real_src, real_dst = os.path.realpath(src_base), os.path.realpath(dst_base)
    if real_src == real_dst:
        raise BadInput(f"{dst_base}: DST_BASE is SRC_BASE; graphfold never writes over its input")
    if is_inside(real_dst, real_src):
        raise BadInput(f"{dst_base}: DST_BASE is inside SRC_BASE")
    if is_inside(real_src, real_dst):
        raise BadInput(f"{dst_base}: SRC_BASE is inside DST_BASE")
    if os.path.exists(dst_base) and not os.path.isdir(dst_base):
        raise BadInput(f"{dst_base}: exists and is not a directory")


# ---- one version --------------------------------------------------------------------------------


# ---- the repository -----------------------------------------------------------------------------


@dataclasses.dataclass
class RepositoryResult:
    """Every version's record (sorted by model, then version number) and what was run."""

    src_base: str
    dst_base: str
    records: list[dict]
    runner: str
    jobs: int | None
    seconds: float = 0.0
    report_path: str | None = None
    model_config: str | None = None
    worker_start: str | None = None  # local runner: "fork" or "spawn" (pool.start_method)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "failed"]

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    def to_dict(self) -> dict:
        return {
            "src_base": self.src_base,
            "dst_base": self.dst_base,
            "runner": self.runner,
            "jobs": self.jobs,
            "worker_start": self.worker_start,
            "seconds": self.seconds,
            "summary": {s: self.count(s) for s in ("ok", "skipped", "failed")},
            "failed": [f"{r['model']}/{r['version']}" for r in self.failed],
            "report": self.report_path,
            "model_config": self.model_config,
            "versions": self.records,
        }


def _paths(src_base: str, dst_base: str, model: str, version: str) -> tuple[str, str]:
    """A version's SRC and DST directories."""
    return os.path.join(src_base, model, version), os.path.join(dst_base, model, version)


def optimize_repository(
    src_base,
    dst_base,
    *,
    models: Iterable[str] | None = None,
    versions: str | int = "latest",
    jobs: int | None = None,
    force: bool = False,
    isolate: bool = False,
    runner: str = "local",
    pipeline_args: list[str] | None = None,
    model_config: str | None = None,
    on_result: Callable[[dict], None] | None = None,
    on_plan: Callable[[list[Task]], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    options: Options | None = None,
    **option_kwargs,
) -> RepositoryResult:
    """Optimizes every chosen ``<model>/<version>/`` SavedModel under ``src_base`` into the same
    relative path under ``dst_base`` with ``optimize_saved_model(options=options)`` (or the
    options as keyword arguments).

    ``models``: names to choose (default all). ``versions``: "latest", "all" or N (the N
    highest). ``jobs``: local worker processes (default: the cores this process may use).
    ``force``: redo versions already done. ``isolate``: a fresh process per version (its
    saved_model.pb is then byte-identical to ``graphfold optimize``'s). ``runner``: "local" or
    "beam" (``pipeline_args``: Beam pipeline options). ``model_config``: write TF Serving's
    ``model_config_list`` file there. ``on_plan(tasks)`` and ``on_result(record)``: progress.

    A failing version (bad SavedModel, failed verification, crashed worker) is recorded with its
    error and does not stop the others. Writes ``<dst_base>/graphfold_repository.json``.
    """
    clock = time.perf_counter()
    src_base, dst_base = os.fspath(src_base), os.fspath(dst_base)
    normalized = normalized_options(options, **option_kwargs)
    _check_runner(runner, jobs, pipeline_args)
    check_bases(src_base, dst_base)
    if model_config is not None:
        _check_output_file(model_config, spelled("model_config"), src_base)
    tasks = [
        Task(model, version, *_paths(src_base, dst_base, model, version), normalized, force)
        for model, version in find_versions(src_base, models, versions)
    ]
    if runner == "beam":
        _check_beam()
    os.makedirs(dst_base, exist_ok=True)
    if on_plan is not None:
        on_plan(tasks)
    jobs = default_jobs() if jobs is None else jobs
    records: dict[str, dict] = {}

    def done(task: Task, record: dict) -> None:
        records[task.name] = record
        if on_result is not None:
            on_result(record)

    worker_start = None  # local workers: how they started (fork, spawn)
    if runner == "local":
        worker_start = _run_local(tasks, jobs, isolate, done, on_tick)
    else:
        _run_beam(tasks, pipeline_args or [], isolate, done)
    for task in tasks:
        if task.name not in records:
            done(task, failed_record(task, "no result came back from the pipeline"))
    result = RepositoryResult(
        src_base,
        dst_base,
        [records[t.name] for t in tasks],
        runner,
        jobs if runner == "local" else None,
        worker_start=worker_start,
    )
    result.seconds = time.perf_counter() - clock
    if model_config is not None:
        write_model_config(model_config, dst_base, result, versions)
        result.model_config = model_config
    result.report_path = os.path.join(dst_base, REPORT)
    write_json(result.report_path, result.to_dict())
    return result


def _check_runner(runner: str, jobs, pipeline_args) -> None:
    """``BadInput`` for a runner, jobs or pipeline options that do not go together."""
    if runner not in ("local", "beam"):
        raise BadInput(f"{with_value('runner', runner)}: must be local or beam")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise BadInput(f"{with_value('jobs', jobs)}: must be a whole number, at least 1")
    if pipeline_args and runner != "beam":
        raise BadInput(f"Beam pipeline options are only for {with_value('runner', 'beam')}")
    if jobs is not None and runner == "beam":
        raise BadInput(
            f"{spelled('jobs')} is for the local runner; on Beam the pipeline "
            f"options say how many workers (e.g. -- --direct_num_workers=2 "
            f"--direct_running_mode=multi_processing)"
        )


def _check_beam() -> None:
    """``BadInput`` when Apache Beam is not installed."""
    try:
        import graphfold.fleet.beam  # noqa: F401
    except ImportError:
        raise BadInput(
            f"{with_value('runner', 'beam')} needs Apache Beam: pip install 'graphfold[beam]'"
        ) from None


def _run_local(tasks: list[Task], jobs: int, isolate: bool, done, on_tick) -> str | None:
    """Runs the tasks not already done in local worker processes (``graphfold.fleet.pool``), each
    record to ``done``; returns how the workers were started (None: none was needed)."""
    todo = _not_done(tasks, done)
    if not todo:
        return None
    from graphfold.fleet import pool

    workers = min(jobs, len(todo))
    threads = max(1, default_jobs() // workers)
    worker_start = pool.start_method()
    for task, record in pool.imap_unordered(
        run_task,
        todo,
        workers,
        tasks_per_worker=1 if isolate else None,
        initializer=functools.partial(quiet_worker, threads),
        tick=on_tick,
    ):
        done(task, failed_record(task, str(record)) if isinstance(record, Exception) else record)
    return worker_start


def _run_beam(tasks: list[Task], pipeline_args: list[str], isolate: bool, done) -> None:
    """Runs every task as a Beam pipeline (its workers hash the sources, near the data)."""
    from graphfold.fleet.beam import run_pipeline

    by_name = {task.name: task for task in tasks}
    for record in run_pipeline(tasks, pipeline_args, isolate=isolate):
        done(by_name[f"{record['model']}/{record['version']}"], record)


def _not_done(tasks: list[Task], done: Callable[[Task, dict], None]) -> list[Task]:
    """The tasks left to run, with their source fingerprints; reports the others to ``done``
    (already done: skipped; unreadable: failed) without starting a worker."""
    todo = []
    for task in tasks:
        try:
            fingerprint = source_fingerprint(task.src)
        except OSError as exc:
            done(task, failed_record(task, f"{task.src}: cannot read it ({exc.strerror or exc})"))
            continue
        task = dataclasses.replace(task, fingerprint=fingerprint)
        if already_done(task, fingerprint) is not None:
            done(task, run_task(task))
        else:
            todo.append(task)
    return todo


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_output_file(path: str, option: str, src_base: str) -> None:
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise BadInput(f"{option} {path}: is a directory")
    if is_inside(real, os.path.realpath(src_base)):
        raise BadInput(f"{option} {path}: must not be inside SRC_BASE")


# ---- TF Serving's model config ------------------------------------------------------------------


def model_config_text(dst_base: str, models: list[str], versions: str | int = "latest") -> str:
    """TF Serving's ``model_config_list`` (text protobuf) serving ``models`` from ``dst_base``
    with the version policy matching ``versions``."""
    count = _version_policy(versions)
    policy = (
        ""
        if count == 1
        else "    model_version_policy { all {} }\n"
        if count is None
        else f"    model_version_policy {{ latest {{ num_versions: {count} }} }}\n"
    )
    lines = ["model_config_list {"]
    for model in models:
        base = os.path.join(os.path.abspath(dst_base), model)
        lines.append(
            "  config {\n"
            f"    name: {_quote(model)}\n"
            f"    base_path: {_quote(base)}\n"
            '    model_platform: "tensorflow"\n' + policy + "  }"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_model_config(path: str, dst_base: str, result: RepositoryResult, versions) -> None:
    """The config for every model with at least one version optimized (or already done)."""
    served = sorted({r["model"] for r in result.records if r["status"] != "failed"})
    left_out = sorted({r["model"] for r in result.records} - set(served))
    text = model_config_text(dst_base, served, versions)
    if left_out:
        text = "".join(f"# left out (no version optimized): {m}\n" for m in left_out) + text
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
