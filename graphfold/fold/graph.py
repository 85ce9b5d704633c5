"""A small mutable view over a GraphDef shared by every stage.

Nodes by name, the data consumers of every tensor (kept in sync by the mutators), constant values
as NumPy arrays (decoded lazily, cached), and the static shapes TensorFlow inferred when the graph
was frozen. Tensors are named as in TensorFlow: ``"node"`` is output 0, ``"node:1"`` output 1.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from graphfold.fold.weights import fill_tensor, stub


def split_tensor(tensor: str) -> tuple[str, int]:
    """``"a:1"`` -> ``("a", 1)``; ``"a"`` -> ``("a", 0)``."""
    name, _, index = tensor.partition(":")
    return name, int(index) if index else 0


def tensor_name(node: str, index: int = 0) -> str:
    return node if index == 0 else f"{node}:{index}"


def canonical(tensor: str) -> str:
    return tensor_name(*split_tensor(tensor))


# Consumers that read only a tensor's shape: they never see its values.
SHAPE_ONLY_OPS = frozenset({"Shape", "ShapeN", "Rank", "Size"})


class Graph:
    """Nodes, consumers, constants and shapes of one GraphDef (which the Graph owns)."""

    def __init__(
        self,
        graph_def: graph_pb2.GraphDef,
        shapes: dict[str, tuple | None] | None = None,
        outputs: Iterable[str] = (),
        weights=None,
    ):
        self.graph_def = graph_def
        # ``graphfold.fold.weights.Weights``: values of the stub constants kept out of the GraphDef;
        # new constants that large are kept there too (None: every value is in the GraphDef).
        self.weights = weights
        self.nodes: dict[str, node_def_pb2.NodeDef] = {n.name: n for n in graph_def.node}
        self.shapes: dict[str, tuple | None] = dict(shapes or {})
        self.outputs = {canonical(t) for t in outputs}  # tensors the caller fetches
        self._consts: dict[str, np.ndarray] = {}
        # nodes a rewrite created -> the node of the original graph each stands for (a folded
        # bias -> its layer), so that no report names a node the user never had
        self.created: dict[str, str] = {}
        self._consumers: dict[str, list[str]] = collections.defaultdict(list)
        for node in graph_def.node:
            for tensor in node.input:
                if not tensor.startswith("^"):
                    self._consumers[canonical(tensor)].append(node.name)

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first input that refers to no node, or a fetched
        tensor that no node produces."""
        for node in self.graph_def.node:
            for tensor in node.input:
                if split_tensor(tensor.lstrip("^"))[0] not in self.nodes:
                    raise ValueError(
                        f"node {node.name!r} reads {tensor!r}, which no node of the graph produces"
                    )
        for tensor in self.outputs:
            if split_tensor(tensor)[0] not in self.nodes:
                raise ValueError(f"output {tensor!r} is produced by no node of the graph")

    # ---- reading -------------------------------------------------------------------------------
    def producer(self, tensor: str) -> node_def_pb2.NodeDef:
        return self.nodes[split_tensor(tensor)[0]]

    def consumers(self, tensor: str) -> list[node_def_pb2.NodeDef]:
        """Distinct data consumers of ``tensor`` (a node reading it twice appears once)."""
        names = dict.fromkeys(self._consumers.get(canonical(tensor), ()))
        return [self.nodes[n] for n in names]

    def value_consumers(self, tensor: str) -> list[node_def_pb2.NodeDef]:
        """Consumers that read the values (not only the shape) of ``tensor``."""
        return [n for n in self.consumers(tensor) if n.op not in SHAPE_ONLY_OPS]

    def is_fetched(self, tensor: str) -> bool:
        return canonical(tensor) in self.outputs

    def data_inputs(self, node: node_def_pb2.NodeDef) -> list[str]:
        return [t for t in node.input if not t.startswith("^")]

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of ``tensor`` if its producer is a ``Const`` node, else None."""
        name, index = split_tensor(tensor)
        node = self.nodes.get(name)
        if node is None or node.op != "Const" or index != 0:
            return None
        if name not in self._consts:
            held = self.weights.get(name) if self.weights is not None else None
            self._consts[name] = (
                held if held is not None else tf.make_ndarray(node.attr["value"].tensor)
            )
        return self._consts[name]

    def shape(self, tensor: str) -> tuple | None:
        """Static shape as a tuple (None for an unknown dimension), or None for an unknown rank."""
        value = self.const(tensor)
        if value is not None:
            return tuple(value.shape)
        return self.shapes.get(canonical(tensor))

    def rank(self, tensor: str) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dtype(self, node: node_def_pb2.NodeDef) -> tf.DType:
        for key in ("T", "dtype", "Tout", "DstT"):
            if key in node.attr and node.attr[key].type:
                return tf.as_dtype(node.attr[key].type)
        raise KeyError(f"node {node.name} ({node.op}) has no T or dtype attribute")

    def unique_name(self, base: str) -> str:
        name, i = base, 0
        while name in self.nodes:
            i += 1
            name = f"{base}_{i}"
        return name

    # ---- mutating ------------------------------------------------------------------------------
    def add_node(self, node: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
        if node.name in self.nodes:
            raise ValueError(f"duplicate node name {node.name}")
        added = self.graph_def.node.add()
        added.CopyFrom(node)
        self.nodes[added.name] = added
        for tensor in added.input:
            if not tensor.startswith("^"):
                self._consumers[canonical(tensor)].append(added.name)
        return added

    def add_const(self, base: str, value: np.ndarray, dtype: tf.DType) -> str:
        """Adds a ``Const`` node holding ``value`` cast to ``dtype``; returns its name."""
        node = node_def_pb2.NodeDef(name=self.unique_name(base), op="Const")
        node.attr["dtype"].type = dtype.as_datatype_enum
        array = np.asarray(value).astype(dtype.as_numpy_dtype, copy=False)
        self._fill(node, array, dtype)
        self.add_node(node)
        self._consts[node.name] = array
        return node.name

    def add_op(self, base: str, op: str, inputs: list[str], dtype: tf.DType, **attrs) -> str:
        node = node_def_pb2.NodeDef(name=self.unique_name(base), op=op, input=inputs)
        node.attr["T"].type = dtype.as_datatype_enum
        for key, value in attrs.items():
            if isinstance(value, bytes):
                node.attr[key].s = value
            else:
                raise TypeError(f"unsupported attribute {key}={value!r}")
        return self.add_node(node).name

    def set_input(self, node: node_def_pb2.NodeDef, index: int, tensor: str) -> None:
        """Makes data input ``index`` of ``node`` read ``tensor``."""
        old = canonical(node.input[index])
        self._consumers[old].remove(node.name)
        node.input[index] = tensor
        self._consumers[canonical(tensor)].append(node.name)

    def replace_uses(self, old: str, new: str, *, except_nodes: Iterable[str] = ()) -> None:
        """Every data consumer of ``old`` reads ``new`` instead; a fetched ``old`` stays fetched."""
        skip = set(except_nodes)
        old = canonical(old)
        for consumer in list(self.consumers(old)):
            if consumer.name in skip:
                continue
            for i, tensor in enumerate(consumer.input):
                if not tensor.startswith("^") and canonical(tensor) == old:
                    self.set_input(consumer, i, new)

    def redirect(self, old: str, new: str) -> None:
        """Every data reader of tensor ``old`` reads ``new`` instead (``new``'s own node aside),
        and a name the caller fetches keeps computing the value it stands for: if ``old`` is
        fetched, its name is handed to ``new``'s value. When ``new`` is computed from ``old`` (a
        node added after a layer), ``old``'s producer is renamed ``<name>/graphfold_inner`` and
        ``new``'s node takes its name; otherwise ``old``'s producer becomes ``Identity(new)``.
        The one mechanism by which a rewrite keeps the caller's fetches valid."""
        old, new = canonical(old), canonical(new)
        new_node = self.producer(new)
        self.replace_uses(old, new, except_nodes=[new_node.name])
        if not self.is_fetched(old):
            return
        old_name, index = split_tensor(old)
        if old in (canonical(t) for t in self.data_inputs(new_node)):
            if index != 0 or split_tensor(new)[1] != 0:
                raise ValueError(f"cannot hand the fetched name {old} to {new}")
            inner = self.unique_name(f"{old_name}/graphfold_inner")
            self._rename(old_name, inner)  # the fetched name is free ...
            self.created[inner] = old_name
            self._rename(new_node.name, old_name)  # ... for the node that now computes it
        else:
            self.become(self.nodes[old_name], "Identity", [new], self.dtype(self.nodes[old_name]))

    def _rename(self, old: str, new: str) -> None:
        """Renames node ``old`` to ``new`` (unused), with every data and control reference to it,
        its consumers, shapes and cached value."""
        node = self.nodes.pop(old)
        node.name = new
        self.nodes[new] = node
        for tensor in self.data_inputs(node):
            users = self._consumers[canonical(tensor)]
            users[users.index(old)] = new
        for key in [k for k in list(self._consumers) if split_tensor(k)[0] == old]:
            self._consumers[tensor_name(new, split_tensor(key)[1])] = self._consumers.pop(key)
        for key in [k for k in list(self.shapes) if split_tensor(k)[0] == old]:
            self.shapes[tensor_name(new, split_tensor(key)[1])] = self.shapes.pop(key)
        if old in self._consts:
            self._consts[new] = self._consts.pop(old)
        prefix = old + ":"
        for reader in self.graph_def.node:
            for i, tensor in enumerate(reader.input):
                control = tensor.startswith("^")
                name = tensor.lstrip("^")
                if name == old:
                    reader.input[i] = ("^" if control else "") + new
                elif name.startswith(prefix):
                    reader.input[i] = new + name[len(old) :]

    def become(
        self, node: node_def_pb2.NodeDef, op: str, inputs: list[str], dtype: tf.DType
    ) -> None:
        """Turns ``node`` into ``op(*inputs)`` of type ``dtype``, keeping its name (so that a
        fetched tensor stays valid) and its control inputs."""
        for tensor in self.data_inputs(node):
            self._consumers[canonical(tensor)].remove(node.name)
        controls = [t for t in node.input if t.startswith("^")]
        del node.input[:]
        node.input.extend(inputs + controls)
        for tensor in inputs:
            self._consumers[canonical(tensor)].append(node.name)
        node.op = op
        for key in list(node.attr):
            del node.attr[key]
        node.attr["T"].type = dtype.as_datatype_enum
        self._consts.pop(node.name, None)
        if self.weights is not None:
            self.weights.discard(node.name)

    def set_const(self, name: str, value: np.ndarray, dtype: tf.DType) -> None:
        """Overwrites the value of the ``Const`` node ``name``."""
        node = self.nodes[name]
        array = np.asarray(value).astype(dtype.as_numpy_dtype, copy=False)
        self._fill(node, array, dtype)
        self._consts[name] = array

    def _fill(self, node: node_def_pb2.NodeDef, array: np.ndarray, dtype: tf.DType) -> None:
        """Writes ``array`` into ``node``, or, when large, into ``weights`` (a stub in the node)."""
        if self.weights is not None and self.weights.keeps(array):
            stub(node.attr["value"].tensor, array, dtype)
            self.weights.put(node.name, array)
            return
        if self.weights is not None:
            self.weights.discard(node.name)
        fill_tensor(node.attr["value"].tensor, array, dtype)

    def remove_nodes(self, names: Iterable[str]) -> None:
        doomed = set(names)
        if not doomed:
            return
        for name in doomed:
            for tensor in self.nodes[name].input:
                if not tensor.startswith("^"):
                    users = self._consumers[canonical(tensor)]
                    users.remove(name)
            del self.nodes[name]
            self._consts.pop(name, None)
            if self.weights is not None:
                self.weights.discard(name)
        # In place, without copying a NodeDef: a stable sort moves the doomed nodes to the end
        # (the kept ones keep their order and stay the same objects), then one truncation.
        nodes = self.graph_def.node
        count = sum(n.name in doomed for n in nodes)
        nodes.sort(key=lambda n: n.name in doomed)
        del nodes[len(nodes) - count :]
        self.nodes = {n.name: n for n in self.graph_def.node}

    def prune(self, keep: Iterable[str] = ()) -> None:
        """Removes every node that no fetched tensor, control edge or ``keep`` node depends on."""
        live: set[str] = set()
        stack = [split_tensor(t)[0] for t in self.outputs] + list(keep)
        while stack:
            name = stack.pop()
            if name in live or name not in self.nodes:
                continue
            live.add(name)
            stack.extend(split_tensor(t.lstrip("^"))[0] for t in self.nodes[name].input)
        self.remove_nodes([n for n in self.nodes if n not in live])

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(n.op for n in self.graph_def.node).items()))
