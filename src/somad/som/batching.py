"""Grouped batching: run one batched matrix product per group of rows without a Python loop over groups.

One responsibility: turn "row i belongs to group g(i)" into padded ``(G, L)`` index blocks, so that per-group
work (a node's covariance, a node's whitening, a window of SOM nodes) becomes a few ``bmm`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def padded_groups(
    group: torch.Tensor, n_groups: int, *, max_elements: int = 1 << 24, max_groups: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batch the rows of each group into padded blocks for batched matrix products.

    Groups are sorted by size, largest first, and cut into consecutive blocks; each block is padded to the
    size of its largest group, so neighbours in the order waste little. The Python loop runs over blocks,
    never over groups or rows.

    Parameters
    ----------
    group : int64 tensor (P,)
        Group id of each row.
    n_groups : int
    max_elements : int
        Upper bound on ``len(ids) * L`` per yielded block (a single group larger than this is one block).
    max_groups : int, optional
        Upper bound on ``len(ids)`` per yielded block.

    Yields
    ------
    ids : tensor (G,) group ids of the block
    rows : tensor (G, L) row indices; padding entries hold ``P`` (point at an extra zero row)
    valid : bool tensor (G, L)
    """
    p = group.shape[0]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    by_size = torch.argsort(counts, descending=True, stable=True)
    sizes = counts[by_size].tolist()  # one host copy, so the loop below never synchronises with a GPU
    lo = 0
    while lo < len(sizes) and sizes[lo] > 0:
        length = sizes[lo]
        step = max(1, max_elements // length)
        step = min(step, max_groups) if max_groups else step
        chunk = by_size[lo : lo + step]
        chunk = chunk[counts[chunk] > 0]
        offs = torch.arange(length, device=group.device)
        valid = offs[None, :] < counts[chunk][:, None]
        pos = (starts[chunk][:, None] + offs[None, :]).clamp_max(max(p - 1, 0))
        rows = torch.where(valid, order[pos], torch.full_like(pos, p))
        yield chunk, rows, valid
        lo += step
