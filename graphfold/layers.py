"""Weight layouts of the linear layers L(x) = W ⊛ x + b (FOLDING.md §2), in one table.

For each op: where its output channels are, how to scale W along out- or in-channels, and the
constant response ``W ⊛ t`` of the layer to a per-in-channel shift t. All math is float64.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from graphfold.affine import channel_axis_of


@dataclasses.dataclass(frozen=True)
class Layout:
    scale_out: Callable[[np.ndarray, np.ndarray, object], np.ndarray]   # (W, s, node) -> W ⊙_out s
    scale_in: Callable[[np.ndarray, np.ndarray, object], np.ndarray]    # (W, s, node) -> W ⊙_in s
    response: Callable[[np.ndarray, np.ndarray, object], np.ndarray]    # (W, t, node) -> W ⊛ t
    in_channels: Callable[[np.ndarray, object], int]
    out_channels: Callable[[np.ndarray, object], int]


def _conv_scale_out(w, s, node):
    return w * s                                                    # [..., C_in, C_out]


def _conv_scale_in(w, s, node):
    return w * s[:, None]


def _conv_response(w, t, node):
    return np.einsum("kco,c->o", w.reshape(-1, *w.shape[-2:]), t)


def _dw_scale_out(w, s, node):
    kh, kw, c, m = w.shape
    return w * s.reshape(c, m)                                      # o = c·M + m


def _dw_response(w, t, node):
    return np.einsum("hwcm,c->cm", w, t).reshape(-1)


def _transposed(node) -> bool:
    return bool(node.attr["transpose_b"].b)


def _mm_scale_out(w, s, node):
    return w * s[:, None] if _transposed(node) else w * s[None, :]


def _mm_scale_in(w, s, node):
    return w * s[None, :] if _transposed(node) else w * s[:, None]


def _mm_response(w, t, node):
    return w @ t if _transposed(node) else t @ w


LAYOUTS = {
    "Conv2D": Layout(_conv_scale_out, _conv_scale_in, _conv_response,
                     lambda w, n: w.shape[-2], lambda w, n: w.shape[-1]),
    "Conv3D": Layout(_conv_scale_out, _conv_scale_in, _conv_response,
                     lambda w, n: w.shape[-2], lambda w, n: w.shape[-1]),
    "DepthwiseConv2dNative": Layout(_dw_scale_out, _conv_scale_in, _dw_response,
                                    lambda w, n: w.shape[2], lambda w, n: w.shape[2] * w.shape[3]),
    "MatMul": Layout(_mm_scale_out, _mm_scale_in, _mm_response,
                     lambda w, n: w.shape[1 if _transposed(n) else 0],
                     lambda w, n: w.shape[0 if _transposed(n) else 1]),
}


def channel_axis(node, rank: int) -> int:
    """The channel axis of a linear layer's input and output tensors."""
    if node.op == "MatMul":
        return rank - 1
    return channel_axis_of(node.attr["data_format"].s or b"NHWC", rank)


def bias_format(node) -> bytes:
    """``data_format`` for a ``BiasAdd`` placed after the layer."""
    fmt = node.attr["data_format"].s if "data_format" in node.attr else b""
    return b"NCHW" if fmt.startswith(b"NC") else b"NHWC"
