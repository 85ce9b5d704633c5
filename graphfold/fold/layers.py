"""The linear layers L(x) = W ⊛ x + b (docs/folding.md §2), one table entry each.

An entry says which input is the data and which the weight, on which axes of the data and the
output the channels are, the factor that scales W along its out- or in-channels, the constant
response ``W ⊛ t`` of the layer to a per-in-channel shift t, and whether that response is a
per-channel bias at all (zero padding or a transposed convolution's uneven taps make it a spatial
map). An entry also carries its op's variants and quirks: groups, whether TensorFlow's CPU kernel
needs XLA for it, whether a bias may follow it, whether oneDNN fuses a ``Pad`` into it. All math is
float64. Adding a linear op is adding an entry here plus its weight math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from graphfold.errors import Blocked
from graphfold.fold import formats

if TYPE_CHECKING:
    from tensorflow.core.framework.node_def_pb2 import NodeDef


@dataclasses.dataclass(frozen=True)
class Site:
    """A linear layer as the fold sees it: the node, its weight (float32 or float64 as the graph
    holds it, other dtypes as float64), and the static shapes of its data input and output
    (None where unknown). ``host``: the graph node that runs ``node``, when it is a call whose
    function body holds ``node`` (None: ``node`` itself), its input ``weight_input`` the weight."""

    node: NodeDef
    w: np.ndarray
    data_shape: tuple | None
    out_shape: tuple | None
    host: NodeDef | None = None
    weight_input: int | None = None

    @property
    def layer(self) -> NodeDef:
        """The graph node a fold rewires: the layer itself, or the call that runs it."""
        return self.host if self.host is not None else self.node

    @property
    def weight_index(self) -> int:
        """The input of ``layer`` that holds the weight."""
        return self.linear.weight if self.weight_input is None else self.weight_input

    @property
    def linear(self) -> Linear:
        return LINEAR[self.node.op]

    @property
    def groups(self) -> int:
        return self.linear.groups(self)


@dataclasses.dataclass(frozen=True)
class Linear:
    data: int  # index of the data input
    weight: int  # index of the weight input
    in_axis: Callable[[NodeDef, int], int]  # (node, rank) -> channel axis of the data
    out_axis: Callable[[NodeDef, int], int]  # (node, rank) -> channel axis of the output
    in_channels: Callable[[Site], int]
    out_channels: Callable[[Site], int]
    out_factor: Callable[[Site, np.ndarray], np.ndarray]  # F, W ⊙_out s = W · F (broadcast)
    in_factor: Callable[[Site, np.ndarray], np.ndarray]  # F, W ⊙_in s = W · F (broadcast)
    shift_response: Callable[[Site, np.ndarray], np.ndarray | Blocked]
    """W ⊛ t as a per-out-channel vector, or why it is not one (then the shift cannot fold)."""
    refuse: Callable[[Site], Blocked | None] = lambda site: None
    """Why the layer cannot take any fold (a form the math does not cover), or None."""
    groups: Callable[[Site], int] = lambda site: 1
    """Grouped convolution: data channels / filter in-channels."""
    needs_xla: bool = False
    """TensorFlow's CPU kernel lacks a form Keras runs it in inside an XLA call (a grouped 3-D
    convolution): such a call is not inlined."""
    refuse_bias: Callable[[NodeDef], Blocked | None] = lambda node: None
    """Why no bias may be added after the layer (a TensorFlow bug), or None."""
    fuses_pad: bool = False
    """oneDNN fuses a ``Pad`` that feeds the layer, and drops a padding of the batch or channel
    axis (TensorFlow 2.21): a fold must not make such a ``Pad`` feed it directly."""


def _fmt_axis(node: NodeDef, rank: int) -> int:
    return formats.channel_axis(formats.data_format(node), rank)


def _last(node: NodeDef, rank: int) -> int:
    return rank - 1


def _w64(site: Site) -> np.ndarray:
    """The weight in float64, for sums of products (a product with the float64 s promotes it
    by itself, exactly)."""
    return site.w.astype(np.float64, copy=False)


# ---- Conv2D / Conv3D: [..., C_in/g, C_out] ------------------------------------------------------
def _conv_groups(site: Site) -> int:
    """Data channels / filter in-channels (1 when unknown or not a whole number)."""
    if site.data_shape is None:
        return 1
    c = site.data_shape[_fmt_axis(site.node, len(site.data_shape))]
    n = site.w.shape[-2]
    return c // n if c is not None and n and c % n == 0 else 1


def _group_index(site: Site) -> np.ndarray:
    """``index[j, o]``: the data channel that filter in-index ``j`` of output ``o`` reads
    (grouped: ``(o // (C_out/g)) · C_in/g + j``; ungrouped: ``j``)."""
    n_in, n_out, g = site.w.shape[-2], site.w.shape[-1], site.groups
    return (np.arange(n_out)[None, :] // (n_out // g)) * n_in + np.arange(n_in)[:, None]


def _conv_in_factor(site: Site, s: np.ndarray) -> np.ndarray:
    return s[_group_index(site)]


def _conv_response(site: Site, t: np.ndarray) -> np.ndarray | Blocked:
    blocked = _padding_touches(site)
    if blocked:
        return blocked
    w = _w64(site).reshape(-1, *site.w.shape[-2:])
    return np.einsum("kjo,jo->o", w, t[_group_index(site)])


PADDING_TOUCHES = (
    "zero padding touches the input: the shift cannot fold (the border outputs would change)"
)


def _padding_touches(site: Site) -> Blocked | None:
    """Why zero padding reaches the layer's input (SAME/EXPLICIT with pads > 0), or None."""
    node = site.node
    padding = node.attr["padding"].s
    if padding == b"VALID":
        return None
    why = Blocked(node.name, PADDING_TOUCHES)
    if padding == b"EXPLICIT":
        return why if np.any(np.asarray(node.attr["explicit_paddings"].list.i) != 0) else None
    shape = site.data_shape
    if shape is None:
        return why
    fmt = formats.data_format(node)
    strides = list(node.attr["strides"].list.i) or [1] * len(shape)
    dilations = list(node.attr["dilations"].list.i) or [1] * len(shape)
    for k, axis in enumerate(formats.spatial_axes(fmt, len(shape))):
        kernel, size = site.w.shape[k], shape[axis]
        if kernel == 1:
            continue
        if size is None:
            return why
        out = -(-size // strides[axis])
        if (out - 1) * strides[axis] + (kernel - 1) * dilations[axis] + 1 - size > 0:
            return why
    return None


CONV2D = Linear(
    data=0,
    weight=1,
    in_axis=_fmt_axis,
    out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[-2] * site.groups,
    out_channels=lambda site: site.w.shape[-1],
    out_factor=lambda site, s: s,
    in_factor=_conv_in_factor,
    shift_response=_conv_response,
    groups=_conv_groups,
    fuses_pad=True,
)
CONV3D = dataclasses.replace(CONV2D, fuses_pad=False, needs_xla=True)


# ---- DepthwiseConv2dNative: [kh, kw, C_in, M], o = c·M + m ---------------------------------------
def _dw_response(site: Site, t: np.ndarray) -> np.ndarray | Blocked:
    blocked = _padding_touches(site)
    return blocked or np.einsum("hwcm,c->cm", _w64(site), t).reshape(-1)


def _dw_refuse_bias(node: NodeDef) -> Blocked | None:
    """TensorFlow 2.21 with oneDNN (the default x86 CPU build) aborts the process (``CHECK`` in
    tensor_format.h, from grappler's remapper) when a ``DepthwiseConv2dNative`` with
    ``padding=EXPLICIT`` feeds a ``BiasAdd`` or ``Add``: never add one after such a layer."""
    if node.attr["padding"].s == b"EXPLICIT":
        return Blocked(
            node.name,
            "a bias after a DepthwiseConv2dNative with EXPLICIT padding "
            "makes TensorFlow's oneDNN remapper abort the process",
        )
    return None


DEPTHWISE = Linear(
    data=0,
    weight=1,
    in_axis=_fmt_axis,
    out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[2],
    out_channels=lambda site: site.w.shape[2] * site.w.shape[3],
    out_factor=lambda site, s: s.reshape(site.w.shape[2], site.w.shape[3]),
    in_factor=lambda site, s: s[:, None],
    shift_response=_dw_response,
    refuse_bias=_dw_refuse_bias,
)


# ---- MatMul: [K, N] (transpose_b: [N, K]) --------------------------------------------------------
def _transposed(node: NodeDef) -> bool:
    return bool(node.attr["transpose_b"].b)


MATMUL = Linear(  # transpose_a: the data is [K, M], its channels (K) on axis 0
    data=0,
    weight=1,
    out_axis=_last,
    in_axis=lambda node, rank: 0 if node.attr["transpose_a"].b else rank - 1,
    in_channels=lambda site: site.w.shape[1 if _transposed(site.node) else 0],
    out_channels=lambda site: site.w.shape[0 if _transposed(site.node) else 1],
    out_factor=lambda site, s: s[:, None] if _transposed(site.node) else s[None, :],
    in_factor=lambda site, s: s[None, :] if _transposed(site.node) else s[:, None],
    shift_response=lambda site, t: _w64(site) @ t if _transposed(site.node) else t @ _w64(site),
)


# ---- Conv2DBackpropInput / Conv3DBackpropInputV2: [..., C_out, C_in], data input 2 ---------------
def _tap_coverage(site: Site) -> list[np.ndarray] | Blocked:
    """Per spatial axis, ``V[p, k]`` = 1 when output position p of the transposed convolution
    receives kernel tap k from some input position (p = i·stride + k·dilation − pad_before for
    an i in [0, n_in)), else 0: the adjoint of the forward convolution's index map."""
    node, fmt = site.node, formats.data_format(site.node)
    unknown = Blocked(node.name, "the layer's input or output size is unknown")
    if site.data_shape is None or site.out_shape is None:
        return unknown
    rank = len(site.out_shape)
    strides = list(node.attr["strides"].list.i) or [1] * rank
    dilations = list(node.attr["dilations"].list.i) or [1] * rank
    padding = node.attr["padding"].s
    explicit = list(node.attr["explicit_paddings"].list.i) if padding == b"EXPLICIT" else []
    coverage = []
    for k, axis in enumerate(formats.spatial_axes(fmt, rank)):
        n_in, n_out = site.data_shape[axis], site.out_shape[axis]
        if n_in is None or n_out is None:
            return unknown
        kernel, stride, dilation = site.w.shape[k], strides[axis], dilations[axis]
        if padding == b"SAME":
            before = max((n_in - 1) * stride + (kernel - 1) * dilation + 1 - n_out, 0) // 2
        else:
            before = explicit[2 * axis] if explicit else 0
        source = np.arange(n_out)[:, None] + before - np.arange(kernel)[None, :] * dilation
        coverage.append(
            ((source % stride == 0) & (source >= 0) & (source < n_in * stride)).astype(np.float64)
        )
    return coverage


def transposed_shift_map(site: Site, t: np.ndarray) -> np.ndarray | Blocked:
    """What a constant input shift t adds to a transposed convolution's output, at every output
    position: ``M[p, o] = Σ_{k reaching p} Σ_c W[k, o, c] t_c`` (docs/folding.md), in float64;
    or why it cannot be computed."""
    coverage = _tap_coverage(site)
    if isinstance(coverage, Blocked):
        return coverage
    taps = _w64(site) @ t  # [..., C_out]: Σ_c W[k, o, c] t_c
    n = len(coverage)
    positions, kernel = "abc"[:n], "klm"[:n]
    spec = ",".join(p + k for p, k in zip(positions, kernel)) + f",{kernel}o->{positions}o"
    return np.einsum(spec, *coverage, taps)


def _transposed_response(site: Site, t: np.ndarray) -> np.ndarray | Blocked:
    """The shift folds into the bias exactly when its map is the same at every position."""
    shift_map = transposed_shift_map(site, t)
    if isinstance(shift_map, Blocked):
        return shift_map
    flat = shift_map.reshape(-1, shift_map.shape[-1])
    if np.max(np.abs(flat - flat[0]), initial=0.0) > 1e-12 * max(np.max(np.abs(flat)), 1e-300):
        return Blocked(
            site.node.name,
            "transposed convolution: its output positions receive different sets of "
            "kernel taps (by phase modulo the stride, and at the borders), so the "
            "shift adds a spatial map, not a per-channel bias",
        )
    return flat[0]


TRANSPOSED_CONV2D = Linear(
    data=2,
    weight=1,
    in_axis=_fmt_axis,
    out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[-1],
    out_channels=lambda site: site.w.shape[-2],
    out_factor=lambda site, s: s[:, None],
    in_factor=lambda site, s: s,
    shift_response=_transposed_response,
)
TRANSPOSED_CONV3D = dataclasses.replace(TRANSPOSED_CONV2D, needs_xla=True)


# ---- BatchMatMul/V2/V3 with a constant [K, N] weight (adj_y: [N, K]); Einsum as a dense layer --
def _dense(w_kn: Callable[[Site], bool]) -> dict:
    """Weight math of ``x @ W`` on the last axis, W of shape [K, N] (``w_kn``) or [N, K]."""
    return dict(
        in_channels=lambda site: site.w.shape[0 if w_kn(site) else 1],
        out_channels=lambda site: site.w.shape[1 if w_kn(site) else 0],
        out_factor=lambda site, s: s[None, :] if w_kn(site) else s[:, None],
        in_factor=lambda site, s: s[:, None] if w_kn(site) else s[None, :],
        shift_response=lambda site, t: t @ _w64(site) if w_kn(site) else _w64(site) @ t,
    )


def _batch_matmul_refuse(site: Site) -> Blocked | None:
    node = site.node
    if site.w.ndim != 2:
        return Blocked(
            node.name, f"{node.op}: the weight has batch dimensions (shape {list(site.w.shape)})"
        )
    attr = node.attr
    if "Ta" in attr and len({attr[k].type for k in ("Ta", "Tb", "Tout")}) != 1:
        return Blocked(node.name, f"{node.op} mixes dtypes (Ta, Tb, Tout differ)")
    return None


BATCH_MATMUL = Linear(  # adj_x: the data is [..., K, M], its channels on axis -2
    data=0,
    weight=1,
    out_axis=_last,
    in_axis=lambda node, rank: rank - 2 if node.attr["adj_x"].b else rank - 1,
    refuse=_batch_matmul_refuse,
    **_dense(lambda site: not site.node.attr["adj_y"].b),
)


def dense_equation(node: NodeDef) -> tuple[str, str] | None:
    """``(c, d)`` when ``Einsum``'s equation is a dense layer ``...c,cd->...d`` (or ``dc``): the
    weight's two subscripts, the contracted one last in the data, the free one last in the
    output, every other data subscript kept in order; else None."""
    equation = node.attr["equation"].s.decode().replace(" ", "").replace("...", ".")
    operands, _, out = equation.partition("->")
    parts = operands.split(",")
    if len(parts) != 2 or len(parts[1]) != 2 or not parts[0] or not out:
        return None
    x, w = parts
    c, d = x[-1], out[-1]
    if set(w) != {c, d} or c == d or x[:-1] != out[:-1] or c in out or d in x:
        return None
    return c, d


def _einsum_refuse(site: Site) -> Blocked | None:
    if dense_equation(site.node) is None:
        equation = site.node.attr["equation"].s.decode()
        return Blocked(site.node.name, f"Einsum {equation!r} is not a dense layer (...c,cd->...d)")
    return None


def _einsum_kn(site: Site) -> bool:
    """Whether the dense Einsum's weight is [K, N] (subscripts ``cd``) rather than [N, K]."""
    weight = site.node.attr["equation"].s.decode().replace(" ", "").split("->")[0].split(",")[1]
    dense = dense_equation(site.node)
    assert dense is not None, "asked only of an Einsum that _einsum_refuse accepts"
    return weight == "".join(dense)


EINSUM = Linear(
    data=0, weight=1, in_axis=_last, out_axis=_last, refuse=_einsum_refuse, **_dense(_einsum_kn)
)


LINEAR: dict[str, Linear] = {
    "Conv2D": CONV2D,
    "Conv3D": CONV3D,
    "DepthwiseConv2dNative": DEPTHWISE,
    "MatMul": MATMUL,
    "Conv2DBackpropInput": TRANSPOSED_CONV2D,
    "Conv3DBackpropInputV2": TRANSPOSED_CONV3D,
    "BatchMatMul": BATCH_MATMUL,
    "BatchMatMulV2": BATCH_MATMUL,
    "BatchMatMulV3": BATCH_MATMUL,
    "Einsum": EINSUM,
}
