"""Data in and out: image decoding, dataset layouts, model files, prediction outputs, synthetic test sets."""
