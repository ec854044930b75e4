"""A fitted detector as one ONNX graph that decides: the decoded image in; score, verdict, anomaly maps and mask out.

The graph (:func:`write_onnx`; its contract, declared once: ``somad.io.export_format``) holds everything after
decoding, the resize and the decision included:

* inputs: ``image`` uint8 ``(1, H, W, 3)``, RGB, the decoded image at any size; ``original_size`` int64 ``(2,)``, its
  height and width where ``image`` was resized before (default ``[0, 0]``: ``image``'s own size); ``valid`` bool
  ``(1,)``, the input gate's result; ``image_threshold`` and ``pixel_threshold``, float32 scalars held in the graph
  as constants (the model's thresholds, rounded as ``export_format.threshold_feeds`` rounds them) that a caller may
  override. Only ``image`` is needed;
* the resize and crop (:func:`input_nodes`): the native path's resize to ``image_size`` square
  (``somad.resize.resize_bilinear``: Pillow's antialiased BILINEAR in 8-bit fixed point, the horizontal pass
  first), bit for bit (``somad.export.resize_graph``), then the central ``input_size`` square. ONNX's own
  ``Resize`` with ``antialias=1`` is another filter (measured on 16 test images of each shared dataset resized to
  256 px: up to 1 grey level apart on metal_plate, 2 on tire and 7 on magnetic_tile's odd sizes, scores up to
  2.7e-2 apart). An image already resized by ``resize_bilinear`` (``export_format.resized_input``, with its
  ``original_size``) passes through unchanged: the runtime feeds that, Pillow's C code being 3-10x faster;
* the feature stage, traced: ``x / 255``, the backbone's normalisation, the backbone and the stages combined as
  the native path combines them (``model.feature_graph()``: ``features.FeatureGraph``);
* the method's patch scoring, as ``model.export_scoring()`` gives it: the very module its ``predict`` runs, traced
  (PaDiM: ``methods.padim.PadimScorer``; PatchCore: ``methods.patchcore.PatchcoreScorer``, with its own image
  score); or, where the native scoring cannot be traced (SOMAD's node-grouped C kernel), the ONNX nodes that
  mirror it, kept beside it (``somad.som.onnx_graph``: the model's own search, exhaustive or its IVF index);
* the map step of ``BaseDetector._anomaly_maps``: bilinear upsampling to ``S x S`` and the Gaussian blur, one
  ``(S, h)`` matrix per axis (``model.map_matrix()``); ``score``, the map maximum or the method's own image score;
* the **input gate** (:func:`gate_nodes`) of a model that learned one (``verdicts.FrameGate`` with ``"resized"``
  statistics, somad 0.11 on): on an image fed whole, its statistics in the integers ``verdicts.frame_stats`` uses
  (grey levels of the frame resized to 256 square, sums and counts against integer bounds), so the graph refuses
  exactly the frames ``check_frame`` refuses; where the caller resized the image (``original_size`` fed) the
  gate's result is its ``valid``;
* the decision (:func:`decision_nodes`), the rule of ``somad.verdicts.decide``: ``is_anomalous`` = score above the
  image threshold, or a frame the gate refused; ``original_map`` ``(1, H, W)``, the map put back on the original image
  (the crop's margin edge-replicated, bilinear: ``features.to_original_resolution``); ``mask`` ``(1, H, W)``, its
  pixels above the pixel threshold plus its peak when the image is flagged, every pixel of a refused frame, none
  otherwise (``verdicts.predicted_mask``).

What stays outside the graph (``somad.runtime.OnnxDetector`` does it):

* decoding (``somad.io.images``: files, 16-bit, palette, EXIF orientation... to 8-bit RGB);
* the input gate's **reason** (the runtime's ``status``: the graph says only refused or not), and the gate of
  models fitted before 0.11, whose statistics were taken on Pillow's BOX thumbnail, which ONNX does not reproduce
  bit for bit: their gate's result enters as ``valid``;
* a model without thresholds: the graph gets NaN thresholds (nothing above them) and the runtime reports the
  verdict and mask as ``None``, as the native path does.

A tiled model (``tile_size``) exports for one frame: its tiles' positions and the stitched map's size depend on
the frame an image is resized to (``somad.resize.frame_size``: offsets rounded to 16 px, blur matrices of the
frame's size), so its graph is built for the frame of the images it serves (``original_size``, by default the
training images' median size: a line's camera gives one): :func:`tile_nodes` resizes to that frame and cuts the
tiles, the traced part scores them as one batch, :func:`stitch_nodes` stitches their patch scores as
``methods.tiling.stitch_maps`` does, and an image whose own frame is another (computed in the graph by the same
rule) is refused as the input gate refuses a frame (the runtime's ``status`` says how to export for it).

:func:`export_model` writes ``DIR/model.onnx`` and ``DIR/somad_export.json`` (thresholds, geometry,
normalisation, source model hash, the graph's SHA-256, its own hash and, with a key, its signature) into a staged
folder renamed into place whole, after checking the graph under onnxruntime against the native path
(:func:`check_parity`: scores, maps, verdicts and masks, on generated frames of another size than the model's, fed
whole and resized as the runtime feeds them).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from somad._version import __version__
from somad.errors import SomadError
from somad.export.resize_graph import pillow_bilinear_nodes
from somad.io.export_format import (
    EXPORT_VERSION,
    FORMATS,
    INPUT_NAME,
    INPUT_NAMES,
    META_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    resized_input,
    seal,
    threshold_feeds,
)
from somad.io.integrity import as_key, file_sha256
from somad.io.outputs import staged_output_dir
from somad.io.schema import MAX_IMAGE_SIZE
from somad.methods import load
from somad.methods.base import BaseDetector
from somad.resize import MAX_ASPECT, frame_size
from somad.verdicts import (
    BLANK_BOUND,
    FLAT_BLOCK,
    FLAT_BOUND,
    GATE_SIZE,
    LUMA_WEIGHTS,
    decide,
    predicted_mask,
)

logger = logging.getLogger(__name__)

# FORMATS (export_format): OpenVINO (2026.4) is not offered: it fails to convert SOMAD's Loop (with a Concat-carried
# loop) or runs it to an empty output (with a tensor sequence), and its CPU plugin infers in bf16 unless told f32.
#: The operator set of the graph (SOMAD's hand-built nodes use its signatures: ``somad.som.onnx_graph``).
OPSET = 17
#: Graph constants beyond this many bytes do not fit one ONNX protobuf file (2 GiB).
MAX_CONSTANT_BYTES = 1_900_000_000
#: The export check: largest relative score difference allowed between the graph and the native path (same search);
#: maps within this fraction of their largest value (at least 1), and verdicts and mask pixels that differ only
#: where the native score or map lies that close to the threshold.
PARITY_RTOL = 1e-3
#: Maps of a graph with an IVF search (SOMAD's default): within this fraction of their largest value. The graph and
#: the native kernel compute the coarse distances in another order, so a patch whose two nearest lists are tied to
#: float precision may probe other nodes there: its patch score moves by the gap between their distances, and the
#: blur spreads it (measured on the shared test images: up to 0.26% of the map's maximum, docs/benchmarks.md; a
#: metal_plate model fitted at one thread failed the former 0.1% on a generated frame). A wrong resize, blur or
#: scoring step moves maps by a sizeable part of their values; scores and verdicts keep :data:`PARITY_RTOL`.
IVF_MAP_RTOL = 1e-2


class ExportError(SomadError):
    """A model that cannot be exported (a tiled model, a graph too large for one file, a missing package)."""


# ---------------------------------------------------------------------------------------------- graph
class _Traced(nn.Module):
    """The traced part of the graph: ``image`` -> the feature stage -> the method's scoring module, if it has one
    (patch scores ``(1, h, w)`` and maybe its own image scores ``(1,)``); without one, the features."""

    def __init__(self, features: nn.Module, scoring: nn.Module | None):
        super().__init__()
        self.features, self.scoring = features, scoring

    def forward(self, image: torch.Tensor):
        feats = self.features(image)
        return feats if self.scoring is None else self.scoring(feats)


def decision_nodes(
    patch: str, own_score: str | None, matrices: tuple[np.ndarray, np.ndarray], geometry, size: str, valid: str
) -> tuple[list, list]:
    """ONNX nodes from the patch scores ``patch`` ``(1, h, w)`` (and the method's own image score ``own_score``, or
    ``None``) to :data:`OUTPUT_NAMES`, with the graph inputs of :data:`INPUT_NAMES` (see the module docstring),
    ``size``, the original image's height and width (int64 ``(2,)``), and ``valid``, the frame's admission (bool
    ``(1,)``). ``matrices``: the map step, ``(rows (H, h), cols (W, w))`` (``model.map_matrices``); ``geometry``:
    the model's ``Geometry`` (its crop). Returns ``(nodes, initializers)``."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    score, amap, flagged, original, mask = OUTPUT_NAMES
    _, _, _, image_t, pixel_t = INPUT_NAMES
    before = geometry.crop_offset  # the crop's margins in the resized frame, put back by edge replication
    after = 0 if geometry.tile_size is not None else geometry.resized[0] - geometry.input_size - before
    rows, cols = matrices
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(rows, np.float32), "map_rows"),
        numpy_helper.from_array(np.ascontiguousarray(cols.T, np.float32), "map_cols_t"),
        numpy_helper.from_array(np.array([1], np.int64), "decision_axis1"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "decision_ones2"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "decision_row"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "decision_one_pixel"),
        numpy_helper.from_array(np.array([[True]]), "decision_true"),
    ]
    if before or after:
        margins = np.array([0, 0, before, before, 0, 0, after, after], np.int64)  # Pad's begins, then ends
        inits.append(numpy_helper.from_array(margins, "decision_margins"))
    false = helper.make_tensor("false", TensorProto.BOOL, [1], [False])
    nodes = [
        n("MatMul", ["map_rows", patch], ["map_half"]),  # (S, h) @ (1, h, w): rows, as features.upsample_blur
        n("MatMul", ["map_half", "map_cols_t"], [amap]),  # (1, H, W): the model input, or a tiled model's frame
        n("Identity", [own_score], [score]) if own_score else n("ReduceMax", [amap], [score], axes=[1, 2], keepdims=0),
        # The verdict (verdicts.decide: a refused frame is always flagged, else the score above the threshold).
        n("Greater", [score, image_t], ["decision_above"]),
        n("Not", [valid], ["decision_refused"]),
        n("Or", ["decision_above", "decision_refused"], [flagged]),
        # The map on the original image (features.to_original_resolution): the crop's margins edge-replicated,
        # then bilinear (half-pixel centres, as torch's align_corners=False) to the original size.
        n("Unsqueeze", [amap, "decision_axis1"], ["decision_map4"]),  # (1, 1, S, S)
        *(
            [n("Pad", ["decision_map4", "decision_margins"], ["decision_frame"], mode="edge")]
            if before or after
            else [n("Identity", ["decision_map4"], ["decision_frame"])]
        ),
        n("Concat", ["decision_ones2", size], ["decision_sizes"], axis=0),
        n(
            "Resize",
            ["decision_frame", "", "", "decision_sizes"],
            ["decision_original4"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        n("Squeeze", ["decision_original4", "decision_axis1"], [original]),  # (1, H, W)
        # The mask (verdicts.predicted_mask): flagged, the pixels above the threshold and the first peak pixel
        # (numpy's argmax); refused, every pixel; else none.
        n("Greater", [original, pixel_t], ["decision_over"]),
        n("Shape", [original], ["decision_shape"]),
        n("Reshape", [original, "decision_row"], ["decision_flat"]),  # (1, H W)
        n("ArgMax", ["decision_flat"], ["decision_peak"], axis=1, keepdims=1, select_last_index=0),
        n("Shape", ["decision_flat"], ["decision_flat_shape"]),
        n("ConstantOfShape", ["decision_flat_shape"], ["decision_none"], value=false),
        n("ScatterElements", ["decision_none", "decision_peak", "decision_true"], ["decision_peak_flat"], axis=1),
        n("Reshape", ["decision_peak_flat", "decision_shape"], ["decision_peak_pixel"]),
        n("Or", ["decision_over", "decision_peak_pixel"], ["decision_shown"]),
        n("Reshape", [flagged, "decision_one_pixel"], ["decision_flagged3"]),
        n("And", ["decision_shown", "decision_flagged3"], ["decision_flagged_pixels"]),
        n("Reshape", ["decision_refused", "decision_one_pixel"], ["decision_refused3"]),
        n("Or", ["decision_flagged_pixels", "decision_refused3"], [mask]),
    ]
    return nodes, inits


def input_nodes(geometry, model_image: str, size: str) -> tuple[list, list]:
    """ONNX nodes from the graph's ``image`` (uint8 ``(1, H, W, 3)``, any size) to ``model_image`` (uint8 ``(1, S, S,
    3)``: the native path's resize to ``image_size`` square, bit for bit (``somad.export.resize_graph``), then the
    central ``input_size`` square) and to ``size``, the original image's height and width (:func:`size_nodes`).
    Returns ``(nodes, initializers)``."""
    from onnx import helper, numpy_helper

    n = helper.make_node
    o, (h, w) = geometry.crop_offset, geometry.input_shape
    nodes, inits = size_nodes(size)
    resize, resize_inits = pillow_bilinear_nodes(INPUT_NAME, "input_resized", geometry.resized, prefix="input_resize")
    inits += resize_inits + [
        numpy_helper.from_array(np.array([o, o], np.int64), "input_crop_starts"),
        numpy_helper.from_array(np.array([o + h, o + w], np.int64), "input_crop_ends"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "input_crop_axes"),
    ]
    nodes += resize + [
        n("Slice", ["input_resized", "input_crop_starts", "input_crop_ends", "input_crop_axes"], [model_image]),
    ]
    return nodes, inits


def size_nodes(size: str) -> tuple[list, list]:
    """ONNX nodes giving ``size``, the original image's height and width (int64 ``(2,)``): the ``original_size``
    input where it is fed (positive), else the ``image`` input's own. Returns ``(nodes, initializers)``."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    inits = [numpy_helper.from_array(np.array([0, 0], np.int64), "input_no_size")]
    nodes = [
        n("Shape", [INPUT_NAME], ["input_own_size"], start=1, end=3),  # (H, W) of the image fed
        n("Greater", [INPUT_NAMES[1], "input_no_size"], ["input_size_fed"]),
        n("Where", ["input_size_fed", INPUT_NAMES[1], "input_own_size"], [size]),
        n("Cast", ["input_size_fed"], ["input_size_fed_i"], to=TensorProto.INT64),
        n("ReduceMax", ["input_size_fed_i"], ["input_size_fed_max"], keepdims=1, axes=[0]),
        n("Cast", ["input_size_fed_max"], ["input_size_fed_any"], to=TensorProto.BOOL),  # (1,)
    ]
    return nodes, inits


def tile_nodes(geometry, layout, model_image: str, size: str, valid: str) -> tuple[list, list]:
    """A tiled model's input: ONNX nodes from the graph's ``image`` (uint8 ``(1, H, W, 3)``) to ``model_image``, its
    tiles ``(K, T, T, 3)``: the native path's resize to the frame of ``layout`` (``somad.resize.frame_size`` of the
    original size the export serves), bit for bit, cut at the layout's offsets (``Geometry.layout``); ``size`` as
    :func:`size_nodes` gives it; and ``valid``, the ``valid`` input and the frame check: the image's own frame, by
    the rule of ``somad.resize.frame_size`` in float64 (Python's ``round`` and ONNX's ``Round`` both take halves
    to even), is the layout's. The tiles' positions and the stitched map's size follow the frame, so the graph
    serves the images whose frame is that one (an image of another aspect ratio is refused, as the input gate
    refuses a frame). Returns ``(nodes, initializers)``."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    (fh, fw), t, r = layout.size, geometry.tile_size, geometry.image_size
    nodes, inits = size_nodes(size)
    resize, resize_inits = pillow_bilinear_nodes(INPUT_NAME, "input_resized", (fh, fw), prefix="input_resize")
    nodes += resize
    inits += resize_inits + [
        numpy_helper.from_array(np.array([1, 2], np.int64), "tile_axes"),
        numpy_helper.from_array(np.array(float(r)), "tile_side"),
        numpy_helper.from_array(np.array(float(MAX_ASPECT * r)), "tile_longest"),
        numpy_helper.from_array(np.array(16.0), "tile_step"),
        numpy_helper.from_array(np.array([float(fh), float(fw)]), "tile_frame"),
        numpy_helper.from_array(np.array([0], np.int64), "tile_axis0"),
    ]
    for k, (y, x) in enumerate(layout.offsets):
        inits += [
            numpy_helper.from_array(np.array([y, x], np.int64), f"tile{k}_starts"),
            numpy_helper.from_array(np.array([y + t, x + t], np.int64), f"tile{k}_ends"),
        ]
        nodes.append(n("Slice", ["input_resized", f"tile{k}_starts", f"tile{k}_ends", "tile_axes"], [f"tile{k}"]))
    nodes += [
        n("Concat", [f"tile{k}" for k in range(len(layout.offsets))], [model_image], axis=0),
        # The frame check: scale = side / min(H, W); each side round(n * scale / 16) * 16 within [side, 8 side].
        n("Cast", [size], ["tile_size_d"], to=TensorProto.DOUBLE),
        n("ReduceMin", ["tile_size_d"], ["tile_short"], axes=[0], keepdims=1),
        n("Div", ["tile_side", "tile_short"], ["tile_scale"]),
        n("Mul", ["tile_size_d", "tile_scale"], ["tile_scaled"]),
        n("Div", ["tile_scaled", "tile_step"], ["tile_steps"]),
        n("Round", ["tile_steps"], ["tile_rounded"]),
        n("Mul", ["tile_rounded", "tile_step"], ["tile_sides"]),
        n("Max", ["tile_sides", "tile_side"], ["tile_at_least"]),
        n("Min", ["tile_at_least", "tile_longest"], ["tile_own_frame"]),
        n("Equal", ["tile_own_frame", "tile_frame"], ["tile_equal"]),
        n("Cast", ["tile_equal"], ["tile_equal_i"], to=TensorProto.INT64),
        n("ReduceMin", ["tile_equal_i"], ["tile_both"], axes=[0], keepdims=1),
        n("Cast", ["tile_both"], ["tile_frame_ok"], to=TensorProto.BOOL),
        n("And", [INPUT_NAMES[2], "tile_frame_ok"], [valid]),
    ]
    return nodes, inits


def gate_nodes(gate, resized: str | None, valid_in: str, valid: str) -> tuple[list, list]:
    """The input gate inside the graph (``somad.verdicts.check_frame`` with a learned gate's ``"resized"``
    statistics, in the same integers): ONNX nodes from the graph's ``image`` (or ``resized``, its resize to
    ``GATE_SIZE`` square where the graph makes that anyway) to ``valid``: ``valid_in`` and, for an image fed whole
    (no ``original_size``: a caller that resizes first computes the gate itself and feeds ``valid``), the gate's
    admission: not blank (``n S2 - S1^2 < BLANK_BOUND``), not saturated (more than ``saturated_fraction`` of its
    pixels at 0-2 or 253-255), not mostly blank (more than ``flat_fraction`` of its 8x8 blocks with ``64 s2 - s1^2
    < FLAT_BOUND``). Every sum is an int64 of 8-bit grey levels, every fraction a count against an integer bound,
    so the graph and ``frame_stats`` decide alike to the last pixel. Returns ``(nodes, initializers)``."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    side, block = GATE_SIZE, FLAT_BLOCK
    pixels, blocks = side * side, (side // block) ** 2
    nodes, inits = [], []
    if resized is None:
        nodes, inits = pillow_bilinear_nodes(INPUT_NAME, "gate_resized", (side, side), prefix="gate_resize")
        resized = "gate_resized"
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits += [
        i64("gate_luma", list(LUMA_WEIGHTS)),
        i64("gate_half", 1 << 15),
        i64("gate_unit", 1 << 16),
        i64("gate_dark", 2),
        i64("gate_bright", 253),
        i64("gate_pixels", pixels),
        i64("gate_area", block * block),
        i64("gate_blank_bound", BLANK_BOUND),
        i64("gate_flat_bound", FLAT_BOUND),
        # a count above limit * total: above its floor (the limits may pass 1: then the rule never fires)
        i64("gate_clipped_limit", int(np.floor(gate.saturated_fraction * pixels))),
        i64("gate_flat_limit", int(np.floor(gate.flat_fraction * blocks))),
        i64("gate_blocks_shape", [side // block, block, side // block, block]),
        i64("gate_block_axes", [1, 3]),
    ]
    nodes += [
        n("Cast", [resized], ["gate_rgb"], to=TensorProto.INT64),  # (1, S, S, 3)
        n("MatMul", ["gate_rgb", "gate_luma"], ["gate_weighted"]),  # (1, S, S): r R + g G + b B
        n("Add", ["gate_weighted", "gate_half"], ["gate_rounded"]),
        n("Div", ["gate_rounded", "gate_unit"], ["gate_grey"]),  # >> 16 (non-negative: Div floors)
        n("Mul", ["gate_grey", "gate_grey"], ["gate_grey2"]),
        n("ReduceSum", ["gate_grey"], ["gate_s1"], keepdims=0),
        n("ReduceSum", ["gate_grey2"], ["gate_s2"], keepdims=0),
        n("Mul", ["gate_s2", "gate_pixels"], ["gate_ns2"]),
        n("Mul", ["gate_s1", "gate_s1"], ["gate_s1s1"]),
        n("Sub", ["gate_ns2", "gate_s1s1"], ["gate_var"]),
        n("Less", ["gate_var", "gate_blank_bound"], ["gate_blank"]),
        n("LessOrEqual", ["gate_grey", "gate_dark"], ["gate_black"]),
        n("GreaterOrEqual", ["gate_grey", "gate_bright"], ["gate_white"]),
        n("Or", ["gate_black", "gate_white"], ["gate_ends"]),
        n("Cast", ["gate_ends"], ["gate_ends_i"], to=TensorProto.INT64),
        n("ReduceSum", ["gate_ends_i"], ["gate_clipped"], keepdims=0),
        n("Greater", ["gate_clipped", "gate_clipped_limit"], ["gate_saturated"]),
        n("Reshape", ["gate_grey", "gate_blocks_shape"], ["gate_g_blocks"]),
        n("Reshape", ["gate_grey2", "gate_blocks_shape"], ["gate_g2_blocks"]),
        n("ReduceSum", ["gate_g_blocks", "gate_block_axes"], ["gate_b1"], keepdims=0),
        n("ReduceSum", ["gate_g2_blocks", "gate_block_axes"], ["gate_b2"], keepdims=0),
        n("Mul", ["gate_b2", "gate_area"], ["gate_nb2"]),
        n("Mul", ["gate_b1", "gate_b1"], ["gate_b1b1"]),
        n("Sub", ["gate_nb2", "gate_b1b1"], ["gate_bvar"]),
        n("Less", ["gate_bvar", "gate_flat_bound"], ["gate_flat_blocks"]),
        n("Cast", ["gate_flat_blocks"], ["gate_flat_i"], to=TensorProto.INT64),
        n("ReduceSum", ["gate_flat_i"], ["gate_flat"], keepdims=0),
        n("Greater", ["gate_flat", "gate_flat_limit"], ["gate_mostly_blank"]),
        n("Or", ["gate_blank", "gate_saturated"], ["gate_refused_2"]),
        n("Or", ["gate_refused_2", "gate_mostly_blank"], ["gate_refused"]),
        n("Not", ["gate_refused"], ["gate_passes"]),
        n("Or", ["input_size_fed_any", "gate_passes"], ["gate_admits"]),  # resized by the caller: its valid says
        n("And", [valid_in, "gate_admits"], [valid]),
    ]
    return nodes, inits


def stitch_nodes(patch: str, own_score: str | None, layout, tile_grid: int, stride: int) -> tuple[list, list, str, str]:
    """ONNX nodes from the tiles' patch scores ``patch`` ``(K, g, g)``, ``g = tile_grid`` (and their own image scores
    ``own_score`` ``(K,)``, or ``None``) to the frame's patch grid ``(1, h, w)``, as ``methods.tiling.stitch_maps``
    stitches them: each tile placed at its offset (a 0/1 placement matrix per side), summed, divided by the number
    of tiles over each patch; and the largest tile score (``None`` without ``own_score``: the map maximum decides).
    Returns ``(nodes, initializers, grid, score)``."""
    from onnx import helper, numpy_helper

    n = helper.make_node
    (fh, fw), g = layout.size, tile_grid
    gh, gw = fh // stride, fw // stride
    place_rows = np.zeros((len(layout.offsets), gh, g), np.float32)  # (K, h, g): tile row i -> frame row y + i
    place_cols = np.zeros((len(layout.offsets), g, gw), np.float32)  # (K, g, w): tile column j -> frame column x + j
    count = np.zeros((1, gh, gw), np.float32)
    for k, (y, x) in enumerate(layout.offsets):
        y, x = y // stride, x // stride
        place_rows[k, y + np.arange(g), np.arange(g)] = 1.0
        place_cols[k, np.arange(g), x + np.arange(g)] = 1.0
        count[0, y : y + g, x : x + g] += 1.0
    inits = [
        numpy_helper.from_array(place_rows, "stitch_rows"),
        numpy_helper.from_array(place_cols, "stitch_cols"),
        numpy_helper.from_array(count, "stitch_count"),
        numpy_helper.from_array(np.array([0], np.int64), "stitch_axis0"),
    ]
    nodes = [
        n("MatMul", ["stitch_rows", patch], ["stitch_tall"]),  # (K, h, g)
        n("MatMul", ["stitch_tall", "stitch_cols"], ["stitch_placed"]),  # (K, h, w), zero outside each tile
        n("ReduceSum", ["stitch_placed", "stitch_axis0"], ["stitch_total"], keepdims=1),  # (1, h, w)
        n("Div", ["stitch_total", "stitch_count"], ["stitch_grid"]),
    ]
    if own_score is None:
        return nodes, inits, "stitch_grid", None
    nodes.append(n("ReduceMax", [own_score], ["stitch_score"], axes=[0], keepdims=1))  # (1,)
    return nodes, inits, "stitch_grid", "stitch_score"


def _trace(module: nn.Module, path: Path, example: torch.Tensor, outputs: list[str], opset: int) -> None:
    """``torch.onnx.export`` (the TorchScript-based exporter: no extra package needed) of ``module`` on
    ``example`` (named :data:`INPUT_NAME`), shapes as traced."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings: nothing to act on here
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=int(opset),
            input_names=[INPUT_NAME],
            output_names=outputs,
            do_constant_folding=True,
        )


def write_onnx(model: BaseDetector, path: Path, layout=None) -> None:
    """Write the whole graph of ``model`` to ``path`` (see the module docstring), in opset :data:`OPSET`: the input
    (:func:`input_nodes`, or a tiled model's :func:`tile_nodes` for ``layout``, the ``Geometry.layout`` of the
    original size it serves), the traced part (features, and the method's scoring module where it has one), its
    scoring nodes where it has those instead (``model.export_scoring()``), a tiled model's :func:`stitch_nodes`,
    then :func:`decision_nodes`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    geometry = model.extractor_.geometry
    sh, sw = geometry.input_shape  # the model input's (a tiled model's: a tile's)
    example = torch.zeros(1 if layout is None else len(layout.offsets), sh, sw, 3, dtype=torch.uint8)
    scoring = model.export_scoring()
    traced = isinstance(scoring, nn.Module)
    module = _Traced(model.feature_graph(), scoring if traced else None)
    if traced:
        with torch.no_grad():
            probe = module.eval()(example)
        names = ["patch_scores", "method_score"][: len(probe) if isinstance(probe, tuple) else 1]
    else:
        names = ["features"]
    _trace(module, path, example, names, OPSET)
    proto = onnx.load(str(path))
    graph = proto.graph
    model_image, size = "model_image", "decision_original_size"
    for node in graph.node:  # the traced part now starts from the resized and cropped image (or its tiles)
        node.input[:] = [model_image if name == INPUT_NAME else name for name in node.input]
    nodes, inits, patch = ([], [], names[0]) if traced else scoring(names[0])
    own_score = names[1] if len(names) > 1 else None
    if layout is None:
        head, head_inits = input_nodes(geometry, model_image, size)
        valid, (h, w) = INPUT_NAMES[2], (sh, sw)
    else:
        valid, (h, w) = "tile_valid", layout.size
        head, head_inits = tile_nodes(geometry, layout, model_image, size, valid)
        stitch, stitch_inits, patch, own_score = stitch_nodes(
            patch, own_score, layout, model.extractor_.grid_shape[0], model.extractor_.stride
        )
        nodes, inits = nodes + stitch, inits + stitch_inits
    gate = getattr(model, "gate_", None)
    if gate is not None and gate.statistics == "resized":  # a learned gate whose statistics the graph repeats
        same = layout is None and tuple(geometry.resized) == (GATE_SIZE, GATE_SIZE)
        nodes_gate, inits_gate = gate_nodes(gate, "input_resized" if same else None, valid, "gate_valid")
        head, head_inits, valid = head + nodes_gate, head_inits + inits_gate, "gate_valid"
    matrices = tuple(m.numpy() for m in model.map_matrices(layout))
    tail, tail_inits = decision_nodes(patch, own_score, matrices, geometry, size, valid)
    defaults = {
        INPUT_NAMES[1]: np.array([0, 0], np.int64),
        INPUT_NAMES[2]: np.array([True]),
        **threshold_feeds(model.image_threshold_, model.pixel_threshold_),
    }
    traced_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + traced_nodes + nodes + tail)
    graph.initializer.extend(
        head_inits + inits + tail_inits + [numpy_helper.from_array(v, k) for k, v in defaults.items()]
    )
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [1, "image_height", "image_width", 3]),
            helper.make_tensor_value_info(INPUT_NAMES[1], TensorProto.INT64, [2]),
            helper.make_tensor_value_info(INPUT_NAMES[2], TensorProto.BOOL, [1]),
            helper.make_tensor_value_info(INPUT_NAMES[3], TensorProto.FLOAT, []),
            helper.make_tensor_value_info(INPUT_NAMES[4], TensorProto.FLOAT, []),
        ]
    )
    score, amap, flagged, original, mask = OUTPUT_NAMES
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(score, TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info(amap, TensorProto.FLOAT, [1, h, w]),
            helper.make_tensor_value_info(flagged, TensorProto.BOOL, [1]),
            helper.make_tensor_value_info(original, TensorProto.FLOAT, [1, "height", "width"]),
            helper.make_tensor_value_info(mask, TensorProto.BOOL, [1, "height", "width"]),
        ]
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------- export
def check_exportable(model: BaseDetector, where: str) -> None:
    """Raise a one-line :class:`ExportError` for models this exporter does not handle."""
    size = model.export_constant_bytes()
    if size > MAX_CONSTANT_BYTES:
        raise ExportError(
            f"{where}: the {model.method} graph would hold {size / 1e9:.1f} GB of constants, over ONNX's 2 GB "
            "file limit; refit with fewer --dims (or a smaller --som-size / --coreset-ratio)"
        )


def served_layout(model: BaseDetector, original_size: tuple[int, int] | None, where: str):
    """The ``Geometry.layout`` a tiled model's export serves: that of ``original_size`` ``(height, width)``, by
    default the training images' median size (``input_profile_``); ``None`` for an untiled model (it serves
    every size)."""
    g = model.extractor_.geometry
    if g.tile_size is None:
        return None
    if original_size is None:
        original_size = (getattr(model, "input_profile_", None) or {}).get("median_size")
        if not original_size:
            raise ExportError(
                f"{where}: a tiled model's graph serves images of one frame size, and this model does not record "
                "its training images' sizes; pass the camera's image size: --original-size HEIGHTxWIDTH"
            )
    h, w = (int(v) for v in original_size)
    if not (0 < h <= MAX_IMAGE_SIZE and 0 < w <= MAX_IMAGE_SIZE):
        raise ExportError(f"{where}: original size {h}x{w} is out of range; each side must be 1..{MAX_IMAGE_SIZE}")
    return g.layout(h, w)


def parity_images(size: int | tuple[int, int], n: int = 2, seed: int = 0) -> list[Image.Image]:
    """Generated frames for the export check: ``n`` textured ones (smooth pattern plus noise) of ``5/4 size x 3/2
    size`` pixels (``size`` an int) or of ``size`` ``(height, width)`` itself (a tiled export's served size), so that
    the resize and the maps' way back to the original are exercised, and a blank one, which the input gate
    refuses."""
    rng = np.random.default_rng(seed)
    h, w = (round(1.25 * size), round(1.5 * size)) if isinstance(size, int) else size
    size = min(h, w) if not isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w] / max(size, 1)
    out = []
    for i in range(n):
        base = 128 + 60 * np.sin(2 * np.pi * (3 + i) * xx)[..., None] * np.cos(2 * np.pi * 2 * yy)[..., None]
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)))
    out.append(Image.fromarray(np.full((h, w, 3), 128, np.uint8)))
    return out


def check_parity(model: BaseDetector, onnx_path: Path, layout=None, original_size=None) -> dict:
    """Run the written graph under onnxruntime and the native path (the same search) on :func:`parity_images`:
    scores, maps at the model input and on the original image, and verdicts and masks with the model's thresholds
    and with thresholds amid the images' scores and map values (so that both verdicts and partial masks occur).
    A tiled model's (``layout``: :func:`served_layout` of ``original_size``) on images of that size, and on one
    of another aspect ratio, which its graph must refuse. Differences beyond :data:`PARITY_RTOL` (maps of an IVF
    graph: :data:`IVF_MAP_RTOL`) are a one-line :class:`ExportError`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed, so the exported graph cannot be checked; run "
            "`pip install 'somad[export]'` (or pass --no-check)"
        ) from None
    g = model.extractor_.geometry
    map_rtol = IVF_MAP_RTOL if model.scoring_info().get("search") == "ivf" else PARITY_RTOL
    images = parity_images(g.image_size if layout is None else tuple(original_size))
    resize_to = g.resized if layout is None else layout.size
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    native = list(model.predict_iter(images))
    full = [model.original_map(p) for p in native]
    thresholds = [(model.image_threshold_, model.pixel_threshold_)] if model.image_threshold_ is not None else []
    if any(p.valid for p in native):  # amid the valid frames' scores and map values
        pixels = np.concatenate([m.ravel() for p, m in zip(native, full) if p.valid])
        mid = float(np.mean([p.score for p in native if p.valid]))
        thresholds.append((mid, float(np.quantile(pixels, 0.9))))
    found = {"score": [], "map": [], "original": [], "verdict": 0, "verdict_near": 0, "pixels": 0, "pixels_near": 0}
    for image, p, ref in zip(images, native, full):
        raw = {INPUT_NAME: np.asarray(image, np.uint8)[None]}  # the graph resizes (and takes the size from it)
        resized = {  # the runtime's way: resized as the native path resizes, with the original size
            INPUT_NAME: resized_input(image, resize_to)[None],
            INPUT_NAMES[1]: np.array(p.original_size, np.int64),
        }
        for t, (image_t, pixel_t) in enumerate(thresholds):
            rest = {INPUT_NAMES[2]: np.array([p.valid]), **threshold_feeds(image_t, pixel_t)}
            outputs = session.run(list(OUTPUT_NAMES), {**raw, **rest})
            # once per image: the decision reads only the maps, which equal inputs make equal
            same = t > 0 or all(
                np.array_equal(a, b) for a, b in zip(outputs, session.run(list(OUTPUT_NAMES), {**resized, **rest}))
            )
            if not same:
                raise _parity_error(onnx_path, "the graph's own resize and the runtime's resized input disagree")
            score, amap, flagged, original, mask = (a[0] for a in outputs)
            found["score"].append(abs(float(score) - p.score) / max(abs(p.score), 1e-12))
            found["map"].append(float(np.max(np.abs(amap - p.map.numpy()))))
            found["original"].append(float(np.max(np.abs(original - ref))) if original.shape == ref.shape else np.inf)
            tol = map_rtol * max(1.0, float(np.abs(ref).max()))
            verdict = decide(p.score, image_t, valid=p.valid)
            found["verdict"] += 1
            if bool(flagged) != verdict:
                if not (p.valid and abs(p.score - image_t) <= PARITY_RTOL * abs(image_t)):
                    raise _parity_error(onnx_path, f"verdict {bool(flagged)}, native {verdict}, score {p.score:.6g}")
                found["verdict_near"] += 1
                continue
            ref_mask = predicted_mask(ref, verdict, pixel_t, valid=p.valid)
            if ref_mask is None or original.shape != ref.shape:
                continue
            near = (np.abs(ref - np.float32(pixel_t)) <= tol) | (ref >= ref.max() - tol)  # at the threshold or peak
            differ = mask != ref_mask
            found["pixels"] += int(mask.size)
            found["pixels_near"] += int(differ.sum())
            if (differ & ~near).any():
                raise _parity_error(onnx_path, f"{int((differ & ~near).sum())} mask pixels away from the threshold")
    if layout is not None:  # an image whose frame is not the served one is refused, as a refused frame
        h, w = original_size
        shapes = [(h, 2 * w + 16), (2 * h + 16, w), (max(h, w), max(h, w))]
        oh, ow = next(hw for hw in shapes if frame_size(*hw, g.image_size) != tuple(layout.size))
        textured = np.asarray(images[0].resize((ow, oh), Image.BILINEAR), np.uint8)
        flagged = session.run([OUTPUT_NAMES[2]], {INPUT_NAME: textured[None], INPUT_NAMES[2]: np.array([True])})[0]
        if not bool(flagged[0]):
            raise _parity_error(onnx_path, f"a {ow}x{oh} image, whose frame is not the served one, was not refused")
    result = {
        "images": len(images),
        "max_rel_score_diff": float(np.max(found["score"])),  # NaN if any is
        "max_abs_map_diff": float(np.max(found["map"])),
        "max_abs_original_map_diff": float(np.max(found["original"])),
        "max_original_map_value": max(float(np.abs(m).max()) for m in full),
        "verdicts": found["verdict"],
        "verdicts_differing_at_the_threshold": found["verdict_near"],
        "mask_pixels": found["pixels"],
        "mask_pixels_differing_at_the_threshold": found["pixels_near"],
        "native_search": getattr(model, "search", None),
    }
    rel = result["max_rel_score_diff"]
    if not rel <= PARITY_RTOL:
        raise _parity_error(onnx_path, f"scores differ by {rel:.2e} (relative, allowed {PARITY_RTOL:g})")
    worst = result["max_abs_original_map_diff"]
    if not worst <= map_rtol * max(1.0, max(float(np.abs(m).max()) for m in full)):
        raise _parity_error(onnx_path, f"maps on the original image differ by {worst:.2e}")
    return result


def _parity_error(path: Path, what: str) -> ExportError:
    return ExportError(
        f"{path}: the exported graph disagrees with the native path ({what}); please report this model "
        f"(somad {__version__}, torch {torch.__version__})"
    )


def export_metadata(
    model: BaseDetector, source: Path | None, fmt: str, opset: int, parity: dict | None, layout=None, original_size=None
) -> dict:
    ex = model.extractor_
    g = ex.geometry
    h, w = (g.input_size,) * 2 if layout is None else layout.size  # the anomaly map's size
    meta = {
        "export_version": EXPORT_VERSION,
        "format": fmt,
        "somad_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": model.method,
        "source_model": None,
        "image_threshold": model.image_threshold_,
        "pixel_threshold": model.pixel_threshold_,
        "display_range": list(model.display_range_) if model.display_range_ else None,
        "threshold_info": model.threshold_info_,
        "input_gate": model.gate_.as_dict() if getattr(model, "gate_", None) else None,
        "geometry": {
            "image_size": g.image_size,
            "crop_size": g.crop_size,
            "input_size": g.input_size,
            "crop_offset": g.crop_offset,
            "resize": "Pillow's BILINEAR resize of the decoded RGB image to image_size square, the horizontal "
            "pass first (somad.resize.resize_bilinear), then the central input_size square; inside the graph",
            "grid_size": ex.grid_shape[0],
            "input_shape": list(g.input_shape),
            "frame_size": list(g.resized if layout is None else layout.size),
            "stride": ex.stride,
            **(
                {}
                if layout is None
                else {
                    "tile_size": g.tile_size,
                    "tile_overlap": g.tile_overlap,
                    "original_size": [int(v) for v in original_size],
                    "tile_offsets": [list(o) for o in layout.offsets],
                    "resize": "Pillow's BILINEAR resize of the decoded RGB image to frame_size (its aspect ratio "
                    "kept, the shorter side image_size: somad.resize.frame_size), the horizontal pass first, cut "
                    "into tile_size tiles at tile_offsets; inside the graph. It serves images whose frame is "
                    "frame_size, such as original_size; others are refused",
                }
            ),
        },
        "normalisation": {"scale": 1.0 / 255.0, "mean": list(ex.spec.mean), "std": list(ex.spec.std)},
        "graph": {
            "file": MODEL_FILE,
            "opset": int(opset),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [1, "H", "W", 3]},
            "inputs": {
                INPUT_NAME: {"dtype": "uint8", "shape": [1, "H", "W", 3]},
                INPUT_NAMES[1]: {"dtype": "int64", "shape": [2], "default": [0, 0]},
                INPUT_NAMES[2]: {"dtype": "bool", "shape": [1], "default": [True]},
                INPUT_NAMES[3]: {"dtype": "float32", "shape": [], "default": "image_threshold, rounded down"},
                INPUT_NAMES[4]: {"dtype": "float32", "shape": [], "default": "pixel_threshold"},
            },
            "outputs": {
                OUTPUT_NAMES[0]: {"dtype": "float32", "shape": [1]},
                OUTPUT_NAMES[1]: {"dtype": "float32", "shape": [1, h, w]},
                OUTPUT_NAMES[2]: {"dtype": "bool", "shape": [1]},
                OUTPUT_NAMES[3]: {"dtype": "float32", "shape": [1, "H", "W"]},
                OUTPUT_NAMES[4]: {"dtype": "bool", "shape": [1, "H", "W"]},
            },
        },
        "params": {
            "backbone": model.backbone,
            "blur_sigma": float(model.blur_sigma),
            "dims": ex.dims,
            "local_aggregation": ex.local_aggregation,
            "stages": list(ex.stages),
        },
        "scoring": model.scoring_info(),
        "parity_check": parity,
    }
    if source is not None:
        meta["source_model"] = {"file": source.name, "sha256": file_sha256(source)}
    return meta


def export_model(
    model: str | os.PathLike | BaseDetector,
    out: str | os.PathLike,
    *,
    format: str = "onnx",
    overwrite: bool = False,
    check: bool = True,
    search: str | None = None,
    sign_key: bytes | str | os.PathLike | None = None,
    verify_key: bytes | str | os.PathLike | None = None,
    original_size: tuple[int, int] | None = None,
) -> Path:
    """Export a fitted model (a model file or a fitted detector) to the folder ``out``.

    Writes ``out/model.onnx`` and ``out/somad_export.json`` in a temporary folder renamed into place whole. The
    graph's nearest-node search (SOMAD) is ``search`` (``"ivf"`` or ``"exact"``), by default the model's own; other
    methods take none. With ``check`` the graph is run under onnxruntime on generated frames and compared with the
    native path with that search (:func:`check_parity`): scores, maps, verdicts and masks; a difference beyond
    :data:`PARITY_RTOL` is an error; the figures are saved in the JSON file. The description records the graph's
    SHA-256 and its own (``export_format.seal``); with ``sign_key`` (the key's bytes or its file) it is signed, and
    ``verify_key`` refuses a model file that is not signed with that key.

    A tiled model's graph serves the images of one frame size (its tiles' positions and the stitched map follow
    it): those of ``original_size`` ``(height, width)``, by default its training images' median size
    (:func:`served_layout`); images of another aspect ratio are refused, as a refused frame is.
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r} is not supported; valid: {', '.join(FORMATS)}")
    sign_key = as_key(sign_key)  # a bad key file fails now, not after the export
    source = None
    if isinstance(model, BaseDetector):
        where = f"this {model.method} model"
    else:
        source = Path(model)
        where = str(source)
        model = load(source, device="cpu", verify_key=verify_key)
    model = model.cpu_copy(**({} if search is None else {"search": search}))  # the export works on a copy
    check_exportable(model, where)
    layout = served_layout(model, original_size, where)
    if layout is not None:
        original_size = original_size or tuple(model.input_profile_["median_size"])
        logger.info(
            "tiled model: the graph serves images whose frame is %dx%d (such as %dx%d), %d tiles each",
            layout.size[1], layout.size[0], original_size[1], original_size[0], len(layout.offsets),
        )  # fmt: skip
    with staged_output_dir(out, overwrite=overwrite, inputs=[source] if source is not None else ()) as tmp:
        t0 = time.perf_counter()
        write_onnx(model, tmp / MODEL_FILE, layout)
        logger.info("wrote the ONNX graph in %.1f s", time.perf_counter() - t0)
        parity = check_parity(model, tmp / MODEL_FILE, layout, original_size) if check else None
        if parity:
            logger.info(
                "export check on %d generated frames: max relative score difference %.2e, max map difference %.2e, "
                "%d verdicts and %d mask pixels compared",
                parity["images"],
                parity["max_rel_score_diff"],
                parity["max_abs_map_diff"],
                parity["verdicts"],
                parity["mask_pixels"],
            )
        meta = export_metadata(model, source, format, OPSET, parity, layout, original_size)
        meta["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = seal(meta, sign_key)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)
