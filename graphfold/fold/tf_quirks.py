"""Known TensorFlow miscompilations of graphs a fold can create, and how the rewrite avoids them.

A frozen GraphDef is exact; what serves it is TensorFlow, whose Grappler rewrites the graph again
before it runs (fusing ops into one kernel), and some of those rewrites are wrong. Each entry of
``QUIRKS`` names the TensorFlow releases it is known on, the pattern, the workaround, and a
pure-TensorFlow reproduction (``tests/test_tf_quirks.py`` runs it, and fails when a release fixes
the bug, so that the table stays true).

``avoid(graph, before)`` applies the workarounds where the fold created a pattern: every
occurrence not among ``before`` (``snapshot`` of the graph before folding). The workarounds are
exact on every release, and the artifact may be served by another TensorFlow than the one that
wrote it, so they apply whatever release runs graphfold. An occurrence the original graph already
had is left as it is: the original computes that way on this TensorFlow too, and the result must
compute what the original computes; a note says so.

Two other TensorFlow bugs are refusals, kept where the fold decides (the depthwise entry's
``refuse_bias`` in ``layers.LINEAR``: a bias after an EXPLICIT-padded depthwise convolution aborts
the process; ``plan._pad_meets_conv``: the oneDNN Pad+Conv2D fusion drops a batch or channel
padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from graphfold.fold import formats
from graphfold.fold.graph import Graph

Match = tuple[str, ...]  # the names of the nodes of one occurrence


@dataclasses.dataclass(frozen=True)
class Quirk:
    name: str
    known_on: tuple[str, ...]  # TensorFlow releases seen to miscompute it ("2.21")
    pattern: str  # what the graph holds
    bug: str  # what TensorFlow does with it
    workaround: str  # what the rewrite emits instead
    find: Callable[[Graph], list[Match]]  # every occurrence in a graph
    fix: Callable[[Graph, Match], str | None]  # rewrites one occurrence; None, or why it cannot
    reproduce: Callable[[str], float]  # pure TF, per op: rel. error of tf.function vs eager
    ops: tuple[str, ...]  # the ops ``reproduce`` takes (each miscomputed)


# ---- Conv2D/Conv3D -> BiasAdd -> Add -> LeakyRelu ---------------------------------------------

_FUSED_LINEAR = ("Conv2D", "Conv3D")
_ADDS = ("Add", "AddV2")
_FUSED_ALPHA = 0.2  # what the fused kernel uses, whatever the LeakyRelu's alpha


def _find_leaky_relu_fusion(graph: Graph) -> list[Match]:
    """``(linear, bias_add, add, leaky_relu)``: a Conv2D/Conv3D whose BiasAdd feeds an Add whose
    result feeds a LeakyRelu with alpha other than 0.2 (whatever the dtype, the shapes and the
    other consumers: a few of those do not fuse on CPU, but the workaround is exact and cheap)."""
    found: list[tuple[str, ...]] = []
    for node in list(graph.graph_def.node):
        if node.op != "LeakyRelu" or np.float32(node.attr["alpha"].f) == np.float32(_FUSED_ALPHA):
            continue
        add = graph.producer(graph.data_inputs(node)[0])
        if add.op not in _ADDS:
            continue
        for operand in graph.data_inputs(add):
            bias_add = graph.producer(operand)
            if bias_add.op != "BiasAdd":
                continue
            linear = graph.producer(graph.data_inputs(bias_add)[0])
            if linear.op in _FUSED_LINEAR:
                found.append((linear.name, bias_add.name, add.name, node.name))
    return found


def _bias_as_add(graph: Graph, match: Match) -> str | None:
    """The BiasAdd becomes ``AddV2(y, b)``, b shaped to broadcast along the channel axis
    (``[C]`` channels-last, ``[C, 1, 1]`` / ``[C, 1, 1, 1]`` channels-first): the same sum, which
    Grappler does not fuse into the convolution and LeakyRelu."""
    bias_add = graph.nodes[match[1]]
    y, b = graph.data_inputs(bias_add)[:2]
    fmt = formats.data_format(bias_add)
    linear = graph.nodes[match[0]]
    rank = 5 if linear.op == "Conv3D" else 4
    dtype = graph.dtype(bias_add)
    if formats.channels_first(fmt):
        value = graph.const(b)
        if value is None:
            return f"{bias_add.name}: its channels-first bias is not a constant"
        b = graph.add_const(
            f"{bias_add.name}/graphfold_bias", value.reshape([-1] + [1] * (rank - 2)), dtype
        )
    graph.become(bias_add, "AddV2", [y, b], dtype)
    return None


def _leaky_relu_reproduction(op: str) -> float:
    """``leaky_relu(bias_add(conv(x, W), b) + sc, alpha=0.01)``: eager against ``tf.function``
    (where Grappler's remapper fuses it); the relative error (0.15 on TF 2.21: alpha 0.2 used)."""
    rng = np.random.default_rng(0)
    spatial = (8, 8) if op == "Conv2D" else (4, 8, 8)
    x = tf.constant(rng.normal(size=(2, *spatial, 16)), tf.float32)
    sc = tf.constant(rng.normal(size=(2, *spatial, 16)), tf.float32)
    w = tf.constant(rng.normal(size=(*[1] * len(spatial), 16, 16)) / 4, tf.float32)
    b = tf.constant(rng.normal(size=16), tf.float32)
    conv = {
        "Conv2D": lambda v: tf.nn.conv2d(v, w, 1, "VALID"),
        "Conv3D": lambda v: tf.nn.conv3d(v, w, [1] * 5, "VALID"),
    }[op]

    def body(v, s):
        return tf.nn.leaky_relu(tf.nn.bias_add(conv(v), b) + s, alpha=0.01)

    want, got = body(x, sc).numpy(), tf.function(body)(x, sc).numpy()
    return float(np.abs(want - got).max() / np.abs(want).max())


LEAKY_RELU_FUSION = Quirk(
    name="conv-bias-add-leaky-relu",
    known_on=("2.21",),
    pattern="Conv2D/Conv3D -> BiasAdd -> Add -> LeakyRelu(alpha != 0.2)",
    # Measured on TF 2.21 CPU: float32 and bfloat16 (float16 has no fused kernel there);
    # DepthwiseConv2dNative and MatMul in the same place are computed right; so are the bias as
    # AddV2, the bias after the residual Add, an Add that broadcasts, and Maximum(y, alpha*y).
    bug="Grappler's remapper fuses it into one kernel that ignores alpha (uses 0.2)",
    workaround="its bias written as AddV2, which is not fused",
    find=_find_leaky_relu_fusion,
    fix=_bias_as_add,
    reproduce=_leaky_relu_reproduction,
    ops=_FUSED_LINEAR,
)

QUIRKS = (LEAKY_RELU_FUSION,)


# ---- the pass ---------------------------------------------------------------------------------


def snapshot(graph: Graph) -> dict[str, set[Match]]:
    """Every quirk's occurrences in ``graph`` (before the fold)."""
    return {quirk.name: set(quirk.find(graph)) for quirk in QUIRKS}


def avoid(graph: Graph, before: dict[str, set[Match]]) -> list[str]:
    """Rewrites every occurrence that is not in ``before``; returns notes for the report (what
    was rewritten, what the original already had and is kept)."""
    notes = []
    for quirk in QUIRKS:
        fixed, kept, failed = [], [], []
        for match in quirk.find(graph):
            if match in before.get(quirk.name, ()):
                kept.append(match[-1])
                continue
            why = quirk.fix(graph, match)
            (failed.append(why) if why else fixed.append(match[-1]))
        known = f"on TensorFlow {', '.join(quirk.known_on)}"
        if fixed:
            notes.append(
                f"{quirk.pattern} made by the fold at {_names(fixed)}: "
                f"{quirk.workaround} ({quirk.bug} {known})"
            )
        if kept:
            notes.append(
                f"{quirk.pattern} already in the original at {_names(kept)}, left as "
                f"it is: {quirk.bug} {known}, the original's too, and the result "
                f"computes what the original computes"
            )
        for why in failed:
            notes.append(
                f"{quirk.pattern} made by the fold NOT avoided: {why} ({quirk.bug} {known})"
            )
    return notes


def _names(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
