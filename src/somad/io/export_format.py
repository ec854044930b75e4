"""The export folder's contract, declared once: file names, version, tensor names, the description's schema, and
its verification before the first image is scored.

``somad export`` (``somad.export.onnx``) writes ``DIR/model.onnx`` (the graph) and ``DIR/somad_export.json`` (the
description: thresholds, geometry, ...) into a staged folder renamed into place whole. The graph takes
:data:`INPUT_NAMES` (the decoded image at any size, or :func:`resized_input`'s with its original size; the input
gate's result and the thresholds as :func:`threshold_feeds` gives them) and returns :data:`OUTPUT_NAMES` (score,
map at the model input, verdict, map on the original image, mask). The torch-free runtime
(``somad.runtime.OnnxDetector``) reads them through :func:`read_export`, which checks, before anything is scored:

1. the description against :data:`SCHEMA` (types, ranges, version bounds; one line naming the field);
2. the description's own hash, ``content_sha256``: the SHA-256 of the canonical JSON of every other field
   (:func:`content_sha256`), so that an edited threshold or geometry does not pass;
3. with a verify key, its ``signature``: an HMAC-SHA-256 of that hash (``somad.io.integrity``);
4. the graph: its bytes are read once, hashed and compared with ``files["model.onnx"]``, and those same bytes are
   what the runtime loads; another export's graph, or an edited initializer, is refused in one line naming both
   files.

Without a key, 2 and 4 are integrity, not authenticity: whoever can write the folder can recompute both hashes.
This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from somad.errors import ModelFileError
from somad.io.integrity import as_key, check_signature, sign
from somad.io.schema import (
    DISPLAY_RANGE,
    MAX_IMAGE_SIZE,
    THRESHOLD,
    THRESHOLD_INFO,
    Hex,
    Interval,
    Kind,
    ListOf,
    Nullable,
    Options,
    Table,
    Text,
    describe,
    problem,
)
from somad.resize import frame_size, resize_bilinear

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
META_FILE = "somad_export.json"
#: 2 (somad 0.7.2): the description carries its own hash (``content_sha256``) and may be signed. 3: the graph
#: decides (verdict, mask, the map on the original image; :data:`INPUT_NAMES`, :data:`OUTPUT_NAMES`); the runtime
#: refuses older exports, whose verdicts it made in Python, with the fix. 4 (somad 0.10): the graph takes the decoded
#: image at any size and resizes and crops it itself (``somad.export.resize_graph``: the native resize bit for bit). 5
#: (somad 0.11): the frame images are resized to (``geometry``'s ``frame_size``: a kept aspect ratio's, or
#: ``image_size`` square) and tiled models (``tile_offsets``, ``original_size``); the runtime still reads version
#: 4 (every image resized square).
EXPORT_VERSION = 5
#: The oldest export version the runtime reads.
OLDEST_VERSION = 4
FORMATS = ("onnx",)
INPUT_NAME = "image"
#: The graph's inputs: ``image`` uint8 ``(1, H, W, 3)``, the decoded RGB image at any size (or, the same to the bit
#: and faster, :func:`resized_input`'s ``(1, R, R, 3)`` with ``original_size``); ``original_size`` int64 ``(2,)``
#: (the decoded image's height and width; ``[0, 0]``, the default: the ``image`` input's own size); ``valid`` bool
#: ``(1,)`` (the input gate passed it: ``somad.verdicts.check_frame``; default True), ``image_threshold`` and
#: ``pixel_threshold`` float32 scalars (:func:`threshold_feeds`; default the model's thresholds). Only ``image`` is
#: needed.
INPUT_NAMES = (INPUT_NAME, "original_size", "valid", "image_threshold", "pixel_threshold")
#: ``score`` float32 ``(1,)``, ``anomaly_map`` float32 ``(1, S, S)`` at the model input, ``is_anomalous`` bool ``(1,)``,
#: ``original_map`` float32 ``(1, H, W)`` on the original image, ``mask`` bool ``(1, H, W)``.
OUTPUT_NAMES = ("score", "anomaly_map", "is_anomalous", "original_map", "mask")
#: The fields of the description that its hash does not cover (the hash itself, and the signature of it).
UNHASHED = ("content_sha256", "signature")
#: Descriptions larger than this are not somad's (a few kB, at most about 100 kB with 1000 good scores).
_MAX_META_BYTES = 16 << 20
REEXPORT = "re-run `somad export`"

_SIDE = Interval(int, 1, MAX_IMAGE_SIZE)
SCHEMA = Table(
    {
        "export_version": Interval(int, 1, EXPORT_VERSION),
        "format": Options(FORMATS),
        "somad_version": Kind(str, "a string"),
        "method": Text(),
        "image_threshold": THRESHOLD,
        "pixel_threshold": THRESHOLD,
        "display_range": DISPLAY_RANGE,
        "threshold_info": Nullable(THRESHOLD_INFO),
        "geometry": Table(
            {
                "image_size": _SIDE,
                "crop_size": Nullable(_SIDE),
                "input_size": _SIDE,
                "crop_offset": Interval(int, 0, MAX_IMAGE_SIZE),
                "grid_size": Interval(int, 1, MAX_IMAGE_SIZE),
                "stride": Interval(int, 1, MAX_IMAGE_SIZE),
                "tile_size": Nullable(_SIDE),
                "original_size": ListOf(_SIDE, length=2),
                "frame_size": ListOf(Interval(int, 1, 8 * MAX_IMAGE_SIZE), length=2),
                "tile_offsets": ListOf(ListOf(Interval(int, 0, 8 * MAX_IMAGE_SIZE), length=2), max_length=4096),
            },
            required=("image_size", "input_size", "crop_offset"),
        ),
        "graph": Table(
            {"file": Options((MODEL_FILE,)), "input": Table({"name": Options((INPUT_NAME,))}, required=("name",))}
        ),
        "files": Table({MODEL_FILE: Hex()}, required=(MODEL_FILE,)),
        "source_model": Nullable(Table({"file": Kind(str, "a string"), "sha256": Hex()}, required=("sha256",))),
        "content_sha256": Hex(),
        "signature": Kind(str, "a string"),
    },
    required=("export_version", "format", "method", "image_threshold", "pixel_threshold", "geometry", "files"),
)


def resized_input(image: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """A decoded RGB image -> ``(H, W, 3)`` uint8: the native path's resize (``somad.resize.resize_bilinear``) to
    ``size``, the side of a square (``image_size``) or a frame ``(height, width)`` (a kept aspect ratio's, a tiled
    export's), which the graph repeats bit for bit on a larger image and leaves unchanged on one of this size. Fed
    with the image's ``original_size``, it spares the graph the resize (Pillow's C code is 3-10x faster than the
    graph's copy; docs/benchmarks.md)."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.asarray(resize_bilinear(image, (width, height)), dtype=np.uint8)


def threshold_feeds(image_threshold: float | None, pixel_threshold: float | None) -> dict[str, np.ndarray]:
    """The thresholds as the graph takes them: float32 scalars that decide as the native path does. The image
    threshold is rounded down to float32 (a float32 score lies above it exactly when it lies above the float64
    threshold, as ``somad.verdicts.is_anomalous`` compares), the pixel threshold to the nearest float32 (NumPy compares
    a float32 map with a Python float in float32); ``None`` becomes NaN (no score or pixel lies above it)."""
    with np.errstate(over="ignore"):  # beyond float32's range a threshold becomes +-inf, which decides the same
        image = np.float32(np.nan if image_threshold is None else image_threshold)
        pixel = np.float32(np.nan if pixel_threshold is None else pixel_threshold)
    if image_threshold is not None and float(image) > float(image_threshold):
        image = np.nextafter(image, np.float32(-np.inf))
    return {INPUT_NAMES[3]: np.array(image, np.float32), INPUT_NAMES[4]: np.array(pixel, np.float32)}


def content_sha256(meta: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of every field of ``meta`` but :data:`UNHASHED`."""
    body = {k: v for k, v in meta.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict, sign_key: bytes | str | os.PathLike | None = None) -> dict:
    """``meta`` with its ``content_sha256`` and, with a key, its ``signature`` (see the module docstring)."""
    meta = {k: v for k, v in meta.items() if k not in UNHASHED}
    meta["content_sha256"] = content_sha256(meta)
    key = as_key(sign_key)
    if key is not None:
        meta["signature"] = sign(key, "export", meta["content_sha256"])
    return meta


def read_export(folder: str | os.PathLike, verify_key: bytes | str | os.PathLike | None = None) -> tuple[dict, bytes]:
    """The checked description and the graph's bytes of the export folder ``folder`` (module docstring: 1-4).

    Every failure is one :class:`~somad.errors.ModelFileError` line naming the file (both files for a graph that
    does not match its description) and the fix. ``verify_key``: the key's bytes or the path of its file."""
    folder = Path(folder)
    meta_path, graph_path = folder / META_FILE, folder / MODEL_FILE
    if not meta_path.is_file() or not graph_path.is_file():
        raise ModelFileError(
            f"{folder}: not a somad export folder (no {META_FILE} or {MODEL_FILE}); run `somad export`"
        )
    key = as_key(verify_key)
    try:
        with open(meta_path, "rb") as f:
            text = f.read(_MAX_META_BYTES + 1)
        if len(text) > _MAX_META_BYTES:
            raise ValueError(f"over {_MAX_META_BYTES >> 20} MB")
        meta = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:80] or type(exc).__name__
        raise ModelFileError(f"{meta_path}: unreadable export description ({reason}); {REEXPORT}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path}: the export description is not a JSON object; {REEXPORT}")
    version = meta.get("export_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > EXPORT_VERSION:
        raise ModelFileError(f"{meta_path}: export version {version} is newer than this somad's; upgrade somad")
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < OLDEST_VERSION:
        raise ModelFileError(
            f"{meta_path}: export version {version} leaves the verdict or the resize to its runtime, this somad's "
            f"graphs do both (versions {OLDEST_VERSION}-{EXPORT_VERSION}); {REEXPORT} with this somad"
        )
    found = problem(SCHEMA, meta, "")
    if found is None:
        g = meta["geometry"]
        tiled = [key for key in ("tile_size", "original_size", "tile_offsets") if g.get(key) is not None]
        frame = g.get("frame_size") or [g["image_size"]] * 2  # version 4: image_size square
        if not tiled and g["crop_offset"] + g["input_size"] > frame[0]:
            found = ("geometry", g, "the crop (crop_offset + input_size) must lie inside the resized frame")
        elif tiled and (len(tiled) != 3 or g.get("frame_size") is None):
            found = ("geometry", g, "a tiled export has tile_size, original_size, frame_size and tile_offsets")
        elif tiled and tuple(g["frame_size"]) != frame_size(*g["original_size"], g["image_size"]):
            found = ("geometry.frame_size", g["frame_size"], "it is not the frame of original_size")
    if found:
        raise ModelFileError(f"{meta_path}: {describe(found)}; {REEXPORT}")
    stored = meta.get("content_sha256")
    if stored is None:
        raise ModelFileError(f"{meta_path}: content_sha256 is missing (edited after export?); {REEXPORT}")
    if stored != content_sha256(meta):
        raise ModelFileError(
            f"{meta_path}: its content hash does not match its contents (edited after export, or damaged); {REEXPORT}"
        )
    if key is not None:
        check_signature(key, meta.get("signature"), "export", str(stored), where=str(meta_path), signer="somad export")
    try:
        graph = graph_path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{graph_path}: cannot read the graph ({exc.strerror or exc}); {REEXPORT}") from None
    actual = hashlib.sha256(graph).hexdigest()
    if actual != meta["files"][MODEL_FILE]:
        raise ModelFileError(
            f"{graph_path}: does not match {meta_path} (SHA-256 {actual[:16]}..., the description records "
            f"{meta['files'][MODEL_FILE][:16]}...): the graph was modified or comes from another export; {REEXPORT}"
        )
    return meta, graph


__all__ = [
    "EXPORT_VERSION",
    "OLDEST_VERSION",
    "FORMATS",
    "INPUT_NAME",
    "INPUT_NAMES",
    "META_FILE",
    "MODEL_FILE",
    "OUTPUT_NAMES",
    "SCHEMA",
    "content_sha256",
    "resized_input",
    "read_export",
    "seal",
    "threshold_feeds",
]
