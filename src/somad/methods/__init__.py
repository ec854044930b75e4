"""The detectors (SOMAD, PaDiM, PatchCore) on somad's shared feature pipeline (``base``), their registry, ``load``."""

from pathlib import Path

from somad.errors import ModelFileError
from somad.io.model_files import load_model
from somad.methods.base import BaseDetector
from somad.methods.padim import PaDiM
from somad.methods.patchcore import PatchCore
from somad.methods.somad import PRESETS, SOMAD

METHODS = {"somad": SOMAD, "padim": PaDiM, "patchcore": PatchCore}


def load(
    path, *, device: str | None = None, verify_key=None, expect_sha256: str | None = None, **scoring
) -> BaseDetector:
    """Rebuild a detector from a model file written by ``save``.

    Parameters
    ----------
    path : model file
    device : {"auto", "cpu", "cuda"}, optional
        Overrides the device stored in the file.
    verify_key : bytes, or the path of a key file, optional
        Refuse a file that is unsigned or not signed with this key (``somad.io.integrity``; ``save(sign_key=...)``).
    expect_sha256 : str, optional
        Refuse a file whose content hash is not this one (``somad.io.model_files.load_model``).
    **scoring
        Overrides of scoring-only parameters (SOMAD: ``k``, ``search``), e.g. ``load(p, search="exact")``;
        ``None`` values are ignored.
    """
    config, arrays = load_model(path, verify_key, expect_sha256=expect_sha256)
    cls = method_of(config, path)
    scoring = {name: value for name, value in scoring.items() if value is not None}
    return cls._from_file(config, arrays, Path(path), device, scoring)


def method_of(config, path) -> type[BaseDetector]:
    """The detector class of a verified file's ``config``; a one-line ModelFileError when it names none."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: the model config is not a JSON object; re-run `somad fit`")
    method = config.get("method")
    if not isinstance(method, str) or method not in METHODS:
        shown = repr(method) if len(repr(method)) <= 40 else repr(method)[:37] + "..."
        raise ModelFileError(f"{path}: unknown method {shown} in the model file; valid: {', '.join(METHODS)}")
    return METHODS[method]


__all__ = ["METHODS", "PRESETS", "SOMAD", "PaDiM", "PatchCore", "load", "method_of"]
