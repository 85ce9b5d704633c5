"""SavedModels and frozen GraphDef files in, the same out: the optimize run as named stages
(``saved_model``), its result, weights written into the SavedModel, assets, TF Serving warm-up
records, the inputs each signature is verified on. Imports ``convert``, ``fold`` and the leaves."""
