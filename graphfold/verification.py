"""The outcome of a verification, as data: per signature a ``Verification``, per output an
``OutputError`` (``convert/verify.py`` computes them; the report, the progress events and the
command read them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OutputError:
    name: str
    shape: tuple
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float | None = None  # the relative error accepted for this output

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verification:
    """The outcome of comparing one signature: ``status`` is "ok", "failed", "skipped" (not
    checked) or "inconclusive" (only within a noise floor too large to mean anything:
    ``noise.py``). ``tolerance``: the one given, or None (per output, by precision)."""

    signature: str
    status: str
    tolerance: float | None
    inputs: dict[str, tuple] = dataclasses.field(default_factory=dict)  # name -> shape used
    outputs: list[OutputError] = dataclasses.field(default_factory=list)
    reason: str | None = None  # why it failed or was skipped
    seconds: float = 0.0
    source: str = "random inputs"  # or "--inputs", "warm-up records (n)"
    mismatch: bool = False  # failed only by relative errors over the tolerance
    noise_floor: float | None = None  # rel. error of the frozen, unfolded graph (see noise.py)
    fed: list = dataclasses.field(default_factory=list, repr=False)  # the inputs run
    reference_failed: bool = False  # the original itself fails on the given inputs
    shape_note: str | None = None  # why unknown dims are smaller than the usual sizes
    computation: frozenset = frozenset()  # float dtypes the original computes in

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
        text = (
            f"{self.signature}: max abs error {self.max_abs:.3g}, max rel error "
            f"{self.max_rel:.3g} over {len(self.outputs)} output(s), {self.source} "
            f"{shapes}"
        )
        if self.shape_note:
            text += f" ({self.shape_note})"
        if self.noise_floor is not None:
            text += f", noise floor {self.noise_floor:.3g}"
        if self.status == "failed":
            text += f" -- FAILED: {self.reason}"
        elif self.status == "inconclusive":
            text += f" -- INCONCLUSIVE: {self.reason}"
        elif self.reason:
            text += f" -- {self.reason}"
        return text

    def to_dict(self) -> dict:
        return {
            "signature": self.signature,
            "status": self.status,
            "tolerance": self.tolerance,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "outputs": [o.to_dict() for o in self.outputs],
            "reason": self.reason,
            "source": self.source,
            "noise_floor": self.noise_floor,
            "shape_note": self.shape_note,
            "computation": sorted(d.name for d in self.computation),
            "seconds": self.seconds,
        }
