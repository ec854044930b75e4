"""Anomaly detection methods that share somad's feature pipeline (see ``somad.base``)."""

from .padim import PaDiM
from .patchcore import PatchCore
from .somad import PRESETS, SOMAD

METHODS = {"somad": SOMAD, "padim": PaDiM, "patchcore": PatchCore}

__all__ = ["METHODS", "PRESETS", "SOMAD", "PaDiM", "PatchCore"]
