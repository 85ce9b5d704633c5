"""Every "no" graphfold says, in one module.

``Blocked`` is the one representation of "no, because ...": a node and the rule that failed. The
folding engine returns it as a value, never raises it (the planner, the weight computation when a
folded value overflows its dtype, a layer table entry that cannot take a fold, a call left as it
is); a batch norm that can never fold (training mode) carries it; freezing raises its subclass
``NotFreezable``. The ``GraphfoldError`` family are the errors a user of the SavedModel
API and the CLI sees (each with its exit code).
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # the CLI's exit codes
EXIT_VERIFY = EXIT_FAILED  # a verification that failed is a failure like any other


class Blocked(Exception):
    """Why something cannot fold: the first node that stopped it, and the rule that failed."""

    def __init__(self, node: str, reason: str):
        super().__init__(node, reason)
        self.node = node
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" if self.node else self.reason


class NotFreezable(Blocked, ValueError):
    """The function holds state that freezing cannot turn into constants."""

    def __init__(self, reason: str):
        super().__init__("", reason)


class GraphfoldError(Exception):
    """An error with a one-line message meant for the user; ``exit_code`` for the CLI."""

    exit_code = EXIT_USAGE


class BadInput(GraphfoldError):
    """Bad usage or bad input: a path, a SavedModel, a signature key, a tag set (exit 2)."""

    exit_code = EXIT_USAGE


class RewriteFailed(GraphfoldError):
    """graphfold itself failed on a signature (an exception no rule expects): nothing was
    written (exit 1). ``__cause__`` is the exception, for its traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, signature: str, error: BaseException):
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        first = lines[0][:300] if lines else ""
        what = f"{type(error).__name__}: {first}" if first else type(error).__name__
        super().__init__(
            f"signature '{signature}': graphfold failed to rewrite it ({what}); nothing was written"
        )
        self.signature = signature


class VerificationFailed(GraphfoldError):
    """An optimized signature disagrees with the original: nothing was written (exit 1)."""

    exit_code = EXIT_VERIFY

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result
