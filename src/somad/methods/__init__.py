"""Anomaly detection methods that share somad's feature pipeline (see ``somad.base``)."""

from .somad import SOMAD

METHODS = {"somad": SOMAD}

__all__ = ["METHODS", "SOMAD"]
