"""The linear layers L(x) = W ⊛ x + b (FOLDING.md §2), one table entry each.

An entry says which input is the data and which the weight, on which axes of the data and the
output the channels are, the factor that scales W along its out- or in-channels, the constant
response ``W ⊛ t`` of the layer to a per-in-channel shift t, and whether that response is a
per-channel bias at all (zero padding or a transposed convolution's uneven taps make it a spatial
map). All math is float64. Adding a linear op is adding an entry here plus its weight math.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from graphfold import formats


@dataclasses.dataclass(frozen=True)
class Site:
    """A linear layer as the fold sees it: the node, its weight (float32 or float64 as the graph
    holds it, other dtypes as float64), and the static shapes of its data input and output
    (None where unknown)."""
    node: object
    w: np.ndarray
    data_shape: tuple | None
    out_shape: tuple | None

    @property
    def groups(self) -> int:
        """Grouped convolution: data channels / filter in-channels (1 when unknown)."""
        if self.node.op != "Conv2D" or self.data_shape is None:
            return 1
        c = self.data_shape[formats.channel_axis(formats.data_format(self.node),
                                                 len(self.data_shape))]
        n = self.w.shape[-2]
        return c // n if c is not None and n and c % n == 0 else 1


@dataclasses.dataclass(frozen=True)
class Linear:
    data: int                                       # index of the data input
    weight: int                                     # index of the weight input
    in_axis: Callable[[object, int], int]           # (node, rank) -> channel axis of the data
    out_axis: Callable[[object, int], int]          # (node, rank) -> channel axis of the output
    in_channels: Callable[[Site], int]
    out_channels: Callable[[Site], int]
    out_factor: Callable[[Site, np.ndarray], np.ndarray]    # F, W ⊙_out s = W · F (broadcast)
    in_factor: Callable[[Site, np.ndarray], np.ndarray]     # F, W ⊙_in s = W · F (broadcast)
    shift_response: Callable[[Site, np.ndarray], "np.ndarray | str"]
    """W ⊛ t as a per-out-channel vector, or why it is not one (then the shift cannot fold)."""
    refuse: Callable[[Site], "str | None"] = lambda site: None
    """Why the layer cannot take any fold (a form the math does not cover), or None."""


def _fmt_axis(node, rank: int) -> int:
    return formats.channel_axis(formats.data_format(node), rank)


def _last(node, rank: int) -> int:
    return rank - 1


def _w64(site: Site) -> np.ndarray:
    """The weight in float64, for sums of products (a product with the float64 s promotes it
    by itself, exactly)."""
    return site.w.astype(np.float64, copy=False)


# ---- Conv2D / Conv3D: [..., C_in/g, C_out] ------------------------------------------------------
def _group_index(site: Site) -> np.ndarray:
    """``index[j, o]``: the data channel that filter in-index ``j`` of output ``o`` reads
    (grouped: ``(o // (C_out/g)) · C_in/g + j``; ungrouped: ``j``)."""
    n_in, n_out, g = site.w.shape[-2], site.w.shape[-1], site.groups
    return (np.arange(n_out)[None, :] // (n_out // g)) * n_in + np.arange(n_in)[:, None]


def _conv_in_factor(site: Site, s: np.ndarray) -> np.ndarray:
    return s[_group_index(site)]


def _conv_response(site: Site, t: np.ndarray) -> np.ndarray | str:
    why = _padding_touches(site)
    if why:
        return why
    w = _w64(site).reshape(-1, *site.w.shape[-2:])
    return np.einsum("kjo,jo->o", w, t[_group_index(site)])


def _padding_touches(site: Site) -> str | None:
    """Why zero padding reaches the layer's input (SAME/EXPLICIT with pads > 0), or None."""
    node = site.node
    padding = node.attr["padding"].s
    if padding == b"VALID":
        return None
    why = ("zero padding touches the input: the shift cannot fold (the border outputs would "
           "change)")
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


CONV = Linear(
    data=0, weight=1, in_axis=_fmt_axis, out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[-2] * site.groups,
    out_channels=lambda site: site.w.shape[-1],
    out_factor=lambda site, s: s,
    in_factor=_conv_in_factor,
    shift_response=_conv_response)


# ---- DepthwiseConv2dNative: [kh, kw, C_in, M], o = c·M + m ---------------------------------------
def _dw_response(site: Site, t: np.ndarray) -> np.ndarray | str:
    why = _padding_touches(site)
    return why or np.einsum("hwcm,c->cm", _w64(site), t).reshape(-1)


DEPTHWISE = Linear(
    data=0, weight=1, in_axis=_fmt_axis, out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[2],
    out_channels=lambda site: site.w.shape[2] * site.w.shape[3],
    out_factor=lambda site, s: s.reshape(site.w.shape[2], site.w.shape[3]),
    in_factor=lambda site, s: s[:, None],
    shift_response=_dw_response)


# ---- MatMul: [K, N] (transpose_b: [N, K]) --------------------------------------------------------
def _transposed(node) -> bool:
    return bool(node.attr["transpose_b"].b)


MATMUL = Linear(     # transpose_a: the data is [K, M], its channels (K) on axis 0
    data=0, weight=1, out_axis=_last,
    in_axis=lambda node, rank: 0 if node.attr["transpose_a"].b else rank - 1,
    in_channels=lambda site: site.w.shape[1 if _transposed(site.node) else 0],
    out_channels=lambda site: site.w.shape[0 if _transposed(site.node) else 1],
    out_factor=lambda site, s: s[:, None] if _transposed(site.node) else s[None, :],
    in_factor=lambda site, s: s[None, :] if _transposed(site.node) else s[:, None],
    shift_response=lambda site, t: _w64(site) @ t if _transposed(site.node) else t @ _w64(site))


# ---- Conv2DBackpropInput / Conv3DBackpropInputV2: [..., C_out, C_in], data input 2 ---------------
def _tap_coverage(site: Site) -> list[np.ndarray] | str:
    """Per spatial axis, ``V[p, k]`` = 1 when output position p of the transposed convolution
    receives kernel tap k from some input position (p = i·stride + k·dilation − pad_before for
    an i in [0, n_in)), else 0: the adjoint of the forward convolution's index map."""
    node, fmt = site.node, formats.data_format(site.node)
    if site.data_shape is None or site.out_shape is None:
        return "the layer's input or output size is unknown"
    rank = len(site.out_shape)
    strides = list(node.attr["strides"].list.i) or [1] * rank
    dilations = list(node.attr["dilations"].list.i) or [1] * rank
    padding = node.attr["padding"].s
    explicit = list(node.attr["explicit_paddings"].list.i) if padding == b"EXPLICIT" else []
    coverage = []
    for k, axis in enumerate(formats.spatial_axes(fmt, rank)):
        n_in, n_out = site.data_shape[axis], site.out_shape[axis]
        if n_in is None or n_out is None:
            return "the layer's input or output size is unknown"
        kernel, stride, dilation = site.w.shape[k], strides[axis], dilations[axis]
        if padding == b"SAME":
            before = max((n_in - 1) * stride + (kernel - 1) * dilation + 1 - n_out, 0) // 2
        else:
            before = explicit[2 * axis] if explicit else 0
        source = np.arange(n_out)[:, None] + before - np.arange(kernel)[None, :] * dilation
        coverage.append(((source % stride == 0) & (source >= 0) &
                         (source < n_in * stride)).astype(np.float64))
    return coverage


def transposed_shift_map(site: Site, t: np.ndarray) -> np.ndarray | str:
    """What a constant input shift t adds to a transposed convolution's output, at every output
    position: ``M[p, o] = Σ_{k reaching p} Σ_c W[k, o, c] t_c`` (docs/folding.md), in float64;
    or why it cannot be computed."""
    coverage = _tap_coverage(site)
    if isinstance(coverage, str):
        return coverage
    taps = _w64(site) @ t                                   # [..., C_out]: Σ_c W[k, o, c] t_c
    n = len(coverage)
    positions, kernel = "abc"[:n], "klm"[:n]
    spec = ",".join(p + k for p, k in zip(positions, kernel)) + f",{kernel}o->{positions}o"
    return np.einsum(spec, *coverage, taps)


def _transposed_response(site: Site, t: np.ndarray) -> np.ndarray | str:
    """The shift folds into the bias exactly when its map is the same at every position."""
    shift_map = transposed_shift_map(site, t)
    if isinstance(shift_map, str):
        return shift_map
    flat = shift_map.reshape(-1, shift_map.shape[-1])
    if np.max(np.abs(flat - flat[0]), initial=0.0) > 1e-12 * max(np.max(np.abs(flat)), 1e-300):
        return ("transposed convolution: its output positions receive different sets of kernel "
                "taps (by phase modulo the stride, and at the borders), so the shift adds a "
                "spatial map, not a per-channel bias")
    return flat[0]


TRANSPOSED_CONV = Linear(
    data=2, weight=1, in_axis=_fmt_axis, out_axis=_fmt_axis,
    in_channels=lambda site: site.w.shape[-1],
    out_channels=lambda site: site.w.shape[-2],
    out_factor=lambda site, s: s[:, None],
    in_factor=lambda site, s: s,
    shift_response=_transposed_response)


# ---- BatchMatMul/V2/V3 with a constant [K, N] weight (adj_y: [N, K]); Einsum as a dense layer --
def _dense(w_kn: Callable[[Site], bool]) -> dict:
    """Weight math of ``x @ W`` on the last axis, W of shape [K, N] (``w_kn``) or [N, K]."""
    return dict(
        in_channels=lambda site: site.w.shape[0 if w_kn(site) else 1],
        out_channels=lambda site: site.w.shape[1 if w_kn(site) else 0],
        out_factor=lambda site, s: s[None, :] if w_kn(site) else s[:, None],
        in_factor=lambda site, s: s[:, None] if w_kn(site) else s[None, :],
        shift_response=lambda site, t: t @ _w64(site) if w_kn(site) else _w64(site) @ t)


def _batch_matmul_refuse(site: Site) -> str | None:
    if site.w.ndim != 2:
        return f"{site.node.op}: the weight has batch dimensions (shape {list(site.w.shape)})"
    attr = site.node.attr
    if "Ta" in attr and len({attr[k].type for k in ("Ta", "Tb", "Tout")}) != 1:
        return f"{site.node.op} mixes dtypes (Ta, Tb, Tout differ)"
    return None


BATCH_MATMUL = Linear(   # adj_x: the data is [..., K, M], its channels on axis -2
    data=0, weight=1, out_axis=_last,
    in_axis=lambda node, rank: rank - 2 if node.attr["adj_x"].b else rank - 1,
    refuse=_batch_matmul_refuse, **_dense(lambda site: not site.node.attr["adj_y"].b))


def dense_equation(node) -> tuple[str, str] | None:
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


def _einsum_refuse(site: Site) -> str | None:
    if dense_equation(site.node) is None:
        equation = site.node.attr["equation"].s.decode()
        return f"Einsum {equation!r} is not a dense layer (...c,cd->...d)"
    return None


def _einsum_kn(site: Site) -> bool:
    """Whether the dense Einsum's weight is [K, N] (subscripts ``cd``) rather than [N, K]."""
    weight = site.node.attr["equation"].s.decode().replace(" ", "").split("->")[0].split(",")[1]
    return weight == "".join(dense_equation(site.node))


EINSUM = Linear(
    data=0, weight=1, in_axis=_last, out_axis=_last, refuse=_einsum_refuse, **_dense(_einsum_kn))


LINEAR: dict[str, Linear] = {
    "Conv2D": CONV,
    "Conv3D": CONV,
    "DepthwiseConv2dNative": DEPTHWISE,
    "MatMul": MATMUL,
    "Conv2DBackpropInput": TRANSPOSED_CONV,
    "Conv3DBackpropInputV2": TRANSPOSED_CONV,
    "BatchMatMul": BATCH_MATMUL,
    "BatchMatMulV2": BATCH_MATMUL,
    "BatchMatMulV3": BATCH_MATMUL,
    "Einsum": EINSUM,
}
