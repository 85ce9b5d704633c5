"""graphfold: fold batch normalization into the weights of frozen TensorFlow graphs, exactly.

The public names are imported when first used (PEP 562): ``import graphfold`` and the command's
``--help`` and ``--version`` do not pay for importing TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
import types

from graphfold.version import __version__  # noqa: F401

# public name -> the module that defines it
_HOMES = {
    "rewrite": "graphfold.rewrite",
    "optimize_graph_def": "graphfold.rewrite",
    "optimize_saved_model": "graphfold.saved_model",
    "verify_saved_models": "graphfold.saved_model",
    "optimize_repository": "graphfold.repository",
    "Options": "graphfold.options",
    "FoldedFunction": "graphfold.function",
    "FoldReport": "graphfold.report",
    "Entry": "graphfold.report",
}
_SUBMODULES = ("examples", "options", "errors", "beam")

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"graphfold.{name}")
    else:
        raise AttributeError(f"module 'graphfold' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES, *_SUBMODULES])


class _Package(types.ModuleType):
    """The package: importing its submodule ``graphfold.rewrite`` (which ``saved_model`` does)
    must not hide the public function ``graphfold.rewrite`` behind the module. Python binds a
    submodule on its package once it is imported; a public name of ``_HOMES`` stays its
    function (``__getattr__``), the submodule stays in ``sys.modules``."""

    def __setattr__(self, name, value):
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
