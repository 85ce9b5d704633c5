"""Progress as typed events.

The library emits events (``optimize_saved_model(..., progress=callback)`` calls ``callback``
with each); the command line renders them. Every event's ``text`` (and ``str(event)``) is the
line the command prints, so ``progress=print`` gives readable lines:

- ``StageStarted(stage, detail)``: a stage begins ("load", "fold", "write", "verify",
  "rename", ...); ``verb`` says what it does ("freezing and folding").
- ``SignatureFolded(key, summary, ...)``, ``SameFunction(key, first)``,
  ``NotOptimized(key, reason)``: what the fold stage found per signature.
- ``SignatureChecked(verification)``: one signature compared.
- ``Note(text)``: anything else worth a line.

The command line shows them with ``heartbeat.Heartbeat``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphfold.verification import Verification

# What each stage does, as the progress line and the heartbeat say it.
VERBS = {
    "read": "reading",
    "load": "loading",
    "fold": "freezing and folding",
    "write": "writing",
    "verify": "verifying",
    "rename": "moving it into place:",
    "build": "building",
    "save": "saving",
    "time": "timing",
}


class Event:
    """A progress event; ``text`` is its line."""

    @property
    def text(self) -> str:  # overridden by every event
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class StageStarted(Event):
    """A stage begins: ``stage`` (a key of ``VERBS``) on ``detail`` (what it works on)."""

    stage: str
    detail: str = ""
    verb: str | None = None  # None: ``VERBS[stage]``

    @property
    def doing(self) -> str:
        """What the stage does, in words (the heartbeat's "still ...")."""
        return (self.verb or VERBS.get(self.stage, self.stage)).rstrip(":")

    @property
    def text(self) -> str:
        return " ".join(
            p for p in (self.verb or VERBS.get(self.stage, self.stage), self.detail) if p
        )


@dataclasses.dataclass(frozen=True)
class SignatureFolded(Event):
    """A signature frozen and folded: its report's summary and the seconds per step."""

    key: str
    summary: str
    freeze: float = 0.0
    fold: float = 0.0
    reimport: float | None = None  # None: nothing was re-imported (inspect)

    @property
    def text(self) -> str:
        tail = "" if self.reimport is None else f", re-import {self.reimport:.2f}s"
        return (
            f"  '{self.key}': {self.summary} (freeze {self.freeze:.2f}s, fold "
            f"{self.fold:.2f}s{tail})"
        )


@dataclasses.dataclass(frozen=True)
class SameFunction(Event):
    """``key`` is the same function as ``first``: folded once."""

    key: str
    first: str

    @property
    def text(self) -> str:
        return f"  '{self.key}': the same function as '{self.first}' (folded once)"


@dataclasses.dataclass(frozen=True)
class NotOptimized(Event):
    """``key`` is copied through unchanged, for ``reason``."""

    key: str
    reason: str

    @property
    def text(self) -> str:
        return f"  '{self.key}' NOT OPTIMIZED (copied through unchanged): {self.reason}"


@dataclasses.dataclass(frozen=True)
class SignatureChecked(Event):
    """One signature compared (or held back, not run): a ``verify.Verification``."""

    verification: Verification

    @property
    def text(self) -> str:
        return f"  {self.verification.line()}"


@dataclasses.dataclass(frozen=True)
class Note(Event):
    """A line that is neither a stage nor a signature's outcome."""

    message: str

    @property
    def text(self) -> str:
        return self.message


Progress = Callable[[Event], None]


def silent(_event: Event) -> None:
    """A ``progress`` that shows nothing."""


def as_event(item: Event | str) -> Event:
    """An event, or a plain string as a ``Note``."""
    return item if isinstance(item, Event) else Note(str(item))
