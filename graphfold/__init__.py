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
    "rewrite": "graphfold.convert.rewrite",
    "optimize_graph_def": "graphfold.convert.rewrite",
    "optimize_saved_model": "graphfold.serving.saved_model",
    "verify_saved_models": "graphfold.serving.saved_model",
    "optimize_repository": "graphfold.fleet.repository",
    "Options": "graphfold.options",
    "FoldedFunction": "graphfold.convert.function",
    "FoldReport": "graphfold.fold.report",
    "Entry": "graphfold.fold.report",
}
# attribute -> the module it names (the layers' packages; ``beam`` where it was first documented)
_SUBMODULES = {
    name: f"graphfold.{name}"
    for name in (
        "examples",
        "options",
        "errors",
        "progress",
        "fold",
        "convert",
        "serving",
        "fleet",
        "cli",
    )
}
_SUBMODULES["beam"] = "graphfold.fleet.beam"

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
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
