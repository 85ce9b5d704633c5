"""Weights written into ``saved_model.pb`` as constants after TensorFlow has saved the model.

Saving a function whose weights are ``Const`` nodes makes TensorFlow copy every weight many times
over: into the traced graph, the registered function, the graph it exports, the serialized
SavedModel (ResNet50: +0.9 GB and about 4 s for 100 MB of weights). Instead, the function is
traced with *marked* constants that hold no values (a ``TensorProto`` with a dtype and a shape and
nothing else; ``MARK`` names the weight), saved, and then each weight is written once into the
marked nodes of ``saved_model.pb``. The result is a SavedModel whose weights are ``Const`` nodes,
as TensorFlow loads and serves them; a marked node left unfilled, or a weight with no node, is an
error (never a model that computes with zeros).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, tensor_pb2
from tensorflow.core.protobuf import saved_model_pb2

from graphfold.fold.weights import Weights, fill_tensor, stub

MARK = "_graphfold_weight"  # attribute of a marked constant: "<tag>\0<weight name>"


def marked_constants(
    weights: Weights, tag: str, names: Callable[[str], str]
) -> Callable[[], list[tf.Tensor]]:
    """``extra`` for ``function.with_signature``: one marked, empty ``Const`` per weight of
    ``weights`` (in the order of ``weights.names()``), named ``names(weight)``; ``tag`` tells
    this function's weights from another's in the same SavedModel."""
    order = weights.names()

    def constants() -> list[tf.Tensor]:
        graph = tf.compat.v1.get_default_graph()
        values = []
        for name in order:
            array = weights.get(name)
            assert array is not None, f"no value for weight {name}"
            dtype = tf.as_dtype(array.dtype)
            value = tensor_pb2.TensorProto()
            stub(value, array, dtype)
            op = graph.create_op(
                "Const",
                [],
                [dtype],
                name=names(name),
                attrs={
                    "value": attr_value_pb2.AttrValue(tensor=value),
                    "dtype": attr_value_pb2.AttrValue(type=dtype.as_datatype_enum),
                    MARK: attr_value_pb2.AttrValue(s=_mark(tag, name)),
                },
            )
            values.append(op.outputs[0])
        return values

    return constants


def _mark(tag: str, name: str) -> bytes:
    return f"{tag}\0{name}".encode()


def fill(path: str, weights: dict[str, Weights]) -> None:
    """Writes the value of every marked constant into ``path``/saved_model.pb (tag -> the
    ``Weights`` its marks name), removing the marks; each array is dropped from its ``Weights``
    once written (a weight is held twice only while it is copied)."""
    if not weights:
        return
    proto = read(path)
    _fill_marked(proto, weights)
    data = proto.SerializeToString(deterministic=True)
    del proto
    write(path, data)


def _fill_marked(proto: saved_model_pb2.SavedModel, weights: dict[str, Weights]) -> None:
    marked: dict[bytes, list] = {}
    for node in _nodes(proto):
        if MARK in node.attr:
            marked.setdefault(node.attr[MARK].s, []).append(node)
    expected = {
        _mark(tag, name): (held, name) for tag, held in weights.items() for name in held.names()
    }
    missing = sorted(m.decode().replace("\0", ": ") for m in set(expected) - set(marked))
    unknown = sorted(m.decode().replace("\0", ": ") for m in set(marked) - set(expected))
    if missing or unknown:
        raise RuntimeError(
            f"graphfold: the saved functions' weights do not match what was "
            f"folded (no node for {missing[:3]}; no value for {unknown[:3]})"
        )
    for mark, nodes in marked.items():
        held, name = expected[mark]
        array = np.ascontiguousarray(held.get(name))
        for node in nodes:
            fill_tensor(node.attr["value"].tensor, array, tf.as_dtype(array.dtype))
            del node.attr[MARK]
        held.discard(name)


def _nodes(proto: saved_model_pb2.SavedModel):
    for meta in proto.meta_graphs:
        yield from meta.graph_def.node
        for function in meta.graph_def.library.function:
            yield from function.node_def


def read(path: str) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def write(path: str, data: bytes) -> None:
    """Writes ``data`` (a serialized SavedModel) as ``path``/saved_model.pb, and
    ``fingerprint.pb`` anew to match it."""
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(data)
    fingerprint = os.path.join(path, "fingerprint.pb")
    try:
        from graphfold.tf_private import saved_model_fingerprint

        value = saved_model_fingerprint(path)
        with open(fingerprint, "wb") as f:
            f.write(value)
    except Exception:  # noqa: BLE001 - the fingerprint is optional metadata
        if os.path.exists(fingerprint):
            os.remove(fingerprint)
