"""Grouped batching: run one batched matrix product per group of rows without a Python loop over groups.

One responsibility: turn "row i belongs to group g(i)" into padded ``(G, L)`` index blocks, so that per-group
work (a node's covariance, a node's whitening, a window of SOM nodes) becomes a few ``bmm`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def padded_groups(group: torch.Tensor, n_groups: int, *, max_elements: int = 1 << 24, max_groups: int | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batch the rows of each group into padded blocks for batched matrix products.

    Groups are bucketed by size rounded up to a power of two, so padding at most doubles the work, and the
    Python loop runs over buckets and memory chunks, never over groups or rows.

    Parameters
    ----------
    group : int64 tensor (P,)
        Group id of each row.
    n_groups : int
    max_elements : int
        Upper bound on ``len(ids) * L`` per yielded block.
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
    nonzero = torch.nonzero(counts).flatten()
    # Bucket = ceil(log2(count)): every group in a bucket is padded to the same power of two.
    bucket = torch.ceil(torch.log2(counts[nonzero].double())).long()
    for b in torch.unique(bucket).tolist():
        length = 1 << b
        ids = nonzero[bucket == b]
        step = max(1, max_elements // length)
        step = min(step, max_groups) if max_groups else step
        for lo in range(0, ids.shape[0], step):
            chunk = ids[lo:lo + step]
            offs = torch.arange(length, device=group.device)
            valid = offs[None, :] < counts[chunk][:, None]
            pos = (starts[chunk][:, None] + offs[None, :]).clamp_max(max(p - 1, 0))
            rows = torch.where(valid, order[pos], torch.full_like(pos, p))
            yield chunk, rows, valid
