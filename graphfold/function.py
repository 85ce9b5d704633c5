"""Re-import an optimized GraphDef as a callable with the original function's signature.

``wrap_function`` around ``import_graph_def``, pruned to the placeholders and fetches, then traced
once more behind the original (args, kwargs) structure so that it takes the same arguments,
returns the same nested structure with the same static shapes, and saves as a SavedModel
signature.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import graph_pb2


def import_graph(graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str]):
    """A pruned ConcreteFunction computing ``outputs`` from ``inputs`` (flat lists)."""
    def load():
        tf.graph_util.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(load, [])
    graph = wrapped.graph
    feeds = [graph.get_tensor_by_name(_full(t)) for t in inputs]
    fetches = [graph.get_tensor_by_name(_full(t)) for t in outputs]
    return wrapped.prune(feeds, fetches)


def _full(tensor: str) -> str:
    return tensor if ":" in tensor else tensor + ":0"


def with_signature(pruned, original: tf.types.experimental.ConcreteFunction):
    """A ConcreteFunction with ``original``'s inputs and outputs that calls ``pruned``."""
    args, kwargs = original.structured_input_signature
    structure = original.structured_outputs

    def call(*call_args, **call_kwargs):
        flat = tf.nest.flatten((call_args, call_kwargs))
        results = pruned(*flat)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        expected = tf.nest.flatten(structure)
        for result, want in zip(results, expected):
            result.set_shape(want.shape)
        return tf.nest.pack_sequence_as(structure, results)

    return tf.function(call, autograph=False).get_concrete_function(*args, **kwargs)


class FoldedFunction:
    """The rewritten function: call it like the original.

    ``graph_def`` is the optimized GraphDef, ``report`` the ``FoldReport``, ``function`` the
    ConcreteFunction (save it with ``tf.saved_model.save(module, path, signatures=...)``).
    """

    def __init__(self, function, graph_def: graph_pb2.GraphDef, report):
        self.function = function
        self.graph_def = graph_def
        self.report = report

    @property
    def structured_input_signature(self):
        return self.function.structured_input_signature

    @property
    def structured_outputs(self):
        return self.function.structured_outputs

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __repr__(self):
        return f"<FoldedFunction {self.report.summary()}>"
