"""Cast round trips that compute nothing: ``Cast(Cast(x, wide), narrow)`` where every value of
x's dtype is a value of the wide one (float16 or bfloat16 through float32 or float64, float32
through float64) returns x, bit for bit.

Mixed-precision Keras models compute their batch norms in float32 between two casts
(``x: float16 -> float32 -> BN -> float16``); once the batch norm is folded away the two casts
meet and do nothing. The opposite order (float32 -> float16 -> float32) rounds, and stays.
"""

from __future__ import annotations

import tensorflow as tf

from graphfold.fold.graph import Graph

# (narrow, wide): every value of ``narrow`` is exactly a value of ``wide``.
EXACT_WIDENINGS = frozenset(
    {
        (tf.float16, tf.float32),
        (tf.float16, tf.float64),
        (tf.bfloat16, tf.float32),
        (tf.bfloat16, tf.float64),
        (tf.float32, tf.float64),
    }
)


def _cast_types(node) -> tuple[tf.DType, tf.DType]:
    return tf.as_dtype(node.attr["SrcT"].type), tf.as_dtype(node.attr["DstT"].type)


def remove_round_trips(graph: Graph) -> int:
    """Every reader of such an outer Cast reads x instead (a fetched outer Cast becomes
    ``Identity(x)``, ``Graph.redirect``); the casts are left for pruning. Returns how many round
    trips were removed."""
    removed = 0
    for outer in list(graph.graph_def.node):
        if outer.op != "Cast" or outer.name not in graph.nodes:
            continue
        inner = graph.producer(graph.data_inputs(outer)[0])
        if inner.op != "Cast":
            continue
        narrow, wide = _cast_types(inner)
        if (narrow, wide) not in EXACT_WIDENINGS or _cast_types(outer) != (wide, narrow):
            continue
        graph.redirect(outer.name, graph.data_inputs(inner)[0])
        removed += 1
    return removed
