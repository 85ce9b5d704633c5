"""Real inputs for verification, in ``saved_model_cli run``'s syntax.

``--inputs 'key=file.npy;key2=file.npz[name]'`` loads NumPy files (``.npy``: the array; ``.npz``:
the array ``name``, or its only array); ``--input_exprs 'key=[[1.0, 2.0]]'`` evaluates a Python
literal (``ast.literal_eval``, as ``saved_model_cli run`` does by default); a key given by both
takes the expression, as there. Entries are separated by ``;``; the flags may be repeated.
Pickles are refused (``allow_pickle=False``). ``check`` matches the values against a signature's
input specs: every key an input, every input given, dtype castable within its kind, shape
compatible.
"""

from __future__ import annotations

import ast
import os
import re
import zipfile
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from graphfold.errors import BadInput
from graphfold.options import spelled

_FILE_WITH_NAME = re.compile(r"([^=]+)=([^\[\]]+)\[([^\[\]]+)\]$")
_FILE = re.compile(r"([^=]+)=([^\[\]]+)$")


def _bad(message: str):
    return BadInput(message)


def _entries(text: str | Iterable[str] | None) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        text = [text]
    return [entry for part in text for entry in part.split(";") if entry]


def parse_inputs(inputs=None, input_exprs=None) -> dict[str, np.ndarray]:
    """key -> array from ``--inputs`` and ``--input_exprs`` strings (or lists of them)."""
    feeds = {}
    for entry in _entries(inputs):
        match = _FILE_WITH_NAME.match(entry) or _FILE.match(entry)
        if not match:
            raise _bad(
                f'--inputs "{entry}": expected <input_key>=<filename> or '
                f"<input_key>=<filename>[<variable_name>]"
            )
        key, path = match.group(1), match.group(2)
        name = match.group(3) if match.lastindex == 3 else None
        feeds[key] = load_array(path, name, key)
    for entry in _entries(input_exprs):
        if "=" not in entry:
            raise _bad(f'--input_exprs "{entry}": expected <input_key>=<python expression>')
        key, expr = entry.split("=", 1)
        try:
            value = ast.literal_eval(expr)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _bad(f'--input_exprs {key}: "{expr}" is not a Python literal') from None
        feeds[key] = np.asarray(value)
    return feeds


def load_array(path: str, name: str | None, key: str) -> np.ndarray:
    """The array of ``key=path`` or ``key=path[name]`` (a ``.npy`` or ``.npz`` file)."""
    where = f"--inputs {key}={path}"
    if not os.path.exists(path):
        raise _bad(f"{where}: no such file")
    if os.path.isdir(path):
        raise _bad(f"{where}: is a directory, not a .npy or .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _bad(f"{where}: not a .npy or .npz file ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        names = list(data.files)
        if name is None:
            if len(names) != 1:
                raise _bad(
                    f"{where}: holds {len(names)} arrays ({', '.join(names)}): name one "
                    f"as {key}={path}[NAME]"
                )
            name = names[0]
        if name not in names:
            raise _bad(
                f"{where}[{name}]: no array '{name}' in it (it holds: "
                f"{', '.join(names) or 'nothing'})"
            )
        try:
            return data[name]
        except ValueError as exc:  # an object array: a pickle
            raise _bad(f"{where}[{name}]: cannot load it without pickle ({exc})") from None


def check(
    signature: str,
    specs: dict[str, tf.TensorSpec],
    feeds: dict[str, np.ndarray],
    origin: str | None = None,
) -> dict[str, np.ndarray]:
    """``feeds`` as arrays of the signature's dtypes, or a ``BadInput`` naming the problem."""
    origin = origin or spelled("inputs")
    unknown = sorted(set(feeds) - set(specs))
    if unknown:
        raise _bad(
            f"{origin}: {', '.join(map(repr, unknown))} is not an input of signature "
            f"'{signature}' (its inputs: {', '.join(sorted(specs))})"
        )
    missing = sorted(set(specs) - set(feeds))
    if missing:
        raise _bad(
            f"{origin}: signature '{signature}' also needs input(s) {', '.join(map(repr, missing))}"
        )
    out = {}
    for key, spec in sorted(specs.items()):
        value = np.asarray(feeds[key])
        dtype = tf.as_dtype(spec.dtype)
        if dtype == tf.string:
            if value.dtype.kind not in "SUO":
                raise _bad(
                    f"{origin}: input '{key}' of signature '{signature}' is a string "
                    f"tensor; got {value.dtype.name} values"
                )
            value = (
                np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(
                    value
                )
                if value.size
                else value.astype(object)
            )
        else:
            target = np.dtype(dtype.as_numpy_dtype)
            if value.dtype.kind in "SUO" or not np.can_cast(value.dtype, target, "same_kind"):
                raise _bad(
                    f"{origin}: input '{key}' of signature '{signature}' is "
                    f"{dtype.name}; got {value.dtype.name} values"
                )
            value = value.astype(target)
        if not tf.TensorShape(value.shape).is_compatible_with(spec.shape):
            raise _bad(
                f"{origin}: input '{key}' of signature '{signature}' has shape "
                f"{spec.shape}; got shape {list(value.shape)}"
            )
        out[key] = value
    return out
