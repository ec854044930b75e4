"""SOMAD's scoring as ONNX nodes, beside what they mirror: the nearest-node search (``node_search``) and the minimum
Mahalanobis distance (``node_stats.mahalanobis``).

SOMAD's native scoring groups the (patch, node) pairs by node in C (``somad._native``), which torch cannot trace,
so ``somad export`` appends these hand-built nodes after the traced feature stage (``SOMAD.export_scoring``
hands it :func:`scoring_nodes` bound to the model's arrays). They take plain arrays and the public fields of an
:class:`~somad.som.node_search.IVFSearch`; ``tests/test_export.py`` checks them against the native search and
scores (the IVF nodes against ``IVFSearch`` itself, misses included). The nodes use opset 17's operator
signatures (``somad.export.onnx.OPSET``). ``onnx`` is imported on use only.
"""

from __future__ import annotations

import numpy as np
import torch

from somad.som.node_search import IVFSearch
from somad.som.node_stats import row_blocks

#: SOMAD graph: (patch, node) pairs are whitened in units of at most UNIT pairs of one node, UNITS_PER_STEP units
#: per step of the graph's Loop (see :func:`scoring_nodes`).
UNIT = 16
UNITS_PER_STEP = 32


def scoring_nodes(
    features: str,
    *,
    prototypes: torch.Tensor,
    means: torch.Tensor,
    whiteners: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    grid: tuple[int, int],
    search: IVFSearch | None = None,
    unit: int = UNIT,
    step: int = UNITS_PER_STEP,
):
    """SOMAD's scoring as ONNX nodes appended after ``features`` ``(N, D, h, w)``: patch scores ``(N, h, w)``.

    ``prototypes``, ``means`` ``(M', D)`` and ``whiteners`` ``(M', D, D)`` (lower triangular, float16 or float32) are
    those of the searched nodes ``ids`` (the non-empty ones, ascending), ``k`` at most ``M'``, ``grid`` the patch grid
    ``(h, w)``; ``search`` the model's :class:`IVFSearch` over those nodes, or ``None`` (exhaustive).

    1. k nearest searched nodes: exhaustive, ``-2 x.w + ||w||^2`` for every node (``MatMul``), ``TopK``; or,
       with ``search`` (unless it searches ``k`` exhaustively: ``IVFSearch.exhaustive_for``), that index's search
       (:func:`ivf_nodes`: the same probed lists and the k nearest of their members, so the graph picks the nodes
       of the native IVF path).
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

    prototypes = prototypes.float().cpu().numpy()
    means = means.float().cpu().numpy()
    whiteners = whiteners.cpu()
    bounds = row_blocks(whiteners.shape[1])  # row blocks: rows lo:hi of W only touch columns 0:hi
    ivf = search is not None and not search.exhaustive_for(k)
    d = prototypes.shape[1]
    h, w = grid
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
        nodes[i : i + 3], ivf_inits = ivf_nodes(search, "somad_x", "somad_k", "somad_knn", ids, const)
        inits = [t for t in inits if t.name not in ("somad_proto_t_m2", "somad_proto_sq")] + ivf_inits
    return nodes, inits, "somad_patch"


#: IVF graph: (query, probed list) pairs are compared with their list's members in units of at most IVF_UNIT pairs.
IVF_UNIT = 32


def ivf_nodes(search: IVFSearch, x: str, k: str, out: str, ids: torch.Tensor, const, unit: int = IVF_UNIT):
    """ONNX nodes: ``out`` ``(Q, k)``, the k nearest nodes of queries ``x`` ``(Q, D)`` as :class:`IVFSearch`
    ``search`` finds them, as positions among the searched nodes ``ids`` (``search.ids``; ascending node ids).
    ``const(name, array)`` makes an initializer.

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

    ids = ids.cpu()
    if not torch.equal(search.ids.cpu(), ids):
        raise ValueError("the IVF index does not search the given nodes; rebuild it over them")
    w = search.weights.float().cpu()
    members = search.members_.cpu()  # (C, L) node ids, padded with M
    valid = members < w.shape[0]
    position = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    position[ids] = torch.arange(ids.numel())  # node id -> position among the kept nodes
    member_w = torch.cat([w, torch.zeros(1, w.shape[1])])[members]  # (C, L, D), padding rows zero
    member_sq = (member_w * member_w).sum(-1).masked_fill(~valid, float("inf"))  # (C, L): padding never wins
    length = members.shape[1]
    if search.projection is not None:
        axes_t, shift = (t.float().cpu().numpy() for t in search.projection)  # (D, R), (R,)
    centres = search.coarse_centres.float().cpu().numpy()  # (C, R): in the projected space, else (C, D)
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    inits = [
        const("somad_ivf_centres_t_m2", (-2.0 * centres.T).astype(np.float32)),
        const("somad_ivf_centre_sq", search.coarse_sq.float().cpu().numpy()),
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
    if search.projection is not None:
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
