"""graphfold: fold batch normalization into the weights of frozen TensorFlow graphs, exactly."""

import os as _os
import sys as _sys


def _quiet_import_for_the_command() -> None:
    """Run as the ``graphfold`` command (or ``python -m graphfold``), keep TensorFlow's C++ log
    lines out of the tables unless the user asked for them (TF_CPP_MIN_LOG_LEVEL set below 2):
    raise the log level and drop what TensorFlow prints on stderr while it is imported."""
    argv = getattr(_sys, "orig_argv", [])
    as_command = (_os.path.basename(_sys.argv[0] if _sys.argv else "") == "graphfold"
                  or argv[1:3] == ["-m", "graphfold"])
    if not as_command or "tensorflow" in _sys.modules:
        return
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if _os.environ["TF_CPP_MIN_LOG_LEVEL"] < "2":
        return
    try:
        _sys.stderr.flush()
        saved, null = _os.dup(2), _os.open(_os.devnull, _os.O_WRONLY)
    except OSError:
        return
    _os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass            # reported, with stderr back, by the imports below
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(null)


_quiet_import_for_the_command()

from graphfold.function import FoldedFunction
from graphfold.options import Options
from graphfold.report import Entry, FoldReport
from graphfold.rewrite import optimize_graph_def, rewrite
from graphfold.saved_model import optimize_saved_model, verify_saved_models
from graphfold.repository import optimize_repository
from graphfold.version import __version__  # noqa: F401

__all__ = ["rewrite", "optimize_graph_def", "optimize_saved_model", "verify_saved_models",
           "optimize_repository", "Options", "FoldedFunction", "FoldReport", "Entry"]
