"""What an optimize (or inspect, or verify) run found: ``SavedModelResult``.

Built by the stages of ``saved_model.optimize_saved_model`` from the values they return; read by
the command line (``render``), the repository runner (``repo_task``) and users. It reads like a
mapping signature key -> ``FoldReport`` (``result["serving_default"]``, ``sorted(result)``,
``result.items()``): read-only views onto ``reports``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from graphfold.fold.report import FoldReport

if TYPE_CHECKING:
    from graphfold.convert.scan import Scan
    from graphfold.convert.verify import Verification


@dataclasses.dataclass
class SavedModelResult:
    """Every requested signature's ``FoldReport`` (``reports``), plus what happened.

    ``same_as``: key -> the first requested key whose signature is the same function (itself
    if none; ``saved_model.same_functions``): folded once, checked once, counted once.
    ``unchanged``: key -> why that requested signature was copied through unchanged.
    ``verification``: key -> ``Verification`` (empty when verification was off).
    ``seconds``: time per stage. ``notes``: what a user should know. ``weights``: "constants" or
    "variables", as written. ``scan``: ops reaching outside the graph (``graphfold.convert.scan``).
    ``written``: whether ``dst`` now holds the result.
    """

    src: str
    dst: str | None
    tags: tuple[str, ...]
    reports: dict[str, FoldReport] = dataclasses.field(default_factory=dict)
    same_as: dict[str, str] = dataclasses.field(default_factory=dict)
    unchanged: dict[str, str] = dataclasses.field(default_factory=dict)
    verification: dict[str, Verification] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    all_signatures: list[str] = dataclasses.field(default_factory=list)
    weights: str | None = None
    scan: Scan | None = None
    written: bool = False

    # ---- a read-only mapping key -> FoldReport ---------------------------------------------
    def __getitem__(self, key: str) -> FoldReport:
        return self.reports[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def __contains__(self, key) -> bool:
        return key in self.reports

    def keys(self):
        return self.reports.keys()

    def values(self):
        return self.reports.values()

    def items(self):
        return self.reports.items()

    def get(self, key: str, default=None):
        return self.reports.get(key, default)

    # ---- what it says ------------------------------------------------------------------------
    def first(self, key: str) -> str:
        """The key whose report ``key`` shares (itself unless it is the same function as an
        earlier one)."""
        return self.same_as.get(key, key)

    @property
    def rewritten(self) -> list[str]:
        """The requested signatures that were rewritten (not copied through)."""
        return sorted(k for k in self.reports if k not in self.unchanged)

    @property
    def verified(self) -> bool:
        """Whether something was rewritten and every rewritten signature verified "ok"."""
        checks = [self.verification.get(k) for k in self.rewritten]
        return bool(checks) and all(c is not None and c.status == "ok" for c in checks)

    @property
    def not_verified(self) -> list[str]:
        """Signatures that could not be checked (their original fails on random inputs)."""
        return sorted(k for k, v in self.verification.items() if v.status == "skipped")

    @property
    def inconclusive(self) -> list[str]:
        """Signatures checked only within a noise floor too large to mean anything."""
        return sorted(k for k, v in self.verification.items() if v.status == "inconclusive")

    def totals(self) -> tuple[int, int, int, int]:
        """(batch norms, folded, ops before, ops after) over distinct functions (Keras' `serve`
        and `serving_default` count once)."""
        bns = folded = before = after = 0
        for key, report in self.reports.items():
            if self.first(key) != key:
                continue
            bns += len(report.batch_norms)
            folded += len(report.folded)
            before += sum(report.ops_before.values())
            after += sum(report.ops_after.values())
        return bns, folded, before, after

    def to_dict(self) -> dict:
        signatures = {}
        for key, report in self.reports.items():
            check = self.verification.get(key)
            signatures[key] = {
                "rewritten": key not in self.unchanged,
                "unchanged_reason": self.unchanged.get(key),
                "same_as": self.first(key),
                "report": report.to_dict(),
                "verification": check.to_dict() if check else None,
            }
        return {
            "src": self.src,
            "dst": self.dst,
            "tag_set": list(self.tags),
            "written": self.written,
            "all_signatures": list(self.all_signatures),
            "not_verified": self.not_verified,
            "inconclusive": self.inconclusive,
            "signatures": signatures,
            "notes": list(self.notes),
            "weights": self.weights,
            "outside_ops": self.scan.to_dict() if self.scan else None,
            "seconds": dict(self.seconds),
        }
