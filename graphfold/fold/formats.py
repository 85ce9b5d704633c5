"""Data formats, in one place: where the channel axis and the spatial axes of a tensor are.

TensorFlow names a layout by its ``data_format`` attribute: ``NHWC``/``NDHWC`` (channels last,
the default) or ``NCHW``/``NCDHW`` (channels first). A missing or empty attribute means channels
last.
"""

from __future__ import annotations


def data_format(node) -> bytes:
    """The node's ``data_format`` (``b"NHWC"`` when it has none)."""
    if "data_format" in node.attr and node.attr["data_format"].s:
        return node.attr["data_format"].s
    return b"NHWC"


def channels_first(fmt: bytes | str) -> bool:
    return (fmt.encode() if isinstance(fmt, str) else fmt).startswith(b"NC")


def channel_axis(fmt: bytes | str, rank: int) -> int:
    """The channel axis of a rank-``rank`` tensor in format ``fmt``."""
    return 1 if channels_first(fmt) else rank - 1


def spatial_axes(fmt: bytes | str, rank: int) -> list[int]:
    """The spatial axes (all but batch and channel) of a rank-``rank`` tensor in format ``fmt``."""
    return list(range(2, rank)) if channels_first(fmt) else list(range(1, rank - 1))


def bias_format(node) -> bytes:
    """``data_format`` for a ``BiasAdd`` placed after ``node`` (BiasAdd knows NHWC and NCHW only,
    whatever the rank)."""
    return b"NCHW" if channels_first(data_format(node)) else b"NHWC"
