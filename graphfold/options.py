"""Every option of an optimize run, declared once and checked once, in the API's words.

``Options`` is one frozen value: the Python API builds it from keyword arguments, the command
line from its flags (``cli.FLAGS`` maps each field to its flag), the repository runner uses it as
its "already done" key. Each kind of source (a SavedModel, a GraphDef file) declares the options
it honours (``SourceKind.supported``) and refuses any other that is given: an option either acts
or is refused, never dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from collections.abc import Iterable, Iterator

from graphfold.errors import BadInput
from graphfold.outside import OUTSIDE

WEIGHTS = ("auto", "constants", "variables")
MAX_WARMUP = 1000  # TF Serving reads at most this many warm-up records


_NO_VALUE = object()
_FLAGS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "graphfold_flags", default=None
)


def spelled(name: str) -> str:
    """What the caller calls the argument ``name``: the API's keyword, or, under the command
    line (``spoken_as``), its flag."""
    flags = _FLAGS.get()
    return flags.get(name, name) if flags else name


def with_value(name: str, value) -> str:
    """``name=value`` in the API's words (``warmup=0``), ``--flag value`` on the command line."""
    flags = _FLAGS.get()
    if flags and name in flags:
        return flags[name] if isinstance(value, bool) else f"{flags[name]} {value}"
    return f"{name}={value!r}"


@contextlib.contextmanager
def spoken_as(flags: dict[str, str]) -> Iterator[None]:
    """Messages name arguments by ``flags`` (argument -> command-line flag) meanwhile."""
    token = _FLAGS.set(dict(flags))
    try:
        yield
    finally:
        _FLAGS.reset(token)


class BadOption(BadInput):
    """An option refused: ``field``, its ``value`` (when the value is the problem) and what is
    wrong, in the caller's words (``warmup=0: ...`` from Python, ``--warmup 0: ...`` from the
    command line)."""

    def __init__(self, field: str, value, problem: str):
        self.field, self.value, self.problem = field, value, problem
        said = spelled(field) if value is _NO_VALUE else with_value(field, value)
        super().__init__(f"{said}: {problem}")


@dataclasses.dataclass(frozen=True)
class Options:
    """How to optimize one model.

    ``signatures``: SavedModel signature keys to rewrite (None: all; the others are copied
    through). ``tags``: the MetaGraph's tag set. ``verify``: compare the written model with the
    original. ``tolerance``: the largest relative error accepted (None: by the precision computed
    in, ``tolerance.py``). ``batch``: the size of an unknown batch dimension of random inputs.
    ``input_shapes``: ``{input: shape}`` of random inputs where a signature leaves dimensions
    unknown (else realistic sizes: ``input_shapes.py``); held as sorted ``(input, shape)``
    pairs, ``shapes()`` gives the dict. ``weights``: "constants" (in saved_model.pb),
    "variables" (in variables/) or "auto": as the original holds its own
    (``saved_model.choose_weights``). ``require_verification``: a signature left NOT
    VERIFIED is an error. ``warmup``: TF Serving warm-up requests written per signature.
    ``drop_other_tag_sets``: write a SavedModel of several MetaGraphs as the one of ``tags``.
    ``input_names`` / ``output_names``: a GraphDef file's placeholders fed and tensors fetched
    (None: inferred). ``allow_ops``: ops reaching outside the graph (file, network, Python,
    print: ``graphfold.outside.OUTSIDE``) that graphfold may run, in verification and loading;
    a signature holding any other is not run (NOT VERIFIED), a model whose loading would run
    one is not loaded. ``partial``: where a batch norm cannot disappear, fold its scale and keep
    its shift as one add (``docs/folding.md``, partial folds); False keeps it whole.
    """

    signatures: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ("serve",)
    verify: bool = True
    tolerance: float | None = None
    batch: int = 1
    weights: str = "auto"
    require_verification: bool = False
    warmup: int | None = None
    drop_other_tag_sets: bool = False
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    allow_ops: tuple[str, ...] = ()
    partial: bool = True

    def __post_init__(self):
        for name in ("signatures", "input_names", "output_names"):
            self._set(name, _names(name, getattr(self, name)))
        self._set("allow_ops", _allow_ops(self.allow_ops))
        self._set("tags", _tags(self.tags))
        self._set("input_shapes", _shapes(self.input_shapes))
        for name in ("verify", "require_verification", "drop_other_tag_sets", "partial"):
            if not isinstance(getattr(self, name), bool):
                raise BadOption(name, getattr(self, name), "must be True or False")
        self._check_numbers()
        if self.weights not in WEIGHTS:
            raise BadOption("weights", self.weights, f"must be one of {', '.join(WEIGHTS)}")
        if not self.verify:
            needing = [
                n for n in ("require_verification", "warmup", "input_shapes") if getattr(self, n)
            ]
            if needing:
                raise BadOption(
                    "verify",
                    False,
                    f"cannot be combined with {' or '.join(needing)} (they need the verification)",
                )

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _check_numbers(self) -> None:
        if self.tolerance is not None:
            if (
                isinstance(self.tolerance, bool)
                or not isinstance(self.tolerance, (int, float))
                or not self.tolerance >= 0
            ):
                raise BadOption(
                    "tolerance",
                    self.tolerance,
                    "must be a non-negative number (or None: by precision)",
                )
            self._set("tolerance", float(self.tolerance))
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise BadOption("batch", self.batch, "must be a whole number, at least 1")
        if self.warmup is not None and (
            isinstance(self.warmup, bool)
            or not isinstance(self.warmup, int)
            or not 1 <= self.warmup <= MAX_WARMUP
        ):
            raise BadOption(
                "warmup",
                self.warmup,
                f"must be a whole number between 1 and "
                f"{MAX_WARMUP} (TF Serving reads at most {MAX_WARMUP} records)",
            )

    @classmethod
    def of(cls, options: Options | None = None, **kwargs) -> Options:
        """``options``, or the options the keyword arguments name (not both)."""
        if options is None:
            return cls(**kwargs)
        if kwargs:
            raise TypeError(
                f"give options= or keyword options, not both (got "
                f"{', '.join(sorted(kwargs))} beside options=)"
            )
        if not isinstance(options, cls):
            raise TypeError(f"options must be graphfold.Options, got {type(options).__name__}")
        return options

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``input_shapes`` as ``{input: shape}``."""
        return dict(self.input_shapes or ())

    def given(self) -> list[str]:
        """The fields whose value is not the default."""
        default = Options()
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]

    def to_dict(self) -> dict:
        """Every field, as JSON values (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """A kind of input graphfold reads, and the options it honours."""

    name: str
    supported: frozenset[str]

    def refuse_unsupported(self, given: Iterable[str]) -> None:
        """``BadOption`` naming the first option given that this kind of source ignores."""
        for field in given:
            if field not in self.supported:
                raise BadOption(field, _NO_VALUE, f"not supported for {self.name}")


_ALL = frozenset(f.name for f in dataclasses.fields(Options))
SAVED_MODEL = SourceKind("a SavedModel", _ALL - {"input_names", "output_names"})
GRAPH_DEF_FILE = SourceKind(
    "a GraphDef file",
    frozenset(
        {
            "verify",
            "tolerance",
            "batch",
            "require_verification",
            "input_names",
            "output_names",
            "allow_ops",
            "input_shapes",
            "partial",
        }
    ),
)
# What comparing two SavedModels (``verify_saved_models``) and reporting without writing
# (``inspect``) honour.
COMPARISON = SourceKind(
    "comparing two SavedModels",
    frozenset(
        {
            "signatures",
            "tags",
            "tolerance",
            "batch",
            "require_verification",
            "allow_ops",
            "input_shapes",
        }
    ),
)
INSPECT_SAVED_MODEL = SourceKind(
    "inspecting a SavedModel", frozenset({"signatures", "tags", "allow_ops", "partial"})
)
INSPECT_GRAPH_DEF_FILE = SourceKind(
    "inspecting a GraphDef file", frozenset({"input_names", "output_names", "partial"})
)


def _names(field: str, value) -> tuple[str, ...] | None:
    """A tuple of names from a name, a comma-separated string or a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    try:
        names = tuple(dict.fromkeys(str(v).strip() for v in value))
    except TypeError:
        raise BadOption(field, value, "must be a name or a list of names") from None
    if not names or not all(names):
        raise BadOption(field, value, "must name at least one, with no empty name")
    return names


def _shapes(value) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """``{input: shape}`` (or its pairs) as sorted ``(input, shape)`` pairs of whole numbers
    (whether the signatures have those inputs, and can take those shapes, is checked where they
    are known: ``input_shapes.check``)."""
    if not value:
        return None
    try:
        pairs = value.items() if isinstance(value, dict) else value
        shapes = {str(key): tuple(int(d) for d in shape) for key, shape in pairs}
    except (TypeError, ValueError):
        raise BadOption(
            "input_shapes", value, "must map input names to shapes, e.g. {'x': (1, 224, 224, 3)}"
        ) from None
    return tuple(sorted(shapes.items()))


def _allow_ops(value) -> tuple[str, ...]:
    """Sorted op names, each one ``graphfold.outside.OUTSIDE`` lists (a typo must not look like
    consent; an unregistered op cannot run at all)."""
    names = tuple(sorted(_names("allow_ops", value) or ())) if value else ()
    unknown = [name for name in names if name not in OUTSIDE]
    if unknown:
        raise BadOption(
            "allow_ops",
            ",".join(unknown),
            "not an op graphfold holds back (it "
            "holds back file, network, Python and print ops: "
            "graphfold.outside.OUTSIDE)",
        )
    return names


def _tags(value) -> tuple[str, ...]:
    tags = _names("tags", value) if value else None
    if not tags:
        raise BadOption("tags", value, "the tag set is empty")
    return tags
