"""Strict JSON of graphfold's documents (``--json``, ``--report``, the repository's records):
an infinite or NaN error is written as the string "inf" / "nan"; objects with ``to_dict`` are
written as that."""

from __future__ import annotations

import json


def dumps(document: dict) -> str:
    """Strict JSON: an infinite or NaN error is written as the string "inf" / "nan"."""
    return json.dumps(
        _strict(json.loads(json.dumps(document, default=_jsonable))), indent=2, allow_nan=False
    )


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
