"""Every use of TensorFlow's private API, in one place (TensorFlow 2.21).

Each function here reaches into a module or attribute that TensorFlow does not promise to keep.
``tests/test_tf_private.py`` exercises every one of them on the running TensorFlow, so a release
that changes one fails there, by name, rather than somewhere inside a rewrite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, op_def_pb2
from tensorflow.python.framework import convert_to_constants, function_def_to_graph, op_def_registry

# ---- freezing without reading the variables -----------------------------------------------------


class _ShapeOnly(np.ndarray):
    """A one-element stand-in for a variable's value that reports the variable's shape: TF's
    converter writes it as a compact constant (one value and a shape), never the weights."""

    def __array_finalize__(self, obj):
        self._shape = getattr(obj, "_shape", None)

    @property  # type: ignore[misc]  # read-only on purpose: the converter only reads it
    def shape(self):
        return self._shape


class _Converter(convert_to_constants._FunctionConverterDataInEager):  # noqa: SLF001
    """TF's freezing (``convert_variables_to_constants_v2``), reading no variable: each one is a
    ``_ShapeOnly`` stand-in (its private ``_eval`` is where the converter reads them)."""

    def __init__(self, **kwargs):
        self.stand_ins: dict[int, tf.Variable] = {}  # id(stand-in) -> its variable
        super().__init__(**kwargs)

    def _eval(self, tensor):
        if isinstance(tensor, tf.Variable):
            stand_in = np.zeros((), tensor.dtype.as_numpy_dtype).view(_ShapeOnly)
            stand_in._shape = tuple(tensor.shape.as_list())
            self.stand_ins[id(stand_in)] = tensor
            return stand_in
        return super()._eval(tensor)


def freeze_without_reading(fn) -> tuple[graph_pb2.GraphDef, dict[str, tf.Variable]]:
    """``fn`` frozen as ``convert_variables_to_constants_v2`` freezes it (calls inlined, control
    flow kept functional), with each variable a compact stand-in constant: ``(graph_def, node
    name -> the variable its constant stands for)``."""
    data = _Converter(func=fn, lower_control_flow=False, aggressive_inlining=True)
    variables = {
        name: data.stand_ins[id(t.numpy)]
        for name, t in data.tensor_data.items()
        if id(t.numpy) in data.stand_ins
    }
    graph_def, _ = convert_to_constants._replace_variables_by_constants(data)  # noqa: SLF001
    return graph_def, variables


def freeze_with_values(fn):
    """``(frozen ConcreteFunction, its GraphDef)``: TensorFlow's own freezing, the variables'
    values copied in (calls inlined, control flow kept functional)."""
    return convert_to_constants.convert_variables_to_constants_v2_as_graph(
        fn, lower_control_flow=False, aggressive_inlining=True
    )


def variable_buffer(variable: tf.Variable) -> np.ndarray:
    """The array of ``variable``'s current value, sharing its buffer (no copy)."""
    return variable.value()._numpy()  # noqa: SLF001


# ---- ops and functions --------------------------------------------------------------------------


def op_def(op: str) -> op_def_pb2.OpDef | None:
    """The registered ``OpDef`` of ``op`` in the running TensorFlow, or None."""
    return op_def_registry.get(op)


def function_body(function, input_shapes: list) -> tf.Graph:
    """A ``FunctionDef`` rebuilt as a graph, its inputs given ``input_shapes``."""
    return function_def_to_graph.function_def_to_graph(function, input_shapes=input_shapes)


def saved_model_fingerprint(path: str) -> bytes:
    """The serialized ``FingerprintDef`` of the SavedModel at ``path``, as TensorFlow writes
    ``fingerprint.pb``."""
    from tensorflow.python.saved_model import pywrap_saved_model

    return pywrap_saved_model.fingerprinting.CreateFingerprintDef(path)


def runtime_started() -> bool:
    """Whether TensorFlow's eager runtime has started in this process (forking it is then not
    safe). False when TensorFlow is not imported at all."""
    context = sys.modules.get("tensorflow.python.eager.context")
    if context is None:
        return False
    current = context.context_safe()
    return current is not None and bool(current._initialized)  # noqa: SLF001


TOUCH_POINTS: dict[str, Callable] = {
    "convert_to_constants.convert_variables_to_constants_v2_as_graph": freeze_with_values,
    "convert_to_constants._FunctionConverterDataInEager._eval": freeze_without_reading,
    "ResourceVariable.value()._numpy": variable_buffer,
    "op_def_registry.get": op_def,
    "function_def_to_graph.function_def_to_graph": function_body,
    "pywrap_saved_model.fingerprinting.CreateFingerprintDef": saved_model_fingerprint,
    "eager.context.context_safe()._initialized": runtime_started,
}
