"""Worker processes that survive each other: run ``function(item)`` for many items in parallel.

Each worker is a Python process that takes one item at a time over its own pipe. It is *forked*
from this process while that is safe to do, so that it starts at once with everything this
process imported (TensorFlow's import takes 3 to 6 s): while TensorFlow's runtime has not started
here (its thread pools, created by the first operation) and no other Python thread runs. Else it
is *spawned* (a fresh interpreter that imports what it needs itself): forking a process whose
runtime threads may hold locks is unsafe. The parent knows which
item every worker holds, so a worker that dies (a segfault, ``os._exit``, the out-of-memory
killer) fails exactly that item, with its exit status, and is replaced; nothing else is lost or
run twice. ``tasks_per_worker=1`` gives every item a fresh process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import connection
from typing import Any


class WorkerDied(Exception):
    """The worker process running an item exited before returning its result."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        if exitcode is not None and exitcode < 0:
            try:
                how = f"killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"killed by signal {-exitcode}"
        else:
            how = f"exit status {exitcode}"
        super().__init__(f"the worker process died ({how})")


class WorkerError(Exception):
    """``function`` raised in the worker: the message is its type and first line."""


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    item: Any = None
    busy: bool = False
    done: int = 0


def imap_unordered(
    function: Callable,
    items: Iterable,
    jobs: int,
    *,
    tasks_per_worker: int | None = None,
    initializer: Callable | None = None,
    tick: Callable[[], None] | None = None,
    every: float = 1.0,
) -> Iterator[tuple[Any, Any]]:
    """Yields ``(item, result)`` as each item finishes; ``result`` is ``function(item)``, or a
    ``WorkerDied`` / ``WorkerError`` instance. ``function`` and ``initializer`` must be
    importable module-level functions, or partials of them (they are sent to the workers by
    name). ``tick()`` is called from this thread about every ``every`` seconds while it waits:
    progress shown without a thread of its own (another thread would make the workers
    spawned, see ``start_method``)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    workers = _Workers(function, initializer, list(items)[::-1], tasks_per_worker)
    try:
        for _ in range(min(jobs, len(workers.pending))):
            workers.feed(workers.start())
        while any(w.busy for w in workers.running):
            busy = [w for w in workers.running if w.busy]
            ready = set(
                connection.wait(
                    [w.conn for w in busy] + [w.process.sentinel for w in busy],
                    timeout=every if tick is not None else None,
                )
            )
            if tick is not None:
                tick()
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    yield workers.collect(worker)
    finally:
        for worker in list(workers.running):
            _stop(worker)


class _Workers:
    """The running workers and the items not yet given out (``pending``: ``pop()`` takes the
    next in order)."""

    def __init__(
        self,
        function: Callable,
        initializer: Callable | None,
        pending: list,
        tasks_per_worker: int | None,
    ):
        self.function, self.initializer = function, initializer
        self.pending, self.tasks_per_worker = pending, tasks_per_worker
        self.running: list[_Worker] = []

    def start(self) -> _Worker:
        context: Any = multiprocessing.get_context(start_method())
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(child, self.function, self.initializer),
            daemon=True,
            name="graphfold-worker",
        )
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self.running.append(worker)
        return worker

    def feed(self, worker: _Worker) -> None:
        """Gives ``worker`` the next item, or retires it (starting a fresh one if needed)."""
        worn_out = self.tasks_per_worker is not None and worker.done >= self.tasks_per_worker
        if self.pending and not worn_out:
            worker.item, worker.busy = self.pending.pop(), True
            worker.conn.send(worker.item)
            return
        self.retire(worker)
        if self.pending:
            self.feed(self.start())

    def retire(self, worker: _Worker) -> None:
        self.running.remove(worker)
        with contextlib.suppress(OSError):
            worker.conn.send(None)
        worker.process.join(timeout=30)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()

    def collect(self, worker: _Worker) -> tuple[Any, Any]:
        """``(item, result)`` of a worker that answered or died; it gets the next item (a dead
        one is replaced)."""
        item, result = worker.item, _receive(worker)
        worker.item, worker.busy = None, False
        if isinstance(result, WorkerDied):
            self.running.remove(worker)
            worker.conn.close()
            if self.pending:
                self.feed(self.start())
        else:
            worker.done += 1
            self.feed(worker)
        return item, result


def start_method() -> str:
    """ "fork" while forking this process is safe for TensorFlow (its runtime not started, no
    other Python thread), else "spawn"."""
    if threading.active_count() > 1 or sys.platform != "linux":
        return "spawn"
    if "tensorflow" in sys.modules:
        from graphfold.tf_private import runtime_started

        if runtime_started():
            return "spawn"
    return "fork"


def _receive(worker: _Worker):
    """The worker's answer, or ``WorkerDied`` when it exited without one."""
    try:
        if worker.conn.poll():
            ok, value = worker.conn.recv()
            return value if ok else WorkerError(value)
    except (EOFError, OSError):
        pass
    worker.process.join()
    return WorkerDied(worker.process.exitcode)


def _stop(worker: _Worker) -> None:
    """Ends a worker now (SIGTERM: it exits through its ``finally`` blocks), then waits."""
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(timeout=30)
        if worker.process.is_alive():
            worker.process.kill()
    worker.process.join()
    worker.conn.close()


def _serve(conn, function: Callable, initializer: Callable | None) -> None:
    """A worker's loop: an item in, ``(True, result)`` or ``(False, error)`` out; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if initializer is not None:
        initializer()
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            answer = (True, function(item))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this item's error
            lines = str(exc).strip().splitlines()
            answer = (False, f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))
        conn.send(answer)


def _exit_cleanly(_signum, _frame) -> None:
    """SIGTERM raises SystemExit, so that ``finally`` blocks (temporary directories) run."""
    sys.exit(143)
