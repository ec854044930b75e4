"""Fused CPU kernels (numba) for the two hot loops of SOMAD scoring.

One responsibility: the inner loops that, written as torch ops, spend their time in per-op overhead at batch
size 1 (hundreds of small gathers and batched matrix products per image). Each kernel runs one pass over
its data in compiled code, parallel over nodes or queries, with no temporaries. The torch implementations in
``somad.node_stats`` and ``somad.node_search`` remain the reference (and the CUDA path); the tests compare
the two.

Kernels are compiled on first use and cached on disk (numba ``cache=True``), so later processes start warm.
They take NumPy views of CPU tensors and write into preallocated outputs.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import torch
from numba import njit, prange

logger = logging.getLogger(__name__)

_BLOCK = 4  # vectors whitened together: each row of a node's factor is loaded once for four dot products


def _compiled(fn=None, *, parallel=True):
    """``njit`` with the on-disk cache when numba finds a writable cache directory (the package's
    ``__pycache__``, else the user's cache), else compiled once per process."""
    if fn is None:
        return lambda f: _compiled(f, parallel=parallel)
    try:
        return njit(parallel=parallel, fastmath=True, cache=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        logger.debug("no writable numba cache directory; %s is compiled in every process", fn.__name__)
        return njit(parallel=parallel, fastmath=True)(fn)


@_compiled(parallel=False)
def _insert(values, ids, value, index):  # pragma: no cover - compiled
    """Insert ``(value, index)`` into the ascending ``values`` (and ``ids``) if it beats the last entry."""
    j = values.shape[0] - 1
    if not value < values[j]:
        return
    while j > 0 and values[j - 1] > value:
        values[j] = values[j - 1]
        ids[j] = ids[j - 1]
        j -= 1
    values[j] = value
    ids[j] = index


def set_threads() -> None:
    """Run the kernels on as many threads as torch uses (the benchmark's and the user's setting)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@_compiled
def whitened_sq_norms(x, pair_vector, pointer, node_ids, table_rows, means, tril, out):  # pragma: no cover - compiled
    """``out[p] = ||L_i^{-1} (x[pair_vector[p]] - means[i])||^2`` for every pair ``p`` of every node ``i``.

    x : float32 (N, D); pair_vector : int64 (P,), pairs sorted by node; pointer : int64 (A + 1,), the pairs of
    node ``node_ids[a]`` are ``pointer[a]:pointer[a + 1]``; table_rows : int64 (A,), its row in ``tril``;
    means : float32 (M, D); tril : float32 (R, D*(D+1)/2), row-major packed lower triangles; out : float32 (P,).
    """
    d = x.shape[1]
    for a in prange(node_ids.shape[0]):
        node, row = node_ids[a], table_rows[a]
        y = np.empty((_BLOCK, d), np.float32)
        for first in range(pointer[a], pointer[a + 1], _BLOCK):
            count = min(_BLOCK, pointer[a + 1] - first)
            for j in range(_BLOCK):
                v = pair_vector[first + min(j, count - 1)]  # a short last block repeats its last vector
                for c in range(d):
                    y[j, c] = x[v, c] - means[node, c]  # centre first: no cancellation between W x and W mu
            s0 = s1 = s2 = s3 = np.float32(0.0)
            start = 0
            for r in range(d):  # row r of the triangle holds columns 0..r, at start = r(r+1)/2
                z0 = z1 = z2 = z3 = np.float32(0.0)
                for c in range(r + 1):
                    w = tril[row, start + c]
                    z0 += w * y[0, c]
                    z1 += w * y[1, c]
                    z2 += w * y[2, c]
                    z3 += w * y[3, c]
                s0 += z0 * z0
                s1 += z1 * z1
                s2 += z2 * z2
                s3 += z3 * z3
                start += r + 1
            out[first] = s0
            if count > 1:
                out[first + 1] = s1
            if count > 2:
                out[first + 2] = s2
            if count > 3:
                out[first + 3] = s3


@_compiled
def probe_nearest(x, coarse, n_probe, members, weights, weights_sq, out_sq, out_index):  # pragma: no cover
    """k nearest nodes among the members of each query's ``n_probe`` nearest clusters.

    x : float32 (N, D); coarse : float32 (N, C), a ranking of the clusters per query (smaller = nearer);
    members : int64 (C, L), node ids padded with ``M``; weights : float32 (M + 1, D); weights_sq : float32
    (M + 1,), ``||w||^2``, ``inf`` for row ``M`` and for excluded nodes; out_sq : float32 (N, k), squared
    distances ascending; out_index : int64 (N, k).
    """
    n, d = x.shape
    k = out_sq.shape[1]
    pad = weights.shape[0] - 1
    for q in prange(n):
        # The n_probe smallest entries of coarse[q], by insertion (n_probe and k are small).
        probe_val = np.full(n_probe, np.inf, np.float32)
        probe_id = np.zeros(n_probe, np.int64)
        for c in range(coarse.shape[1]):
            _insert(probe_val, probe_id, coarse[q, c], c)
        best = np.full(k, np.inf, np.float32)
        best_id = np.full(k, pad, np.int64)
        for p in range(n_probe):
            for j in range(members.shape[1]):
                node = members[probe_id[p], j]
                if node == pad:  # members are padded at the end of each row
                    break
                e = weights_sq[node]
                if e == np.inf:  # an excluded node
                    continue
                dot = np.float32(0.0)
                for c in range(d):
                    dot += x[q, c] * weights[node, c]
                # ||w||^2 - 2 x.w: ||x||^2 is added at the end, it does not change the ranking
                _insert(best, best_id, e - 2.0 * dot, node)
        norm = np.float32(0.0)
        for c in range(d):
            norm += x[q, c] * x[q, c]
        for i in range(k):
            out_sq[q, i] = max(best[i] + norm, np.float32(0.0))  # rounding can go below 0
            out_index[q, i] = best_id[i]
