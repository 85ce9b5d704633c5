"""Check that two callables compute the same thing, on random inputs built from input specs.

Floats are standard normal, integers uniform in ``INT_RANGE``, bools fair coins, strings drawn from
a few short words. Unknown dimensions take realistic sizes (``input_shapes.py``: the batch
``batch``, an image's height and width 224, ...); when the reference function rejects them,
smaller ones, and the check says so. Every output is compared: max absolute error ``max|a-b|``
and relative error ``max|a-b| / max|a|``, against a tolerance that follows the precision of the
output and of the computation unless one is given (``tolerance.py``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf

from graphfold.convert import input_shapes as shapes_
from graphfold.convert import tolerance as tolerance_
from graphfold.verification import OutputError, Verification

INT_RANGE = (0, 4)  # integers are drawn from [0, 4): safe as small indices
WORDS = (b"a", b"b", b"c", b"graphfold")


def input_specs(fn) -> dict[str, tf.TensorSpec]:
    """Keyword name -> TensorSpec of a signature function (a ConcreteFunction taking kwargs)."""
    args, kwargs = fn.structured_input_signature
    if args:
        raise ValueError("signature functions take keyword arguments only")
    return dict(kwargs)


def random_inputs(
    specs: dict[str, tf.TensorSpec],
    *,
    batch: int = 1,
    seed: int = 0,
    shapes: dict[str, tuple] | None = None,
) -> dict[str, tf.Tensor]:
    """Random tensors matching ``specs`` (see the module docstring for the distributions), of
    the given ``shapes`` where there is one, else of ``input_shapes.default_shape``."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    return {
        name: random_tensor(spec, rng, shapes.get(name) or shapes_.default_shape(spec, batch)[0])
        for name, spec in sorted(specs.items())
    }


def random_tensor(spec: tf.TensorSpec, rng: np.random.Generator, shape: tuple) -> tf.Tensor:
    dtype = tf.as_dtype(spec.dtype)
    if dtype.is_floating:
        return tf.cast(tf.constant(rng.standard_normal(shape)), dtype)
    if dtype.is_complex:
        real, imag = rng.standard_normal(shape), rng.standard_normal(shape)
        return tf.cast(tf.constant(real + 1j * imag), dtype)
    if dtype == tf.bool:
        return tf.constant(rng.integers(0, 2, shape).astype(bool))
    if dtype.is_integer:
        return tf.constant(rng.integers(*INT_RANGE, shape).astype(dtype.as_numpy_dtype))
    if dtype == tf.string:
        return tf.constant(
            rng.choice(np.array(WORDS, dtype=object), shape).astype(bytes)
            if shape
            else WORDS[int(rng.integers(len(WORDS)))]
        )
    raise TypeError(f"cannot build random inputs of dtype {dtype.name}")


def compare(want, got) -> tuple[float, float]:
    """(max |a-b|, max |a-b| / max |a|) of reference ``want`` and candidate ``got``.

    NaNs in the same places count as equal. Strings compare for equality (error 0 or inf).
    When ``want`` is all zero the relative error is the absolute error.
    """
    a, b = np.asarray(want), np.asarray(got)
    if a.shape != b.shape:
        raise ValueError(f"shape {b.shape} differs from the original's {a.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        err = 0.0 if np.array_equal(a, b) else float("inf")
        return err, err
    if a.dtype.kind == "c" or b.dtype.kind == "c":
        a, b = a.astype(np.complex128), b.astype(np.complex128)
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | (a == b), 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    scale = np.abs(a[np.isfinite(a)])
    scale = float(scale.max()) if scale.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


@dataclasses.dataclass
class Recorded:
    """The reference's side of a check (``record``): the ``Verification`` so far (inputs,
    shapes, precision; "skipped" when the reference could not be run) and, per input run,
    ``(args, kwargs, outputs)``. ``replay`` compares a candidate with it: the reference need
    not be held meanwhile."""

    check: Verification
    runs: list = dataclasses.field(default_factory=list, repr=False)
    problem: str | None = None  # why the reference failed on a given input
    given: bool = False  # run on given inputs (``feeds``), not random ones


def verify(
    name: str,
    reference,
    candidate,
    *,
    tolerance: float | None = None,
    batch: int = 1,
    seed: int = 0,
    feeds: list[dict] | None = None,
    source: str | None = None,
    shapes: dict[str, tuple] | None = None,
    image_size: int = shapes_.IMAGE_SIZE,
) -> Verification:
    """Runs ``reference`` and ``candidate`` (ConcreteFunctions with the same inputs: a
    SavedModel's signature functions take keyword arguments) on the same random inputs and
    compares every output. ``feeds``: run these keyword-argument dicts instead (real inputs,
    described by ``source``); the errors are the largest over all of them. ``shapes``: input
    name -> the shape of its random values (else ``input_shapes.default_shape``, images
    ``image_size`` high and wide). ``tolerance``: None follows the precision (``tolerance.py``).
    ``record`` then ``replay``: the same in two steps."""
    return replay(
        record(
            name,
            reference,
            tolerance=tolerance,
            batch=batch,
            seed=seed,
            feeds=feeds,
            source=source,
            shapes=shapes,
            image_size=image_size,
        ),
        candidate,
    )


def record(
    name: str,
    reference,
    *,
    tolerance: float | None = None,
    batch: int = 1,
    seed: int = 0,
    feeds: list[dict] | None = None,
    source: str | None = None,
    shapes: dict[str, tuple] | None = None,
    image_size: int = shapes_.IMAGE_SIZE,
) -> Recorded:
    """The reference's outputs on the inputs ``verify`` would run (its arguments), to
    ``replay`` against a candidate later."""
    import time

    clock = time.perf_counter()
    result = Verification(name, "ok", tolerance)
    if tolerance is None:
        result.computation = tolerance_.computation_dtypes(reference)
    if feeds is not None:
        recorded = _record_feeds(result, reference, feeds, source or "given inputs")
    else:
        recorded = Recorded(result)
        try:
            want, args, kwargs = _run_on_random_inputs(
                result, reference, batch, seed, image_size, shapes or {}
            )
            recorded.runs.append((args, kwargs, want))
        except _NotRun as why:
            result.status, result.reason = "skipped", str(why)
    result.seconds = time.perf_counter() - clock
    return recorded


def _record_feeds(result: Verification, reference, feeds: list[dict], source: str) -> Recorded:
    result.source = source
    result.fed = list(feeds)
    recorded = Recorded(result, given=True)
    for i, feed in enumerate(feeds):
        kwargs = {k: tf.constant(v) for k, v in feed.items()}
        if i == 0:
            result.inputs = {k: tuple(t.shape.as_list()) for k, t in sorted(kwargs.items())}
        try:
            recorded.runs.append(((), kwargs, reference(**kwargs)))
        except Exception as exc:  # noqa: BLE001 - the given inputs do not fit the original
            recorded.problem = f"the original fails on {source} #{i}: {_first_line(exc)}"
            break
    return recorded


def replay(recorded: Recorded, candidate) -> Verification:
    """``recorded.check`` completed: ``candidate`` run on the recorded inputs, every output
    compared with the reference's."""
    import time

    clock = time.perf_counter()
    result = recorded.check
    if result.status == "skipped":
        return result
    problems, numeric_only = [], True
    for i, (args, kwargs, want) in enumerate(recorded.runs):
        try:
            got = candidate(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the candidate is a failed check
            on = f" on {result.source} #{i}" if recorded.given else ""
            result.status = "failed"
            result.reason = f"the optimized function fails{on}: {_first_line(exc)}"
            break
        problem = _compare_outputs(result, want, got)
        if problem:
            problems.append(problem)
            numeric_only = numeric_only and result.mismatch
    if recorded.problem and result.status == "ok":
        result.status, result.reason = "failed", recorded.problem
        result.reference_failed = True
    result.mismatch = bool(problems) and numeric_only and result.status == "ok"
    if result.status == "ok" and problems:
        result.status = "failed"
        on = f"on {result.source}: " if recorded.given else ""
        result.reason = on + "; ".join(dict.fromkeys(problems))
    result.seconds += time.perf_counter() - clock
    return result


class _NotRun(Exception):
    """Why the reference could not be run on random inputs."""


def _run_on_random_inputs(
    result: Verification, reference, batch: int, seed: int, image: int, given: dict[str, tuple]
):
    """``(outputs, args, kwargs)`` of ``reference`` on random inputs of the usual sizes, else of
    the fallback sizes (the first it accepts); the shapes, why they are smaller than usual and
    the inputs go into ``result``. Python values of the signature (``training=False``) are
    passed as they are."""
    structure = reference.structured_input_signature
    atoms = tf.nest.flatten(structure)
    if any(isinstance(a, tf.TypeSpec) and not isinstance(a, tf.TensorSpec) for a in atoms):
        raise _NotRun("an input is not a plain tensor")
    specs = input_labels(reference)
    first_error, planned = None, []
    for size in (None,) + shapes_.FALLBACK_SIZES:
        plan = _plan_shapes(specs, batch, size, image, given)
        if plan in planned:
            continue
        planned.append(plan)
        rng = np.random.default_rng(seed)
        try:
            values = {label: random_tensor(specs[label], rng, plan[label][0]) for label in specs}
        except TypeError as exc:
            raise _NotRun(str(exc)) from None
        fed = iter(values.values())
        args, kwargs = tf.nest.pack_sequence_as(
            structure, [next(fed) if isinstance(a, tf.TensorSpec) else a for a in atoms]
        )
        try:
            want = reference(*args, **kwargs)
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            first_error = first_error or exc
            continue
        result.inputs = {label: tuple(t.shape.as_list()) for label, t in values.items()}
        notes = [note for _, note in plan.values() if note]
        if size is not None:
            notes.append(
                f"unknown dims {size}: the original rejects the usual sizes "
                f"({_first_line(first_error)})"
            )
        result.shape_note = "; ".join(dict.fromkeys(notes)) or None
        result.fed = [kwargs] if not args else [(args, kwargs)]
        return want, args, kwargs
    raise _NotRun(f"the original fails on random inputs: {_first_line(first_error)}")


def _plan_shapes(
    specs: dict[str, tf.TensorSpec],
    batch: int,
    size: int | None,
    image: int,
    given: dict[str, tuple],
) -> dict[str, tuple]:
    """label -> (shape, note): the given shape, else the usual size (``size`` None) or ``size``
    for every unknown non-batch dimension."""
    plan: dict[str, tuple[tuple, str | None]] = {}
    for label, spec in specs.items():
        if label in given:
            plan[label] = (tuple(given[label]), None)
        elif size is None:
            plan[label] = shapes_.default_shape(spec, batch, image=image)
        else:
            plan[label] = (shapes_.uniform_shape(spec, batch, size), None)
    return plan


def _compare_outputs(result: Verification, want, got) -> str | None:
    """Adds (or widens) ``result.outputs`` with the errors of ``got`` against ``want``; returns
    what is wrong, or None. Sets ``result.mismatch`` when only tolerances were exceeded."""
    want_flat, got_flat = _named(want), _named(got)
    if set(want_flat) != set(got_flat):
        result.mismatch = False
        return f"outputs {sorted(got_flat)} differ from the original's {sorted(want_flat)}"
    known = {o.name: o for o in result.outputs}
    bad, numeric_only = [], True
    for key in sorted(want_flat):
        a, b = want_flat[key], got_flat[key]
        problem = None
        try:
            max_abs, max_rel = compare(a.numpy(), b.numpy())
        except ValueError as exc:
            max_abs = max_rel = float("inf")
            problem = f"{key}: {exc}"
        if problem is None and a.dtype != b.dtype:
            problem = f"{key}: dtype {b.dtype.name} differs from the original's {a.dtype.name}"
        if problem is None and a.dtype == tf.string and max_abs > 0:
            problem = f"{key}: strings differ from the original's"
        numeric_only = numeric_only and problem is None
        limit, why = (
            (result.tolerance, "given")
            if result.tolerance is not None
            else tolerance_.default(a.dtype, result.computation)
        )
        if key in known:
            known[key].max_abs = max(known[key].max_abs, max_abs)
            known[key].max_rel = max(known[key].max_rel, max_rel)
        else:
            result.outputs.append(
                OutputError(key, tuple(a.shape.as_list()), a.dtype.name, max_abs, max_rel, limit)
            )
        if problem is None and not max_rel <= limit:
            problem = (
                f"{key}: relative error {max_rel:.3g} > tolerance {limit:g} ({why}; "
                f"{tolerance_.how_to_set()})"
            )
        if problem:
            bad.append(problem)
    result.mismatch = bool(bad) and numeric_only
    return "; ".join(bad) if bad else None


def _labels(args_specs, kwargs_specs) -> list[str]:
    """A distinct name per flat input, in flat order: keyword names, else TensorSpec names,
    else argN."""
    labels = []
    for i, spec in enumerate(tf.nest.flatten(args_specs)):
        name = getattr(spec, "name", None) or f"arg{i}"
        labels.append(name if name not in labels else f"arg{i}")
    for key in sorted(kwargs_specs or {}):  # tf.nest flattens a dict in key order
        parts = tf.nest.flatten(kwargs_specs[key])
        labels.extend([key] if len(parts) == 1 else [f"{key}/{i}" for i in range(len(parts))])
    return labels


def input_labels(fn) -> dict[str, tf.TensorSpec]:
    """label -> TensorSpec of every tensor input of a ConcreteFunction (the names
    ``input_shapes`` and the verification line use)."""
    args_specs, kwargs_specs = fn.structured_input_signature
    atoms = tf.nest.flatten((args_specs, kwargs_specs))
    return {
        label: a
        for label, a in zip(_labels(args_specs, kwargs_specs), atoms)
        if isinstance(a, tf.TensorSpec)
    }


def _named(outputs) -> dict[str, tf.Tensor]:
    """Every tensor of ``outputs`` by name: a dict's keys (``key/<i>`` for the leaves of a
    structure under a key), else ``output_<i>`` in flat order; None and Python values are left
    out."""
    if isinstance(outputs, dict):
        pairs: list[tuple[str, object]] = []
        for key in sorted(outputs):
            leaves = tf.nest.flatten(outputs[key])
            pairs += (
                [(key, outputs[key])]
                if isinstance(outputs[key], tf.Tensor)
                else [(f"{key}/{i}", leaf) for i, leaf in enumerate(leaves)]
            )
    else:
        pairs = [(f"output_{i}", t) for i, t in enumerate(tf.nest.flatten(outputs))]
    return {name: t for name, t in pairs if isinstance(t, tf.Tensor)}


def _first_line(exc) -> str:
    """``Type: first line``; for TensorFlow's "Graph execution error" the line that says what
    went wrong, and the node."""
    text = str(getattr(exc, "message", None) or exc).strip()
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if first.startswith("Graph execution error"):
        said = [
            line
            for line in lines[1:]
            if line.strip()
            and not line[0].isspace()
            and not line.startswith(("Detected at node", "<stack traces", "[["))
        ]
        node = re.search(r"Detected at node (\S+)", text)
        if said:
            first = said[0] + (f" (node {node.group(1)})" if node else "")
    return f"{type(exc).__name__}: {first}".rstrip(": ")
