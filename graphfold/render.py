"""Every table graphfold prints, in one place: the per-layer and op-count tables of a report,
and the CLI's per-signature and verification sections. Plain text, aligned columns."""

from __future__ import annotations

import json
import re


def format_table(rows: list[tuple[str, ...]]) -> str:
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
    ops = sorted(set(ops_before) | set(ops_after),
                 key=lambda op: (ops_before.get(op, 0) == ops_after.get(op, 0), op))
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


def render_reports(result, console, full: bool = True) -> None:
    """Per signature: summary, per-layer table (``full``; else only the layers not folded), op
    table. Signatures with the same graph are shown once."""
    first = same_as(result)
    for key in sorted(result):
        report = result[key]
        console.print(f"== signature '{key}' ==")
        if first[key] != key:
            console.print(f"same graph as '{first[key]}': {report.summary()}")
            console.print()
            continue
        if key in result.unchanged:
            console.print(f"NOT OPTIMIZED (copied through unchanged): {result.unchanged[key]}")
        console.print(report.summary())
        shown = report.entries
        if not full:
            shown = [e for e in report.entries if not e.folded and (e.is_batch_norm or e.reason)]
        if shown and (report.batch_norms or not full):
            console.print()
            console.print(_indent(entry_table(shown)))
        if not full and report.folded:
            console.print("(where each one went: graphfold optimize --verbose, or "
                          "graphfold inspect)")
        console.print()
        console.print(_indent(report.op_table()))
        for note in report.notes:
            if key in result.unchanged and note.startswith("signature copied through"):
                continue
            console.print(f"note: {note}")
        console.print()


def same_as(result) -> dict[str, str]:
    """key -> the first key (in sorted order) whose report is the same (itself if none)."""
    first, seen = {}, {}
    for key in sorted(result):
        fingerprint = json.dumps(
            {k: v for k, v in result[key].to_dict().items() if k != "seconds"},
            sort_keys=True, default=str) + str(result.unchanged.get(key))
        fingerprint = re.sub(r" at 0x[0-9a-fA-F]+", "", fingerprint)   # object addresses
        first[key] = seen.setdefault(fingerprint, key)
    return first


def render_verification(result, console) -> None:
    from graphfold import tolerance as tolerance_
    from graphfold.noise import INCONCLUSIVE_FLOOR, NOISE_MULTIPLE
    for note in getattr(result, "notes", []):
        console.print(f"note: {note}")
    if not result.verification:
        return
    rows = [("signature", "status", "max abs err", "max rel err", "tolerance", "noise floor",
             "inputs")]
    for key, check in sorted(result.verification.items()):
        inputs = ", ".join(f"{k}{list(v)}" for k, v in check.inputs.items())
        floor = "-" if check.noise_floor is None else f"{check.noise_floor:.3g}"
        if check.status == "skipped":
            rows.append((key, "NOT VERIFIED", "-", "-", "-", "-", check.reason or ""))
        else:
            status = {"inconclusive": "INCONCLUSIVE", "failed": "failed"}.get(check.status) or \
                ("ok (noise)" if check.noise_floor is not None else "ok")
            limits = sorted({o.tolerance for o in check.outputs if o.tolerance is not None})
            shown = "/".join(f"{t:g}" for t in limits) or "-"
            where = f"{check.source}: {inputs}" + (f" ({check.shape_note})"
                                                   if check.shape_note else "")
            rows.append((key, status, f"{check.max_abs:.3g}", f"{check.max_rel:.3g}", shown,
                         floor, where))
    given = {c.tolerance for c in result.verification.values()}
    tolerance = "relative tolerance " + (
        f"{given.pop():g}" if len(given) == 1 and None not in given else
        f"by precision: {tolerance_.describe()}")
    console.print(f"verification ({tolerance}; an error within {NOISE_MULTIPLE:g}x the noise "
                  f"floor is accepted, INCONCLUSIVE when that floor is over "
                  f"{INCONCLUSIVE_FLOOR:g}):")
    console.print(_indent(format_table(rows)))
    for key, check in sorted(result.verification.items()):
        if check.status in ("failed", "inconclusive") or (check.status == "ok" and check.reason):
            console.print(f"  {key}: {check.reason}")
    console.print()


def render_scan(result, console, always: bool = True) -> None:
    """The ops reaching outside the graph (``graphfold.scan``) per signature, and in what
    loading runs: op, category, node, function, why. Nothing when none and not ``always``."""
    scan = getattr(result, "scan", None)
    if scan is None:
        return
    scopes = [(key, scan.signatures[key]) for key in sorted(scan.signatures)]
    scopes.append(("(loading)", scan.loading))
    rows = [("signature", "op", "category", "node", "function", "why")]
    for key, findings in scopes:
        rows += [(key, f.op, f.category, f.node, f.function or "(graph)", f.reason)
                 for f in findings]
    if len(rows) == 1:
        if always:
            console.print(f"ops reaching outside the graph (file, network, Python, print, "
                          f"unregistered): none in {len(scan.signatures)} signature(s) or in "
                          f"what loading runs")
            console.print()
        return
    console.print("ops reaching outside the graph (graphfold runs them only when allowed: "
                  "--allow-ops OP,...):")
    console.print(_indent(format_table(rows)))
    console.print()


def totals(result) -> tuple[int, int, int, int]:
    """(batch norms, folded, ops before, ops after) over distinct signatures (Keras' `serve`
    and `serving_default` count once)."""
    bns = folded = before = after = 0
    first = same_as(result)
    for key, report in result.items():
        if first[key] != key:
            continue
        bns += len(report.batch_norms)
        folded += len(report.folded)
        before += sum(report.ops_before.values())
        after += sum(report.ops_after.values())
    return bns, folded, before, after


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


def dumps(document: dict) -> str:
    """Strict JSON: an infinite or NaN error is written as the string "inf" / "nan"."""
    return json.dumps(_strict(json.loads(json.dumps(document, default=_jsonable))), indent=2,
                      allow_nan=False)


def _strict(value):
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _jsonable(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
