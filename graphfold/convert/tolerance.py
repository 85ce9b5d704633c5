"""The relative error a verification accepts by default: it follows the precision computed in.

Folding reorders float operations and rounds each folded weight once to its dtype, so the folded
model differs from the original by a few rounding errors of the precision it computes in,
amplified by depth. Freezing alone does not change float16 rounding (the noise floor of a
mixed-precision model is 0), so the noise floor cannot stand in for it: the tolerance itself
follows the precision. The default tolerance of an output is that of the lowest precision among
its own dtype and every float dtype the original's ops compute in (its nested functions
included):

    float64, float32    1e-5
    float16             2e-2   (about 20 x its epsilon 9.8e-4)
    bfloat16            6e-2   (about 8 x its epsilon 7.8e-3)

Measured (Keras 3, random batch-norm statistics, 224 x 224, TF 2.21 CPU): mixed_float16
MobileNetV2 5.8e-4, ResNet50 7.1e-3; mixed_bfloat16 MobileNetV2 1.0e-2, ResNet50 2.0e-2. The
defects verification exists to catch are larger (a dropped shift, TensorFlow's LeakyRelu fusion:
7e-2 to 1.5e-1). A ``tolerance`` the user gives applies to every output.
"""

from __future__ import annotations

import tensorflow as tf

from graphfold.options import spelled

DEFAULT = 1e-5
BY_DTYPE = {tf.float64: 1e-5, tf.float32: 1e-5, tf.float16: 2e-2, tf.bfloat16: 6e-2}


def how_to_set() -> str:
    """How the caller sets the tolerance, in its words (``options.spoken_as``)."""
    flag = spelled("tolerance")
    return f"set it with {flag} T" if flag.startswith("-") else "set it with tolerance=T"


def words(tolerance: float | None) -> str:
    """``tolerance 1e-05``, or ``tolerance by precision`` for None (the default)."""
    return "tolerance by precision" if tolerance is None else f"tolerance {tolerance:g}"


def describe() -> str:
    """The defaults in words: ``1e-05 float32, 0.02 float16, 0.06 bfloat16``."""
    return ", ".join(f"{BY_DTYPE[d]:g} {d.name}" for d in (tf.float32, tf.float16, tf.bfloat16))


def computation_dtypes(fn) -> frozenset:
    """The float dtypes the ops of ``fn`` (a ConcreteFunction) and its nested functions use."""
    graph_def = fn.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    found = set()
    for node in nodes:
        for value in node.attr.values():
            kinds = (
                [value.type]
                if value.WhichOneof("value") == "type"
                else list(value.list.type)
                if value.WhichOneof("value") == "list"
                else []
            )
            for kind in kinds:
                dtype = tf.as_dtype(kind)
                if dtype.is_floating:
                    found.add(dtype)
    return frozenset(found)


def default(output_dtype, computation: frozenset) -> tuple[float, str]:
    """``(tolerance, why)`` for an output of ``output_dtype`` computed with ``computation``."""
    dtypes = {tf.as_dtype(output_dtype)} | set(computation)
    known = [d for d in dtypes if d in BY_DTYPE]
    if not known:
        return DEFAULT, "default"
    loosest = max(known, key=lambda d: BY_DTYPE[d])
    if BY_DTYPE[loosest] == DEFAULT:
        return DEFAULT, "default"
    where = "output" if loosest == tf.as_dtype(output_dtype) else "computation"
    return BY_DTYPE[loosest], f"{loosest.name} {where}"
