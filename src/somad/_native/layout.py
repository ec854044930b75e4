"""The memory layout of the whiteners the native Mahalanobis kernel reads: triangles in 16-row strips.

This is the kernel's layout, not the domain model: ``somad.som.node_stats`` stores each node's whitener ``L_i^{-1}``
(a lower triangle) in it because the CPU kernel then reads each strip as one sequential stream.
"""

from __future__ import annotations

import torch

from somad._native import hugepages

STRIP = 16  # rows per strip of a packed whitener: two 8-float vector registers


def packed_size(d: int) -> int:
    """Entries per node of a whitener packed by :func:`strip_layout`."""
    return sum(STRIP * min(r0 + STRIP, d) for r0 in range(0, d, STRIP))


def strip_layout(d: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each entry of a ``D x D`` lower triangle sits in its packed form (``packed_size(d)`` entries).

    The rows are cut into strips of :data:`STRIP` rows. Strip ``t`` (rows ``16t .. 16t+15``) stores, one
    after another, its columns ``0 .. min(16t+16, D) - 1``, 16 entries each (row ``16t`` first). The entries
    above the diagonal (in the diagonal block) and past row ``D - 1`` are stored as zeros: the CPU kernel then
    reads every strip as one sequential stream of 16-float columns, with no masks. That costs 8.5% more than
    the bare triangle at D = 176.

    Returns
    -------
    rows, cols, positions : int64 tensors (D*(D+1)/2,), in ``torch.tril_indices`` order
    """
    rows, cols = torch.tril_indices(d, d, device=device)
    strip = rows // STRIP
    starts = torch.tensor([0] + [STRIP * min(r0 + STRIP, d) for r0 in range(0, d, STRIP)], device=device).cumsum(0)
    return rows, cols, starts[strip] + cols * STRIP + rows % STRIP


def strips_from_rows(tril: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Repack triangles packed row by row (``torch.tril_indices`` order, ``(M, D*(D+1)/2)``: model files of
    format version 1) into the strips of :func:`strip_layout`, ``(M, packed_size(D))``, a chunk of nodes at a time."""
    d = round(((8 * tril.shape[1] + 1) ** 0.5 - 1) / 2)
    if d * (d + 1) // 2 != tril.shape[1]:
        raise ValueError(f"{tril.shape[1]} entries per node is not a packed triangle")
    positions = strip_layout(d, tril.device)[2]
    out = hugepages.zeros((tril.shape[0], packed_size(d)), tril.dtype, tril.device)
    for start in range(0, tril.shape[0], chunk):
        out[start : start + chunk, positions] = tril[start : start + chunk]
    return out
