"""What a rewrite did: one entry per batch-norm layer, and op counts before and after."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from graphfold.tables import entry_table, op_table

if TYPE_CHECKING:
    from graphfold.verification import Verification


@dataclasses.dataclass
class Entry:
    """One batch-norm layer (or another affine map the rewrite met)."""

    name: str  # user-facing name, e.g. "conv1_bn"
    form: str  # "FusedBatchNormV3", "decomposed (x*inv+offset)", "Mul", ...
    nodes: list[str]  # graph nodes of the A this layer belongs to
    folded: bool  # A disappeared entirely
    direction: str | None = None  # "forward" / "backward" / "split" (scale one way, shift
    #                                     the other); a partial fold: where the scale went
    absorbed_by: list[str] = dataclasses.field(default_factory=list)
    leaves: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None  # why not folded: "<blocker node>: <rule that failed>"
    blocker: str | None = None
    tried: dict[str, str] = dataclasses.field(default_factory=dict)  # direction -> blocker
    is_batch_norm: bool = True
    partial: bool = False  # the scale folded, the shift stays as one add (docs/folding.md §8)
    detail: str | None = None  # a partial or split fold: what folded where, what stayed


@dataclasses.dataclass
class FoldReport:
    entries: list[Entry]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    verification: Verification | None = None  # rewrite's own check, if it ran

    @property
    def batch_norms(self) -> list[Entry]:
        return [e for e in self.entries if e.is_batch_norm]

    @property
    def folded(self) -> list[Entry]:
        return [e for e in self.batch_norms if e.folded]

    @property
    def partial(self) -> list[Entry]:
        """Batch norms whose scale folded and whose shift stays as one add."""
        return [e for e in self.batch_norms if e.partial]

    @property
    def not_folded(self) -> list[Entry]:
        return [e for e in self.batch_norms if not e.folded and not e.partial]

    def count(self, direction: str) -> int:
        return sum(e.direction == direction for e in self.folded)

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def summary(self) -> str:
        """``N batch norms: F folded (a forward, b backward[, c split])[, P partial], U not
        folded``: full folds, partial folds (one add left each) and the rest, apart."""
        split = f", {self.count('split')} split" if self.count("split") else ""
        partial = f", {len(self.partial)} partial" if self.partial else ""
        return (
            f"{len(self.batch_norms)} batch norms: {len(self.folded)} folded "
            f"({self.count('forward')} forward, {self.count('backward')} backward{split})"
            f"{partial}, {len(self.not_folded)} not folded"
        )

    def to_dict(self) -> dict:
        return {
            "summary": {
                "batch_norms": len(self.batch_norms),
                "folded": len(self.folded),
                "folded_forward": self.count("forward"),
                "folded_backward": self.count("backward"),
                "folded_split": self.count("split"),
                "partial": len(self.partial),
                "not_folded": len(self.not_folded),
            },
            "entries": [dataclasses.asdict(e) for e in self.entries],
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "notes": list(self.notes),
            "seconds": dict(self.seconds),
            "verification": self.verification.to_dict() if self.verification else None,
        }

    def op_table(self) -> str:
        return op_table(self.ops_before, self.ops_after)

    def entry_table(self) -> str:
        return entry_table(self.entries)

    def __str__(self) -> str:
        parts = [self.summary(), "", self.entry_table(), "", self.op_table()]
        parts += [f"note: {n}" for n in self.notes]
        if self.verification is not None:
            parts.append(f"verification: {self.verification.line()}")
        return "\n".join(parts)
