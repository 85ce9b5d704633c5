"""Check that two callables compute the same thing, on random inputs built from input specs.

Floats are standard normal, integers uniform in ``INT_RANGE``, bools fair coins, strings drawn from
a few short words. An unknown leading (batch) dimension takes ``batch``; any other unknown
dimension takes 1, and, when the reference function rejects that, 8 and then 32. Every output is
compared: max absolute error ``max|a-b|`` and relative error ``max|a-b| / max|a|``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf

INT_RANGE = (0, 4)            # integers are drawn from [0, 4): safe as small indices
WORDS = (b"a", b"b", b"c", b"graphfold")
OTHER_DIMS = (1, 8, 32)       # sizes tried, in order, for unknown non-batch dimensions


@dataclasses.dataclass
class OutputError:
    name: str
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verification:
    """The outcome of comparing one signature: ``status`` is "ok", "failed" or "skipped"."""
    signature: str
    status: str
    tolerance: float
    inputs: dict[str, tuple] = dataclasses.field(default_factory=dict)   # name -> shape used
    outputs: list[OutputError] = dataclasses.field(default_factory=list)
    reason: str | None = None            # why it failed or was skipped
    seconds: float = 0.0
    source: str = "random inputs"        # or "--inputs", "warm-up records (n)"
    mismatch: bool = False               # failed only by relative errors over the tolerance
    noise_floor: float | None = None     # rel. error of the frozen, unfolded graph (see noise.py)
    fed: list = dataclasses.field(default_factory=list, repr=False)   # the inputs run
    reference_failed: bool = False       # the original itself fails on the given inputs

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.signature}: NOT VERIFIED ({self.reason})"
        shapes = ", ".join(f"{k}{list(v)}" for k, v in self.inputs.items())
        text = (f"{self.signature}: max abs error {self.max_abs:.3g}, max rel error "
                f"{self.max_rel:.3g} over {len(self.outputs)} output(s), {self.source} "
                f"{shapes}")
        if self.noise_floor is not None:
            text += f", noise floor {self.noise_floor:.3g}"
        if self.status == "failed":
            text += f" -- FAILED: {self.reason}"
        elif self.reason:
            text += f" -- {self.reason}"
        return text

    def to_dict(self) -> dict:
        return {"signature": self.signature, "status": self.status, "tolerance": self.tolerance,
                "max_abs": self.max_abs, "max_rel": self.max_rel,
                "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": [o.to_dict() for o in self.outputs], "reason": self.reason,
                "source": self.source, "noise_floor": self.noise_floor,
                "seconds": self.seconds}


def input_specs(fn) -> dict[str, tf.TensorSpec]:
    """Keyword name -> TensorSpec of a signature function (a ConcreteFunction taking kwargs)."""
    args, kwargs = fn.structured_input_signature
    if args:
        raise ValueError("signature functions take keyword arguments only")
    return dict(kwargs)


def random_inputs(specs: dict[str, tf.TensorSpec], *, batch: int = 1, other: int = 1,
                  seed: int = 0) -> dict[str, tf.Tensor]:
    """Random tensors matching ``specs`` (see the module docstring for the distributions)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in sorted(specs.items()):
        out[name] = random_tensor(spec, rng, batch=batch, other=other)
    return out


def concrete_shape(spec: tf.TensorSpec, batch: int = 1, other: int = 1) -> tuple:
    if spec.shape.rank is None:
        return (batch,)
    dims = spec.shape.as_list()
    return tuple((batch if i == 0 else other) if d is None else d for i, d in enumerate(dims))


def random_tensor(spec: tf.TensorSpec, rng: np.random.Generator, *, batch=1, other=1) -> tf.Tensor:
    shape = concrete_shape(spec, batch, other)
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
        return tf.constant(rng.choice(np.array(WORDS, dtype=object), shape).astype(bytes)
                           if shape else WORDS[int(rng.integers(len(WORDS)))])
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


def verify(name: str, reference, candidate, *, tolerance: float = 1e-5, batch: int = 1,
           seed: int = 0, feeds: list[dict] | None = None,
           source: str | None = None) -> Verification:
    """Runs ``reference`` and ``candidate`` (ConcreteFunctions with the same inputs: a
    SavedModel's signature functions take keyword arguments) on the same random inputs and
    compares every output. ``feeds``: run these keyword-argument dicts instead (real inputs,
    described by ``source``); the errors are the largest over all of them."""
    import time
    clock = time.perf_counter()
    result = Verification(name, "ok", tolerance)
    if feeds is not None:
        return _verify_feeds(result, reference, candidate, feeds, source or "given inputs",
                             clock)

    def done(status=None, reason=None):
        if status:
            result.status, result.reason = status, reason
        result.seconds = time.perf_counter() - clock
        return result

    args_specs, kwargs_specs = reference.structured_input_signature
    flat_specs = tf.nest.flatten((args_specs, kwargs_specs))
    if not all(isinstance(s, tf.TensorSpec) for s in flat_specs):
        return done("skipped", "an input is not a plain tensor")
    labels = _labels(args_specs, kwargs_specs)
    unknown_other = any(s.shape.rank is None or None in s.shape.as_list()[1:]
                        for s in flat_specs)
    want, error = None, None
    for other in (OTHER_DIMS if unknown_other else (1,)):
        rng = np.random.default_rng(seed)
        try:
            flat = [random_tensor(s, rng, batch=batch, other=other) for s in flat_specs]
        except TypeError as exc:
            return done("skipped", str(exc))
        args, kwargs = tf.nest.pack_sequence_as((args_specs, kwargs_specs), flat)
        try:
            want = reference(*args, **kwargs)
            break
        except (tf.errors.OpError, ValueError, TypeError) as exc:
            error = exc
    if want is None:
        return done("skipped", f"the original fails on random inputs: {_first_line(error)}")

    result.inputs = {label: tuple(t.shape.as_list()) for label, t in zip(labels, flat)}
    if not args:
        result.fed = [kwargs]
    try:
        got = candidate(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the candidate is a failed check
        return done("failed", f"the optimized function fails: {_first_line(exc)}")
    problem = _compare_outputs(result, want, got)
    return done("failed", problem) if problem else done()


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
        if problem is None and not max_rel <= result.tolerance:
            problem = f"{key}: relative error {max_rel:.3g} > tolerance {result.tolerance:g}"
        if problem:
            bad.append(problem)
        if key in known:
            known[key].max_abs = max(known[key].max_abs, max_abs)
            known[key].max_rel = max(known[key].max_rel, max_rel)
        else:
            result.outputs.append(OutputError(key, tuple(a.shape.as_list()), a.dtype.name,
                                              max_abs, max_rel))
    result.mismatch = bool(bad) and numeric_only
    return "; ".join(bad) if bad else None


def _verify_feeds(result: Verification, reference, candidate, feeds: list[dict], source: str,
                  clock: float) -> Verification:
    import time
    result.source = source
    result.fed = list(feeds)
    problems, numeric_only = [], True
    for i, feed in enumerate(feeds):
        kwargs = {k: tf.constant(v) for k, v in feed.items()}
        if i == 0:
            result.inputs = {k: tuple(t.shape.as_list()) for k, t in sorted(kwargs.items())}
        try:
            want = reference(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the given inputs do not fit the original
            result.status, result.reference_failed = "failed", True
            result.reason = f"the original fails on {source} #{i}: {_first_line(exc)}"
            break
        try:
            got = candidate(**kwargs)
        except Exception as exc:  # noqa: BLE001
            result.status, result.reason = "failed", \
                f"the optimized function fails on {source} #{i}: {_first_line(exc)}"
            break
        problem = _compare_outputs(result, want, got)
        if problem:
            problems.append(problem)
            numeric_only = numeric_only and result.mismatch
    result.mismatch = bool(problems) and numeric_only and result.status == "ok"
    if result.status == "ok" and problems:
        result.status = "failed"
        result.reason = f"on {source}: " + "; ".join(dict.fromkeys(problems))
    result.seconds = time.perf_counter() - clock
    return result


def _labels(args_specs, kwargs_specs) -> list[str]:
    """A name per flat input, in flat order: keyword names, else TensorSpec names, else argN."""
    labels = []
    for i, spec in enumerate(tf.nest.flatten(args_specs)):
        labels.append(spec.name or f"arg{i}")
    for key in sorted(kwargs_specs or {}):          # tf.nest flattens a dict in key order
        parts = tf.nest.flatten(kwargs_specs[key])
        labels.extend([key] if len(parts) == 1 else [f"{key}/{i}" for i in range(len(parts))])
    return labels


class _Skip(Exception):
    pass


def _named(outputs) -> dict[str, tf.Tensor]:
    if isinstance(outputs, dict):
        return dict(outputs)
    flat = tf.nest.flatten(outputs)
    return {f"output_{i}": t for i, t in enumerate(flat)}


def _first_line(exc) -> str:
    """``Type: first line``; for TensorFlow's "Graph execution error" the line that says what
    went wrong, and the node."""
    text = str(getattr(exc, "message", None) or exc).strip()
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if first.startswith("Graph execution error"):
        said = [line for line in lines[1:] if line.strip() and not line[0].isspace() and
                not line.startswith(("Detected at node", "<stack traces", "[["))]
        node = re.search(r"Detected at node (\S+)", text)
        if said:
            first = said[0] + (f" (node {node.group(1)})" if node else "")
    return f"{type(exc).__name__}: {first}".rstrip(": ")
