"""Re-import an optimized GraphDef as a callable with the original function's signature.

``wrap_function`` around ``import_graph_def``, pruned to the placeholders and fetches, then traced
once more behind the original (args, kwargs) structure so that it takes the same arguments,
returns the same nested structure with the same static shapes, and saves as a SavedModel
signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from graphfold.fold.weights import as_placeholders


def import_graph(
    graph_def: graph_pb2.GraphDef, inputs: list[str], outputs: list[str], stubs: Sequence[str] = ()
):
    """A pruned ConcreteFunction computing ``outputs`` from ``inputs`` (flat lists), then from
    the stub constants named ``stubs`` (``graphfold.fold.weights``), fed in that order (nothing of
    their values is copied into the graph)."""
    light = as_placeholders(graph_def, stubs) if stubs else graph_def

    def load():
        tf.graph_util.import_graph_def(light, name="")

    wrapped = tf.compat.v1.wrap_function(load, [])
    graph = wrapped.graph
    feeds = [graph.get_tensor_by_name(_full(t)) for t in inputs]
    feeds += [graph.get_tensor_by_name(_full(name)) for name in stubs]
    fetches = [graph.get_tensor_by_name(_full(t)) for t in outputs]
    return wrapped.prune(feeds, fetches)


def _full(tensor: str) -> str:
    return tensor if ":" in tensor else tensor + ":0"


def with_signature(pruned, original: tf.types.experimental.ConcreteFunction, extra=None):
    """A ConcreteFunction with ``original``'s inputs and outputs that calls ``pruned``.

    ``extra``: called while tracing, returns the tensors ``pruned`` takes after the inputs (the
    weights: new ``Const`` nodes, or reads of variables the function captures).
    """
    args, kwargs = original.structured_input_signature
    structure = original.structured_outputs
    # Python values in the signature (``training=False``, any default argument) are traced into
    # the graph, not placeholders: only the TensorSpec positions are fed.
    fed = [isinstance(spec, tf.TensorSpec) for spec in tf.nest.flatten((args, kwargs))]

    signature = _python_signature(original, args, kwargs)

    def call(*call_args, **call_kwargs):
        if signature is not None:
            # Bound by the original parameter names, so keyword calls work as they do on fn.
            bound = signature.bind(*call_args, **call_kwargs).arguments
            call_args = tuple(
                bound[name] for name, p in signature.parameters.items() if p.kind != p.KEYWORD_ONLY
            )
            call_kwargs = {
                name: bound[name]
                for name, p in signature.parameters.items()
                if p.kind == p.KEYWORD_ONLY
            }
        flat = tf.nest.flatten((call_args, call_kwargs))
        flat = [value for value, is_fed in zip(flat, fed) if is_fed]
        if extra is not None:
            flat += list(extra())
        results = pruned(*flat)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        # ``structure`` may hold atoms that are not tensors (a ``None`` output): they are not
        # among the fetches, and come back as they were.
        fetched = iter(results)
        flat_out = []
        for want in tf.nest.flatten(structure):
            if isinstance(want, (tf.Tensor, tf.TensorSpec)):
                result = next(fetched)
                result.set_shape(want.shape)
                flat_out.append(result)
            else:
                flat_out.append(want)
        return tf.nest.pack_sequence_as(structure, flat_out)

    if signature is not None:
        call.__signature__ = signature  # type: ignore[attr-defined]
    return tf.function(call, autograph=False).get_concrete_function(*args, **kwargs)


def _python_signature(original, args, kwargs) -> inspect.Signature | None:
    """The parameter names and kinds of ``original`` (``x, training, *, alpha``), when they match
    its structured (args, kwargs); None when they cannot be recovered (then the rewritten
    function takes its arguments positionally, as the structure lists them)."""
    function_type = getattr(original, "function_type", None)
    if function_type is None:
        return None
    params = list(function_type.parameters.values())
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    keyword = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    if (
        len(positional) + len(keyword) != len(params)
        or len(positional) != len(args)
        or sorted(p.name for p in keyword) != sorted(kwargs)
    ):
        return None
    try:
        return inspect.Signature([inspect.Parameter(p.name, p.kind) for p in params])
    except (ValueError, TypeError):
        return None


def bind_weights(
    weights, mode: str, release: bool = False
) -> tuple[Callable[[], list], list[tf.Variable]]:
    """``(extra, variables)`` for ``with_signature``: the stub constants' values as ``Const``
    nodes of the traced function (``mode`` "constants") or as variables it captures
    ("variables": the original variable where a value is still exactly its buffer, else a new
    one named after the node), returned so that a SavedModel can track them. ``release``: drop
    each array from ``weights`` once it is bound (at most one weight is held twice at a time)."""
    names = weights.names()
    if mode == "constants":
        # ``Const`` nodes of the traced function itself: TensorFlow then sees the weights as
        # constants (oneDNN caches its reordered filters), which serves ResNet50 about 1.5x
        # faster than the same weights captured as inputs (docs/benchmarks.md).
        def constants():
            values = []
            for name in names:
                values.append(tf.constant(weights.get(name), name=op_name(name)))
                if release:
                    weights.discard(name)
            return values

        return constants, []
    if mode != "variables":
        raise ValueError(f"weights must be 'constants' or 'variables', got {mode!r}")
    variables = [
        _variable(
            weights,
            name,
            lambda a, name=name: tf.Variable(a, trainable=False, name=op_name(name)),
            release,
        )
        for name in names
    ]
    return (lambda: [v.value() for v in variables]), variables


def _variable(weights, name: str, new, release: bool) -> tf.Variable:
    """The original variable still holding the value of ``name``, else ``new(value)``."""
    original = weights.variable(name)
    variable = original if original is not None else new(weights.get(name))
    if release:
        weights.discard(name)
    return variable


def op_name(node: str) -> str:
    return "".join(c if c.isalnum() or c in "._-/" else "_" for c in node).lstrip("_./-") or "w"


class FoldedFunction:
    """The rewritten function: call it like the original.

    ``graph_def`` is the optimized GraphDef (with its weights), ``report`` the ``FoldReport``,
    ``function`` the ConcreteFunction (save it with ``tf.saved_model.save(module, path,
    signatures=...)``; track ``variables`` with it when the weights are variables).
    ``marked``: the values of marked constants not yet written (``saved_weights``), if any.
    """

    def __init__(
        self,
        function,
        graph_def: graph_pb2.GraphDef | None,
        report,
        weights=None,
        variables=(),
        marked=None,
    ):
        self.function = function
        self.report = report
        self.variables = list(variables)
        self.marked = marked
        self._graph_def, self._weights = graph_def, weights

    @property
    def graph_def(self) -> graph_pb2.GraphDef:
        if self._weights is not None:  # stub constants: put their values back, once
            self._graph_def, self._weights = self._weights.inline(self._graph_def), None
        return self._graph_def

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
