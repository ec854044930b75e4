"""Run an exported somad model without torch: onnxruntime (or OpenVINO), numpy and Pillow only."""
