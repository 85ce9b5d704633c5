"""graphfold: fold batch normalization into the weights of frozen TensorFlow graphs, exactly."""

from graphfold.function import FoldedFunction
from graphfold.report import Entry, FoldReport
from graphfold.rewrite import optimize_graph_def, rewrite

__all__ = ["rewrite", "optimize_graph_def", "FoldedFunction", "FoldReport", "Entry"]
__version__ = "0.1.0"
