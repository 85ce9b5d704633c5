"""How the command line shows progress events: on a terminal a ``rich`` spinner below the lines
with the running stage and its elapsed time; elsewhere (a log file, a CI job) plain lines, and
one more every ``every`` seconds while a stage runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from graphfold.progress import StageStarted


class Heartbeat:
    """``show(text, stage)`` prints a progress line; with ``stage`` (a ``StageStarted``) it starts
    that stage (ending the previous one). ``stop()`` ends the running stage."""

    def __init__(self, stream: TextIO, prefix: Callable[[], str], every: float = 10.0):
        self.stream, self.prefix, self.every = stream, prefix, every
        self.terminal = bool(getattr(stream, "isatty", lambda: False)())
        self._console: Any = None
        self._status: Any = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def show(self, text: str, stage: StageStarted | None = None) -> None:
        if self.terminal:
            if self._console is None:
                from rich.console import Console

                self._console = Console(file=self.stream, highlight=False, markup=False)
            self._console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)
        if stage is not None:
            self.stop()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._tick, args=(stage,), daemon=True)
            if self.terminal:
                self._status = self._console.status(stage.text)
                self._status.start()
            self._thread.start()

    def _tick(self, stage: StageStarted) -> None:
        start = time.perf_counter()
        every = 1.0 if self.terminal else self.every
        while not self._done.wait(every):
            seconds = time.perf_counter() - start
            if self._status is not None:
                self._status.update(f"{stage.text} ({seconds:.0f} s)")
            else:
                print(
                    f"{self.prefix()}   ... still {stage.doing} ({seconds:.0f} s)",
                    file=self.stream,
                    flush=True,
                )

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._status is not None:
            self._status.stop()
            self._status = None
