"""Plain-text tables: aligned columns, a report's op counts and its per-layer rows. Pure
formatting of plain data (no graphfold import): ``report.FoldReport.__str__`` and ``render`` both
use it."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text columns, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def op_table(ops_before: dict[str, int], ops_after: dict[str, int]) -> str:
    """Before/after op counts, changed rows first, in the manner of onnxsim."""
    ops = sorted(
        set(ops_before) | set(ops_after),
        key=lambda op: (ops_before.get(op, 0) == ops_after.get(op, 0), op),
    )
    rows = [("op", "before", "after")]
    for op in ops:
        rows.append((op, str(ops_before.get(op, 0)), str(ops_after.get(op, 0))))
    rows.append(("total", str(sum(ops_before.values())), str(sum(ops_after.values()))))
    return format_table(rows)


def entry_table(entries) -> str:
    """One row per batch norm (and per affine map left with a reason): folded which way into
    which layers, or why not."""
    rows = [("layer", "form", "folded", "into / reason")]
    for e in entries:
        if not e.is_batch_norm and not e.folded and e.reason is None:
            continue
        label = e.name if e.is_batch_norm else f"{e.name} (affine)"
        if e.folded or e.partial:
            into = e.detail or ", ".join(e.absorbed_by)
            if e.leaves:
                into += f" (leaves: {', '.join(e.leaves)})"
            rows.append((label, e.form, "partial" if e.partial else e.direction, into))
        else:
            rows.append((label, e.form, "no", e.reason or ""))
    return format_table(rows)
