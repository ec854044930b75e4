"""Run an exported somad model without torch: onnxruntime, numpy and Pillow only.

``somad export MODEL -o DIR`` writes ``DIR/model.onnx`` and ``DIR/somad_export.json``
(``somad.export.onnx``; the contract: ``somad.io.export_format``). :class:`OnnxDetector` verifies them
(``export_format.read_export``: the description's fields and own hash, the graph's SHA-256, with a key its
signature) and scores images the way the native path does:

1. decode with somad's rules (``somad.io.inputs``, ``somad.io.images``: files, PIL images, numpy frames;
   16-bit, float, palette, alpha...);
2. resize to ``image_size x image_size`` with ``PIL.Image.resize(..., Image.BILINEAR)`` and keep the central
   ``input_size`` square (the model's crop, if any): the pixels ``FeatureExtractor.preprocess`` feeds the
   backbone;
3. run the graph on the uint8 ``(N, S, S, 3)`` batch: ``score`` ``(N,)`` and ``anomaly_map`` ``(N, S, S)``;
4. apply the input gate (``somad.verdicts.check_frame``, with the limits the model learned from its training
   images: ``input_gate``) and the decision rule (``score > image_threshold``,
   refused frames always anomalous), and the predicted mask (``somad.verdicts.predicted_mask``).

This module imports nothing that imports torch (a test runs it with torch made unimportable).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from somad.errors import ModelFileError, SomadError
from somad.io.export_format import INPUT_NAME, META_FILE, MODEL_FILE, OUTPUT_NAMES, read_export
from somad.io.inputs import as_items
from somad.io.schema import BATCH_SIZE
from somad.verdicts import OK, FrameGate, check_frame, is_anomalous, normalized_or_none, predicted_mask

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
    normalized_score : float or None, the [0, 1] scale with the threshold at 0.5 (``None`` without a threshold
        or where the export records no good scores)
    """

    name: str
    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray
    status: str
    original_size: tuple[int, int]
    mask: np.ndarray | None = None
    normalized_score: float | None = None  #: ``somad.verdicts.normalized_score``, as the native path gives it

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
    verify_key : bytes, or the path of a key file, optional
        Refuse an export that is unsigned or not signed with this key (``somad export --sign-key``;
        ``somad.io.integrity``). Without it the export is still checked against its own hashes.

    The export is verified before the first image (``somad.io.export_format.read_export``): the description field
    by field and against its own hash, the graph's bytes against the hash the description records (the bytes
    loaded are the bytes hashed); any mismatch is one ``ModelFileError`` line naming the files.
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
        verify_key: bytes | str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise SomadError(f"backend {backend!r} is not supported; valid: {', '.join(BACKENDS)}")
        meta_path = self.path / META_FILE
        # The description checked field by field and against its own hash, the graph's bytes against the
        # description (and, with a key, the signature): before anything is scored (somad.io.export_format).
        self.meta, graph = read_export(self.path, verify_key)
        geometry = self.meta["geometry"]
        self.image_size = int(geometry["image_size"])
        self.input_size = int(geometry["input_size"])
        self.crop_offset = int(geometry["crop_offset"])
        try:
            self.gate_ = FrameGate.from_dict(self.meta.get("input_gate"))  # None in older exports: the fixed rule
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{meta_path}: unreadable export description ({exc}); re-run `somad export`") from None
        self.method = self.meta.get("method")
        self.image_threshold_ = self.meta.get("image_threshold") if threshold is None else float(threshold)
        self.pixel_threshold_ = self.meta.get("pixel_threshold") if pixel_threshold is None else float(pixel_threshold)
        self.backend = backend
        self._run = _onnxruntime_runner(graph, self.path / MODEL_FILE, self.input_size, threads, spinning)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Decoded RGB image -> the graph's uint8 input ``(S, S, 3)``: the native path's resize and crop."""
        resized = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        o, s = self.crop_offset, self.input_size
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8)[o : o + s, o : o + s])

    def _decoded(self, images) -> Iterator[tuple[str, Image.Image]]:
        """Images as the native path accepts them (``somad.io.inputs.as_items``: folders, paths, PIL images, numpy
        frames, sequences of these), decoded one at a time."""
        for item in as_items(images):
            yield item.name, item.load()

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
        problem = BATCH_SIZE.check(batch_size)
        if problem:  # 0 or -1 would run every image as one batch
            raise SomadError(f"batch_size={batch_size!r} is invalid: {problem}")
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
            status = check_frame(image, self.gate_)
            flagged = (
                None
                if self.image_threshold_ is None
                else (True if status != OK else is_anomalous(score, self.image_threshold_))
            )
            mask = predicted_mask(m, flagged, self.pixel_threshold_, valid=status == OK)
            n = normalized_or_none(float(score), self.image_threshold_, self.meta.get("threshold_info"))
            yield Detection(name, float(score), flagged, m, status, (image.height, image.width), mask, n)


def _onnxruntime_runner(graph: bytes, path: Path, size: int, threads: int | None, spinning: bool = True):
    """A session of the graph's bytes ``graph`` (read from ``path``), checked to take the described input."""
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
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelFileError(
            f"{path}: onnxruntime cannot load it ({type(exc).__name__}); re-run `somad export`"
        ) from None
    inputs, outputs = session.get_inputs(), {o.name for o in session.get_outputs()}
    shape = list(inputs[0].shape[1:]) if len(inputs) == 1 else None
    if shape != [size, size, 3] or inputs[0].name != INPUT_NAME or not outputs >= set(OUTPUT_NAMES):
        raise ModelFileError(
            f"{path}: the graph does not take uint8 {INPUT_NAME} (N, {size}, {size}, 3) to {', '.join(OUTPUT_NAMES)} "
            f"as its description ({META_FILE}) says; re-run `somad export`"
        )
    return lambda batch: session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})


__all__ = ["Detection", "OnnxDetector"]
