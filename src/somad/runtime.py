"""Run an exported somad model without torch: onnxruntime, numpy and Pillow only.

``somad export MODEL -o DIR`` writes ``DIR/model.onnx`` and ``DIR/somad_export.json``
(``somad.export.onnx``; the contract: ``somad.io.export_format``). :class:`OnnxDetector` verifies them
(``export_format.read_export``: the description's fields and own hash, the graph's SHA-256, with a key its
signature) and scores images the way the native path does:

1. decode with somad's rules (``somad.io.inputs``, ``somad.io.images``: files, PIL images, numpy frames;
   16-bit, float, palette, alpha...);
2. resize and crop to the model input (``export_format.model_input``: Pillow's BILINEAR resize to ``image_size``
   square, the central ``input_size`` square): the pixels ``FeatureExtractor.preprocess`` feeds the backbone;
3. apply the input gate (``somad.verdicts.check_frame``, with the limits the model learned from its training
   images: ``input_gate``);
4. run the graph, one image at a time, on that input, the image's original size, the gate's result and the
   thresholds: it returns the score, the map at the model input, the verdict, the map on the original image and
   the mask (the decision is the graph's: ``somad.export.onnx``). Without a threshold the verdict and mask are
   reported as ``None``; the normalised score is read from the thresholds' record
   (``somad.verdicts.normalized_or_none``).

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
from somad.io.export_format import (
    INPUT_NAME,
    INPUT_NAMES,
    META_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    model_input,
    read_export,
    threshold_feeds,
)
from somad.io.inputs import as_items, decoded
from somad.io.schema import BATCH_SIZE
from somad.verdicts import OK, FrameGate, check_frame, normalized_or_none

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
    mask : ndarray (H, W) bool or None, the predicted defect mask on the original image (``None`` without
        thresholds)
    normalized_score : float or None, the [0, 1] scale with the threshold at 0.5 (``None`` without a threshold
        or where the export records no good scores)
    original_map : ndarray (H, W) float32, the anomaly map on the original image
    """

    name: str
    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray
    status: str
    original_size: tuple[int, int]
    mask: np.ndarray | None = None
    normalized_score: float | None = None  #: ``somad.verdicts.normalized_score``, as the native path gives it
    original_map: np.ndarray | None = None

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
        Override the exported thresholds (fed to the graph, which decides with them).
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
        return model_input(image, self.image_size, self.crop_offset, self.input_size)

    def _decoded(self, images) -> Iterator[tuple[str, Image.Image]]:
        """Images as the native path accepts them (``somad.io.inputs.as_items``: folders, paths, PIL images, numpy
        frames, sequences of these), decoded one at a time as it decodes them (``somad.io.inputs.decoded``)."""
        for item, image in decoded(as_items(images)):
            yield item.name, image

    # ------------------------------------------------------------------ scoring
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare graph, image by image: uint8 ``(N, S, S, 3)`` -> scores ``(N,)``, maps ``(N, S, S)`` (float32)."""
        s = self.input_size
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (s, s, 3):
            raise SomadError(f"the graph takes uint8 (N, {s}, {s}, 3) inputs, got {batch.dtype} {batch.shape}")
        thresholds = threshold_feeds(self.image_threshold_, self.pixel_threshold_)
        found = [self._run({INPUT_NAME: np.ascontiguousarray(x[None]), **thresholds}) for x in batch]
        return np.concatenate([f[0] for f in found]).astype(np.float32), np.concatenate([f[1] for f in found])

    def predict_iter(self, images, *, batch_size: int = 1) -> Iterator[Detection]:
        """One :class:`Detection` per image, decoded ``batch_size`` at a time (the graph runs one image at a time)."""
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
        for name, image in pending:
            status = check_frame(image, self.gate_)
            size = (image.height, image.width)
            feeds = {
                INPUT_NAME: self.preprocess(image)[None],
                INPUT_NAMES[1]: np.array(size, np.int64),
                INPUT_NAMES[2]: np.array([status == OK]),
                **threshold_feeds(self.image_threshold_, self.pixel_threshold_),  # the graph decides with them
            }
            score, m, flagged, original, mask = (a[0] for a in self._run(feeds))
            decided = self.image_threshold_ is not None  # the graph decides; without a threshold, nothing is decided
            n = normalized_or_none(float(score), self.image_threshold_, self.meta.get("threshold_info"))
            yield Detection(
                name,
                float(score),
                bool(flagged) if decided else None,
                m,
                status,
                size,
                mask if decided and self.pixel_threshold_ is not None else None,
                n,
                original,
            )


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
    given = [*session.get_inputs(), *session.get_overridable_initializers()]  # inputs with a default are the latter
    inputs, outputs = {i.name: i for i in given}, {o.name for o in session.get_outputs()}
    shape = list(inputs[INPUT_NAME].shape) if INPUT_NAME in inputs else None
    if shape != [1, size, size, 3] or set(inputs) != set(INPUT_NAMES) or not outputs >= set(OUTPUT_NAMES):
        raise ModelFileError(
            f"{path}: the graph does not take uint8 {INPUT_NAME} (1, {size}, {size}, 3) and "
            f"{', '.join(INPUT_NAMES[1:])} to {', '.join(OUTPUT_NAMES)} as its description ({META_FILE}) says; "
            "re-run `somad export`"
        )
    return lambda feeds: session.run(list(OUTPUT_NAMES), feeds)


__all__ = ["Detection", "OnnxDetector"]
