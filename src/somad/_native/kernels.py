"""Native CPU kernels for the two hot loops of SOMAD scoring: checked entry points to ``somad._kernels``.

One responsibility: the inner loops that, written as torch ops, spend their time in per-op overhead at batch
size 1 (hundreds of small gathers and batched matrix products per image). Each kernel runs in C
(``_kernels.c``: AVX2 where the CPU has it, portable C otherwise; OpenMP threads) over its whole input in one
call. The torch implementations in ``somad.som.node_stats`` and ``somad.som.node_search`` remain the reference,
the CUDA path and the fallback where the extension was not built (no C compiler at install time); the tests
compare them.

The functions here check what the C code trusts: dtypes, contiguity, shapes and index ranges.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from somad._native.layout import packed_size

logger = logging.getLogger(__name__)

try:
    from somad._native import _kernels
except ImportError:  # built without a C compiler: the torch paths are used
    _kernels = None
    logger.info("somad._native._kernels is not built; scoring on CPU uses the slower torch implementation")

AVAILABLE = _kernels is not None


def set_simd(flag: bool) -> bool:
    """Use the AVX2 bodies when ``flag`` and the CPU has AVX2, FMA and F16C (the default); returns whether
    they are used. ``False`` selects the portable C bodies (for tests)."""
    return bool(_kernels.set_simd(bool(flag)))


def _array(a: np.ndarray, dtype, name: str, shape: tuple | None = None) -> np.ndarray:
    """Check dtype, C-contiguity and (where given; ``None`` = any size) the shape of ``a``."""
    if a.dtype != dtype or not a.flags.c_contiguous:
        got = a.dtype if a.flags.c_contiguous else f"a non-contiguous {a.dtype} array"
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array, got {got}")
    if shape is not None and (a.ndim != len(shape) or any(e is not None and g != e for g, e in zip(a.shape, shape))):
        expected = ", ".join("any" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {a.shape}, expected ({expected})")
    return a


def whitened_sq_norms(x: np.ndarray, nodes: np.ndarray, means: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """``out[v, j] = ||L_i^{-1} (x[v] - means[i])||^2`` with ``i = nodes[v, j]``.

    The pairs are grouped by node in C (a counting sort), so each node's whitener is read once per call.

    Parameters
    ----------
    x : float32 (N, D)
    nodes : int64 (N, k), in ``[0, M)`` (checked in C: ``ValueError`` otherwise)
    means : float32 (M, D)
    packed : float32 or float16 (M, packed_size(D)), the whiteners ``L_i^{-1}`` packed in 16-row strips
        (``somad._native.layout.strip_layout``)

    Returns
    -------
    float32 (N, k)
    """
    n, d = x.shape
    _array(x, np.float32, "x")
    _array(nodes, np.int64, "nodes", (n, None))
    m = means.shape[0]
    _array(means, np.float32, "means", (m, d))
    if packed.dtype not in (np.float32, np.float16):
        raise ValueError(f"packed must be float32 or float16, got {packed.dtype}")
    _array(packed, packed.dtype, "packed", (m, packed_size(d)))
    k = nodes.shape[1]
    out = np.empty((n, k), np.float32)
    _kernels.whitened_sq_norms(
        x, nodes, means, packed, out, n, d, k, m, packed.dtype == np.float16, torch.get_num_threads()
    )
    return out


def probe_nearest(
    x: np.ndarray,
    centres: np.ndarray,
    centre_sq: np.ndarray,
    nprobe: int,
    panels: np.ndarray,
    lane_start: np.ndarray,
    lane_ids: np.ndarray,
    lane_sq: np.ndarray,
    k: int,
    *,
    pad: int,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
    projected: np.ndarray | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest nodes among the members of each query's ``nprobe`` nearest clusters.

    Vectors are held as *panels*: a group's vectors side by side, dimension by dimension (``(D, width)``,
    ``width`` a multiple of 8, padding columns zero), so that the C code compares 8 or 16 of them with a query
    in vector registers.

    Parameters
    ----------
    x : float32 (N, D)
    centres : float32 (R, Cw), the C cluster centres as one panel (``Cw >= C``), in the space of the
        projection (``R`` dims), else of ``x`` (``R = D``)
    centre_sq : float32 (Cw,), ``||centre||^2``; ``inf`` past C
    nprobe : int, in [1, min(C, 64)]
    panels : float32 (D * W,), cluster c's members as a ``(D, width_c)`` panel from ``D * lane_start[c]``
    lane_start : int64 (C + 1,), from 0 to W in steps ``width_c`` that are positive multiples of 8
    lane_ids : int64 (W,), the node id of each lane
    lane_sq : float32 (W,), ``||w||^2``; ``inf`` for padding lanes (never returned)
    k : int
    pad : int, the id returned where a query has fewer than k candidates
    projection : (float32 (D, Aw), float32 (Aw,)), optional
        ``(axes, shift)``: queries are compared with the centres as ``x @ axes + shift`` (its first R columns;
        ``Aw`` a multiple of 8 and at least R), computed in C a block of queries at a time.
    projected : float32 (N, R), optional
        The queries already projected (e.g. once for all the epochs of a SOM); ``projection`` is then unused.
    out : (float32 (N, k), int64 (N, k)), optional
        Arrays to write the result into (e.g. rows of a larger result), else new ones.

    Returns
    -------
    sq_dist : float32 (N, k), squared distances ascending (``inf`` where fewer than k candidates)
    index : int64 (N, k)
    """
    n, d = x.shape
    _array(x, np.float32, "x")
    axes, shift = projection if projection is not None else (np.zeros((d, 0), np.float32), np.zeros(0, np.float32))
    _array(axes, np.float32, "axes", (d, None))
    _array(shift, np.float32, "shift", (axes.shape[1],))
    _array(centres, np.float32, "centres", (None, None))
    if projected is not None:
        _array(projected, np.float32, "projected", (n, centres.shape[0]))
    _array(centre_sq, np.float32, "centre_sq", (centres.shape[1],))
    _array(lane_start, np.int64, "lane_start")
    w = lane_ids.shape[0]
    _array(lane_ids, np.int64, "lane_ids", (w,))
    _array(lane_sq, np.float32, "lane_sq", (w,))
    _array(panels, np.float32, "panels", (d * w,))
    sq, index = out if out is not None else (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
    _array(sq, np.float32, "out[0]", (n, k))
    _array(index, np.int64, "out[1]", (n, k))
    _kernels.probe_nearest(
        x,
        projected if projected is not None else np.zeros(0, np.float32),
        axes,
        shift,
        centres,
        centre_sq,
        panels,
        lane_start,
        lane_ids,
        lane_sq,
        sq,
        index,
        n,
        d,
        axes.shape[1],
        centres.shape[0],
        centres.shape[1],
        int(nprobe),
        lane_start.shape[0] - 1,
        w,
        int(pad),
        int(k),
        projected is not None,
        torch.get_num_threads(),
    )
    return sq, index
