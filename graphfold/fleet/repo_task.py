"""One version of a model repository, optimized: the unit of work that a local worker
(``graphfold.fleet.pool``) or a Beam worker (``graphfold.fleet.beam``) runs, and the record it
leaves beside
the written version (``assets.extra/graphfold_source.json``: the sha256 of the source's files and
the options used), by which a later run skips what is done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import time
import traceback
import warnings

from graphfold.errors import GraphfoldError
from graphfold.options import SAVED_MODEL, Options

RECORD = os.path.join("assets.extra", "graphfold_source.json")  # TF Serving ignores it


@dataclasses.dataclass(frozen=True)
class Task:
    """One version to optimize: ``src`` -> ``dst`` (``model``/``version`` name it)."""

    model: str
    version: str
    src: str
    dst: str
    options: Options = Options()  # for optimize_saved_model
    force: bool = False
    fingerprint: str | None = None  # the source's, when the planner already computed it

    @property
    def name(self) -> str:
        return f"{self.model}/{self.version}"


def source_fingerprint(src: str) -> str:
    """sha256 over the relative name and bytes of every file under ``src``."""
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, src).encode() + b"\0")
            file_digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(block)
            digest.update(file_digest.digest())
    return digest.hexdigest()


def read_record(dst: str) -> dict | None:
    """The record a previous run left in ``dst``, or None."""
    try:
        with open(os.path.join(dst, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(os.path.join(dst, "saved_model.pb")):
        return None
    return record if isinstance(record, dict) else None


def already_done(task: Task, fingerprint: str) -> dict | None:
    """The previous record when ``task.dst`` holds this source optimized with these options."""
    if task.force:
        return None
    record = read_record(task.dst)
    if (
        not record
        or record.get("source_sha256") != fingerprint
        or not isinstance(record.get("options"), dict)
    ):
        return None
    # an option added since the record was written took its default then
    recorded = {**Options().to_dict(), **record["options"]}
    return record if recorded == task.options.to_dict() else None


def run_task(task: Task) -> dict:
    """Optimizes one version (unless already done); returns its result record (a plain dict).
    Never raises for a bad model: the record's ``status`` is "ok", "skipped" or "failed"."""
    from graphfold.serving.saved_model import VerificationFailed, optimize_saved_model

    clock = time.perf_counter()
    record = failed_record(task, None)
    try:
        fingerprint = task.fingerprint or source_fingerprint(task.src)
        previous = already_done(task, fingerprint)
        if previous is not None:
            record.update({k: previous.get(k) for k in SUMMARY_FIELDS})
            record.update(status="skipped", seconds=time.perf_counter() - clock)
            return record
        try:
            result = optimize_saved_model(task.src, task.dst, overwrite=True, options=task.options)
        except VerificationFailed as exc:
            result = exc.result
            record["error"] = str(exc)
        record.update(summarise(result))
        record["report"] = result.to_dict()
        if record["error"] is None:
            record["status"] = "ok"
            write_record(task, fingerprint, record)
    except GraphfoldError as exc:
        record["error"] = str(exc)
        if exc.__cause__ is not None:
            record["traceback"] = "".join(traceback.format_exception(exc.__cause__))
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
        lines = str(exc).strip().splitlines()
        record["error"] = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        record["traceback"] = "".join(traceback.format_exception(exc))
    record["seconds"] = time.perf_counter() - clock
    record["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def failed_record(task: Task, error: str | None) -> dict:
    return {
        "model": task.model,
        "version": task.version,
        "src": task.src,
        "dst": task.dst,
        "status": "failed",
        "error": error,
        "seconds": None,
    }


SUMMARY_FIELDS = ("batch_norms", "folded", "ops_before", "ops_after", "verified", "not_optimized")


def summarise(result) -> dict:
    batch_norms, folded, before, after = result.totals()
    checked = result.verification and result.rewritten
    return {
        "batch_norms": batch_norms,
        "folded": folded,
        "ops_before": before,
        "ops_after": after,
        "verified": result.verified if checked else None,
        "not_optimized": dict(sorted(result.unchanged.items())),
    }


def write_record(task: Task, fingerprint: str, record: dict) -> None:
    from graphfold.version import __version__

    document = {
        "source": task.src,
        "source_sha256": fingerprint,
        "options": task.options.to_dict(),
        "graphfold": __version__,
        **{k: record.get(k) for k in SUMMARY_FIELDS},
    }
    write_json(os.path.join(task.dst, RECORD), document)


def write_json(path: str, document) -> None:
    """Writes ``document`` as strict JSON (as ``--json`` prints it: an infinite or NaN error is
    the string "inf" / "nan") through a temporary file and a rename."""
    from graphfold.jsonout import dumps

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(dumps(document) + "\n")
    os.replace(temporary, path)


def quiet_worker(threads: int | None = None) -> None:
    """In a worker process: TensorFlow's Python warnings and log lines off; ``threads``: the
    size of TensorFlow's thread pools (N workers on C cores: C // N each, so that they do not
    oversubscribe the cores). Set through TensorFlow's environment variables, read when its
    runtime starts (after this): ``tf.config.threading`` would also write the thread counts
    into every saved function's ``config_proto``, and so change the bytes of saved_model.pb."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if threads is not None:
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))
    warnings.simplefilter("ignore")
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def normalized_options(options: Options | None = None, **option_kwargs) -> Options:
    """The ``Options`` of every version of a repository (``options``, or the same as keyword
    arguments), those a SavedModel does not honour refused."""
    options = Options.of(options, **option_kwargs)
    SAVED_MODEL.refuse_unsupported(options.given())
    return options
