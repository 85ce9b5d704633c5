"""Every table graphfold prints, in one place: the per-layer and op-count tables of a report,
and the CLI's per-signature and verification sections. Plain text, aligned columns (the tables
themselves: ``graphfold.tables``)."""

from __future__ import annotations

from graphfold.tables import entry_table, format_table


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
            console.print(
                "(where each one went: graphfold optimize --verbose, or graphfold inspect)"
            )
        console.print()
        console.print(_indent(report.op_table()))
        for note in report.notes:
            if key in result.unchanged and note.startswith("signature copied through"):
                continue
            console.print(f"note: {note}")
        console.print()


def same_as(result) -> dict[str, str]:
    """key -> the first key that is the same function (itself if none): the result's own
    answer (``saved_model.same_functions``, stored as ``result.same_as``)."""
    return {key: result.first(key) for key in result}


def render_verification(result, console) -> None:
    from graphfold.convert import tolerance as tolerance_
    from graphfold.convert.noise import INCONCLUSIVE_FLOOR, NOISE_MULTIPLE

    for note in getattr(result, "notes", []):
        console.print(f"note: {note}")
    if not result.verification:
        return
    rows = [
        ("signature", "status", "max abs err", "max rel err", "tolerance", "noise floor", "inputs")
    ]
    for key, check in sorted(result.verification.items()):
        inputs = ", ".join(f"{k}{list(v)}" for k, v in check.inputs.items())
        floor = "-" if check.noise_floor is None else f"{check.noise_floor:.3g}"
        if check.status == "skipped":
            rows.append((key, "NOT VERIFIED", "-", "-", "-", "-", check.reason or ""))
        else:
            status = {"inconclusive": "INCONCLUSIVE", "failed": "failed"}.get(check.status) or (
                "ok (noise)" if check.noise_floor is not None else "ok"
            )
            limits = sorted({o.tolerance for o in check.outputs if o.tolerance is not None})
            shown = "/".join(f"{t:g}" for t in limits) or "-"
            where = f"{check.source}: {inputs}" + (
                f" ({check.shape_note})" if check.shape_note else ""
            )
            rows.append(
                (key, status, f"{check.max_abs:.3g}", f"{check.max_rel:.3g}", shown, floor, where)
            )
    given = {c.tolerance for c in result.verification.values()}
    tolerance = "relative tolerance " + (
        f"{given.pop():g}"
        if len(given) == 1 and None not in given
        else f"by precision: {tolerance_.describe()}"
    )
    console.print(
        f"verification ({tolerance}; an error within {NOISE_MULTIPLE:g}x the noise "
        f"floor is accepted, INCONCLUSIVE when that floor is over "
        f"{INCONCLUSIVE_FLOOR:g}):"
    )
    console.print(_indent(format_table(rows)))
    for key, check in sorted(result.verification.items()):
        if check.status in ("failed", "inconclusive") or (check.status == "ok" and check.reason):
            console.print(f"  {key}: {check.reason}")
    console.print()


def render_scan(result, console, always: bool = True) -> None:
    """The ops reaching outside the graph (``graphfold.convert.scan``) per signature, and in what
    loading runs: op, category, node, function, why. Nothing when none and not ``always``."""
    scan = getattr(result, "scan", None)
    if scan is None:
        return
    scopes = [(key, scan.signatures[key]) for key in sorted(scan.signatures)]
    scopes.append(("(loading)", scan.loading))
    rows = [("signature", "op", "category", "node", "function", "why")]
    for key, findings in scopes:
        rows += [
            (key, f.op, f.category, f.node, f.function or "(graph)", f.reason) for f in findings
        ]
    if len(rows) == 1:
        if always:
            console.print(
                f"ops reaching outside the graph (file, network, Python, print, "
                f"unregistered): none in {len(scan.signatures)} signature(s) or in "
                f"what loading runs"
            )
            console.print()
        return
    console.print(
        "ops reaching outside the graph (graphfold runs them only when allowed: "
        "--allow-ops OP,...):"
    )
    console.print(_indent(format_table(rows)))
    console.print()


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())
