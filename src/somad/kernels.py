"""Native CPU kernels for the two hot loops of SOMAD scoring: checked entry points to ``somad._kernels``.

One responsibility: the inner loops that, written as torch ops, spend their time in per-op overhead at batch
size 1 (hundreds of small gathers and batched matrix products per image). Each kernel runs in C
(``_kernels.c``: AVX2 where the CPU has it, portable C otherwise; OpenMP threads) over its whole input in one
call. The torch implementations in ``somad.node_stats`` and ``somad.node_search`` remain the reference,
the CUDA path and the fallback where the extension was not built (no C compiler at install time); the tests
compare them.

The functions here check what the C code trusts: dtypes, contiguity, shapes and index ranges.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

try:
    from . import _kernels
except ImportError:  # built without a C compiler: the torch paths are used
    _kernels = None
    logger.info("somad._kernels is not built; scoring on CPU uses the slower torch implementation")

AVAILABLE = _kernels is not None


def set_simd(flag: bool) -> bool:
    """Use the AVX2 bodies when ``flag`` and the CPU has AVX2, FMA and F16C (the default); returns whether
    they are used. ``False`` selects the portable C bodies (for tests)."""
    return bool(_kernels.set_simd(bool(flag)))


def _array(a: np.ndarray, dtype, name: str, shape: tuple | None = None) -> np.ndarray:
    if a.dtype != dtype or not a.flags.c_contiguous:
        got = a.dtype if a.flags.c_contiguous else f"a non-contiguous {a.dtype} array"
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype)} array, got {got}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _in_range(a: np.ndarray, stop: int, name: str) -> None:
    if a.size and not (0 <= int(a.min()) and int(a.max()) < stop):
        raise ValueError(f"{name} must be in [0, {stop})")


def whitened_sq_norms(x: np.ndarray, pair_vector: np.ndarray, pointer: np.ndarray, node_ids: np.ndarray,
                      table_rows: np.ndarray, means: np.ndarray, tril: np.ndarray) -> np.ndarray:
    """``out[p] = ||L_i^{-1} (x[pair_vector[p]] - means[i])||^2`` for every pair ``p`` of every node ``i``.

    Parameters
    ----------
    x : float32 (N, D)
    pair_vector : int64 (P,), the vector of each pair; pairs sorted by node
    pointer : int64 (A + 1,), the pairs of node ``node_ids[a]`` are ``pointer[a]:pointer[a + 1]``
    node_ids : int64 (A,)
    table_rows : int64 (A,), the row of ``tril`` that holds that node's triangle
    means : float32 (M, D)
    tril : float32 or float16 (R, D*(D+1)/2), row-major packed lower triangles

    Returns
    -------
    float32 (P,)
    """
    n, d = x.shape
    a = node_ids.shape[0]
    _array(x, np.float32, "x")
    _array(pair_vector, np.int64, "pair_vector")
    _array(pointer, np.int64, "pointer", (a + 1,))
    _array(node_ids, np.int64, "node_ids")
    _array(table_rows, np.int64, "table_rows", (a,))
    _array(means, np.float32, "means", (means.shape[0], d))
    if tril.dtype not in (np.float32, np.float16):
        raise ValueError(f"tril must be float32 or float16, got {tril.dtype}")
    _array(tril, tril.dtype, "tril", (tril.shape[0], d * (d + 1) // 2))
    p = pair_vector.shape[0]
    if pointer[0] != 0 or pointer[-1] != p or np.any(np.diff(pointer) < 0):
        raise ValueError(f"pointer must rise from 0 to {p}")
    _in_range(pair_vector, n, "pair_vector")
    _in_range(node_ids, means.shape[0], "node_ids")
    _in_range(table_rows, tril.shape[0], "table_rows")
    out = np.empty(p, np.float32)
    _kernels.whitened_sq_norms(x, pair_vector, pointer, node_ids, table_rows, means, tril, out, n, d, p, a,
                               means.shape[0], tril.shape[0], tril.dtype == np.float16, torch.get_num_threads())
    return out


def probe_nearest(x: np.ndarray, coarse: np.ndarray, n_probe: int, members: np.ndarray, weights: np.ndarray,
                  weights_sq: np.ndarray, k: int, *, out: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest nodes among the members of each query's ``n_probe`` nearest clusters.

    Parameters
    ----------
    x : float32 (N, D)
    coarse : float32 (N, C), a ranking of the clusters per query (smaller = nearer)
    n_probe : int, in [1, C]
    members : int64 (C, L), node ids padded at the end of each row with ``M``
    weights : float32 (M + 1, D), row ``M`` zero
    weights_sq : float32 (M + 1,), ``||w||^2``; ``inf`` for row ``M`` and for excluded nodes
    k : int
    out : (float32 (N, k), int64 (N, k)), optional
        Arrays to write the result into (e.g. rows of a larger result), else new ones.

    Returns
    -------
    sq_dist : float32 (N, k), squared distances ascending (``inf`` where fewer than k candidates)
    index : int64 (N, k)
    """
    n, d = x.shape
    c = coarse.shape[1]
    _array(x, np.float32, "x")
    _array(coarse, np.float32, "coarse", (n, c))
    _array(members, np.int64, "members", (c, members.shape[1]))
    _array(weights, np.float32, "weights", (weights.shape[0], d))
    _array(weights_sq, np.float32, "weights_sq", (weights.shape[0],))
    _in_range(members, weights.shape[0], "members")
    sq, index = out if out is not None else (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
    _array(sq, np.float32, "out[0]", (n, k))
    _array(index, np.int64, "out[1]", (n, k))
    _kernels.probe_nearest(x, coarse, members, weights, weights_sq, sq, index, n, d, c, int(n_probe),
                           members.shape[1], weights.shape[0], int(k), torch.get_num_threads())
    return sq, index
