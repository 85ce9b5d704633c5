"""Apache Beam: optimize SavedModels as a step of a pipeline (DirectRunner, Flink, Spark, Dataflow).

``OptimizeSavedModels`` is a ``PTransform`` from source SavedModel paths to result records (the
dicts ``graphfold optimize-repo --json`` lists under "versions"). Each element is optimized by
the same function as on the local runner (``graphfold.fleet.repo_task.run_task``), so a version
already done (same source sha256, same options) is skipped and a failing model yields a
"failed" record instead of failing the bundle.

Every worker writes to ``dst``: on a cluster, the destination must be a file system that all
workers and the reader share (a POSIX mount: graphfold writes by rename).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile

try:
    import apache_beam as beam
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "graphfold.fleet.beam needs Apache Beam: pip install 'graphfold[beam]'"
    ) from exc

from graphfold.fleet.repo_task import (
    Task,
    failed_record,
    normalized_options,
    quiet_worker,
    run_task,
)


class OptimizeSavedModels(beam.PTransform):
    """SavedModel paths -> result records (dicts with "status": "ok", "skipped" or "failed").

    An element is a source version directory ``<src_base>/<model>/<version>``, written to the
    same relative path under ``dst_base``; or a ``(src, dst)`` pair; or a
    ``graphfold.fleet.repo_task.Task``. ``options`` (a ``graphfold.Options``, or its fields as
    keyword
    arguments) go to ``optimize_saved_model``. ``force``: redo versions already done.
    ``isolate``: optimize each element in a fresh process (byte-identical output to
    ``graphfold optimize``; costs a TensorFlow start per element).
    """

    def __init__(
        self,
        src_base: str | None = None,
        dst_base: str | None = None,
        *,
        force: bool = False,
        isolate: bool = False,
        options=None,
        **option_kwargs,
    ):
        super().__init__()
        self._src_base, self._dst_base = src_base, dst_base
        self._options = normalized_options(options, **option_kwargs)
        self._force, self._isolate = force, isolate

    def expand(self, paths):
        return paths | "Optimize" >> beam.ParDo(
            _OptimizeFn(self._src_base, self._dst_base, self._options, self._force, self._isolate)
        )


class _OptimizeFn(beam.DoFn):
    def __init__(self, src_base, dst_base, options, force, isolate):
        super().__init__()
        self._src_base, self._dst_base = src_base, dst_base
        self._options, self._force, self._isolate = options, force, isolate

    def setup(self):
        quiet_worker()

    def process(self, element):
        record = run_isolated(self.task(element)) if self._isolate else run_task(self.task(element))
        beam.metrics.Metrics.counter("graphfold", record["status"]).inc()
        yield record

    def task(self, element) -> Task:
        if isinstance(element, Task):
            return element
        if isinstance(element, (tuple, list)):
            src, dst = map(os.fspath, element)
        else:
            src = os.fspath(element)
            if self._src_base is None or self._dst_base is None:
                raise ValueError(
                    "OptimizeSavedModels: give src_base and dst_base to map a "
                    "source path to its destination, or (src, dst) pairs"
                )
            dst = os.path.join(self._dst_base, os.path.relpath(src, self._src_base))
        parts = os.path.normpath(src).split(os.sep)
        return Task(
            parts[-2] if len(parts) > 1 else "", parts[-1], src, dst, self._options, self._force
        )


def run_isolated(task: Task) -> dict:
    """``run_task(task)`` in a fresh spawned process (a crash there fails only this task)."""
    from graphfold.fleet import pool

    [(_, record)] = list(
        pool.imap_unordered(run_task, [task], 1, tasks_per_worker=1, initializer=quiet_worker)
    )
    return failed_record(task, str(record)) if isinstance(record, Exception) else record


def run_pipeline(
    tasks: list[Task], pipeline_args: list[str], *, isolate: bool = False
) -> list[dict]:
    """Runs ``tasks`` as a Beam pipeline (options from ``pipeline_args``; DirectRunner unless
    they say otherwise) and returns their records, read back from files the pipeline writes
    in a hidden directory of the destination base (removed afterwards)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    if not tasks:
        return []
    dst_base = os.path.dirname(os.path.dirname(tasks[0].dst))
    scratch = tempfile.mkdtemp(prefix=".graphfold-beam-", dir=dst_base)
    beam_logger = logging.getLogger("apache_beam")
    level = beam_logger.level
    if not logging.getLogger().isEnabledFor(logging.INFO):
        beam_logger.setLevel(logging.WARNING)  # Beam's INFO lines only when asked for
    try:
        with beam.Pipeline(options=PipelineOptions(pipeline_args)) as pipeline:
            _ = (
                pipeline
                | "Versions" >> beam.Create(tasks)
                | "Spread" >> beam.Reshuffle()
                | "OptimizeSavedModels" >> OptimizeSavedModels(isolate=isolate)
                | "AsJson" >> beam.Map(lambda record: json.dumps(record, default=str))
                | "Records"
                >> beam.io.WriteToText(os.path.join(scratch, "records"), file_name_suffix=".jsonl")
            )
        records: list[dict] = []
        for path in sorted(glob.glob(os.path.join(scratch, "records*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                records.extend(json.loads(line) for line in f if line.strip())
        return records
    finally:
        beam_logger.setLevel(level)
        shutil.rmtree(scratch, ignore_errors=True)
