"""What a model file says about itself: method, backbone, geometry, thresholds, training set, hashes.

Shared by ``somad info`` and the service's ``GET /v1/model``. Reading the header is cheap; ``verify=True``
also reads and checks every array against the header's content hash (``somad.io.model_files.load_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from somad.errors import ModelFileError
from somad.io.model_files import FORMAT, load_model

#: Geometry and backbone parameters shown on their own (the rest of the parameters are listed as ``params``).
_GEOMETRY = ("image_size", "crop_size", "tile_size", "tile_overlap")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` of a safetensors file's JSON header, without reading the arrays."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if length is None or not 2 <= length <= _HEADER_LIMIT:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        metadata = header.get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:100] or type(exc).__name__
        raise ModelFileError(f"{path}: not a readable somad model file ({reason}); re-run `somad fit`") from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a somad model (no somad header); pass a file written by `somad fit`")
    return metadata


def describe(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """A JSON-ready description of the model file at ``path``.

    With ``verify`` the whole file is read and checked (format version, content hash, config), as
    ``somad.load`` does, so a corrupt file raises :class:`~somad.errors.ModelFileError` (one line). Without it
    only the header is read (for a file that was just loaded and checked).
    """
    path = Path(path)
    metadata = read_metadata(path)
    if verify:
        config, _ = load_model(path)
    else:
        try:
            config = json.loads(metadata.get("config", ""))
        except (json.JSONDecodeError, RecursionError):
            raise ModelFileError(f"{path}: config is not valid JSON; re-run `somad fit`") from None
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        raise ModelFileError(f"{path}: the model config is not a somad config; re-run `somad fit`")
    params = dict(config["params"])
    state = config.get("state") if isinstance(config.get("state"), dict) else {}
    info = state.get("threshold_info") if isinstance(state.get("threshold_info"), dict) else None
    return {
        "path": str(path),
        "method": config.get("method"),
        "backbone": params.get("backbone"),
        "weights": params.get("weights"),
        "preset": config.get("preset"),  # not recorded by somad <= 0.7: None
        "geometry": {name: params.get(name) for name in _GEOMETRY},
        "params": params,
        "image_threshold": state.get("image_threshold"),
        "pixel_threshold": state.get("pixel_threshold"),
        "threshold_info": info,
        "n_train_images": state.get("n_train_images"),
        "n_val_images": state.get("n_val_images"),
        "train_set_sha256": state.get("train_set_sha256"),  # None: not recorded (files before somad 0.7)
        "fit_seconds": state.get("fit_seconds"),
        "somad_version": config.get("somad_version"),
        "format_version": _int_or_none(metadata.get("format_version")),
        "content_sha256": metadata.get("sha256"),
        "file_sha256": file_sha256(path),
        "file_bytes": path.stat().st_size,
    }


def threshold_source(info: dict | None) -> str:
    """How the thresholds were set, in words."""
    if not info:
        return "not recorded"
    source = info.get("source", "unknown")
    if info.get("quantile") is None or info.get("n_images") is None:
        return str(source)
    return (
        f"{source}: {info['quantile']:g}-quantile of {info['n_images']} good images' scores "
        f"(expected false-alarm rate {100 * (1 - info['quantile']):.1f}%), pixel {info.get('pixel_quantile', 0):g}-"
        "quantile of their map pixels"
    )


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


__all__ = ["describe", "file_sha256", "read_metadata", "threshold_source"]
