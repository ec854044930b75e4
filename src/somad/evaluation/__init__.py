"""Measuring detectors: the MVTec AD metrics, the evaluation protocol, the benchmark and the HTML report."""
