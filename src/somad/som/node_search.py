"""Nearest-node search behind one interface: exhaustive, or an inverted-file index (IVF-Flat, as in faiss).

One responsibility: given node vectors, return the k nearest nodes (Euclidean) of query vectors. Every index
has ``search(x, k, projected=None) -> (sq_dist, index)`` and ``project(x, reuse=None)`` (queries projected once
for an index and the indices warm-started from it; ``None`` where an index does not project). They are built
by name from :data:`SEARCHES` with :func:`make_search`.

* :class:`ExactSearch` (``"exact"``) is exhaustive: one matmul per chunk of queries, ``N * M * D``
  multiply-adds (:func:`nearest_nodes`).
* :class:`IVFSearch` (``"ivf"``) is an inverted-file index over the SOM's nodes: ``nlist`` lists (about
  ``M / 16``) by k-means, initialised with the means of 4 x 4 blocks of the SOM grid (so the lists start as
  topological neighbourhoods and the result is deterministic). A query is compared with the list centroids,
  in the ``R``-dimensional principal subspace of the node vectors (default R = 48), then exhaustively, in
  full, with the nodes of its ``nprobe`` nearest lists: ``N * (D * R + nlist * R + nprobe * M/nlist * D)``
  multiply-adds instead of ``N * M * D``. It can miss a true neighbour that lies in an unprobed list;
  ``tests/test_node_search.py`` and docs/benchmarks.md measure how often, and ``nprobe = nlist`` makes it
  exact. Maps of fewer than 1024 nodes are searched exhaustively (cheap already).
"""

from __future__ import annotations

import logging

import torch

from somad._native import kernels
from somad.som.batching import padded_groups

logger = logging.getLogger(__name__)


def nearest_nodes(
    x: torch.Tensor, weights: torch.Tensor, k: int = 1, *, exclude: torch.Tensor | None = None, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive k nearest nodes by Euclidean distance.

    Parameters
    ----------
    x : tensor (N, D)
    weights : tensor (M, D)
    k : int
    exclude : bool tensor (M,), optional
        Nodes never returned (e.g. nodes without members).

    Returns
    -------
    sq_dist : tensor (N, k) float32, squared distances, ascending
    index : tensor (N, k) int64
    """
    w = weights.float()
    w_sq = (w * w).sum(1)
    if exclude is not None:
        w_sq = w_sq.masked_fill(exclude, float("inf"))  # excluded nodes are infinitely far
    dists, idx = [], []
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start : start + chunk_size].to(w.device, torch.float32)
        # ||x - w||^2 = ||x||^2 - 2 x.w + ||w||^2; the ||x||^2 term does not change the ranking, add it after top-k.
        d = torch.addmm(w_sq, xc, w.T, beta=1.0, alpha=-2.0)
        dk, ik = smallest(d, k)
        dists.append((dk + (xc * xc).sum(1, keepdim=True)).clamp_min_(0.0))  # rounding can go below 0
        idx.append(ik)
    return torch.cat(dists), torch.cat(idx)


def smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest values of each row of ``d`` ``(N, M)`` and their columns, ascending.

    For k <= 4 on short rows, k passes of ``min`` (masking each winner) beat ``topk``, whose per-row cost
    dominates on CPU; on long rows (the exhaustive search) ``topk`` wins.
    """
    if k > 4 or (k > 1 and d.shape[1] > 1024):
        return torch.topk(d, k, dim=1, largest=False, sorted=True)
    if k == 1:
        v, i = d.min(1, keepdim=True)
        return v, i
    d = d.clone()
    vals, idx = [], []
    for _ in range(k):
        v, i = d.min(1, keepdim=True)
        vals.append(v)
        idx.append(i)
        d.scatter_(1, i, float("inf"))
    return torch.cat(vals, 1), torch.cat(idx, 1)


class ExactSearch:
    """Exhaustive k-nearest-node search (:func:`nearest_nodes`), with the interface of :class:`IVFSearch`."""

    def __init__(self, weights: torch.Tensor, size: int | None = None, *, exclude: torch.Tensor | None = None, **_):
        self._weights, self._exclude = weights, exclude

    def __call__(self, x: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.search(x, k)

    def search(self, x: torch.Tensor, k: int = 1, *, projected=None) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_nodes(x, self._weights, k, exclude=self._exclude)

    def project(self, x: torch.Tensor, reuse=None):
        return None


class IVFSearch:
    """Approximate k-nearest-node search over the nodes of a ``size x size`` SOM: an inverted-file index.

    Parameters
    ----------
    weights : tensor (size*size, D)
        Node vectors.
    size : int
        SOM grid side.
    nprobe : int, default 8
        Lists searched per query (more: slower, closer to exact).
    exclude : bool tensor (size*size,), optional
        Nodes never returned.
    block : int, default 4
        Side of the grid blocks whose means initialise the clusters (about ``block**2`` nodes per cluster).
    iterations : int, default 10
        k-means iterations on the node vectors.
    coarse_dims : int or None, default 48
        Queries are ranked against the cluster centres after projecting both on this many principal axes of
        the node vectors (48 of EfficientNet-Lite0's 176 dims hold 98-99% of the nodes' variance on the shared
        data: the ranking's cost halves, and the exact top-4 is missed for about 0.2% more queries than when
        ranking in full). ``None``, or at least D: no projection.
    warm_start : IVFSearch, optional
        An index of a slightly different version of the same nodes (the SOM's previous epoch): its clusters
        are refreshed by two k-means steps instead of being recomputed, and its principal axes are kept (no SVD).

    Attributes
    ----------
    centres_ : tensor (C, D) float32
    members_ : int64 tensor (C, L): node ids of each cluster, padded with ``M`` (a node at infinity)
    labels_ : int64 tensor (M',): the cluster of each searched node (the nodes not excluded, in order)
    """

    def __init__(
        self,
        weights: torch.Tensor,
        size: int,
        *,
        nprobe: int = 8,
        exclude: torch.Tensor | None = None,
        block: int = 4,
        iterations: int = 10,
        coarse_dims: int | None = 48,
        warm_start: IVFSearch | None = None,
    ):
        w = weights.float()
        m, d = w.shape
        keep = torch.ones(m, dtype=torch.bool, device=w.device) if exclude is None else ~exclude.to(w.device)
        ids = torch.nonzero(keep).flatten()
        if ids.numel() == 0:
            raise ValueError("every node is excluded; nothing to search")
        warm = warm_start if warm_start is not None and torch.equal(warm_start._ids, ids) else None
        if warm is not None:  # two Lloyd steps refresh the previous partition; it need not settle to be searched
            start, iterations = warm.labels_, min(iterations, 1)
        else:
            rows, cols = ids // size, ids % size
            nb = -(-size // block)  # ceil: blocks per grid side
            start = (rows // block) * nb + cols // block
        labels = _kmeans(w[ids], start, iterations)
        self._weights, self._exclude, self._ids = w, ~keep, ids
        counts = torch.bincount(labels)
        used = torch.nonzero(counts).flatten()
        labels = torch.searchsorted(used, labels)  # renumber the non-empty clusters 0..C-1
        self.labels_ = labels
        counts = counts[used]
        c = used.numel()
        # One padded block holding every cluster: rows index ``ids``, padding points at node M (at infinity).
        order, rows, _ = next(padded_groups(labels, c, max_elements=c * int(counts.max())))
        self.members_ = torch.empty_like(rows)
        self.members_[order] = torch.cat([ids, torch.tensor([m], device=w.device)])[rows]
        self.centres_ = (
            torch.zeros(c, d, dtype=torch.float64, device=w.device)
            .index_add_(0, labels, w[ids].double())
            .div_(counts[:, None])
            .float()
        )
        self.min_size_ = int(counts.min())
        self.nprobe = max(1, min(int(nprobe), c))
        self._torch_members = None  # (C, L, D) weights and (C, L) squared norms, built by the torch path only
        self.coarse_dims = None if coarse_dims is None or int(coarse_dims) >= d else max(1, int(coarse_dims))
        if warm is not None and warm.coarse_dims == self.coarse_dims:
            self._axes = warm._axes
        elif self.coarse_dims:
            kept = w[ids].double()
            mean = kept.mean(0)
            self._axes = (
                torch.linalg.svd(kept - mean, full_matrices=False).Vh[: self.coarse_dims],
                mean,
            )  # (R, D), (D,)
        else:
            self._axes = None
        if self._axes is not None:
            axes, mean = self._axes
            self._projection = (axes.T.float().contiguous(), (-(mean @ axes.T)).float())  # x @ A^T - mean @ A^T
            self._coarse_centres = ((self.centres_.double() - mean) @ axes.T).float()
        else:
            self._projection, self._coarse_centres = None, self.centres_
        self._coarse_sq = (self._coarse_centres * self._coarse_centres).sum(1)
        self._panels = (
            _panels(self.members_, w, counts, self._coarse_centres, self._projection)
            if w.device.type == "cpu"
            else None
        )

    @property
    def nlist(self) -> int:
        return self.centres_.shape[0]

    # What a graph that searches as this index does needs (``somad.som.onnx_graph``), read-only.
    @property
    def ids(self) -> torch.Tensor:
        """int64 ``(M',)``: the searched nodes (those not excluded), ascending."""
        return self._ids

    @property
    def weights(self) -> torch.Tensor:
        """``(M, D)`` float32: every node vector (excluded ones included; ``members_`` indexes it)."""
        return self._weights

    @property
    def projection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(axes^T (D, R), shift (R,))``: queries are ranked as ``x @ axes^T + shift``; ``None``: unprojected."""
        return self._projection

    @property
    def coarse_centres(self) -> torch.Tensor:
        """``(C, R)``: the list centres in the ranking's space (projected, or ``centres_``); ``coarse_sq``: norms."""
        return self._coarse_centres

    @property
    def coarse_sq(self) -> torch.Tensor:
        return self._coarse_sq

    def exhaustive_for(self, k: int) -> bool:
        """Whether a search for ``k`` neighbours is exhaustive: the probed lists might hold fewer than ``k`` nodes."""
        return k > self.nprobe * self.min_size_

    def __call__(self, x: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.search(x, k)

    def search(
        self, x: torch.Tensor, k: int = 1, *, chunk_size: int = 8192, projected=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate k nearest nodes.

        Parameters
        ----------
        x : tensor (N, D)
        k : int, at most ``nprobe`` times the smallest cluster (else the search is exhaustive)
        projected : optional
            ``project(x)`` of this index or of one it was warm-started from (the same principal axes): the
            queries' projections are then not recomputed. Ignored if the axes differ.

        Returns
        -------
        sq_dist : tensor (N, k) float32, ascending
        index : tensor (N, k) int64
        """
        if self.exhaustive_for(k):  # the probed clusters might hold fewer than k nodes
            return nearest_nodes(x, self._weights, k, exclude=self._exclude)
        # The outputs are allocated once and filled chunk by chunk: small per-chunk results kept between the
        # chunks' large temporaries would pin them in the heap (glibc), and a large fit's RSS would creep up.
        device = self.centres_.device
        sq = torch.empty(x.shape[0], k, device=device)
        index = torch.empty(x.shape[0], k, dtype=torch.int64, device=device)
        xc = projected[1] if projected is not None and projected[0] is self._axes else None
        for s in range(0, x.shape[0], chunk_size):
            self._search(
                x[s : s + chunk_size],
                k,
                sq[s : s + chunk_size],
                index[s : s + chunk_size],
                None if xc is None else xc[s : s + chunk_size],
            )
        return sq, index

    def project(self, x: torch.Tensor, reuse=None):
        """``x`` ``(N, D)`` projected on this index's principal axes, tagged with them, for :meth:`search`
        (of this index or of later ones warm-started from it); ``None`` without a projection. ``reuse``, an
        earlier projection of the same ``x``, is returned as it is if it was made on these axes."""
        if self._axes is None:
            return None
        if reuse is not None and reuse[0] is self._axes:
            return reuse
        return self._axes, self._coarse_vectors(x.to(self.centres_.device, torch.float32))

    def _search(
        self, x: torch.Tensor, k: int, out_sq: torch.Tensor, out_index: torch.Tensor, xc: torch.Tensor | None = None
    ) -> None:
        xf = x.to(self.centres_.device, torch.float32).contiguous()
        if self._panels is not None and kernels.AVAILABLE:
            centres, centre_sq, panels, lane_start, lane_ids, lane_sq, projection = self._panels
            kernels.probe_nearest(
                xf.numpy(),
                centres,
                centre_sq,
                self.nprobe,
                panels,
                lane_start,
                lane_ids,
                lane_sq,
                k,
                pad=self._weights.shape[0],
                projection=projection,
                projected=None if xc is None else xc.contiguous().numpy(),
                out=(out_sq.numpy(), out_index.numpy()),
            )
            return
        dk, nodes = self._probe_torch(xf, self._rank(self._coarse_vectors(xf) if xc is None else xc), k)
        out_sq.copy_(dk)
        out_index.copy_(nodes)

    def _coarse_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Queries as compared with the cluster centres: ``(N, R)`` projected, or ``x`` itself."""
        if self._projection is None:
            return x
        axes_t, shift = self._projection
        return torch.addmm(shift, x, axes_t)

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        """The ranking of the clusters for each query: ``(N, C)``, squared distances to the centres (projected
        on ``coarse_dims`` axes) up to a per-query constant; smaller = nearer."""
        return self._rank(self._coarse_vectors(x))

    def _rank(self, xc: torch.Tensor) -> torch.Tensor:
        """:meth:`coarse` of queries already projected (``_coarse_vectors``)."""
        return torch.addmm(self._coarse_sq, xc, self._coarse_centres.T, beta=1.0, alpha=-2.0)

    def _probe_torch(
        self, xf: torch.Tensor, coarse: torch.Tensor, k: int, max_elements: int = 1 << 22
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The probing step with torch ops only (any device): pairs grouped by cluster, one bmm per block."""
        device = xf.device
        n, p = xf.shape[0], self.nprobe
        probes = torch.topk(coarse, p, dim=1, largest=False, sorted=False).indices  # (N, P)
        length = self.members_.shape[1]
        cand_sq = torch.empty(n * p, length, device=device)
        x_pad = torch.cat([xf, torch.zeros(1, xf.shape[1], device=device)])
        query = torch.cat([torch.arange(n * p, device=device) // p, torch.tensor([n], device=device)])
        if self._torch_members is None:
            w = self._weights
            w_pad = torch.cat([w, torch.zeros(1, w.shape[1], device=device)])
            sq_pad = torch.cat([(w * w).sum(1), torch.tensor([float("inf")], device=device)])  # padding never wins
            self._torch_members = (w_pad[self.members_], sq_pad[self.members_])  # each cluster's nodes, for bmm
        member_weights, member_sq = self._torch_members
        # Group the (query, probed cluster) pairs by cluster: one bmm per block of clusters, no per-query gather.
        groups = padded_groups(
            probes.reshape(-1), self.nlist, max_elements=max(1, max_elements // max(length, xf.shape[1]))
        )
        for ids, rows, valid in groups:
            # (nodes x dims) @ (dims x queries) runs ~1.5x faster than the transposed product for these shapes.
            dot = torch.bmm(member_weights[ids], x_pad[query[rows]].transpose(1, 2)).transpose(1, 2)
            cand_sq[rows[valid]] = (member_sq[ids][:, None, :] - 2.0 * dot)[valid]
        dk, pos = smallest(cand_sq.view(n, p * length), k)
        nodes = self.members_[probes].reshape(n, p * length).gather(1, pos)
        dk = (dk + (xf * xf).sum(1, keepdim=True)).clamp_min_(0.0)  # rounding can go below 0
        return dk, nodes


def _panels(
    members: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    centres: torch.Tensor,
    projection: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple:
    """The arrays of :func:`somad._native.kernels.probe_nearest`: the (coarse) centres ``(C, R)`` and each cluster's
    members (``members`` ``(C, L)``: the first ``counts[i]`` entries of row i index ``weights`` ``(M, D)``) as
    panels: ``(R or D, width)``, vectors side by side, the width rounded up to 8 with zero columns whose
    squared norm is inf; the projection ``(axes (D, R), shift (R,))`` with its width rounded up to 8 likewise.

    Returns ``(centres (R, Cw), centre_sq (Cw,), panels (D * W,), lane_start (C + 1,), lane_ids (W,),
    lane_sq (W,), projection (axes (D, Rw), shift (Rw,)) or None)`` as numpy arrays; padding lanes have id M.
    """
    c, r = centres.shape
    m, d = weights.shape
    cw = -(-c // 8) * 8
    centre_panel = torch.zeros(r, cw)
    centre_panel[:, :c] = centres.T
    centre_sq = torch.full((cw,), float("inf"))
    centre_sq[:c] = (centres * centres).sum(1)
    widths = (counts + 7) // 8 * 8
    lane_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(widths, 0)])
    lanes = int(lane_start[-1])
    valid = torch.arange(members.shape[1])[None, :] < counts[:, None]  # (C, L): members sit first in each row
    cluster, slot = torch.nonzero(valid, as_tuple=True)
    nodes = members[cluster, slot]
    lane = lane_start[cluster] + slot
    lane_ids = torch.full((lanes,), m, dtype=torch.int64)
    lane_ids[lane] = nodes
    lane_sq = torch.full((lanes,), float("inf"))
    lane_sq[lane] = (weights[nodes] * weights[nodes]).sum(1)
    # Cluster i's panel is (D, width_i) from D * lane_start[i]: dimension j of its member in slot s sits at
    # D * lane_start[i] + j * width_i + s.
    panels = torch.zeros(d * lanes)
    where = (d * lane_start[cluster])[:, None] + torch.arange(d)[None, :] * widths[cluster][:, None] + slot[:, None]
    panels[where.reshape(-1)] = weights[nodes].reshape(-1)
    if projection is not None:
        axes, shift = projection
        rw = -(-r // 8) * 8
        axes_panel, shift_panel = torch.zeros(d, rw), torch.zeros(rw)
        axes_panel[:, :r], shift_panel[:r] = axes, shift
        projection = (axes_panel.numpy(), shift_panel.numpy())
    arrays = (centre_panel, centre_sq, panels, lane_start, lane_ids, lane_sq)
    return tuple(a.contiguous().numpy() for a in arrays) + (projection,)


def _kmeans(x: torch.Tensor, labels: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's k-means from the initial partition ``labels`` (``iterations + 1`` steps at most); returns the
    final labels (N,)."""
    for _ in range(iterations + 1):
        c = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=c).to(x.dtype)
        centres = torch.zeros(c, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
        centres = centres / counts.clamp_min(1)[:, None]
        sq = (centres * centres).sum(1).masked_fill(counts == 0, float("inf"))  # an emptied cluster stays empty
        new = torch.addmm(sq, x, centres.T, beta=1.0, alpha=-2.0).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


#: The nearest-node searches by name (``SOMAD(search=...)``).
SEARCHES = {"ivf": IVFSearch, "exact": ExactSearch}
SEARCH_CHOICES = tuple(SEARCHES)
#: Below this many nodes, ``"ivf"`` searches exhaustively: the full comparison is already cheap.
IVF_MIN_NODES = 1024


def make_search(
    weights: torch.Tensor,
    size: int,
    search: str,
    *,
    exclude: torch.Tensor | None = None,
    nprobe: int = 8,
    warm_start=None,
):
    """The index named ``search`` (:data:`SEARCHES`) over ``weights``; ``warm_start`` is the index of a
    previous version of the same nodes (see :class:`IVFSearch`)."""
    if search not in SEARCHES:
        raise ValueError(f"search={search!r} is invalid; choose one of: {', '.join(SEARCHES)}")
    if search == "ivf" and weights.shape[0] >= IVF_MIN_NODES:
        warm = warm_start if isinstance(warm_start, IVFSearch) else None
        return IVFSearch(weights, size, nprobe=nprobe, exclude=exclude, warm_start=warm)
    return ExactSearch(weights, size, exclude=exclude)
