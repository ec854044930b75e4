"""Per-node Gaussian statistics and Mahalanobis distances.

One responsibility: given vectors and the node each belongs to, fit one Gaussian per node and measure
Mahalanobis distances from vectors to chosen nodes.

The rule for every node ``i`` with ``n_i`` members (the training patches whose nearest node is ``i``):

* ``n_i >= 2``: mean = member mean, covariance = ``cov(G_i)`` (unbiased) ``+ eps * I`` (as the paper's code).
* ``n_i == 1``: mean = the member; covariance = the pooled within-node covariance ``+ eps * I``. One sample
  has no spread, so it borrows the map's average spread instead of the degenerate ``eps * I`` alone.
* ``n_i == 0``: the node is *empty*: it is excluded from the nearest-node search at scoring time. Its stored
  mean is its SOM prototype and its covariance the pooled one ``+ eps * I``, so no array holds NaN.

The pooled within-node covariance is ``sum_i S_i / sum_i (n_i - 1)`` over nodes with ``n_i >= 2`` (``S_i``
the scatter matrix); zero when there are none. Each covariance is stored as the inverse of its Cholesky
factor, ``W_i = L_i^{-1}``, so that ``d_i(x)^2 = ||W_i x - W_i mu_i||^2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .batching import padded_groups
from .errors import NumericalError

logger = logging.getLogger(__name__)


def row_blocks(d: int, n: int = 4) -> tuple[tuple[int, int], ...]:
    """Split ``d`` rows into at most ``n`` nearly equal ``(lo, hi)`` blocks."""
    n = max(1, min(n, d))
    edges = [round(i * d / n) for i in range(n + 1)]
    return tuple((lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo)


@dataclass
class NodeGaussians:
    """Gaussian per node, in whitened form.

    Each whitener ``W_i = L_i^{-1}`` (``Sigma_i = L_i L_i^T``) is lower triangular, so it is stored as row
    blocks that stop at the diagonal block: block ``b`` holds rows ``lo:hi`` and columns ``0:hi``. With four
    blocks that is 62.5% of the dense matrix, in memory traffic and in multiply-adds.

    Attributes
    ----------
    means : tensor (M, D) float32
    blocks : tuple of tensors (M, hi - lo, hi), float32 or float16, one per ``(lo, hi)`` in ``bounds``
    shifts : tensor (M, D) float32, ``W_i mu_i``
    counts : tensor (M,) int64, members per node
    """

    means: torch.Tensor
    blocks: tuple[torch.Tensor, ...]
    shifts: torch.Tensor
    counts: torch.Tensor

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        out, lo = [], 0
        for b in self.blocks:
            out.append((lo, lo + b.shape[1]))
            lo += b.shape[1]
        return tuple(out)

    @property
    def empty(self) -> torch.Tensor:
        """Bool (M,): nodes without members, excluded from scoring."""
        return self.counts == 0

    @property
    def whiteners(self) -> torch.Tensor:
        """Dense lower-triangular whiteners ``(M, D, D)`` (a copy)."""
        m, d = self.means.shape
        dense = torch.zeros(m, d, d, dtype=self.blocks[0].dtype, device=self.means.device)
        for (lo, hi), b in zip(self.bounds, self.blocks):
            dense[:, lo:hi, :hi] = b
        return dense

    def tril(self) -> torch.Tensor:
        """Lower triangles ``(M, D*(D+1)/2)`` in ``torch.tril_indices`` order (the file layout)."""
        m, d = self.means.shape
        rows, cols = torch.tril_indices(d, d, device=self.means.device)
        out = torch.empty(m, rows.numel(), dtype=self.blocks[0].dtype, device=self.means.device)
        for (lo, hi), b in zip(self.bounds, self.blocks):
            # In tril_indices order the rows lo:hi are one contiguous run of columns of ``out``.
            first, last = lo * (lo + 1) // 2, hi * (hi + 1) // 2
            flat = (rows[first:last] - lo) * hi + cols[first:last]  # positions in a flattened (hi - lo, hi) block
            for start in range(0, m, 256):  # node chunks: no (M, ...) temporary
                out[start:start + 256, first:last] = b[start:start + 256].reshape(-1, (hi - lo) * hi)[:, flat]
        return out

    @classmethod
    def from_whiteners(cls, means: torch.Tensor, tril: torch.Tensor, counts: torch.Tensor, *,
                       chunk: int = 256) -> "NodeGaussians":
        """Rebuild from means ``(M, D)``, lower triangles ``(M, D*(D+1)/2)`` (see :meth:`tril`) and counts.

        Float16 triangles give float16 blocks; any other dtype gives float32.
        """
        m, d = means.shape
        if tril.shape != (m, d * (d + 1) // 2):
            raise ValueError(f"whitener triangles have shape {tuple(tril.shape)}, expected ({m}, {d * (d + 1) // 2})")
        rows, cols = torch.tril_indices(d, d)
        bounds = row_blocks(d)
        dtype = torch.float16 if tril.dtype == torch.float16 else torch.float32
        blocks = tuple(torch.zeros(m, hi - lo, hi, dtype=dtype) for lo, hi in bounds)
        for start in range(0, m, chunk):  # chunked: never a dense (M, D, D) copy
            dense = torch.zeros(min(chunk, m - start), d, d, dtype=dtype)
            dense[:, rows, cols] = tril[start:start + chunk].to(dtype)
            for (lo, hi), b in zip(bounds, blocks):
                b[start:start + chunk] = dense[:, lo:hi, :hi]
        means = means.float()
        return cls(means, blocks, _shifts(blocks, bounds, means), counts.long())

    def to(self, device) -> "NodeGaussians":
        return NodeGaussians(self.means.to(device), tuple(b.to(device) for b in self.blocks),
                             self.shifts.to(device), self.counts.to(device))


def _shifts(blocks, bounds, means: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``W_i mu_i`` for every node, block by block, in float32: ``(M, D)``."""
    out = torch.empty_like(means)
    for (lo, hi), b in zip(bounds, blocks):
        for start in range(0, means.shape[0], chunk):  # node chunks: float16 blocks are widened a chunk at a time
            sl = slice(start, start + chunk)
            out[sl, lo:hi] = torch.einsum("mij,mj->mi", b[sl].float(), means[sl, :hi])
    return out


def fit_node_gaussians(x: torch.Tensor, assignment: torch.Tensor, prototypes: torch.Tensor, eps: float,
                       *, max_elements: int = 1 << 24, dtype: torch.dtype = torch.float32) -> NodeGaussians:
    """Fit the per-node Gaussians (see the module docstring for the rule).

    Parameters
    ----------
    x : tensor (N, D), any float dtype
    assignment : int64 tensor (N,), node of each vector
    prototypes : tensor (M, D), SOM weights (means of empty nodes)
    eps : float, >= 0
    dtype : torch.float32 or torch.float16
        Storage of the whitener blocks (float16: half the memory and file; scoring computes in float32).
    """
    m, d = prototypes.shape
    device = prototypes.device
    assignment = assignment.to(device)
    counts = torch.bincount(assignment, minlength=m)
    sums = torch.zeros(m, d, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], 65536):
        sums.index_add_(0, assignment[start:start + 65536], x[start:start + 65536].to(device, torch.float64))
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], prototypes.double())

    bounds = row_blocks(d)
    blocks = tuple(torch.zeros(m, hi - lo, hi, dtype=dtype, device=device) for lo, hi in bounds)
    pooled = torch.zeros(d, d, dtype=torch.float64, device=device)
    dof = 0
    eye = torch.eye(d, dtype=torch.float64, device=device)
    groups = padded_groups(assignment, m, max_elements=max(1, max_elements // d), max_groups=max(1, max_elements // (d * d)))
    for ids, rows, valid in groups:
        many = counts[ids] >= 2
        if not bool(many.any()):
            continue
        ids, rows, valid = ids[many], rows[many], valid[many]
        scatter = torch.zeros(ids.numel(), d, d, dtype=torch.float64, device=device)
        centre = means[ids][:, None, :]
        step = max(1, max_elements // (ids.numel() * d))  # members per pass: a huge node never needs a huge copy
        for c in range(0, rows.shape[1], step):
            # Padding entries point one past the end: clamp them to a real row, then zero them with the mask.
            members = x[rows[:, c:c + step].clamp_max(x.shape[0] - 1).to(x.device)].to(device, torch.float64)
            members.sub_(centre).mul_(valid[:, c:c + step, None])
            scatter.baddbmm_(members.transpose(1, 2), members)  # += outer products of the centred members
        pooled += scatter.sum(0)
        dof += int((counts[ids] - 1).sum())
        cov = scatter / (counts[ids] - 1).double()[:, None, None] + eps * eye
        _store(blocks, bounds, ids, _inverse_cholesky(cov))

    pooled = pooled / dof if dof else pooled
    few = counts < 2
    if bool(few.any()):
        _store(blocks, bounds, torch.nonzero(few).flatten(), _inverse_cholesky((pooled + eps * eye)[None]))
        logger.info("%d empty and %d one-member SOM nodes use the pooled covariance",
                    int((counts == 0).sum()), int((counts == 1).sum()))
    means = means.float()
    if not torch.isfinite(means).all():
        raise NumericalError(NON_FINITE)
    return NodeGaussians(means, blocks, _shifts(blocks, bounds, means), counts)


NON_FINITE = "non-finite node statistics (NaN/Inf in the training features?); check the input images"


def _store(blocks, bounds, ids: torch.Tensor, whiteners: torch.Tensor) -> None:
    """Write dense whiteners ``(G or 1, D, D)`` of nodes ``ids`` into the row blocks, checking them first
    (here, one group at a time, rather than on the full blocks: no block-sized temporaries)."""
    whiteners = whiteners.to(blocks[0].dtype)
    if not torch.isfinite(whiteners).all():
        raise NumericalError(NON_FINITE if whiteners.dtype != torch.float16 else
                             "node whiteners overflow float16; refit with factor_dtype='float32' or a larger eps")
    for (lo, hi), b in zip(bounds, blocks):
        b[ids] = whiteners[:, lo:hi, :hi]


def _inverse_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` for a batch of SPD matrices ``(G, D, D)`` (float64).

    A matrix that is not numerically positive definite (eps = 0 with fewer members than dimensions) gets a
    growing ridge ``1e-10 * 10^t * mean(diag)`` until its Cholesky factorisation succeeds.
    """
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    ridge = 1e-10
    while bool((info > 0).any()):
        bad = info > 0
        chol[bad], info[bad] = torch.linalg.cholesky_ex(cov[bad] + (ridge * scale[bad])[:, None, None] * eye)
        ridge *= 10.0
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def mahalanobis(x: torch.Tensor, nodes: torch.Tensor, gaussians: NodeGaussians, *,
                max_elements: int = 1 << 20, max_nodes: int = 64) -> torch.Tensor:
    """Mahalanobis distances from vectors to chosen nodes.

    Parameters
    ----------
    x : tensor (N, D)
    nodes : int64 tensor (N, k), node indices per vector
    gaussians : NodeGaussians
    max_elements, max_nodes : int
        Work per step: at most ``max_nodes`` nodes and ``max_elements`` vector entries.

    Returns
    -------
    tensor (N, k) float32, ``sqrt((x - mu)^T Sigma^{-1} (x - mu))``
    """
    n, k = nodes.shape
    d = x.shape[1]
    g = gaussians
    device = g.means.device
    flat = nodes.reshape(-1).to(device)
    x_pad = torch.cat([x.to(device, torch.float32), torch.zeros(1, d, device=device)])
    out = torch.empty(n * k, dtype=torch.float32, device=device)
    bounds = g.bounds
    # Reused buffers of max_nodes whiteners: small enough to stay in cache between the copy and the bmm
    # (a fresh W[ids] per step would page-fault and stream every whitener through memory twice).
    buffers = [torch.empty(max_nodes, *b.shape[1:], device=device) for b in g.blocks]
    staging = [torch.empty(max_nodes, *b.shape[1:], dtype=b.dtype, device=device) if b.dtype != torch.float32 else None
               for b in g.blocks]  # float16 blocks are gathered here, then widened into the float32 buffers
    # Pair j = (vector j // k, node flat[j]); grouping pairs by node lets each node whiten its vectors in one bmm.
    pair_vector = torch.cat([torch.arange(n * k, device=device) // k, torch.tensor([n], device=device)])
    for ids, rows, valid in padded_groups(flat, g.means.shape[0], max_elements=max(1, max_elements // d),
                                          max_groups=max_nodes):
        xv = x_pad[pair_vector[rows]]  # (G, L, D)
        shift = g.shifts[ids][:, None, :]
        total = None
        for (lo, hi), block, buf, stage in zip(bounds, g.blocks, buffers, staging):
            if stage is None:
                w = torch.index_select(block, 0, ids, out=buf[: ids.numel()])
            else:
                w = buf[: ids.numel()].copy_(torch.index_select(block, 0, ids, out=stage[: ids.numel()]))
            # Triangular: rows lo:hi of W only touch columns 0:hi of x.
            z = torch.baddbmm(shift[:, :, lo:hi], xv[:, :, :hi], w.transpose(1, 2), beta=-1.0)
            sq = (z * z).sum(-1)
            total = sq if total is None else total.add_(sq)
        out[rows[valid]] = total[valid]
    return out.view(n, k).clamp_min_(0.0).sqrt_()
