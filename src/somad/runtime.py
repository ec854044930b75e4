"""Run an exported somad model without torch: onnxruntime (or OpenVINO), numpy and Pillow only.

``somad export MODEL -o DIR`` writes ``DIR/model.onnx`` and ``DIR/somad_export.json``
(``somad.export.onnx``; the contract: ``somad.io.export_format``). :class:`OnnxDetector` verifies them
(``export_format.read_export``: the description's fields and own hash, the graph's SHA-256, with a key its
signature) and scores images the way the native path does:

1. decode with somad's rules (``somad.io.inputs``, ``somad.io.images``: files, PIL images, numpy frames;
   16-bit, float, palette, alpha...);
2. resize to ``image_size`` square as the native path does (``export_format.resized_input``: the graph would
   do the same to the bit on the decoded image, 3-10x slower than Pillow's C code; the graph crops), or, for a
   tiled export, to the frame it serves (``geometry.frame_size``; the graph cuts the tiles and refuses an image
   whose own frame, ``somad.resize.frame_size``, is another: the runtime says why in its ``status``);
3. apply the input gate (``somad.verdicts.check_frame``, with the limits the model learned from its training
   images: ``input_gate``);
4. run the graph, one image at a time, on that input, the image's original size, the gate's result and the
   thresholds: it returns the score, the map at the model input, the verdict, the map on the original image and
   the mask (the crop and the decision are the graph's: ``somad.export.onnx``). Without a threshold the verdict
   and mask are reported as ``None``; the normalised score is read from the thresholds' record
   (``somad.verdicts.normalized_or_none``).

:class:`OnnxDetector` answers what ``somad.io.outputs.write_predictions`` and the service ask of a detector
(``predict_iter``, ``original_map``, ``verdict``, ``mask``, the thresholds, ``display_range_``), so ``somad predict``
and ``somad serve`` take an export folder in place of a model file and write the same files.

Two backends run the graph (:data:`BACKENDS`): onnxruntime (``pip install "somad[runtime]"``) and OpenVINO
(``"somad[runtime-openvino]"``). OpenVINO's ONNX reader turns a graph input that has a default into a constant,
so the graph it is given has the defaults of ``export_format.INPUT_NAMES`` removed (:func:`_without_defaults`, on
the verified bytes) and every input is fed; it infers in float32 (its CPU plugin would otherwise choose bf16 where
the CPU has it).

This module imports nothing that imports torch (a test runs it with torch made unimportable).
"""

from __future__ import annotations

import dataclasses
import io
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
    read_export,
    resized_input,
    threshold_feeds,
)
from somad.io.inputs import ImageItem, as_items, decoded
from somad.io.integrity import file_sha256
from somad.io.schema import BATCH_SIZE
from somad.resize import frame_size
from somad.verdicts import INVALID, OK, FrameGate, check_frame, normalized_or_none, scale_resolution

#: The runtimes that run an export, and the extra of pyproject.toml that installs each.
BACKENDS = {"onnxruntime": "runtime", "openvino": "runtime-openvino"}


@dataclass
class Detection:
    """The result for one image.

    Attributes
    ----------
    name : str
    score : float, higher = more anomalous
    is_anomalous : bool or None (``None`` when the model has no threshold)
    anomaly_map : ndarray (S, S) float32 at the model input (a tiled export's: its frame, ``geometry.frame_size``)
    status : ``"ok"`` or ``"invalid_input: <reason>"`` (the input gate)
    original_size : (height, width)
    mask : ndarray (H, W) bool or None, the predicted defect mask on the original image (``None`` without
        thresholds)
    normalized_score : float or None, the [0, 1] scale with the threshold at 0.5 (``None`` without a threshold
        or where the export records no good scores)
    original_map : ndarray (H, W) float32, the anomaly map on the original image
    item : ImageItem, the input as ``somad.io.inputs.as_items`` names it (``item.name == name``)
    image : PIL image or None, the decoded RGB input (for the heatmap overlays; ``predict_iter`` only: ``predict``
        drops it, so that a list of results does not hold every image)
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
    item: ImageItem | None = None
    image: Image.Image | None = None

    @property
    def valid(self) -> bool:
        return self.status == OK


class OnnxDetector:
    """An exported somad model (``somad export``), scored with onnxruntime or OpenVINO, without torch.

    Parameters
    ----------
    path : folder written by ``somad export`` (``model.onnx`` + ``somad_export.json``)
    backend : {"onnxruntime", "openvino"}
    threads : int, optional
        Intra-op threads of the runtime (default: the runtime's own choice).
    spinning : bool, default True
        Whether onnxruntime's threads spin while waiting for work (its default: lowest latency, but they take CPU
        from other work in the process, e.g. torch, between runs). OpenVINO: ignored.
    threshold, pixel_threshold : float, optional
        Override the exported thresholds (fed to the graph, which decides with them).
    verify_key : bytes, or the path of a key file, optional
        Refuse an export that is unsigned or not signed with this key (``somad export --sign-key``;
        ``somad.io.integrity``). Without it the export is still checked against its own hashes.

    The export is verified before the first image (``somad.io.export_format.read_export``): the description field
    by field and against its own hash, the graph's bytes against the hash the description records (the bytes
    loaded are the bytes hashed); any mismatch is one ``ModelFileError`` line naming the files.

    Attributes
    ----------
    image_threshold_, pixel_threshold_, threshold_info_, display_range_ : as a loaded model's (the description's,
        or the overrides); ``somad predict --threshold`` sets them as it sets a model's
    batch_size : int, images decoded per step of :meth:`predict_iter` (the graph scores one at a time)
    device_ : ``"cpu"``
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
            raise SomadError(f"backend {backend!r} is not supported; choose one of: {', '.join(BACKENDS)}")
        meta_path = self.path / META_FILE
        # The description checked field by field and against its own hash, the graph's bytes against the
        # description (and, with a key, the signature): before anything is scored (somad.io.export_format).
        self.meta, graph = read_export(self.path, verify_key)
        geometry = self.meta["geometry"]
        self.image_size = int(geometry["image_size"])
        self.input_size = int(geometry["input_size"])  # the side of anomaly_map (the graph crops), or of a tile
        # What images are resized to (version 4: image_size square); a tiled export serves that frame only.
        self.frame_size = tuple(int(v) for v in geometry.get("frame_size") or (self.image_size,) * 2)
        self.tiled = geometry.get("original_size") is not None
        try:
            self.gate_ = FrameGate.from_dict(self.meta.get("input_gate"))  # None in older exports: the fixed rule
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{meta_path}: unreadable export description ({exc}); re-run `somad export`") from None
        self.method = self.meta.get("method")
        self.image_threshold_ = self.meta.get("image_threshold") if threshold is None else float(threshold)
        self.pixel_threshold_ = self.meta.get("pixel_threshold") if pixel_threshold is None else float(pixel_threshold)
        self.threshold_info_ = self.meta.get("threshold_info")
        shown = self.meta.get("display_range")
        self.display_range_ = tuple(float(v) for v in shown) if shown else None
        self.batch_size = 1
        self.device_ = "cpu"
        self.backend, self.threads, self._verified = backend, threads, verify_key is not None
        runner = _onnxruntime_runner if backend == "onnxruntime" else _openvino_runner
        self._run = runner(graph, self.path / MODEL_FILE, threads, spinning)

    def describe(self) -> dict:
        """What the export says about itself, as :func:`describe_export` gives it (verified when loaded), and the
        backend that runs it."""
        return {**_description(self.path, self.meta, verified=self._verified), "backend": self.backend}

    # ------------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Decoded RGB image -> uint8 ``(h, w, 3)``, its ``frame_size`` (``image_size`` square, a kept aspect ratio's
        frame, or a tiled export's): the native path's resize, which the graph leaves as it is (it crops, or cuts
        the tiles)."""
        return resized_input(image, self.frame_size)

    def frame_status(self, height: int, width: int) -> str:
        """``OK``, or, for a tiled export, why an image of this size is refused: its frame is not the served one."""
        if not self.tiled:
            return OK
        own = frame_size(height, width, self.image_size)
        if own == self.frame_size:
            return OK
        served = self.meta["geometry"]["original_size"]
        return (
            f"{INVALID}: a {width}x{height} image (frame {own[1]}x{own[0]}); this tiled export serves images whose "
            f"frame is {self.frame_size[1]}x{self.frame_size[0]}, such as {served[1]}x{served[0]}: export again "
            f"with --original-size {height}x{width}"
        )

    # ------------------------------------------------------------------ scoring
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bare graph, image by image: uint8 RGB frames ``(N, H, W, 3)`` (any size: the graph resizes them) ->
        scores ``(N,)``, maps ``(N, S, S)`` (float32), with the graph's defaults for the other inputs (a valid
        frame, the model's thresholds)."""
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 or 0 in batch.shape:
            raise SomadError(f"the graph takes uint8 (N, H, W, 3) RGB frames, got {batch.dtype} {batch.shape}")
        found = [self._run(self._feeds(np.ascontiguousarray(x[None]), (0, 0), True)) for x in batch]
        return np.concatenate([f[0] for f in found]).astype(np.float32), np.concatenate([f[1] for f in found])

    def predict_iter(
        self, images, *, batch_size: int | None = None, on_error: str = "fail", skipped: list[str] | None = None
    ) -> Iterator[Detection]:
        """One :class:`Detection` per image, decoded ``batch_size`` (default :attr:`batch_size`) at a time; the
        graph runs one image at a time. ``images``: what the native path accepts (``somad.io.inputs.as_items``:
        folders, paths, PIL images, numpy frames, sequences of these), decoded as it decodes them
        (``somad.io.inputs.decoded``). Unreadable images raise their ``ImageLoadError`` (``on_error="fail"``) or
        are appended to ``skipped`` and left out (``"skip"``), as a model's ``predict_iter`` does."""
        batch_size = self.batch_size if batch_size is None else batch_size
        problem = BATCH_SIZE.check(batch_size)
        if problem:  # 0 or -1 would run every image as one batch
            raise SomadError(f"batch_size={batch_size!r} is invalid: {problem}")
        pending: list[tuple[ImageItem, Image.Image]] = []
        for entry in decoded(as_items(images), on_error, skipped):
            pending.append(entry)
            if len(pending) == batch_size:
                yield from self._score(pending)
                pending = []
        if pending:
            yield from self._score(pending)

    def predict(self, images, *, batch_size: int | None = None) -> list[Detection]:
        """Score, verdict, anomaly map, input-gate status and mask of every image (see :meth:`predict_iter`)."""
        return [dataclasses.replace(d, image=None) for d in self.predict_iter(images, batch_size=batch_size)]

    def predict_maps(self, images, *, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(N,)`` and maps ``(N, S, S)`` at the model input, as ``model.predict_maps`` gives them."""
        found = self.predict(images, batch_size=batch_size)
        return np.asarray([d.score for d in found], np.float32), np.stack([d.anomaly_map for d in found])

    # ------------------------------------------------------------------ what the outputs ask of a detector
    def original_map(self, detection: Detection) -> np.ndarray:
        """The detection's map on its original image, ``(H, W)`` (the graph's ``original_map``)."""
        return detection.original_map

    def verdict(self, detection: Detection) -> bool | None:
        """Is this image anomalous (the graph's decision)? ``None`` without a threshold."""
        return detection.is_anomalous

    def mask(self, detection: Detection, anomaly_map: np.ndarray | None = None) -> np.ndarray | None:
        """The predicted defect mask on the original image (the graph's; ``anomaly_map``, the map a model's
        ``mask`` thresholds, is that of :meth:`original_map`); ``None`` without thresholds."""
        return detection.mask

    def _feeds(self, image: np.ndarray, size: tuple[int, int], valid: bool) -> dict[str, np.ndarray]:
        return {
            INPUT_NAME: image,
            INPUT_NAMES[1]: np.array(size, np.int64),
            INPUT_NAMES[2]: np.array([valid]),
            **threshold_feeds(self.image_threshold_, self.pixel_threshold_),  # the graph decides with them
        }

    def _score(self, pending: list[tuple[ImageItem, Image.Image]]) -> Iterator[Detection]:
        for item, image in pending:
            size = (image.height, image.width)
            status = check_frame(image, self.gate_)
            status = self.frame_status(*size) if status == OK else status  # the graph refuses the same frames
            score, m, flagged, original, mask = (
                a[0] for a in self._run(self._feeds(self.preprocess(image)[None], size, status == OK))
            )
            decided = self.image_threshold_ is not None  # the graph decides; without a threshold, nothing is decided
            n = normalized_or_none(float(score), self.image_threshold_, self.threshold_info_)
            yield Detection(
                item.name,
                float(score),
                bool(flagged) if decided else None,
                m,
                status,
                size,
                mask if decided and self.pixel_threshold_ is not None else None,
                n,
                original,
                item,
                image,
            )


def describe_export(path: str | os.PathLike, *, verify_key: bytes | str | os.PathLike | None = None) -> dict:
    """What an export folder says about itself, after :func:`~somad.io.export_format.read_export` has verified it
    (the description field by field and against its own hash, the graph against the description, with a key the
    signature): ``somad info EXPORT_DIR``. Any failure is one ``ModelFileError`` line."""
    meta, _ = read_export(path, verify_key)
    return _description(Path(path), meta, verified=verify_key is not None)


def _description(folder: Path, meta: dict, *, verified: bool) -> dict:
    """The description of a verified export: its ``somad_export.json`` (less the signature itself), the kind, the
    signature's state, and each file's SHA-256 and size (``file_sha256``: the graph's, which ``read_export`` has
    checked against ``files``, as the service reports a model file's)."""
    described = {k: v for k, v in meta.items() if k != "signature"}
    graph_sha256 = meta["files"][MODEL_FILE]
    files = {
        MODEL_FILE: {"sha256": graph_sha256, "bytes": (folder / MODEL_FILE).stat().st_size},
        META_FILE: {"sha256": file_sha256(folder / META_FILE), "bytes": (folder / META_FILE).stat().st_size},
    }
    return {
        **described,
        "path": str(folder),
        "kind": "export",
        "backbone": (meta.get("params") or {}).get("backbone"),
        "normalized_scale_resolution": scale_resolution(meta.get("threshold_info")),
        "signature": "verified" if verified else "present" if meta.get("signature") else None,
        "files": files,
        "file_sha256": graph_sha256,
    }


def _missing(backend: str) -> str:
    return f'{backend} is not installed; pip install "somad[{BACKENDS[backend]}]"'


def _check_graph(path: Path, shape, inputs: set[str], outputs: set[str]) -> None:
    """The graph a backend loaded takes the described input (an RGB frame of any size: ``shape`` ``[1, None, None,
    3]``, its free sides ``None``) and gives the described outputs."""
    if shape != [1, None, None, 3] or inputs != set(INPUT_NAMES) or not outputs >= set(OUTPUT_NAMES):
        raise ModelFileError(
            f"{path}: the graph does not take uint8 {INPUT_NAME} (1, H, W, 3) and "
            f"{', '.join(INPUT_NAMES[1:])} to {', '.join(OUTPUT_NAMES)} as its description ({META_FILE}) says; "
            "re-run `somad export`"
        )


def _onnxruntime_runner(graph: bytes, path: Path, threads: int | None, spinning: bool = True):
    """A session of the graph's bytes ``graph`` (read from ``path``), checked to take the described input."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SomadError(_missing("onnxruntime")) from None
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
    inputs = {i.name: i for i in given}
    shape = [d if isinstance(d, int) else None for d in inputs[INPUT_NAME].shape] if INPUT_NAME in inputs else None
    _check_graph(path, shape, set(inputs), {o.name for o in session.get_outputs()})
    return lambda feeds: session.run(list(OUTPUT_NAMES), feeds)


def _openvino_runner(graph: bytes, path: Path, threads: int | None, spinning: bool = True):
    """An OpenVINO CPU model of the graph's bytes ``graph`` (read from ``path``), in float32, its inputs' defaults
    removed (:func:`_without_defaults`), checked to take the described input."""
    try:
        import openvino as ov
    except ImportError:
        raise SomadError(_missing("openvino")) from None
    config = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin would run bf16 where the CPU has it
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        model = ov.convert_model(io.BytesIO(_without_defaults(graph, INPUT_NAMES[1:])))
        compiled = ov.Core().compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types for graphs it cannot read
        raise ModelFileError(f"{path}: OpenVINO cannot load it ({type(exc).__name__}); re-run `somad export`") from None
    inputs = {i.get_any_name(): i for i in compiled.inputs}
    image = inputs[INPUT_NAME].get_partial_shape() if INPUT_NAME in inputs else None
    shape = [d.get_length() if d.is_static else None for d in image] if image is not None else None
    _check_graph(path, shape, set(inputs), {o.get_any_name() for o in compiled.outputs})
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        found = request.infer(feeds)  # copies of the outputs (share_outputs=False)
        return [found[o] for o in outputs]

    return run


# ---------------------------------------------------------------------------------------------- ONNX's wire format
# ModelProto.graph is field 7; GraphProto.initializer field 5; TensorProto.name field 8 (onnx.proto3).
_GRAPH, _INITIALIZER, _NAME = 7, 5, 8


def _without_defaults(graph: bytes, names) -> bytes:
    """The ONNX model ``graph`` with the initializers named ``names`` removed, so that the graph inputs of those
    names have no default and stay inputs (OpenVINO's reader makes an input with a default a constant). The bytes
    are edited field by field (protobuf's wire format), everything else copied as it is: no ``onnx`` needed."""
    buf, names = memoryview(graph), {n.encode() for n in names}
    out: list = []
    for field, start, end, body in _fields(buf, 0, len(buf)):
        if field != _GRAPH or body is None:
            out.append(buf[start:end])
            continue
        kept = []
        for gfield, gstart, gend, gbody in _fields(buf, *body):
            if gfield == _INITIALIZER and gbody is not None:
                name = next((bytes(buf[slice(*b)]) for f, _, _, b in _fields(buf, *gbody) if f == _NAME and b), None)
                if name in names:
                    continue
            kept.append(buf[gstart:gend])
        inner = b"".join(kept)
        out += [_varint_bytes(_GRAPH << 3 | 2), _varint_bytes(len(inner)), inner]
    return b"".join(out)


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, tuple[int, int] | None]]:
    """The fields of the protobuf message ``buf[start:end]``: number, start, end and, for a length-delimited field,
    its body's bounds."""
    pos = start
    while pos < end:
        key, at = _varint(buf, pos)
        field, wire, body = key >> 3, key & 7, None
        if wire == 0:
            _, at = _varint(buf, at)
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        elif wire == 2:
            length, at = _varint(buf, at)
            body, at = (at, at + length), at + length
        else:
            raise ModelFileError(f"unreadable ONNX graph (wire type {wire}); re-run `somad export`")
        if at > end:
            raise ModelFileError("unreadable ONNX graph (a field runs past its message); re-run `somad export`")
        yield field, pos, at, body
        pos = at


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ModelFileError("unreadable ONNX graph (it ends inside a number); re-run `somad export`")
        byte = buf[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


__all__ = ["BACKENDS", "Detection", "OnnxDetector", "describe_export"]
