"""What a model file says about itself: method, backbone, geometry, thresholds, training set, hashes.

Shared by ``somad info`` and the service's ``GET /v1/model``. Reading the header is cheap; ``verify=True``
also reads and checks every array against the header's content hash (``somad.io.model_files.load_model``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from somad.errors import ModelFileError
from somad.io.integrity import file_sha256
from somad.io.model_files import FORMAT, load_model
from somad.verdicts import FALSE_ALARM_LEVEL, scale_resolution

#: Geometry and backbone parameters shown on their own (the rest of the parameters are listed as ``params``).
_GEOMETRY = ("image_size", "crop_size", "tile_size", "tile_overlap")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


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


def describe(path: str | os.PathLike, *, verify: bool = True, verify_key=None) -> dict:
    """A JSON-ready description of the model file at ``path``.

    With ``verify`` the whole file is read and checked (format version, content hash, config, and with
    ``verify_key`` its signature), as ``somad.load`` does, so a corrupt file raises
    :class:`~somad.errors.ModelFileError` (one line). Without it only the header is read (for a file that was just
    loaded and checked).
    """
    path = Path(path)
    metadata = read_metadata(path)
    if verify:
        from somad.methods import method_of

        config, arrays = load_model(path, verify_key)
        method_of(config, path).check_file(config, arrays, path)  # every field against its rule, as load does
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
        "geometry": {**{name: params.get(name) for name in _GEOMETRY}, "input_frame": state.get("input_frame")},
        "params": params,
        "som_side": state.get("som_side"),  # SOMAD's fitted SOM side (som_size "auto"); None: not recorded
        "image_threshold": state.get("image_threshold"),
        "pixel_threshold": state.get("pixel_threshold"),
        "threshold_info": info,
        "normalized_scale_resolution": scale_resolution(info),  # 1 / the good scores it rests on; None: not recorded
        "n_train_images": state.get("n_train_images"),
        "n_val_images": state.get("n_val_images"),
        "train_set_sha256": state.get("train_set_sha256"),  # None: not recorded (files before somad 0.7)
        "fit_seconds": state.get("fit_seconds"),
        "somad_version": config.get("somad_version"),
        "format_version": _int_or_none(metadata.get("format_version")),
        "content_sha256": metadata.get("sha256"),
        "signature": _signature(metadata, verified=verify and verify_key is not None),
        "file_sha256": file_sha256(path),
        "file_bytes": path.stat().st_size,
    }


def _signature(metadata: dict, *, verified: bool) -> str | None:
    """``"verified"`` (checked against a key), ``"present"`` (signed, not checked) or ``None`` (unsigned)."""
    return "verified" if verified else "present" if metadata.get("signature") else None


def threshold_source(info: dict | None) -> str:
    """How the thresholds were set, in words."""
    if not info:
        return "not recorded"
    source = info.get("source", "unknown")
    if info.get("quantile") is None or info.get("n_images") is None:
        return str(source)
    rate = info.get("expected_false_alarm_rate")
    rate = 1 - info["quantile"] if rate is None else rate  # older files: 1 - quantile
    interval = info.get("false_alarm_rate_interval")
    if interval:
        level = f"{100 * FALSE_ALARM_LEVEL:.0f}%"
        rate_text = f"{100 * rate:.1f}%, {level} interval {100 * interval[0]:.1f}-{100 * interval[1]:.1f}%"
    else:
        rate_text = f"{100 * rate:.1f}%"
    scores = "out-of-fold scores" if info.get("rule") == "cross_fit" else "scores"
    how = f" ({info.get('folds') or 'k'}-fold cross-fitting)" if info.get("rule") == "cross_fit" else ""
    return (
        f"{source}{how}: {info['quantile']:g}-quantile of {info['n_images']} good images' {scores} "
        f"(expected false-alarm rate {rate_text}), pixel {info.get('pixel_quantile') or 0:g}-quantile of their map "
        "pixels"
    )


def scale_source(info: dict | None) -> str:
    """What the normalised score (``somad.verdicts.normalized_score``) rests on, in words, with its resolution."""
    info = info or {}
    resolution = scale_resolution(info)
    if resolution is not None:
        n = len(info["good_scores"])
        return (
            f"below the threshold, the CDF of {n} good scores (resolution {resolution:.3g}); above it, "
            "1 - 0.5 (t - m) / (s - m), m their median"
        )
    if info.get("good_score_median") is not None:
        return "from the median good score only (a somad 0.7 file): linear below the threshold"
    return "not available (no good scores recorded; run `somad calibrate`)"


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


__all__ = ["describe", "file_sha256", "read_metadata", "scale_source", "threshold_source"]
