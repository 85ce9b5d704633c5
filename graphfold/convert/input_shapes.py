"""The shapes of random verification inputs where a signature leaves dimensions unknown.

A check on a 1 x 1 image is dominated by padding and says little; the sizes are realistic:

- a shape the user gives (``--input-shape KEY=1,224,224,3``, API ``input_shapes={key: shape}``)
  or, for a signature verified on random inputs, the shape of an input of the same name in the
  given inputs or the warm-up records;
- else an unknown batch (leading) dimension takes ``batch``; the unknown height and width of an
  image (a rank-4 floating input) ``IMAGE_SIZE`` (its channels 3 when they are unknown too); any
  other unknown dimension ``OTHER_SIZE``;
- halved while an input would hold more than ``MAX_ELEMENTS`` values (a memory budget), and the
  check says so; when the original rejects the sizes, ``FALLBACK_SIZES`` are tried in turn and
  the check says that too.
"""

from __future__ import annotations

import math

import tensorflow as tf

from graphfold.errors import BadInput
from graphfold.options import spelled

IMAGE_SIZE = 224  # unknown height / width of a rank-4 floating input
OTHER_SIZE = 32  # any other unknown non-batch dimension (a sequence, a volume's side)
MAX_ELEMENTS = 1 << 24  # values per random input (64 MiB of float32)
FALLBACK_SIZES = (32, 8, 1)


def default_shape(
    spec: tf.TensorSpec, batch: int, image: int = IMAGE_SIZE, other: int = OTHER_SIZE
) -> tuple[tuple, str | None]:
    """``(shape, note)``: the shape of a random input for ``spec``; the note says when the
    memory budget made it smaller."""
    if spec.shape.rank is None:
        return (batch,), None
    dims = spec.shape.as_list()
    image_like = len(dims) == 4 and tf.as_dtype(spec.dtype).is_floating
    if image_like and dims[1:] == [None, None, None]:
        dims[3] = 3  # channels unknown too: an RGB image (NHWC)
    free = [i for i, d in enumerate(dims) if d is None and i > 0]
    size = image if image_like else other
    wanted = [batch if i == 0 and d is None else d for i, d in enumerate(dims)]
    shape, note = _within_budget(wanted, free, size)
    if note is None and image_like and free and image < IMAGE_SIZE:
        note = f"images {image} x {image}, not {IMAGE_SIZE}: a quick check"
    return shape, note


def uniform_shape(spec: tf.TensorSpec, batch: int, size: int) -> tuple:
    """Every unknown non-batch dimension ``size`` (the fallbacks)."""
    if spec.shape.rank is None:
        return (batch,)
    return tuple(
        (batch if i == 0 else size) if d is None else d for i, d in enumerate(spec.shape.as_list())
    )


def _within_budget(shape: list, free: list[int], size: int) -> tuple[tuple, str | None]:
    known = math.prod(d for i, d in enumerate(shape) if i not in free)
    wanted = size
    while free and size > 1 and known * size ** len(free) > MAX_ELEMENTS:
        size //= 2
    for i in free:
        shape[i] = size
    note = (
        None
        if size == wanted or not free
        else f"unknown dims {size}, not {wanted}: over {MAX_ELEMENTS} values per input otherwise"
    )
    return tuple(shape), note


def parse_entry(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,224,224,3"`` -> ``("x", (1, 224, 224, 3))``; ``ValueError`` saying the syntax."""
    key, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.replace(" ", "").strip("[]()").split(",") if d)
    except ValueError:
        shape = None
    if not sep or not key.strip() or not shape:
        raise ValueError(f'"{text}": expected KEY=D1,D2,... (e.g. x=1,224,224,3)')
    return key.strip(), shape


def check(
    input_shapes: dict | None, specs: dict[str, dict[str, tf.TensorSpec]]
) -> dict[str, dict[str, tuple]]:
    """``{signature: {input: shape}}`` for the given shapes (``{input: shape}``), each applied to
    every signature with that input; ``BadInput`` for an input no signature has, a dimension
    below 1, or a shape the signature's input cannot take."""
    if not input_shapes:
        return {}
    out: dict[str, dict[str, tuple]] = {}
    for key, shape in input_shapes.items():
        shape = tuple(int(d) for d in shape)
        where = f"{spelled('input_shapes')} {key}={','.join(map(str, shape))}"
        if any(d < 1 for d in shape):
            raise BadInput(f"{where}: every dimension must be at least 1")
        having = [name for name, inputs in specs.items() if key in inputs]
        if not having:
            listing = "; ".join(
                f"{name}: {', '.join(sorted(inputs))}" for name, inputs in specs.items()
            )
            raise BadInput(f"{where}: no signature has an input '{key}' (inputs: {listing})")
        for name in having:
            spec = specs[name][key]
            if not tf.TensorShape(shape).is_compatible_with(spec.shape):
                raise BadInput(
                    f"{where}: input '{key}' of signature '{name}' has shape {_shown(spec.shape)}"
                )
            out.setdefault(name, {})[key] = shape
    return out


def from_feeds(feeds: dict[str, list[dict]]) -> dict[str, tuple]:
    """``{input: shape}`` of the first given or recorded value of each input name."""
    shapes: dict[str, tuple] = {}
    for batch in feeds.values():
        for feed in batch:
            for key, value in feed.items():
                shapes.setdefault(key, tuple(getattr(value, "shape", ())))
    return shapes


def compatible(hints: dict[str, tuple], specs: dict[str, tf.TensorSpec]) -> dict[str, tuple]:
    """The hints that fit the inputs of the same name."""
    return {
        k: s
        for k, s in hints.items()
        if k in specs and tf.TensorShape(s).is_compatible_with(specs[k].shape)
    }


def _shown(shape: tf.TensorShape) -> str:
    if shape.rank is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"
