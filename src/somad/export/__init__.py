"""somad export: a fitted model as one ONNX graph (backbone, scoring and the decision), checked against the native
path (scores, maps, verdicts, masks)."""
