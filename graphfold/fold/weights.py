"""Weights kept out of the GraphDef: the values of large ``Const`` nodes, held as NumPy arrays.

A GraphDef that carries its weights is copied whole by every step that touches it (freezing,
re-importing, pruning, tracing), and cannot be serialized at all past protobuf's 2 GB. So while
graphfold rewrites a function, a ``Const`` node of ``THRESHOLD`` bytes or more is a *stub*: its
``value`` attribute holds the dtype and shape only, and its array lives here. The arrays read
from the original variables share the variables' memory (read-only views, no copy); only the
weights a fold changes are new arrays. At the end the weights are bound once, either as constants
(``Const`` nodes of the final function) or as variables (``variables/`` of a SavedModel).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, tensor_pb2

from graphfold.tf_private import variable_buffer

THRESHOLD = 1024  # bytes: smaller constants (shapes, axes, scalars) stay in the GraphDef


# Dtypes that ``tf.make_tensor_proto`` writes as raw ``tensor_content`` (when there is more than
# one element): ``fill_tensor`` writes those itself, byte for byte the same, without its ~20 µs of
# checks per call (a fifth of the normalize stage on graphs of many small constants) and straight
# into the node (no intermediate TensorProto to copy: a copy less of every weight).
_RAW_DTYPES = frozenset({tf.float32, tf.float64, tf.int32, tf.int64})


def fill_tensor(tensor: tensor_pb2.TensorProto, array: np.ndarray, dtype: tf.DType) -> None:
    """Makes ``tensor`` what ``tf.make_tensor_proto(array, dtype=dtype)`` returns."""
    if (
        dtype in _RAW_DTYPES
        and array.size > 1
        and array.dtype == dtype.as_numpy_dtype
        and array.dtype.isnative
    ):
        tensor.Clear()
        tensor.dtype = dtype.as_datatype_enum
        for size in array.shape:
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = array.tobytes()
    else:
        tensor.CopyFrom(tf.make_tensor_proto(array, dtype=dtype))


def stub(tensor: tensor_pb2.TensorProto, array: np.ndarray, dtype: tf.DType) -> None:
    """Makes ``tensor`` describe ``array`` (dtype and shape) without its values."""
    tensor.Clear()
    tensor.dtype = dtype.as_datatype_enum
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view of ``array`` (a NumPy scalar, as a scalar variable reads, becomes a 0-d
    array: a scalar has no flags to set)."""
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


class Weights:
    """Node name -> value of every stub ``Const`` node; ``variable(name)`` -> the original
    variable whose value it still is, unchanged (bound to it rather than to a copy)."""

    def __init__(self, threshold: int = THRESHOLD):
        self.threshold = threshold
        self._arrays: dict[str, np.ndarray] = {}
        self._origin: dict[int, tuple[np.ndarray, tf.Variable]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def names(self) -> list[str]:
        return list(self._arrays)

    def keeps(self, array: np.ndarray) -> bool:
        """Whether an array this large is kept here rather than in the GraphDef."""
        return array.nbytes >= self.threshold

    def get(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)

    def put(self, name: str, array: np.ndarray) -> None:
        self._arrays[name] = read_only(array) if array.flags.writeable else array

    def put_variable(self, name: str, variable: tf.Variable) -> np.ndarray:
        """Holds the value of ``variable`` (a read-only view of its buffer: no copy)."""
        array = read_only(variable_buffer(variable))
        self._arrays[name] = array
        self._origin[id(array)] = (array, variable)
        return array

    def discard(self, name: str) -> None:
        self._arrays.pop(name, None)

    def variable(self, name: str) -> tf.Variable | None:
        """The original variable if the value of ``name`` is still exactly its buffer."""
        array = self._arrays.get(name)
        held = self._origin.get(id(array)) if array is not None else None
        return held[1] if held is not None and held[0] is array else None

    def keep_only(self, names) -> None:
        """Drops every array whose node is not in ``names`` (pruned away)."""
        names = set(names)
        for name in [n for n in self._arrays if n not in names]:
            del self._arrays[name]

    def inline(self, graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
        """A copy of ``graph_def`` whose stub constants hold their values again."""
        full = graph_pb2.GraphDef()
        full.CopyFrom(graph_def)
        for node in full.node:
            array = self._arrays.get(node.name)
            if array is not None and node.op == "Const":
                fill_tensor(
                    node.attr["value"].tensor, np.ascontiguousarray(array), tf.as_dtype(array.dtype)
                )
        return full


def as_placeholders(graph_def: graph_pb2.GraphDef, names) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` in which every stub constant named in ``names`` is a
    ``Placeholder`` of its dtype and shape (to be fed): importable, and TensorFlow infers the
    same static shapes."""
    names = set(names)
    light = graph_pb2.GraphDef()
    light.CopyFrom(graph_def)
    for node in light.node:
        if node.name in names and node.op == "Const":
            value = node.attr["value"].tensor
            dtype, shape = value.dtype, tf.TensorShape(value.tensor_shape)
            name, controls = node.name, [t for t in node.input if t.startswith("^")]
            node.Clear()
            node.name, node.op = name, "Placeholder"
            node.input.extend(controls)
            node.attr["dtype"].type = dtype
            node.attr["shape"].shape.CopyFrom(shape.as_proto())
    return light
