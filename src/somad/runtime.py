"""Run an exported somad model without torch: onnxruntime, numpy and Pillow only.

``somad export MODEL -o DIR`` writes ``DIR/model.onnx`` and ``DIR/somad_export.json``
(``somad.export.onnx``). :class:`OnnxDetector` reads them and scores images the way the native path does:

1. decode with somad's rules (``somad.io.images``: files, PIL images, uint8 arrays; 16-bit, palette, alpha...);
2. resize to ``image_size x image_size`` with ``PIL.Image.resize(..., Image.BILINEAR)`` and keep the central
   ``input_size`` square (the model's crop, if any): the pixels ``FeatureExtractor.preprocess`` feeds the
   backbone;
3. run the graph on the uint8 ``(N, S, S, 3)`` batch: ``score`` ``(N,)`` and ``anomaly_map`` ``(N, S, S)``;
4. apply the input gate (``somad.verdicts.check_frame``) and the decision rule (``score > image_threshold``,
   refused frames always anomalous), and the predicted mask (``somad.verdicts.predicted_mask``).

This module imports nothing that imports torch (a test runs it with torch made unimportable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from somad.errors import ModelFileError, SomadError
from somad.io.images import list_images, load_image, to_rgb
from somad.verdicts import OK, check_frame, is_anomalous, predicted_mask

MODEL_FILE = "model.onnx"
META_FILE = "somad_export.json"
EXPORT_VERSION = 1
BACKENDS = ("onnxruntime",)


@dataclass
class Detection:
    """The result for one image.

    Attributes
    ----------
    name : str
    score : float, higher = more anomalous
    is_anomalous : bool or None (``None`` when the model has no threshold)
    anomaly_map : ndarray (S, S) float32 at the model input
    status : ``"ok"`` or ``"invalid_input: <reason>"`` (the input gate)
    original_size : (height, width)
    mask : ndarray (S, S) bool or None, the predicted defect mask at the model input
    """

    name: str
    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray
    status: str
    original_size: tuple[int, int]
    mask: np.ndarray | None = None

    @property
    def valid(self) -> bool:
        return self.status == OK


class OnnxDetector:
    """An exported somad model (``somad export``), scored with onnxruntime, without torch.

    Parameters
    ----------
    path : folder written by ``somad export`` (``model.onnx`` + ``somad_export.json``)
    backend : {"onnxruntime"}
    threads : int, optional
        Intra-op threads of the runtime (default: the runtime's own choice).
    spinning : bool, default True
        Whether onnxruntime's threads spin while waiting for work (its default: lowest latency, but they take CPU
        from other work in the process, e.g. torch, between runs).
    threshold, pixel_threshold : float, optional
        Override the exported thresholds.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        spinning: bool = True,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
    ):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise SomadError(f"backend {backend!r} is not supported; valid: {', '.join(BACKENDS)}")
        meta_path = self.path / META_FILE
        if not meta_path.is_file() or not (self.path / MODEL_FILE).is_file():
            raise ModelFileError(
                f"{self.path}: not a somad export folder (no {META_FILE} or {MODEL_FILE}); run `somad export`"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
            geometry = self.meta["geometry"]
            self.image_size = int(geometry["image_size"])
            self.input_size = int(geometry["input_size"])
            self.crop_offset = int(geometry["crop_offset"])
            version = int(self.meta["export_version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{meta_path}: unreadable export description ({exc}); re-run `somad export`") from None
        if version > EXPORT_VERSION:
            raise ModelFileError(f"{meta_path}: export version {version} is newer than this somad's; upgrade somad")
        self.method = self.meta.get("method")
        self.image_threshold_ = self.meta.get("image_threshold") if threshold is None else float(threshold)
        self.pixel_threshold_ = self.meta.get("pixel_threshold") if pixel_threshold is None else float(pixel_threshold)
        self.backend = backend
        self._run = _onnxruntime_runner(self.path / MODEL_FILE, threads, spinning)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Decoded RGB image -> the graph's uint8 input ``(S, S, 3)``: the native path's resize and crop."""
        resized = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        o, s = self.crop_offset, self.input_size
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8)[o : o + s, o : o + s])

    def _decoded(self, images) -> Iterator[tuple[str, Image.Image]]:
        """Images as the native path accepts them: a folder, a path, PIL images, a sequence of these, or a uint8
        array ``(H, W, 3)``, ``(N, H, W)`` or ``(N, H, W, 3)``; decoded one at a time."""
        if isinstance(images, np.ndarray):
            if images.ndim == 3 and images.shape[-1] == 3:
                images = images[None]
            if images.ndim not in (3, 4) or images.dtype != np.uint8 or (images.ndim == 4 and images.shape[-1] != 3):
                raise SomadError(
                    f"image arrays must be uint8 of shape (H, W, 3), (N, H, W) or (N, H, W, 3), "
                    f"got {images.dtype} {images.shape}"
                )
            for i, a in enumerate(images):
                yield f"array_{i:05d}", Image.fromarray(a).convert("RGB")
            return
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        count = 0
        for entry in images:
            if isinstance(entry, Image.Image):
                name = f"image_{count:05d}"
                yield name, to_rgb(entry, name)
                count += 1
                continue
            path = Path(entry)
            if path.is_dir():
                for p in list_images(path):
                    yield str(p.relative_to(path)), load_image(p)
                    count += 1
            else:
                yield path.name, load_image(path)
                count += 1
        if not count:
            raise SomadError("no images given; pass a folder of images or a list of image files")

    # ------------------------------------------------------------------ scoring
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare graph: uint8 ``(N, S, S, 3)`` -> scores ``(N,)``, maps ``(N, S, S)`` (float32)."""
        s = self.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise SomadError(f"the graph takes uint8 (N, {s}, {s}, 3) inputs, got {batch.dtype} {batch.shape}")
        scores, maps = self._run(np.ascontiguousarray(batch))
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)

    def predict_iter(self, images, *, batch_size: int = 1) -> Iterator[Detection]:
        """One :class:`Detection` per image, ``batch_size`` images per graph run."""
        pending: list[tuple[str, Image.Image]] = []
        for entry in self._decoded(images):
            pending.append(entry)
            if len(pending) == batch_size:
                yield from self._score(pending)
                pending = []
        if pending:
            yield from self._score(pending)

    def predict(self, images, *, batch_size: int = 1) -> list[Detection]:
        """Score, verdict, anomaly map, input-gate status and mask of every image (see :meth:`predict_iter`)."""
        return list(self.predict_iter(images, batch_size=batch_size))

    def predict_maps(self, images, *, batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(N,)`` and maps ``(N, S, S)`` at the model input, as ``model.predict_maps`` gives them."""
        found = self.predict(images, batch_size=batch_size)
        return np.asarray([d.score for d in found], np.float32), np.stack([d.anomaly_map for d in found])

    def _score(self, pending: list[tuple[str, Image.Image]]) -> Iterator[Detection]:
        batch = np.stack([self.preprocess(image) for _, image in pending])
        scores, maps = self.run(batch)
        for (name, image), score, m in zip(pending, scores, maps):
            status = check_frame(image)
            flagged = (
                None
                if self.image_threshold_ is None
                else (True if status != OK else is_anomalous(score, self.image_threshold_))
            )
            mask = predicted_mask(m, flagged, self.pixel_threshold_, valid=status == OK)
            yield Detection(name, float(score), flagged, m, status, (image.height, image.width), mask)


def _onnxruntime_runner(path: Path, threads: int | None, spinning: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SomadError("onnxruntime is not installed; run `pip install 'somad[export]'`") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelFileError(
            f"{path}: onnxruntime cannot load it ({type(exc).__name__}); re-run `somad export`"
        ) from None
    return lambda batch: session.run(["score", "anomaly_map"], {"image": batch})


__all__ = ["Detection", "OnnxDetector"]
