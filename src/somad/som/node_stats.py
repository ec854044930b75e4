"""Per-node Gaussian statistics and Mahalanobis distances.

One responsibility: given vectors and the node each belongs to, fit one Gaussian per node and measure
Mahalanobis distances from vectors to chosen nodes.

The rule for every node ``i`` with ``n_i`` members (the training patches whose nearest node is ``i``):

* ``n_i >= 2``: mean = member mean, covariance = ``cov(G_i)`` (unbiased) ``+ eps * I`` (as the paper's code);
  with ``shrinkage`` ``a > 0``: ``(1 - a) cov(G_i) + a P + eps * I``, shrunk toward the pooled within-node
  covariance ``P`` (as Ledoit and Wolf shrink toward a structured target; the scale of ``P`` follows the
  features', so one value of ``a`` suits any backbone, unlike ``eps`` alone).
* ``n_i == 1``: mean = the member; covariance = the pooled within-node covariance ``+ eps * I``. One sample
  has no spread, so it borrows the map's average spread instead of the degenerate ``eps * I`` alone.
* ``n_i == 0``: the node is *empty*: it is excluded from the nearest-node search at scoring time. Its stored
  mean is its SOM prototype and its covariance the pooled one ``+ eps * I``, so no array holds NaN.

The pooled within-node covariance is ``sum_i S_i / sum_i (n_i - 1)`` over nodes with ``n_i >= 2`` (``S_i``
the scatter matrix); zero when there are none. Each covariance is stored as the inverse of its Cholesky
factor, ``W_i = L_i^{-1}`` (lower triangular, packed in strips of 16 rows: :func:`strip_layout`), so that
``d_i(x)^2 = ||W_i (x - mu_i)||^2``.

Mergeable statistics (:class:`NodeMoments`): every rule above needs only each node's count ``n_i``, mean
``mu_i`` and scatter ``S_i`` (the sum of outer products about the mean, the un-normalised covariance). Two sets
of them, from two sets of patches assigned with the same SOM, combine exactly by Chan, Golub and LeVeque's
pairwise formula (:meth:`NodeMoments.merge`), so the Gaussians of ``A + B`` follow from those of ``A`` and the
patches of ``B`` alone (``SOMAD.update``, and the per-shard statistics of a distributed fit);
:func:`gaussians_from_moments` applies the rule above to them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from somad._native import hugepages, kernels
from somad._native.layout import STRIP, packed_size, strip_layout
from somad.errors import NumericalError
from somad.som.batching import padded_groups

logger = logging.getLogger(__name__)


def row_blocks(d: int, n: int = 4) -> tuple[tuple[int, int], ...]:
    """Split ``d`` rows into at most ``n`` nearly equal ``(lo, hi)`` blocks."""
    n = max(1, min(n, d))
    edges = [round(i * d / n) for i in range(n + 1)]
    return tuple((lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo)


@dataclass
class NodeGaussians:
    """Gaussian per node, in whitened form.

    Each whitener ``W_i = L_i^{-1}`` (``Sigma_i = L_i L_i^T``) is lower triangular and is stored packed in
    strips of 16 rows, each strip column by column (:func:`strip_layout`; the file layout): 54% of the dense
    bytes at D = 176. On CPU, :func:`mahalanobis` reads them in place (``somad._native.kernels``), 16 rows at a time
    with vector instructions. The torch path (CUDA, or no native kernels) uses row blocks that stop at the
    diagonal block, built on first use: block ``b`` holds rows ``lo:hi`` and columns ``0:hi``, 62.5% of the
    dense matrix with four blocks.

    Attributes
    ----------
    means : tensor (M, D) float32
    packed : tensor (M, packed_size(D)), float32 or float16, the packed whiteners
    counts : tensor (M,) int64, members per node
    """

    means: torch.Tensor
    packed: torch.Tensor
    counts: torch.Tensor
    moments: NodeMoments | None = field(default=None, repr=False, compare=False)  # kept when the model is updatable
    _torch_layout: tuple | None = field(default=None, repr=False, compare=False)  # (blocks, shifts), built lazily

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return row_blocks(self.means.shape[1])

    @property
    def empty(self) -> torch.Tensor:
        """Bool (M,): nodes without members, excluded from scoring."""
        return self.counts == 0

    @property
    def whiteners(self) -> torch.Tensor:
        """Dense lower-triangular whiteners ``(M, D, D)`` (a copy)."""
        m, d = self.means.shape
        rows, cols, positions = strip_layout(d, self.means.device)
        dense = torch.zeros(m, d, d, dtype=self.packed.dtype, device=self.means.device)
        dense[:, rows, cols] = self.packed[:, positions]
        return dense

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        """Row blocks ``(M, hi - lo, hi)``, one per ``(lo, hi)`` in ``bounds``, in the dtype of ``packed``."""
        return self._layout()[0]

    @property
    def shifts(self) -> torch.Tensor:
        """``W_i mu_i`` ``(M, D)`` float32."""
        return self._layout()[1]

    def _layout(self) -> tuple:
        if self._torch_layout is None:
            m, d = self.means.shape
            rows, cols, positions = strip_layout(d, self.means.device)
            bounds = self.bounds
            blocks = tuple(
                torch.zeros(m, hi - lo, hi, dtype=self.packed.dtype, device=self.means.device) for lo, hi in bounds
            )
            for (lo, hi), b in zip(bounds, blocks):
                entries = (rows >= lo) & (rows < hi)
                flat = (rows[entries] - lo) * hi + cols[entries]  # positions in a flattened (hi - lo, hi) block
                source = positions[entries]
                for start in range(0, m, 256):  # node chunks: no (M, ...) temporary
                    b[start : start + 256].view(-1, (hi - lo) * hi)[:, flat] = self.packed[start : start + 256, source]
            self._torch_layout = (blocks, _shifts(blocks, bounds, self.means))
        return self._torch_layout

    @classmethod
    def from_arrays(cls, means: torch.Tensor, packed: torch.Tensor, counts: torch.Tensor) -> NodeGaussians:
        """Rebuild from means ``(M, D)``, packed whiteners ``(M, packed_size(D))`` and counts.

        Float16 whiteners stay float16; any other dtype becomes float32.
        """
        m, d = means.shape
        if packed.shape != (m, packed_size(d)):
            raise ValueError(f"packed whiteners have shape {tuple(packed.shape)}, expected ({m}, {packed_size(d)})")
        packed = packed if packed.dtype == torch.float16 else packed.float()
        return cls(means.float().contiguous(), packed.contiguous(), counts.long())

    def to(self, device) -> NodeGaussians:
        moments = None if self.moments is None else self.moments.to(device)
        return NodeGaussians(self.means.to(device), self.packed.to(device), self.counts.to(device), moments)


def tril_size(d: int) -> int:
    """Entries of a row-packed ``D x D`` lower triangle (``torch.tril_indices`` order)."""
    return d * (d + 1) // 2


@dataclass
class NodeMoments:
    """Per-node sufficient statistics of the patches assigned to each node, mergeable across patch sets.

    Attributes
    ----------
    counts : tensor (M,) int64, members per node
    means : tensor (M, D) float64 (any value where the count is 0)
    scatter : tensor (M, D*(D+1)/2), the lower triangle of ``S_i = sum_j (x_j - mu_i)(x_j - mu_i)^T``, row-packed
        (``torch.tril_indices`` order); float64 when computed, or the dtype it was stored in (read float64)
    """

    counts: torch.Tensor
    means: torch.Tensor
    scatter: torch.Tensor

    @property
    def dims(self) -> int:
        return self.means.shape[1]

    @classmethod
    def zeros(cls, m: int, d: int, device=None) -> NodeMoments:
        return cls(
            torch.zeros(m, dtype=torch.int64, device=device),
            torch.zeros(m, d, dtype=torch.float64, device=device),
            torch.zeros(m, tril_size(d), dtype=torch.float64, device=device),
        )

    @classmethod
    def of(cls, x: torch.Tensor, assignment: torch.Tensor, m: int, *, max_elements: int = 1 << 24) -> NodeMoments:
        """The statistics of vectors ``x`` ``(N, D)`` assigned to nodes ``assignment`` ``(N,)``, in float64: the
        means first, then each node's scatter about its own mean (no cancellation), as ``fit_node_gaussians``."""
        assignment = assignment.to(x.device)
        counts, means = _member_means(x, assignment, m, x.device)
        scatter = torch.zeros(m, tril_size(x.shape[1]), dtype=torch.float64, device=x.device)
        for ids, s in _group_scatters(x, assignment, counts, means, max_elements):
            scatter[ids] = _tril(s)
        return cls(counts, means, scatter)

    def merge(self, other: NodeMoments, *, inplace: bool = False) -> NodeMoments:
        """The statistics of both patch sets (Chan et al.'s pairwise update, float64):
        ``n = n_a + n_b``, ``mu = mu_a + delta n_b / n``, ``S = S_a + S_b + delta delta^T n_a n_b / n`` with
        ``delta = mu_b - mu_a``. Only the nodes ``other`` has members in change. ``inplace``: update this
        object's arrays where they are already float64 (no copy of the ``M x D(D+1)/2`` scatter)."""
        if other.means.shape != self.means.shape:
            raise ValueError(
                f"node statistics of shape {tuple(other.means.shape)} cannot merge into {tuple(self.means.shape)}"
            )
        counts = self.counts + other.counts.to(self.counts.device)
        own = inplace and self.means.dtype == torch.float64
        means = self.means if own else self.means.double().clone()
        own = inplace and self.scatter.dtype == torch.float64
        scatter = self.scatter if own else self.scatter.double()
        scatter = scatter.clone() if (scatter is self.scatter and not own) else scatter
        ids = torch.nonzero(other.counts > 0).flatten().to(self.counts.device)
        rows, cols = torch.tril_indices(self.dims, self.dims, device=self.means.device)
        for start in range(0, ids.numel(), 256):  # node chunks: (256, D*(D+1)/2) temporaries
            sel = ids[start : start + 256]
            na, nb = self.counts[sel].double(), other.counts[sel].double()
            n = na + nb
            mb = other.means[sel].double()
            delta = mb - means[sel]
            means[sel] = means[sel] + delta * (nb / n)[:, None]
            cross = delta[:, rows] * delta[:, cols] * (na * nb / n)[:, None]
            scatter[sel] = scatter[sel] + other.scatter[sel].double() + cross
        if inplace:
            self.counts, self.means, self.scatter = counts, means, scatter
            return self
        return NodeMoments(counts, means, scatter)

    def dense(self, ids: torch.Tensor) -> torch.Tensor:
        """The full scatter matrices ``(G, D, D)`` float64 of nodes ``ids``."""
        d = self.dims
        rows, cols = torch.tril_indices(d, d, device=self.scatter.device)
        tril = self.scatter[ids].double()
        out = torch.zeros(ids.numel(), d, d, dtype=torch.float64, device=self.scatter.device)
        out[:, rows, cols] = tril
        out[:, cols, rows] = tril
        return out

    def to(self, device) -> NodeMoments:
        return NodeMoments(self.counts.to(device), self.means.to(device), self.scatter.to(device))


def _tril(dense: torch.Tensor) -> torch.Tensor:
    d = dense.shape[-1]
    rows, cols = torch.tril_indices(d, d, device=dense.device)
    return dense[:, rows, cols]


def _group_scatters(x, assignment, counts, means, max_elements):
    """Yield ``(ids, scatter)``: the scatter matrices ``(G, D, D)`` float64 of groups of nodes with 2 or more
    members about their means, computed member block by member block (a huge node never needs a huge copy)."""
    m, d = means.shape
    device = means.device
    groups = padded_groups(
        assignment, m, max_elements=max(1, max_elements // d), max_groups=max(1, max_elements // (d * d))
    )
    for ids, rows, valid in groups:
        many = counts[ids] >= 2
        if not bool(many.any()):
            continue
        ids, rows, valid = ids[many], rows[many], valid[many]
        scatter = torch.empty(ids.numel(), d, d, dtype=torch.float64, device=device)
        centre = means[ids][:, None, :]
        step = max(1, max_elements // (ids.numel() * d))  # members per pass: a huge node never needs a huge copy
        for c in range(0, rows.shape[1], step):
            # Padding entries point one past the end: clamp them to a real row, then zero them with the mask.
            members = x[rows[:, c : c + step].clamp_max(x.shape[0] - 1).to(x.device)].to(device, torch.float64)
            members.sub_(centre).mul_(valid[:, c : c + step, None])
            # (+)= outer products of the centred members; the first pass writes, so no zero-filled buffer
            scatter.baddbmm_(members.transpose(1, 2), members, beta=1.0 if c else 0.0)
        yield ids, scatter


def _member_means(x: torch.Tensor, assignment: torch.Tensor, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Members per node ``(M,)`` and their mean ``(M, D)`` in float64 (zero for an empty node)."""
    counts = torch.bincount(assignment, minlength=m)
    sums = torch.zeros(m, x.shape[1], dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], 65536):
        sums.index_add_(0, assignment[start : start + 65536], x[start : start + 65536].to(device, torch.float64))
    return counts, sums / counts.clamp_min(1)[:, None]


def _shifts(blocks, bounds, means: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``W_i mu_i`` for every node, block by block, in float32: ``(M, D)``."""
    out = torch.empty_like(means)
    for (lo, hi), b in zip(bounds, blocks):
        for start in range(0, means.shape[0], chunk):  # node chunks: float16 blocks are widened a chunk at a time
            sl = slice(start, start + chunk)
            out[sl, lo:hi] = torch.einsum("mij,mj->mi", b[sl].float(), means[sl, :hi])
    return out


def fit_node_gaussians(
    x: torch.Tensor,
    assignment: torch.Tensor,
    prototypes: torch.Tensor,
    eps: float,
    *,
    max_elements: int = 1 << 24,
    dtype: torch.dtype = torch.float32,
    shrinkage: float = 0.0,
    keep_moments: bool = False,
) -> NodeGaussians:
    """Fit the per-node Gaussians (see the module docstring for the rule).

    Parameters
    ----------
    x : tensor (N, D), any float dtype
    assignment : int64 tensor (N,), node of each vector
    prototypes : tensor (M, D), SOM weights (means of empty nodes)
    eps : float, >= 0
    shrinkage : float in [0, 1]
        Weight of the pooled within-node covariance in every node's covariance (0: none, the paper's rule).
    dtype : torch.float32 or torch.float16
        Storage of the whitener triangles (float16: half the memory and file; scoring computes in float32).
        Factors that overflow float16 switch the whole array to float32 (logged).
    keep_moments : bool
        Also keep each node's :class:`NodeMoments` (``.moments``), so that more patches can be merged later
        (:func:`gaussians_from_moments`); costs ``M * D * (D + 1) / 2`` float64 in memory.
    """
    m, d = prototypes.shape
    device = prototypes.device
    if keep_moments:
        moments = NodeMoments.of(x.to(device), assignment, m, max_elements=max_elements)
        return gaussians_from_moments(
            moments, prototypes, eps, max_elements=max_elements, dtype=dtype, shrinkage=shrinkage
        )
    assignment = assignment.to(device)
    counts, means = _member_means(x, assignment, m, device)
    means = torch.where(counts[:, None] > 0, means, prototypes.double())

    # On CPU the whiteners may sit on huge pages (scoring reads them all, in a new order, for every image).
    packed = hugepages.zeros((m, packed_size(d)), dtype, device)
    pooled = torch.zeros(d, d, dtype=torch.float64, device=device)
    dof = 0
    target = _pooled_covariance(x, counts, means) if shrinkage > 0 else None
    for ids, scatter in _group_scatters(x, assignment, counts, means, max_elements):
        pooled += scatter.sum(0)
        dof += int((counts[ids] - 1).sum())
        cov = scatter.div_((counts[ids] - 1).double()[:, None, None])  # in place: these are the group's largest arrays
        if target is not None:
            cov.mul_(1.0 - shrinkage).add_(target, alpha=shrinkage)
        cov.diagonal(dim1=-2, dim2=-1).add_(eps)
        packed = _store(packed, ids, inverse_cholesky(cov))

    pooled = pooled / dof if dof else pooled
    if target is not None:
        pooled = target
    return _with_pooled_rule(packed, counts, means, pooled, eps)


def gaussians_from_moments(
    moments: NodeMoments,
    prototypes: torch.Tensor,
    eps: float,
    *,
    max_elements: int = 1 << 24,
    dtype: torch.dtype = torch.float32,
    shrinkage: float = 0.0,
) -> NodeGaussians:
    """The per-node Gaussians of the module docstring's rule from per-node statistics (the same result as
    :func:`fit_node_gaussians` on the patches they summarise, within float64 rounding); ``.moments`` keeps them.
    """
    m, d = prototypes.shape
    device = prototypes.device
    moments = moments.to(device)
    counts = moments.counts
    means = torch.where(counts[:, None] > 0, moments.means.double(), prototypes.double())
    many = torch.nonzero(counts >= 2).flatten()
    step = max(1, max_elements // (d * d))
    pooled = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, many.numel(), step):  # pass 1: the pooled within-node covariance
        pooled += moments.dense(many[start : start + step]).sum(0)
    dof = int((counts - 1).clamp_min(0).sum())
    pooled = pooled / dof if dof else pooled
    packed = hugepages.zeros((m, packed_size(d)), dtype, device)
    for start in range(0, many.numel(), step):  # pass 2: each node's covariance and whitener
        ids = many[start : start + step]
        cov = moments.dense(ids).div_((counts[ids] - 1).double()[:, None, None])
        if shrinkage > 0:
            cov.mul_(1.0 - shrinkage).add_(pooled, alpha=shrinkage)
        cov.diagonal(dim1=-2, dim2=-1).add_(eps)
        packed = _store(packed, ids, inverse_cholesky(cov))
    return _with_pooled_rule(packed, counts.clone(), means, pooled, eps, moments)


def _with_pooled_rule(packed, counts, means, pooled, eps: float, moments=None) -> NodeGaussians:
    """The last step of both paths: nodes with fewer than two members get the pooled covariance (+ eps I),
    then the means are checked and the Gaussians assembled."""
    few = counts < 2
    if bool(few.any()):
        eye = torch.eye(pooled.shape[0], dtype=torch.float64, device=pooled.device)
        packed = _store(packed, torch.nonzero(few).flatten(), inverse_cholesky((pooled + eps * eye)[None]))
        logger.info(
            "%d empty and %d one-member SOM nodes use the pooled covariance",
            int((counts == 0).sum()),
            int((counts == 1).sum()),
        )
    means = means.float()
    if not torch.isfinite(means).all():
        raise NumericalError(NON_FINITE)
    return NodeGaussians(means, packed, counts, moments)


def _pooled_covariance(x: torch.Tensor, counts: torch.Tensor, means: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """The pooled within-node covariance ``sum_i S_i / sum_i (n_i - 1)`` in one pass over ``x``, before any node's
    scatter is formed: ``sum_i S_i = sum_n (x_n - c)(x_n - c)^T - sum_i n_i (mu_i - c)(mu_i - c)^T`` (``c`` the
    overall mean, subtracted first so that float32 products lose nothing to cancellation)."""
    d = means.shape[1]
    centre = ((counts.double()[:, None] * means).sum(0) / counts.sum()).to(means.device)
    total = torch.zeros(d, d, dtype=torch.float64, device=means.device)
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk].to(means.device, torch.float32) - centre.float()
        total += (block.T @ block).double()
    shifted = (means - centre) * counts.double().sqrt()[:, None]
    dof = int((counts - 1).clamp_min(0).sum())
    return (total - shifted.T @ shifted) / max(dof, 1)


NON_FINITE = "non-finite node statistics (NaN/Inf in the training features?); check the input images"


def _store(packed: torch.Tensor, ids: torch.Tensor, whiteners: torch.Tensor) -> torch.Tensor:
    """Write dense whiteners ``(G or 1, D, D)`` of nodes ``ids`` into ``packed`` (:func:`strip_layout`),
    checking them first (here, one group at a time, rather than on the whole array: no array-sized temporaries).

    Returns ``packed``, or a float32 copy of it when these whiteners overflow float16 (tiny spreads, e.g.
    ``eps=0``): the factors are then kept in float32, with a warning, rather than failing the fit.
    """
    if not torch.isfinite(whiteners.sum()):  # NaN or inf anywhere makes the sum non-finite: one pass
        raise NumericalError(NON_FINITE)
    group = _pack(whiteners, packed.dtype)
    if packed.dtype == torch.float16 and not torch.isfinite(group.sum(dtype=torch.float32)):
        logger.warning(
            "node covariance factors overflow float16 (largest entry %.3g; eps too small?): they are kept in float32",
            float(whiteners.abs().max()),
        )
        packed, group = packed.float(), _pack(whiteners, torch.float32)
    packed[ids] = group
    return packed


def _pack(whiteners: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense lower-triangular whiteners ``(G, D, D)`` -> packed ``(G, packed_size(D))`` (:func:`strip_layout`),
    a strided copy per strip. The entries above the diagonal are those of the dense matrices: zeros."""
    g, d, _ = whiteners.shape
    out = torch.zeros(g, packed_size(d), dtype=dtype, device=whiteners.device)
    start = 0
    for r0 in range(0, d, STRIP):
        rows, cols = min(STRIP, d - r0), min(r0 + STRIP, d)
        out[:, start : start + STRIP * cols].view(g, cols, STRIP)[:, :, :rows] = whiteners[
            :, r0 : r0 + rows, :cols
        ].transpose(1, 2)  # column c's 16 entries are contiguous
        start += STRIP * cols
    return out


RIDGE_STEPS = 16  # 1e-10 .. 1e5 times the mean variance


def inverse_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` for a batch of SPD matrices ``(G, D, D)`` (float64).

    A matrix that is not numerically positive definite (eps = 0 with fewer members than dimensions) gets a
    growing ridge ``1e-10 * 10^t * mean(diag)`` until its Cholesky factorisation succeeds, at most
    :data:`RIDGE_STEPS` times; a matrix with NaN or Inf entries, or one still not factorisable, is a
    :class:`NumericalError` (never an endless retry).
    """
    d = cov.shape[-1]
    if not bool(torch.isfinite(cov).all()):
        raise NumericalError(NON_FINITE)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    scale = cov.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
    ridge = 1e-10
    for _ in range(RIDGE_STEPS):
        if not bool((info > 0).any()):
            break
        bad = info > 0
        chol[bad], info[bad] = torch.linalg.cholesky_ex(cov[bad] + (ridge * scale[bad])[:, None, None] * eye)
        ridge *= 10.0
    if bool((info > 0).any()):
        raise NumericalError("a covariance is not positive definite even with a large ridge; use a larger eps")
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def mahalanobis(x: torch.Tensor, nodes: torch.Tensor, gaussians: NodeGaussians) -> torch.Tensor:
    """Mahalanobis distances from vectors to chosen nodes.

    On CPU a native kernel (``somad._native.kernels.whitened_sq_norms``) whitens each node's vectors in place; on
    other devices, or where the kernels are not built, batched matrix products over row blocks
    (:func:`mahalanobis_torch`).

    Parameters
    ----------
    x : tensor (N, D)
    nodes : int64 tensor (N, k), node indices per vector
    gaussians : NodeGaussians

    Returns
    -------
    tensor (N, k) float32, ``sqrt((x - mu)^T Sigma^{-1} (x - mu))``
    """
    if gaussians.means.device.type == "cpu" and kernels.AVAILABLE:
        return _mahalanobis_kernel(x, nodes, gaussians)
    return mahalanobis_torch(x, nodes, gaussians)


def _mahalanobis_kernel(x: torch.Tensor, nodes: torch.Tensor, g: NodeGaussians) -> torch.Tensor:
    if x.shape[1] != g.means.shape[1]:
        raise ValueError(f"vectors have {x.shape[1]} features, the node Gaussians {g.means.shape[1]}")
    xs = x.detach().to("cpu", torch.float32).contiguous().numpy()
    sq = kernels.whitened_sq_norms(xs, nodes.cpu().contiguous().numpy(), g.means.numpy(), g.packed.numpy())
    return torch.from_numpy(sq).clamp_min_(0.0).sqrt_()


def mahalanobis_torch(
    x: torch.Tensor, nodes: torch.Tensor, gaussians: NodeGaussians, *, max_elements: int = 1 << 20, max_nodes: int = 64
) -> torch.Tensor:
    """:func:`mahalanobis` with torch ops only (any device): ``max_elements`` and ``max_nodes`` bound the
    vector entries and nodes per step."""
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
    staging = [
        torch.empty(max_nodes, *b.shape[1:], dtype=b.dtype, device=device) if b.dtype != torch.float32 else None
        for b in g.blocks
    ]  # float16 blocks are gathered here, then widened into the float32 buffers
    # Pair j = (vector j // k, node flat[j]); grouping pairs by node lets each node whiten its vectors in one bmm.
    pair_vector = torch.cat([torch.arange(n * k, device=device) // k, torch.tensor([n], device=device)])
    for ids, rows, valid in padded_groups(
        flat, g.means.shape[0], max_elements=max(1, max_elements // d), max_groups=max_nodes
    ):
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
