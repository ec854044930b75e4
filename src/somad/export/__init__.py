"""somad export: a fitted model as one ONNX graph (backbone + scoring), with parity checks against the native path."""
