"""The folding engine: a GraphDef in, a GraphDef out (docs/folding.md). Recognise each
per-channel affine map (``affine``), walk the rule table (``rules``) to the linear layers
(``layers``) that can absorb it (``plan``), decide, compute what each fold writes (``writes``) and
apply it; the census and the report of every batch norm. Imports only the shared leaves."""
