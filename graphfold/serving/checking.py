"""Which inputs each signature is verified on, running the checks, and the warm-up records
written from them.

A signature is verified on, in this order of preference: the inputs the user gave (``--inputs``
/ ``--input_exprs``, API ``inputs=``) when they address it; else SRC's TF Serving warm-up records
that call it (the first ``WARMUP_VERIFIED`` of them); else random inputs (``verify.py``).
A signature whose original fails on random inputs and that has no real inputs is NOT VERIFIED.
``rewrite`` checks its own result the same way, on random inputs (``self_check.py``).
"""

from __future__ import annotations

import os

import numpy as np

from graphfold.convert import input_shapes as input_shapes_
from graphfold.convert import inputs as inputs_
from graphfold.convert import noise
from graphfold.convert.verify import (
    Recorded,
    Verification,
    input_specs,
    record,
    replay,
)
from graphfold.errors import BadInput
from graphfold.options import spelled, with_value
from graphfold.progress import SignatureChecked
from graphfold.serving import warmup

WARMUP_VERIFIED = 16  # warm-up records verified per signature


def fix_hint() -> str:
    """How to give real inputs, in the caller's words."""
    if spelled("inputs") == "inputs":
        return "give real inputs with inputs={key: array}"
    return "give real inputs with --inputs KEY=FILE.npy or --input_exprs 'KEY=[...]'"


def _bad(message: str):
    return BadInput(message)


def given_feeds(loaded, keys: list[str], given: dict | None) -> dict[str, list[dict]]:
    """key -> [checked inputs] for the signatures the given inputs address: every signature
    among ``keys`` that has all the given keys (with one signature, that one)."""
    if not given:
        return {}
    specs = {key: input_specs(loaded.signatures[key]) for key in keys}
    addressed = [k for k in keys if set(given) <= set(specs[k])] if len(keys) > 1 else keys
    if not addressed:
        listing = "; ".join(f"{k}: {', '.join(sorted(specs[k]))}" for k in keys)
        wanted = ", ".join(map(repr, sorted(given)))
        raise _bad(
            f"{spelled('inputs')}: no signature has input(s) {wanted} (inputs of each: {listing})"
        )
    return {key: [inputs_.check(key, specs[key], given)] for key in addressed}


def warmup_feeds(src: str, loaded) -> tuple[dict[str, list[dict]], list[str]]:
    """``(signature -> [checked inputs] of SRC's warm-up records (at most ``WARMUP_VERIFIED``
    each), notes)``. A record that calls a missing signature or feeds it the wrong inputs is
    ``BadInput``: TF Serving would refuse to load SRC too."""
    path = os.path.join(src, warmup.PATH)
    if not os.path.isfile(path):
        return {}, []
    if not warmup.available():
        return {}, [
            f"{warmup.PATH} not replayed in verification: it needs "
            f"tensorflow-serving-api (pip install 'graphfold[serving]')"
        ]
    requests, others = warmup.read(path)
    notes = []
    if others:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
        notes.append(
            f"{warmup.PATH}: {kinds} record(s) kept but not replayed (only predict_log records are)"
        )
    feeds: dict[str, list[dict]] = {}
    for request in requests:
        where = f"{path}: record {request.index}"
        if request.signature not in loaded.signatures:
            raise _bad(
                f"{where} calls signature '{request.signature}', which SRC does not "
                f"have (it has: {', '.join(sorted(loaded.signatures))})"
            )
        specs = input_specs(loaded.signatures[request.signature])
        checked = inputs_.check(request.signature, specs, request.inputs, origin=where)
        if len(feeds.setdefault(request.signature, [])) < WARMUP_VERIFIED:
            feeds[request.signature].append(checked)
    return feeds, notes


def shapes_for(loaded, keys: list[str], input_shapes: dict | None) -> dict[str, dict]:
    """signature -> {input: shape} of the shapes the user gave (``input_shapes.check``)."""
    specs = {key: input_specs(loaded.signatures[key]) for key in keys}
    return input_shapes_.check(input_shapes, specs)


def run_checks(
    reference,
    candidate,
    keys: list[str],
    given: dict[str, list[dict]],
    recorded: dict[str, list[dict]],
    *,
    tolerance: float | None,
    batch: int,
    progress,
    shapes: dict[str, dict] | None = None,
) -> dict[str, Verification]:
    """key -> Verification of ``candidate.signatures[key]`` against ``reference``'s, on the
    preferred inputs of each signature, with the noise floor measured on a failure. A signature
    verified on random inputs takes the ``shapes`` given for it, else those of the given inputs
    or warm-up records of the same name (``input_shapes.py``). The same as ``record_checks``
    then ``replay_checks``."""
    records = record_checks(
        reference, keys, given, recorded, tolerance=tolerance, batch=batch, shapes=shapes
    )
    return replay_checks(records, candidate, lambda key: reference.signatures[key], progress)


def record_checks(
    reference,
    keys: list[str],
    given: dict[str, list[dict]],
    recorded: dict[str, list[dict]],
    *,
    tolerance: float | None,
    batch: int,
    shapes: dict[str, dict] | None = None,
) -> dict[str, Recorded]:
    """key -> the original's side of its check (``verify.record``): its outputs on the inputs
    ``run_checks`` would choose, so that the original can be let go before the candidate is
    loaded (``replay_checks``)."""
    records = {}
    seen = input_shapes_.from_feeds({**recorded, **given})
    for key in keys:
        original = reference.signatures[key]
        if key in given:
            records[key] = record(
                key, original, tolerance=tolerance, feeds=given[key], source=spelled("inputs")
            )
        elif key in recorded:
            records[key] = record(
                key,
                original,
                tolerance=tolerance,
                feeds=recorded[key],
                source=f"warm-up records ({len(recorded[key])})",
            )
        else:
            hints = input_shapes_.compatible(seen, input_specs(original))
            records[key] = record(
                key,
                original,
                tolerance=tolerance,
                batch=batch,
                shapes={**hints, **(shapes or {}).get(key, {})},
            )
    return records


def replay_checks(
    records: dict[str, Recorded], candidate, original_of, progress
) -> dict[str, Verification]:
    """key -> the check of ``candidate.signatures[key]`` against the recorded outputs;
    ``original_of(key)``: the original's function, asked for only to measure a noise floor
    (``noise.judge``: a check failed on relative error alone)."""
    checks = {}
    for key, recorded_check in records.items():
        check = replay(recorded_check, candidate.signatures[key])
        if check.reference_failed:  # real inputs the original itself cannot run
            raise _bad(f"signature '{key}': {check.reason}")
        if check.status == "skipped":
            check.reason = f"{check.reason}; {fix_hint()}"
        if check.status == "failed" and check.mismatch and check.fed:  # noise.judge's case
            noise.judge(check, original_of(key))
        checks[key] = check
        progress(SignatureChecked(check))
    return checks


def as_arrays(feed: dict) -> dict[str, np.ndarray]:
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in feed.items()}


def single_examples(feed: dict[str, np.ndarray], specs: dict) -> list[dict[str, np.ndarray]]:
    """``feed`` split into requests of one example each when every input has an unknown leading
    (batch) dimension of the same size; else ``[feed]``."""
    sizes = {value.shape[0] if value.ndim else None for value in feed.values()}
    batched = all(spec.shape.rank and spec.shape[0] is None for spec in specs.values())
    size = sizes.pop() if len(sizes) == 1 else None
    if not batched or size is None:
        return [feed]
    return [{k: v[i : i + 1] for k, v in feed.items()} for i in range(size)]


def warmup_records(
    src: str, checks: dict[str, Verification], specs: dict[str, dict], count: int
) -> tuple[list[bytes] | None, list[str]]:
    """``(records, notes)``: SRC's warm-up records, then what is missing for ``count`` requests
    to each signature of ``specs`` (key -> its input specs): one example each, taken in turn
    from its verification inputs. None: nothing to add."""
    path = os.path.join(src, warmup.PATH)
    existing = warmup.read_raw(path) if os.path.isfile(path) else []
    per_signature: dict[str, int] = {}
    if existing:
        for request in warmup.read(path)[0]:
            per_signature[request.signature] = per_signature.get(request.signature, 0) + 1
    added: list[bytes] = []
    notes: list[str] = []
    for key in specs:
        check = checks.get(key)
        if check is None or check.status != "ok" or not check.fed:
            notes.append(
                f"no warm-up records written for '{key}': it was not verified, so "
                f"there are no inputs known to run ({fix_hint()})"
            )
            continue
        missing = count - per_signature.get(key, 0)
        feeds = [one for feed in check.fed for one in single_examples(as_arrays(feed), specs[key])]
        added.extend(warmup.build(key, feeds[i % len(feeds)]) for i in range(max(missing, 0)))
    if not added:
        return None, notes
    total = len(existing) + len(added)
    if total > warmup.MAX_RECORDS:
        raise _bad(
            f"{with_value('warmup', count)}: {total} records in all ({len(existing)} "
            f"from SRC, "
            f"{len(added)} new); TF Serving reads at most {warmup.MAX_RECORDS}"
        )
    notes.append(
        f"{warmup.PATH}: SRC's {len(existing)} record(s) kept, {len(added)} added"
        if existing
        else f"{warmup.PATH}: {len(added)} warm-up record(s) written"
    )
    return existing + added, notes
