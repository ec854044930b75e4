"""The detectors (SOMAD, PaDiM, PatchCore) on somad's shared feature pipeline (``base``), their registry, ``load``."""

from pathlib import Path

from somad.errors import ModelFileError
from somad.io.model_files import load_model
from somad.methods.base import BaseDetector
from somad.methods.padim import PaDiM
from somad.methods.patchcore import PatchCore
from somad.methods.somad import PRESETS, SOMAD

METHODS = {"somad": SOMAD, "padim": PaDiM, "patchcore": PatchCore}


def load(path, *, device: str | None = None, **scoring) -> BaseDetector:
    """Rebuild a detector from a model file written by ``save``.

    Parameters
    ----------
    path : model file
    device : {"auto", "cpu", "cuda"}, optional
        Overrides the device stored in the file.
    **scoring
        Overrides of scoring-only parameters (SOMAD: ``k``, ``search``), e.g. ``load(p, search="exact")``;
        ``None`` values are ignored.
    """
    config, arrays = load_model(path)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the model config is not a JSON object; re-run `somad fit`")
    method = config.get("method")
    if method not in METHODS:
        raise ModelFileError(f"{path}: unknown method {method!r} in the model file; valid: {', '.join(METHODS)}")
    scoring = {name: value for name, value in scoring.items() if value is not None}
    return METHODS[method]._from_file(config, arrays, Path(path), device, scoring)


__all__ = ["METHODS", "PRESETS", "SOMAD", "PaDiM", "PatchCore", "load"]
