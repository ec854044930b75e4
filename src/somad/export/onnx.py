"""A fitted detector as one ONNX graph: uint8 pixels in, image scores and anomaly maps out.

The graph holds everything after decoding and resizing (:func:`write_onnx`: the feature stages and, for PaDiM and
PatchCore, their scoring are traced from torch modules; SOMAD's scoring is built as ONNX nodes):

* input ``image``: uint8 ``(N, S, S, 3)``, RGB, ``S`` the model input size (``Geometry.input_size``). The caller
  decodes the image with somad's rules (``somad.io.images``), resizes it to ``image_size x image_size`` with
  Pillow's ``Image.resize(..., Image.BILINEAR)`` and keeps the central ``S x S`` crop when the model has one,
  exactly as ``FeatureExtractor.preprocess`` does (``somad.runtime.OnnxDetector`` does all of this);
* ``x / 255``, the backbone's normalisation ``(x - mean) / std``, the backbone, and the feature stages as
  ``FeatureExtractor`` combines them (channel subset, local aggregation, bilinear upsampling, concatenation);
* the method's patch scores: SOMAD: the k nearest SOM nodes (Euclidean, non-empty nodes only) found as the
  model's own ``search`` finds them (exhaustive, or its IVF index), then the minimum Mahalanobis distance over
  those k nodes (:func:`somad_scoring_nodes`); PaDiM: the
  Mahalanobis distance to each position's Gaussian; PatchCore: the distance to the nearest memory-bank patch;
* bilinear upsampling to ``S x S`` and the Gaussian blur (``features.extractor.upsample_blur``'s two
  matrices);
* outputs ``score`` ``(N,)`` float32 (the map maximum; PatchCore: its reweighted image score) and
  ``anomaly_map`` ``(N, S, S)`` float32.

The nearest-node search in the graph is the model's own (``export_model(search=None)``): for ``search="ivf"`` the
graph holds the native :class:`~somad.som.node_search.IVFSearch` index built at load (its principal axes, coarse
centres and the list of each node) and probes the same ``nprobe`` lists, so it selects the same k nodes as the
native IVF path; ``search="exact"`` (or an index that falls back to exhaustive: fewer than
``IVF_MIN_NODES`` nodes) gives the exhaustive graph.

:func:`export_model` writes ``DIR/model.onnx`` and ``DIR/somad_export.json`` (thresholds, geometry,
normalisation, source model hash, the graph's SHA-256, its own hash and, with a key, its signature) into a staged
folder renamed into place whole, after checking the graph under onnxruntime against the native path on two
generated images. The file names, version, tensor names and the description's schema are declared once, in the
torch-free ``somad.io.export_format``, which the runtime reads them with.
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
import torch.nn.functional as F
from torch import nn

from somad._version import __version__
from somad.errors import SomadError
from somad.features.extractor import FeatureExtractor, _resize_blur_matrix, local_mean
from somad.io.export_format import EXPORT_VERSION, FORMATS, INPUT_NAME, META_FILE, MODEL_FILE, OUTPUT_NAMES, seal
from somad.io.integrity import as_key, file_sha256
from somad.io.outputs import staged_output_dir
from somad.methods import PaDiM, PatchCore, load
from somad.methods.base import BaseDetector
from somad.methods.somad import SOMAD
from somad.som.node_search import SEARCH_CHOICES, IVFSearch
from somad.som.node_stats import row_blocks

logger = logging.getLogger(__name__)

# FORMATS (export_format): OpenVINO (2026.4) is not offered: it fails to convert SOMAD's Loop (with a Concat-carried
# loop) or runs it to an empty output (with a tensor sequence), and its CPU plugin infers in bf16 unless told f32.
OPSET = 17
#: Graph constants beyond this many bytes do not fit one ONNX protobuf file (2 GiB).
MAX_CONSTANT_BYTES = 1_900_000_000
#: The export check: largest relative score difference allowed between the graph and the native path (same search).
PARITY_RTOL = 1e-3


class ExportError(SomadError):
    """A model that cannot be exported (a tiled model, a graph too large for one file, a missing package)."""


# ---------------------------------------------------------------------------------------------- graph modules
class FeatureGraph(nn.Module):
    """uint8 ``(N, S, S, 3)`` -> features ``(N, D, h, w)``, as ``FeatureExtractor`` computes them."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.backbone = extractor.model
        self.register_buffer("mean", torch.tensor(extractor.spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(extractor.spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.stages = tuple(extractor.stages)
        self.local_aggregation = extractor.local_aggregation
        self.keep = []
        for i, keep in enumerate(extractor._stage_channels):
            full = extractor.spec.channels[self.stages[i]]
            name = f"keep{i}"
            self.register_buffer(name, keep.cpu().long())
            self.keep.append((name, len(keep), full))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        outputs = self.backbone(x)
        stages = [outputs[s] for s in self.stages]
        size = stages[0].shape[-2:]
        parts = []
        for stage, (name, n_keep, full) in zip(stages, self.keep):
            if n_keep == 0:
                continue
            if n_keep < full:
                stage = stage.index_select(1, getattr(self, name))
            stage = local_mean(stage, self.local_aggregation)
            if stage.shape[-2:] != size:
                stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
            parts.append(stage)
        return torch.cat(parts, dim=1)


#: SOMAD graph: (patch, node) pairs are whitened in units of at most UNIT pairs of one node, UNITS_PER_STEP units
#: per step of the graph's Loop (see :func:`somad_scoring_nodes`).
UNIT = 16
UNITS_PER_STEP = 32


def somad_scoring_nodes(model: SOMAD, features: str, unit: int = UNIT, step: int = UNITS_PER_STEP, search=None):
    """The SOMAD scoring as ONNX nodes appended after ``features`` ``(N, D, h, w)``: patch scores ``(N, h, w)``.

    1. k nearest non-empty nodes: exhaustive, ``-2 x.w + ||w||^2`` for every node (``MatMul``), ``TopK``; or,
       with ``search`` an :class:`IVFSearch` over the same non-empty nodes (the model's ``_node_search()``),
       that index's search (:func:`_ivf_nodes`: the same probed lists and the k nearest of their members, so
       the graph picks the nodes of the native IVF path).
    2. The (patch, node) pairs are sorted by node (``TopK`` over the node ids) and centred on their node's mean.
       Each node's run of pairs is cut into *units* of at most ``unit`` pairs; a ``Loop`` takes ``step`` units
       at a time: it gathers their whiteners and pairs and whitens them in one batched product,
       ``(x - mu) W^T`` (grouped by node as in the native kernel: a whitener is read once per ``unit`` pairs,
       not once per pair). The unit slots past a node's run are dropped afterwards (``Compress``).
    3. The squared norms go back to pair order (``ScatterElements``), the minimum over the k nodes, ``sqrt``.

    The whiteners are stored in the row blocks of ``node_stats.row_blocks`` (block ``(lo, hi)``: rows ``lo:hi``
    and columns ``0:hi`` of the lower triangle, transposed: 62.5% of the dense matrix with four blocks), in the
    model's factor dtype (float16 factors are widened to float32 after the gather, as the native path computes).
    Returns ``(nodes, initializers, output_name)``.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.gaussians_
    keep = (~g.empty).cpu()
    prototypes = model.som_.weights_.float().cpu()[keep].numpy()
    means = g.means.float().cpu()[keep].numpy()
    whiteners = g.whiteners.cpu()[keep]  # (M', D, D) lower triangular, as stored (float16 or float32)
    bounds = row_blocks(whiteners.shape[1])  # row blocks: rows lo:hi of W only touch columns 0:hi
    k = min(int(model.k), int(keep.sum()))
    ivf = isinstance(search, IVFSearch) and k <= search.nprobe * search.min_size_  # else it searches exhaustively
    d = prototypes.shape[1]
    h = w = model.extractor_.grid_size
    wide = whiteners.dtype != torch.float32

    def const(name, array):
        return numpy_helper.from_array(np.array(array, order="C"), name)  # (ascontiguousarray makes 0-d 1-d)

    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    inits = [
        const("somad_proto_t_m2", (-2.0 * prototypes.T).astype(np.float32)),  # -2 w: exact scaling (power of 2)
        const("somad_proto_sq", (prototypes.astype(np.float32) ** 2).sum(1).astype(np.float32)),
        const("somad_means", means.astype(np.float32)),
        *(
            const(f"somad_whiteners_t{b}", whiteners[:, lo:hi, :hi].transpose(1, 2).contiguous().numpy())
            for b, (lo, hi) in enumerate(bounds)
        ),  # W[lo:hi, :hi]^T per block: (M', hi, hi - lo)
        *(const(f"somad_cols{b}", i64([hi])) for b, (lo, hi) in enumerate(bounds)),
        const("somad_k", i64([k])),
        const("somad_flat_d", i64([-1, d])),
        const("somad_flat", i64([-1])),
        const("somad_pairs_k", i64([-1, k])),
        const("somad_grid", i64([-1, h, w])),
        const("somad_axis0", i64([0])),
        const("somad_axis1", i64([1])),
        const("somad_axis0_0", i64([0])),
        const("somad_zero", i64(0)),
        const("somad_one", i64(1)),
        const("somad_ones1", i64([1])),
        const("somad_unit", i64(unit)),
        const("somad_unit_m1", i64(unit - 1)),
        const("somad_step", i64(step)),
        const("somad_step_m1", i64(step - 1)),
        const("somad_step1", i64([step])),
        const("somad_slots", i64(np.arange(unit))),  # (unit,)
        const("somad_slots_row", i64(np.arange(unit)[None])),  # (1, unit)
        const("somad_zero_rows", np.zeros((unit, d), np.float32)),
        const("somad_dummy_zeros", i64(np.zeros(step))),
        const("somad_zero_f", np.array(0.0, np.float32)),
        const("somad_true", np.array(True)),
    ]
    n = helper.make_node
    zero_i64 = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes = [
        n("Transpose", [features], ["somad_x4"], perm=[0, 2, 3, 1]),
        n("Reshape", ["somad_x4", "somad_flat_d"], ["somad_x"]),  # (Q, D), Q = N h w, image-major
        n("MatMul", ["somad_x", "somad_proto_t_m2"], ["somad_xw"]),
        n("Add", ["somad_xw", "somad_proto_sq"], ["somad_dist"]),  # ||x - w||^2 - ||x||^2 (the ranking)
        n("TopK", ["somad_dist", "somad_k"], ["somad_knn_d", "somad_knn"], axis=-1, largest=0, sorted=1),
        n("Reshape", ["somad_knn", "somad_flat"], ["somad_pair_node"]),  # (P,), P = Q k: pair j = (patch j // k, node)
        n("Shape", ["somad_pair_node"], ["somad_n_pairs"]),  # (1,)
        n("Cast", ["somad_pair_node"], ["somad_pair_node_f"], to=TensorProto.FLOAT),  # node ids < 2^24: exact
        n("TopK", ["somad_pair_node_f", "somad_n_pairs"], ["somad_sorted_f", "somad_order"], axis=0, largest=0),
        n("Gather", ["somad_pair_node", "somad_order"], ["somad_sorted_node"]),
        n("Div", ["somad_order", "somad_k"], ["somad_sorted_patch"]),  # integer division: the pair's patch
        n("Gather", ["somad_x", "somad_sorted_patch"], ["somad_sorted_x"]),  # (P, D) in node order
        n("Gather", ["somad_means", "somad_sorted_node"], ["somad_sorted_mu"]),
        n("Sub", ["somad_sorted_x", "somad_sorted_mu"], ["somad_centred"]),
        n("Concat", ["somad_centred", "somad_zero_rows"], ["somad_centred_pad"], axis=0),  # (P + unit, D)
        *(
            n("Slice", ["somad_centred_pad", "somad_axis0_0", f"somad_cols{b}", "somad_axis1"], [f"somad_centred{b}"])
            for b, (lo, hi) in enumerate(bounds)
        ),  # (P + unit, hi): the columns block b reads
        # Runs of equal nodes, and their units of at most `unit` pairs.
        n("Unique", ["somad_sorted_node"], ["somad_uniq", "somad_u_idx", "somad_u_inv", "somad_u_count"], sorted=1),
        n("CumSum", ["somad_u_count", "somad_zero"], ["somad_u_start"], exclusive=1),  # first pair of each run
        n("Add", ["somad_u_count", "somad_unit_m1"], ["somad_u_count_up"]),
        n("Div", ["somad_u_count_up", "somad_unit"], ["somad_u_units"]),  # ceil(count / unit) units per run
        n("CumSum", ["somad_u_units", "somad_zero"], ["somad_u_first_unit"], exclusive=1),
        n("ReduceSum", ["somad_u_units"], ["somad_n_units1"], keepdims=1),  # (1,)
        n("Squeeze", ["somad_n_units1"], ["somad_n_units"]),
        n("ConstantOfShape", ["somad_n_units1"], ["somad_marks0"], value=zero_i64),
        n("Shape", ["somad_uniq"], ["somad_n_runs1"]),
        n("Expand", ["somad_ones1", "somad_n_runs1"], ["somad_run_ones"]),
        n("ScatterElements", ["somad_marks0", "somad_u_first_unit", "somad_run_ones"], ["somad_marks"], axis=0),
        n("CumSum", ["somad_marks", "somad_zero"], ["somad_owner1"]),
        n("Sub", ["somad_owner1", "somad_one"], ["somad_owner"]),  # (units,): the run each unit belongs to
        n("Range", ["somad_zero", "somad_n_units", "somad_one"], ["somad_unit_ids"]),
        n("Gather", ["somad_u_first_unit", "somad_owner"], ["somad_owner_first"]),
        n("Sub", ["somad_unit_ids", "somad_owner_first"], ["somad_rank"]),  # unit's position in its run
        n("Mul", ["somad_rank", "somad_unit"], ["somad_rank_rows"]),
        n("Gather", ["somad_u_start", "somad_owner"], ["somad_owner_start"]),
        n("Add", ["somad_owner_start", "somad_rank_rows"], ["somad_unit_row0"]),  # first pair of each unit
        n("Gather", ["somad_u_count", "somad_owner"], ["somad_owner_count"]),
        n("Sub", ["somad_owner_count", "somad_rank_rows"], ["somad_left"]),
        n("Min", ["somad_left", "somad_unit"], ["somad_unit_len"]),  # pairs in each unit, 1..unit
        n("Gather", ["somad_uniq", "somad_owner"], ["somad_unit_node"]),
        # `step` dummy units (node 0, no pairs: they read the zero rows) so that every step takes `step` units.
        n("Expand", ["somad_n_pairs", "somad_step1"], ["somad_dummy_rows"]),
        n("Concat", ["somad_unit_node", "somad_dummy_zeros"], ["somad_unit_node_p"], axis=0),
        n("Concat", ["somad_unit_row0", "somad_dummy_rows"], ["somad_unit_row0_p"], axis=0),
        n("Concat", ["somad_unit_len", "somad_dummy_zeros"], ["somad_unit_len_p"], axis=0),
        n("Add", ["somad_n_units", "somad_step_m1"], ["somad_n_units_up"]),
        n("Div", ["somad_n_units_up", "somad_step"], ["somad_n_steps"]),
    ]
    b = [
        n("Mul", ["i", "somad_step"], ["lo"]),
        n("Add", ["lo", "somad_step"], ["hi"]),
        n("Unsqueeze", ["lo", "somad_axis0"], ["lo1"]),
        n("Unsqueeze", ["hi", "somad_axis0"], ["hi1"]),
        n("Slice", ["somad_unit_node_p", "lo1", "hi1", "somad_axis0"], ["nodes"]),  # (step,)
        n("Slice", ["somad_unit_row0_p", "lo1", "hi1", "somad_axis0"], ["row0"]),
        n("Unsqueeze", ["row0", "somad_axis1"], ["row0c"]),
        n("Add", ["row0c", "somad_slots"], ["rows_idx"]),  # (step, unit)
    ]
    for i in range(len(bounds)):
        b += [
            n("Gather", [f"somad_centred{i}", "rows_idx"], [f"rows{i}"]),  # (step, unit, hi)
            n("Gather", [f"somad_whiteners_t{i}", "nodes"], [f"wt{i}_stored" if wide else f"wt{i}"]),
        ]
        if wide:
            b.append(n("Cast", [f"wt{i}_stored"], [f"wt{i}"], to=TensorProto.FLOAT))
        b += [
            n("MatMul", [f"rows{i}", f"wt{i}"], [f"z{i}"]),  # (step, unit, hi - lo): rows lo:hi of W (x - mu)
            n("ReduceSumSquare", [f"z{i}"], [f"sq{i}"], axes=[2], keepdims=0),  # (step, unit)
        ]
    b += [
        n("Sum", [f"sq{i}" for i in range(len(bounds))], ["sq"]),
        n("Identity", ["cond_in"], ["cond_out"]),
    ]
    body = helper.make_graph(
        b,
        "somad_whiten_units",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("sq", TensorProto.FLOAT, [step, unit]),
        ],
    )
    nodes += [
        n("Loop", ["somad_n_steps", "somad_true"], ["somad_unit_sq"], body=body),  # (steps, step, unit)
        n("Reshape", ["somad_unit_sq", "somad_flat"], ["somad_slot_sq"]),
        n("Mul", ["somad_n_steps", "somad_step"], ["somad_n_slots_units"]),
        n("Unsqueeze", ["somad_n_slots_units", "somad_axis0"], ["somad_n_slots_units1"]),
        n("Slice", ["somad_unit_len_p", "somad_axis0", "somad_n_slots_units1", "somad_axis0"], ["somad_len_used"]),
        n("Unsqueeze", ["somad_len_used", "somad_axis1"], ["somad_len_col"]),
        n("Less", ["somad_slots_row", "somad_len_col"], ["somad_slot_valid2"]),  # (units, unit)
        n("Reshape", ["somad_slot_valid2", "somad_flat"], ["somad_slot_valid"]),
        n("Compress", ["somad_slot_sq", "somad_slot_valid"], ["somad_sorted_sq"], axis=0),  # (P,) in node order
        n(
            "ConstantOfShape",
            ["somad_n_pairs"],
            ["somad_sq0"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0]),
        ),
        n("ScatterElements", ["somad_sq0", "somad_order", "somad_sorted_sq"], ["somad_pair_sq"], axis=0),
        n("Reshape", ["somad_pair_sq", "somad_pairs_k"], ["somad_pair_sq2"]),
        n("ReduceMin", ["somad_pair_sq2"], ["somad_min_sq"], axes=[1], keepdims=0),
        n("Max", ["somad_min_sq", "somad_zero_f"], ["somad_min_sq0"]),
        n("Sqrt", ["somad_min_sq0"], ["somad_patch_flat"]),
        n("Reshape", ["somad_patch_flat", "somad_grid"], ["somad_patch"]),  # (N, h, w)
    ]
    if ivf:  # the exhaustive MatMul, Add and TopK give way to the index's search
        i = next(j for j, node in enumerate(nodes) if node.op_type == "MatMul")
        assert [node.op_type for node in nodes[i : i + 3]] == ["MatMul", "Add", "TopK"]
        nodes[i : i + 3], ivf_inits = _ivf_nodes(search, "somad_x", "somad_k", "somad_knn", keep, const)
        inits = [t for t in inits if t.name not in ("somad_proto_t_m2", "somad_proto_sq")] + ivf_inits
    return nodes, inits, "somad_patch"


#: IVF graph: (query, probed list) pairs are compared with their list's members in units of at most IVF_UNIT pairs.
IVF_UNIT = 32


def _ivf_nodes(search: IVFSearch, x: str, k: str, out: str, keep: torch.Tensor, const, unit: int = IVF_UNIT):
    """ONNX nodes: ``out`` ``(Q, k)``, the k nearest nodes of queries ``x`` ``(Q, D)`` as :class:`IVFSearch`
    ``search`` finds them, as positions among the kept nodes ``keep`` (the nodes the index searches).

    1. The queries are projected on the index's principal axes (``x A^T + shift``), ranked against its coarse
       centres (``||c||^2 - 2 x_c.c``) and their ``nprobe`` nearest lists kept (``TopK``), as the native index.
    2. The (query, list) pairs are sorted by list; each list's run of pairs is cut into units of at most
       ``unit`` pairs, and every unit is compared with its list's members in one batched ``MatMul``
       (``||w||^2 - 2 x.w``; a list's members are padded to the longest list with ``||w||^2 = inf``): about
       ``nprobe * L / M`` of the exhaustive product (L the longest list).
    3. The candidates go back to pair order; the k smallest of each query's ``nprobe * L`` candidates
       (``TopK``) are the native IVF search's k nodes.
    """
    from onnx import TensorProto, helper

    ids = torch.nonzero(keep).flatten()
    if not torch.equal(search._ids.cpu(), ids):
        raise ExportError("the IVF index does not search the model's non-empty nodes; reload the model and retry")
    w = search._weights.float().cpu()
    members = search.members_.cpu()  # (C, L) node ids, padded with M
    valid = members < w.shape[0]
    position = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    position[ids] = torch.arange(ids.numel())  # node id -> position among the kept nodes
    member_w = torch.cat([w, torch.zeros(1, w.shape[1])])[members]  # (C, L, D), padding rows zero
    member_sq = (member_w * member_w).sum(-1).masked_fill(~valid, float("inf"))  # (C, L): padding never wins
    length = members.shape[1]
    if search._projection is not None:
        axes_t, shift = (t.float().cpu().numpy() for t in search._projection)  # (D, R), (R,)
    centres = search._coarse_centres.float().cpu().numpy()  # (C, R): in the projected space, else (C, D)
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    inits = [
        const("somad_ivf_centres_t_m2", (-2.0 * centres.T).astype(np.float32)),
        const("somad_ivf_centre_sq", search._coarse_sq.float().cpu().numpy()),
        const("somad_ivf_nprobe", i64([search.nprobe])),
        const("somad_ivf_nprobe0", i64(search.nprobe)),
        const("somad_ivf_members_t_m2", (-2.0 * member_w.transpose(1, 2)).contiguous().numpy()),  # (C, D, L)
        const("somad_ivf_member_sq", member_sq.numpy()),  # (C, L)
        const("somad_ivf_member_pos", position[members].numpy()),  # (C, L): kept positions (padding: 0, inf far)
        const("somad_ivf_flat", i64([-1])),
        const("somad_ivf_rows_l", i64([-1, length])),
        const("somad_ivf_axis0", i64([0])),
        const("somad_ivf_axis1", i64([1])),
        const("somad_ivf_zero", i64(0)),
        const("somad_ivf_one", i64(1)),
        const("somad_ivf_ones1", i64([1])),
        const("somad_ivf_unit", i64(unit)),
        const("somad_ivf_unit_m1", i64(unit - 1)),
        const("somad_ivf_slots", i64(np.arange(unit))),  # (unit,)
        const("somad_ivf_slots_row", i64(np.arange(unit)[None])),  # (1, unit)
        const("somad_ivf_pad_queries", i64(np.zeros(unit))),  # slots past the last pair read query 0 (dropped)
    ]
    n = helper.make_node
    nodes = []
    coarse = x
    if search._projection is not None:
        inits += [const("somad_ivf_axes_t", axes_t), const("somad_ivf_shift", shift)]
        nodes += [
            n("MatMul", [x, "somad_ivf_axes_t"], ["somad_ivf_xa"]),
            n("Add", ["somad_ivf_xa", "somad_ivf_shift"], ["somad_ivf_xc"]),  # (Q, R): on the principal axes
        ]
        coarse = "somad_ivf_xc"
    zero_i64 = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes += [
        n("MatMul", [coarse, "somad_ivf_centres_t_m2"], ["somad_ivf_xcc"]),
        n("Add", ["somad_ivf_xcc", "somad_ivf_centre_sq"], ["somad_ivf_rank"]),  # (Q, C), as IVFSearch.coarse
        n("TopK", ["somad_ivf_rank", "somad_ivf_nprobe"], ["somad_ivf_pd", "somad_ivf_probes"], axis=1, largest=0),
        # (query, list) pairs, pair j = (query j // nprobe, list), sorted by list.
        n("Reshape", ["somad_ivf_probes", "somad_ivf_flat"], ["somad_ivf_pair_list"]),
        n("Shape", ["somad_ivf_pair_list"], ["somad_ivf_n_pairs"]),  # (1,)
        n("Cast", ["somad_ivf_pair_list"], ["somad_ivf_pair_list_f"], to=TensorProto.FLOAT),  # list ids < 2^24
        n(
            "TopK",
            ["somad_ivf_pair_list_f", "somad_ivf_n_pairs"],
            ["somad_ivf_sorted_f", "somad_ivf_order"],
            axis=0,
            largest=0,
        ),
        n("Gather", ["somad_ivf_pair_list", "somad_ivf_order"], ["somad_ivf_sorted_list"]),
        n("Div", ["somad_ivf_order", "somad_ivf_nprobe0"], ["somad_ivf_sorted_query"]),
        n("Concat", ["somad_ivf_sorted_query", "somad_ivf_pad_queries"], ["somad_ivf_query_pad"], axis=0),
        # Runs of equal lists, and their units of at most `unit` pairs (as the whitening units below).
        n(
            "Unique",
            ["somad_ivf_sorted_list"],
            ["somad_ivf_uniq", "somad_ivf_u_idx", "somad_ivf_u_inv", "somad_ivf_u_count"],
            sorted=1,
        ),
        n("CumSum", ["somad_ivf_u_count", "somad_ivf_zero"], ["somad_ivf_u_start"], exclusive=1),
        n("Add", ["somad_ivf_u_count", "somad_ivf_unit_m1"], ["somad_ivf_u_count_up"]),
        n("Div", ["somad_ivf_u_count_up", "somad_ivf_unit"], ["somad_ivf_u_units"]),
        n("CumSum", ["somad_ivf_u_units", "somad_ivf_zero"], ["somad_ivf_u_first_unit"], exclusive=1),
        n("ReduceSum", ["somad_ivf_u_units"], ["somad_ivf_n_units1"], keepdims=1),
        n("Squeeze", ["somad_ivf_n_units1"], ["somad_ivf_n_units"]),
        n("ConstantOfShape", ["somad_ivf_n_units1"], ["somad_ivf_marks0"], value=zero_i64),
        n("Shape", ["somad_ivf_uniq"], ["somad_ivf_n_runs1"]),
        n("Expand", ["somad_ivf_ones1", "somad_ivf_n_runs1"], ["somad_ivf_run_ones"]),
        n(
            "ScatterElements",
            ["somad_ivf_marks0", "somad_ivf_u_first_unit", "somad_ivf_run_ones"],
            ["somad_ivf_marks"],
            axis=0,
        ),
        n("CumSum", ["somad_ivf_marks", "somad_ivf_zero"], ["somad_ivf_owner1"]),
        n("Sub", ["somad_ivf_owner1", "somad_ivf_one"], ["somad_ivf_owner"]),  # (U,): each unit's run
        n("Range", ["somad_ivf_zero", "somad_ivf_n_units", "somad_ivf_one"], ["somad_ivf_unit_ids"]),
        n("Gather", ["somad_ivf_u_first_unit", "somad_ivf_owner"], ["somad_ivf_owner_first"]),
        n("Sub", ["somad_ivf_unit_ids", "somad_ivf_owner_first"], ["somad_ivf_rank_in_run"]),
        n("Mul", ["somad_ivf_rank_in_run", "somad_ivf_unit"], ["somad_ivf_rank_rows"]),
        n("Gather", ["somad_ivf_u_start", "somad_ivf_owner"], ["somad_ivf_owner_start"]),
        n("Add", ["somad_ivf_owner_start", "somad_ivf_rank_rows"], ["somad_ivf_unit_row0"]),
        n("Gather", ["somad_ivf_u_count", "somad_ivf_owner"], ["somad_ivf_owner_count"]),
        n("Sub", ["somad_ivf_owner_count", "somad_ivf_rank_rows"], ["somad_ivf_left"]),
        n("Min", ["somad_ivf_left", "somad_ivf_unit"], ["somad_ivf_unit_len"]),  # pairs in each unit, 1..unit
        n("Gather", ["somad_ivf_uniq", "somad_ivf_owner"], ["somad_ivf_unit_list"]),  # (U,)
        # One batched product: (U, unit, D) pairs @ (U, D, L) their list's members.
        n("Unsqueeze", ["somad_ivf_unit_row0", "somad_ivf_axis1"], ["somad_ivf_row0c"]),
        n("Add", ["somad_ivf_row0c", "somad_ivf_slots"], ["somad_ivf_rows_idx"]),  # (U, unit)
        n("Gather", ["somad_ivf_query_pad", "somad_ivf_rows_idx"], ["somad_ivf_rows_q"]),  # (U, unit) queries
        n("Gather", [x, "somad_ivf_rows_q"], ["somad_ivf_rows"]),  # (U, unit, D): each unit's queries
        n("Gather", ["somad_ivf_members_t_m2", "somad_ivf_unit_list"], ["somad_ivf_unit_w"]),  # (U, D, L)
        n("MatMul", ["somad_ivf_rows", "somad_ivf_unit_w"], ["somad_ivf_dot"]),  # (U, unit, L): -2 x.w
        n("Gather", ["somad_ivf_member_sq", "somad_ivf_unit_list"], ["somad_ivf_unit_sq"]),  # (U, L)
        n("Unsqueeze", ["somad_ivf_unit_sq", "somad_ivf_axis1"], ["somad_ivf_unit_sq3"]),
        n("Add", ["somad_ivf_dot", "somad_ivf_unit_sq3"], ["somad_ivf_unit_d"]),  # ||x - w||^2 - ||x||^2
        n("Reshape", ["somad_ivf_unit_d", "somad_ivf_rows_l"], ["somad_ivf_slot_d"]),  # (U unit, L)
        n("Unsqueeze", ["somad_ivf_unit_len", "somad_ivf_axis1"], ["somad_ivf_len_col"]),
        n("Less", ["somad_ivf_slots_row", "somad_ivf_len_col"], ["somad_ivf_slot_valid2"]),  # (U, unit)
        n("Reshape", ["somad_ivf_slot_valid2", "somad_ivf_flat"], ["somad_ivf_slot_valid"]),
        n("Compress", ["somad_ivf_slot_d", "somad_ivf_slot_valid"], ["somad_ivf_sorted_d"], axis=0),  # (pairs, L)
        # Back to pair order (the inverse permutation of `order`), then the k smallest per query.
        n("Squeeze", ["somad_ivf_n_pairs"], ["somad_ivf_n_pairs0"]),
        n("Range", ["somad_ivf_zero", "somad_ivf_n_pairs0", "somad_ivf_one"], ["somad_ivf_pair_ids"]),
        n(
            "ScatterElements",
            ["somad_ivf_pair_ids", "somad_ivf_order", "somad_ivf_pair_ids"],
            ["somad_ivf_inverse"],
            axis=0,
        ),
        n("Gather", ["somad_ivf_sorted_d", "somad_ivf_inverse"], ["somad_ivf_pair_d"]),  # (pairs, L)
        n("Shape", ["somad_ivf_probes"], ["somad_ivf_qp"]),
        n("Slice", ["somad_ivf_qp", "somad_ivf_axis0", "somad_ivf_ones1"], ["somad_ivf_q1"]),
        n("Concat", ["somad_ivf_q1", "somad_ivf_flat"], ["somad_ivf_q_cands"], axis=0),  # (Q, -1)
        n("Reshape", ["somad_ivf_pair_d", "somad_ivf_q_cands"], ["somad_ivf_cand_d"]),  # (Q, nprobe L)
        n("TopK", ["somad_ivf_cand_d", k], ["somad_ivf_knn_d", "somad_ivf_pos"], axis=1, largest=0, sorted=1),
        n("Gather", ["somad_ivf_member_pos", "somad_ivf_probes"], ["somad_ivf_cand_nodes3"]),  # (Q, nprobe, L)
        n("Reshape", ["somad_ivf_cand_nodes3", "somad_ivf_q_cands"], ["somad_ivf_cand_nodes"]),
        n("GatherElements", ["somad_ivf_cand_nodes", "somad_ivf_pos"], [out], axis=1),  # (Q, k)
    ]
    return nodes, inits


class PadimScorer(nn.Module):
    """Features -> patch scores ``(N, h, w)``: Mahalanobis distance to each grid position's Gaussian."""

    def __init__(self, model: PaDiM):
        super().__init__()
        self.register_buffer("means", model.means_.float().cpu())  # (P, D)
        self.register_buffer("whiteners", model.whiteners_.float().cpu())  # (P, D, D)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        n, d, h, w = feats.shape
        x = feats.permute(2, 3, 0, 1).reshape(h * w, -1, d)  # (P, N, D), as PaDiM._patch_scores
        z = torch.matmul(x - self.means.unsqueeze(1), self.whiteners.transpose(1, 2))  # (P, N, D)
        return (z * z).sum(-1).sqrt().T.reshape(-1, h, w)


class PatchcoreScorer(nn.Module):
    """Features -> patch scores ``(N, h, w)`` and image scores ``(N,)``: nearest memory-bank distance, and the
    reweighted score of the most anomalous patch (``methods.patchcore.reweighted_score``)."""

    def __init__(self, model: PatchCore):
        super().__init__()
        bank = model.memory_bank_.float().cpu()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.neighbours = min(int(model.num_neighbors), bank.shape[0])

    def forward(self, feats: torch.Tensor):
        n, d, h, w = feats.shape
        p = h * w
        x = feats.permute(0, 2, 3, 1).reshape(-1, p, d)  # (N, P, D)
        dist = self.bank_sq - 2.0 * torch.matmul(x, self.bank.T)  # (N, P, M), ||x||^2 added after the minimum
        best, nearest = dist.min(-1)
        patch = (best + (x * x).sum(-1)).clamp_min(0.0).sqrt()  # (N, P)
        star = patch.argmax(1, keepdim=True)  # (N, 1)
        x_star = torch.gather(x, 1, star.unsqueeze(-1).expand(-1, 1, d)).squeeze(1)  # (N, D)
        m_star = torch.gather(nearest, 1, star).squeeze(1)  # (N,)
        anchor = self.bank[m_star]  # (N, D)
        s_star = torch.linalg.vector_norm(x_star - anchor, dim=1)
        if self.neighbours > 1:
            to_bank = self.bank_sq - 2.0 * torch.matmul(anchor, self.bank.T)  # (N, M)
            near = torch.topk(to_bank, self.neighbours, dim=1, largest=False, sorted=True)[1]  # (N, b)
            dist_b = torch.linalg.vector_norm(x_star.unsqueeze(1) - self.bank[near], dim=2)  # (N, b)
            scores = (1.0 - torch.exp(s_star - torch.logsumexp(dist_b, dim=1))) * s_star
        else:
            scores = s_star
        return patch.reshape(-1, h, w), scores


def resize_blur(model: BaseDetector) -> torch.Tensor:
    """``(S, h)``: bilinear upsampling of the patch grid to the model input, then the Gaussian blur (one axis of
    ``features.extractor.upsample_blur``; the same matrix serves both axes of the square grid)."""
    extractor = model.extractor_
    s, h = extractor.geometry.input_size, extractor.grid_size
    return _resize_blur_matrix(s, h, float(model.blur_sigma), torch.device("cpu")).clone()


class ExportGraph(nn.Module):
    """PaDiM and PatchCore as one traced module: uint8 ``image`` ``(N, S, S, 3)`` -> ``score`` ``(N,)``,
    ``anomaly_map`` ``(N, S, S)``. (SOMAD: :class:`FeatureGraph` traced, then :func:`somad_scoring_nodes`.)"""

    def __init__(self, model: BaseDetector):
        super().__init__()
        self.features = FeatureGraph(model.extractor_)
        if isinstance(model, PaDiM):
            self.scorer = PadimScorer(model)
        elif isinstance(model, PatchCore):
            self.scorer = PatchcoreScorer(model)
        else:
            raise ExportError(f"ExportGraph takes padim or patchcore models, not {type(model).__name__}")
        resize = resize_blur(model)
        self.register_buffer("rows", resize)
        self.register_buffer("cols_t", resize.T.contiguous())

    def forward(self, image: torch.Tensor):
        out = self.scorer(self.features(image))
        patch, image_scores = out if isinstance(out, tuple) else (out, None)
        maps = torch.matmul(torch.matmul(self.rows, patch), self.cols_t)  # as features.extractor.upsample_blur
        scores = maps.flatten(1).max(1).values if image_scores is None else image_scores
        return scores, maps


# ---------------------------------------------------------------------------------------------- export
def check_exportable(model: BaseDetector, where: str) -> None:
    """Raise a one-line :class:`ExportError` for models this exporter does not handle."""
    if not isinstance(model, (SOMAD, PaDiM, PatchCore)):
        raise ExportError(f"{where}: cannot export a {type(model).__name__} model; valid: somad, padim, patchcore")
    g = model.extractor_.geometry
    if g.tile_size is not None:
        raise ExportError(
            f"{where}: tiled {model.method} models (tile_size={g.tile_size}) cannot be exported to ONNX; "
            "refit without --tile to export"
        )
    size = constant_bytes(model)
    if size > MAX_CONSTANT_BYTES:
        raise ExportError(
            f"{where}: the {model.method} graph would hold {size / 1e9:.1f} GB of constants, over ONNX's 2 GB "
            "file limit; refit with fewer --dims (or a smaller --som-size / --coreset-ratio)"
        )


def constant_bytes(model: BaseDetector) -> int:
    """Bytes of the scoring constants the graph holds (the backbone aside)."""
    if isinstance(model, SOMAD):
        m, d = model.gaussians_.means.shape
        factor = model.gaussians_.packed.element_size()  # float16 factors stay float16 in the graph
        return m * (4 * 3 * d + factor * sum((hi - lo) * hi for lo, hi in row_blocks(d)))
    if isinstance(model, PaDiM):
        p, d = model.means_.shape
        return 4 * p * d * (d + 1)
    if isinstance(model, PatchCore):
        return 4 * model.memory_bank_.numel()
    return 0


def _trace(module: nn.Module, path: Path, input_size: int, outputs: list[str], opset: int) -> None:
    """``torch.onnx.export`` (the TorchScript-based exporter: no extra package needed) with a dynamic batch."""
    example = torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8)
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
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            do_constant_folding=True,
        )


def write_onnx(model: BaseDetector, path: Path) -> None:
    """Write the whole graph of ``model`` to ``path`` (see the module docstring), in opset :data:`OPSET` (the
    SOMAD nodes use its operator signatures). A SOMAD model's nearest-node search is its ``search``'s."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = model.extractor_.geometry.input_size
    if not isinstance(model, SOMAD):
        _trace(ExportGraph(model), path, size, list(OUTPUT_NAMES), OPSET)
        return
    _trace(FeatureGraph(model.extractor_), path, size, ["features"], OPSET)
    proto = onnx.load(str(path))
    graph = proto.graph
    nodes, inits, patch = somad_scoring_nodes(model, "features", search=model._node_search())
    resize = resize_blur(model).numpy()
    inits += [numpy_helper.from_array(resize, "map_rows"), numpy_helper.from_array(resize.T.copy(), "map_cols_t")]
    nodes += [
        helper.make_node("MatMul", ["map_rows", patch], ["map_half"]),  # (S, h) @ (N, h, w): rows, as upsample_blur
        helper.make_node("MatMul", ["map_half", "map_cols_t"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    s = size
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", s, s]),
        ]
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parity_images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """Generated uint8 ``(n, size, size, 3)`` test inputs (smooth texture plus noise) for the export check."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size, 1)
    out = []
    for i in range(n):
        base = 128 + 60 * np.sin(2 * np.pi * (3 + i) * xx)[..., None] * np.cos(2 * np.pi * 2 * yy)[..., None]
        out.append(np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


def native_scores(model: BaseDetector, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The native pipeline on already resized uint8 inputs ``(N, S, S, 3)``: scores ``(N,)``, maps ``(N, S, S)``."""
    batch = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        maps, scores = model._anomaly_maps(model._checked_features(batch))
    return scores.cpu().numpy().astype(np.float32), maps.cpu().numpy().astype(np.float32)


def check_parity(model: BaseDetector, onnx_path: Path) -> dict:
    """Run the written graph under onnxruntime and the native path (the same search) on :func:`parity_images`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "onnxruntime is not installed, so the exported graph cannot be checked; run "
            "`pip install 'somad[export]'` (or pass --no-check)"
        ) from None
    size = model.extractor_.geometry.input_size
    images = parity_images(size)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    scores, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    ref_scores, ref_maps = native_scores(model, images)
    rel = float(np.max(np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12)))
    result = {
        "images": int(len(images)),
        "max_rel_score_diff": rel,
        "max_abs_map_diff": float(np.max(np.abs(maps - ref_maps))),
        "native_search": getattr(model, "search", None),
    }
    if not (rel <= PARITY_RTOL and np.isfinite(scores).all()):
        raise ExportError(
            f"{onnx_path}: the exported graph's scores differ from the native path's by {rel:.2e} (relative, "
            f"allowed {PARITY_RTOL:g}); please report this model (somad {__version__}, torch {torch.__version__})"
        )
    return result


def export_metadata(model: BaseDetector, source: Path | None, fmt: str, opset: int, parity: dict | None) -> dict:
    ex = model.extractor_
    g = ex.geometry
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
            "resize": "PIL Image.resize((image_size, image_size), Image.BILINEAR) of the decoded RGB image, "
            "then the central input_size square",
            "grid_size": ex.grid_size,
            "stride": ex.stride,
        },
        "normalisation": {"scale": 1.0 / 255.0, "mean": list(ex.spec.mean), "std": list(ex.spec.std)},
        "graph": {
            "file": MODEL_FILE,
            "opset": int(opset),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", g.input_size, g.input_size, 3]},
            "outputs": {
                "score": {"dtype": "float32", "shape": ["N"]},
                "anomaly_map": {"dtype": "float32", "shape": ["N", g.input_size, g.input_size]},
            },
        },
        "params": {
            "backbone": model.backbone,
            "blur_sigma": float(model.blur_sigma),
            "dims": ex.dims,
            "local_aggregation": ex.local_aggregation,
            "stages": list(ex.stages),
        },
        "scoring": _scoring_info(model),
        "parity_check": parity,
    }
    if source is not None:
        meta["source_model"] = {"file": source.name, "sha256": file_sha256(source)}
    return meta


def _scoring_info(model: BaseDetector) -> dict:
    if isinstance(model, SOMAD):
        n_empty = int(model.gaussians_.empty.sum())
        k = min(int(model.k), model.som_.weights_.shape[0] - n_empty)
        index = model._node_search()
        info = {
            "search": "exact",
            "model_search": model.search,
            "k": k,
            "nodes": int(model.som_.weights_.shape[0]),
            "empty_nodes_excluded": n_empty,
        }
        if isinstance(index, IVFSearch) and k <= index.nprobe * index.min_size_:
            info.update(search="ivf", nlist=index.nlist, nprobe=index.nprobe, coarse_dims=index.coarse_dims)
        return info
    if isinstance(model, PatchCore):
        return {"memory_bank_size": int(model.memory_bank_.shape[0]), "num_neighbors": int(model.num_neighbors)}
    return {}


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
) -> Path:
    """Export a fitted model (a model file or a fitted detector) to the folder ``out``.

    Writes ``out/model.onnx`` and ``out/somad_export.json`` in a temporary folder renamed into place whole. The
    graph's nearest-node search (SOMAD) is ``search`` (``"ivf"`` or ``"exact"``), by default the model's own. With
    ``check`` the graph is run under onnxruntime on two generated images and compared with the native path with
    that search: a relative score difference above :data:`PARITY_RTOL` is an error; the figures are saved in
    the JSON file. The description records the graph's SHA-256 and its own (``export_format.seal``); with
    ``sign_key`` (the key's bytes or its file) it is signed, and ``verify_key`` refuses a model file that is not
    signed with that key.
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r} is not supported; valid: {', '.join(FORMATS)}")
    if search not in (None, *SEARCH_CHOICES):
        raise ExportError(f"search {search!r} is not supported; valid: {', '.join(SEARCH_CHOICES)}")
    sign_key = as_key(sign_key)  # a bad key file fails now, not after the export
    source = None
    if isinstance(model, BaseDetector):
        model._check_fitted()
        where = f"this {model.method} model"
    else:
        source = Path(model)
        where = str(source)
        model = load(source, device="cpu", verify_key=verify_key)
    if isinstance(model, SOMAD):
        search = search or model.search
        if search != model.search or model.device_.type != "cpu":
            model = _cpu_copy(model, search)
    elif model.device_.type != "cpu":
        model = _cpu_copy(model)
    check_exportable(model, where)
    with staged_output_dir(out, overwrite=overwrite, inputs=[source] if source is not None else ()) as tmp:
        t0 = time.perf_counter()
        write_onnx(model, tmp / MODEL_FILE)
        logger.info("wrote the ONNX graph in %.1f s", time.perf_counter() - t0)
        parity = check_parity(model, tmp / MODEL_FILE) if check else None
        if parity:
            logger.info(
                "export check on %d generated images: max relative score difference %.2e, max map difference %.2e",
                parity["images"],
                parity["max_rel_score_diff"],
                parity["max_abs_map_diff"],
            )
        meta = export_metadata(model, source, format, OPSET, parity)
        meta["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = seal(meta, sign_key)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def _cpu_copy(model: BaseDetector, search: str | None = None) -> BaseDetector:
    """The same detector scoring on CPU (SOMAD: with ``search``, the graph's), without touching ``model``."""
    import copy

    clone = copy.copy(model)
    if isinstance(clone, SOMAD):
        clone.search = search or model.search
        clone._searcher = None
        clone.gaussians_ = model.gaussians_.to("cpu")
        clone.som_ = copy.copy(model.som_)
        clone.som_.weights_ = model.som_.weights_.cpu()
    elif isinstance(clone, PaDiM):
        clone.means_, clone.whiteners_ = model.means_.cpu(), model.whiteners_.cpu()
    elif isinstance(clone, PatchCore):
        clone.memory_bank_ = model.memory_bank_.cpu()
    clone.device_ = torch.device("cpu")
    if model.device_.type != "cpu":
        clone.device = "cpu"
        clone.extractor_ = clone._make_extractor()
    return clone
