"""The boundary with TensorFlow functions: freeze a ConcreteFunction to a GraphDef (``freeze``),
fold it (``rewrite``), re-import it with the original signature (``function``), check it against
the original (``verify``, ``noise``, ``tolerance``, ``self_check``), and scan it for ops that
reach outside the graph (``scan``). Imports ``graphfold.fold`` and the shared leaves."""
