"""A vectorised batch Self-Organizing Map on a square grid (torch; CPU or GPU).

One responsibility: learn ``K*K`` prototype vectors arranged on a ``K x K`` grid so that neighbouring nodes
hold similar prototypes, and find the nearest nodes of new vectors.

Training follows SOMAD: nodes start at the mean feature of their image position; each epoch assigns every
sample to its best-matching unit (BMU), then sets every node to the Gaussian-neighbourhood-weighted mean of
the samples, with a radius shrinking linearly over ``rough_epochs`` (``K/3 -> K/18``) and then
``fine_epochs`` (``K/12 -> 1``).

Where the samples are: a :class:`Reducer` gives each epoch's best-matching-unit sums and counts, one part per
shard of the samples. :class:`LocalReducer` holds its shards in this process (a local fit: one, the samples);
a distributed fit passes one whose shards live in workers that each hold a :class:`RowShard`
(``somad.distributed.ray``). The subset draw (:func:`subsample_rows`, over the global row order, split over the
shards), the epoch rule and the map errors are :class:`SelfOrganizingMap`'s alone, so both paths give the same
map (tested bitwise with two in-process shards).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from somad.errors import SomadError
from somad.progress import progress_bar
from somad.som.node_search import make_search

logger = logging.getLogger(__name__)


def radius_schedule(size: int, rough_epochs: int, fine_epochs: int) -> np.ndarray:
    """Neighbourhood radius of each epoch: linear ``K/3 -> K/18`` (rough), then ``K/12 -> 1`` (fine)."""
    rough = np.linspace(size / 3.0, size / 18.0, rough_epochs) if rough_epochs else np.empty(0)
    fine = np.linspace(size / 12.0, 1.0, fine_epochs) if fine_epochs else np.empty(0)
    return np.maximum(np.concatenate([rough, fine]), 1e-3)


#: Rows per step when a shard accumulates an epoch's node sums (bounds the float64 copy of its samples).
CHUNK_ROWS = 8192


def subsample_rows(n: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """The SOM's training rows among ``n`` (in the global row order): a seeded random ``max_samples`` of them,
    sorted, or ``None`` (all) when there are no more than that."""
    if max_samples is None or n <= max_samples:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:max_samples].sort().values


def split_rows(keep: torch.Tensor | None, rows: Sequence[int]) -> list[torch.Tensor | None]:
    """Global row indices ``keep`` (sorted; ``None``: all) as each shard's own, for contiguous shards of ``rows``
    rows each."""
    if keep is None:
        return [None] * len(rows)
    starts = np.cumsum([0, *rows]).tolist()
    return [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]


def error_parts(x: torch.Tensor, weights: torch.Tensor, size: int, search: str) -> tuple[float, int, int]:
    """A map's error terms over vectors ``x`` ``(N, D)``, with the map's nearest-node ``search``: the sum of the
    distances to the best-matching unit, how many have their two nearest nodes apart on the grid (not among the 8
    neighbours), and ``N``. Shards' terms add up; :func:`map_errors` turns them into the errors."""
    if x.shape[0] == 0:
        return 0.0, 0, 0
    sq, idx = make_search(weights, size, search)(x, 2)
    r1, c1 = idx[:, 0] // size, idx[:, 0] % size
    r2, c2 = idx[:, 1] // size, idx[:, 1] % size
    apart = torch.maximum((r1 - r2).abs(), (c1 - c2).abs()) > 1
    return float(sq[:, 0].double().sqrt().sum()), int(apart.sum()), int(x.shape[0])


def map_errors(parts: Sequence[tuple[float, int, int]]) -> tuple[float, float]:
    """Quantization error (mean distance to the best-matching unit) and topographic error (fraction of vectors
    whose two nearest nodes are apart) from shards' :func:`error_parts`."""
    n = sum(p[2] for p in parts)
    return sum(p[0] for p in parts) / max(n, 1), sum(p[1] for p in parts) / max(n, 1)


class RowShard:
    """One shard of a SOM's training vectors, held in this process: the chunked accumulator of each epoch's
    best-matching-unit sums and counts. A local fit has one over all its samples; each worker of a distributed
    fit one over its rows.

    Parameters
    ----------
    x : tensor (N, D), any float dtype
    chunk_size : int
        Rows per accumulation step.
    """

    def __init__(self, x: torch.Tensor, chunk_size: int = CHUNK_ROWS):
        self.x = x
        self.chunk_size = chunk_size
        self.sub = self._search = self._projected = None

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def subset(self, keep: torch.Tensor | None) -> int:
        """Train on rows ``keep`` of this shard (``None``: all), copied to float32 (the epochs read them 35 times:
        full precision); returns how many."""
        self.sub = (self.x if keep is None else self.x[keep.to(self.x.device)]).float()
        self._search = self._projected = None
        return int(self.sub.shape[0])

    def epoch(self, weights: torch.Tensor, size: int, search: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums ``(M, D)`` and counts ``(M,)`` (float64) of the training rows by best-matching unit."""
        m, d = weights.shape
        # 4 probes, not scoring's 8: a missed BMU is a near node and only nudges a neighbourhood average.
        # Each epoch's index starts from the previous one's clusters: the prototypes move little per epoch.
        self._search = make_search(weights, size, search, nprobe=4, warm_start=self._search)
        sums = torch.zeros(m, d, dtype=torch.float64, device=weights.device)
        counts = torch.zeros(m, dtype=torch.float64, device=weights.device)
        if self.sub.shape[0] == 0:
            return sums, counts
        # The warm-started indices keep the first one's principal axes: the rows are projected once.
        self._projected = self._search.project(self.sub, reuse=self._projected)
        bmu = self._search.search(self.sub, 1, projected=self._projected)[1][:, 0]
        for start in range(0, self.sub.shape[0], self.chunk_size):
            b = bmu[start : start + self.chunk_size]
            sums.index_add_(0, b, self.sub[start : start + self.chunk_size].to(weights.device, torch.float64))
            counts.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        return sums, counts

    def errors(self, weights: torch.Tensor, size: int, search: str) -> tuple[float, int, int]:
        """:func:`error_parts` of the training rows."""
        return error_parts(self.sub, weights, size, search)


class Reducer(Protocol):
    """Where :meth:`SelfOrganizingMap.fit` reads its samples: shards of rows, contiguous in one global row order,
    each answering for its own rows (as a :class:`RowShard` does); every method returns one result per shard."""

    rows: Sequence[int]  # rows of each shard

    def subset(self, keep: list[torch.Tensor | None]) -> None: ...  # each shard's training rows (split_rows)

    def epoch(self, weights: torch.Tensor, size: int, search: str) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def errors(self, weights: torch.Tensor, size: int, search: str) -> list[tuple[float, int, int]]: ...


class LocalReducer:
    """The :class:`Reducer` over shards held in this process: one :class:`RowShard` per tensor of ``parts``."""

    def __init__(self, parts: Sequence[torch.Tensor], chunk_size: int = CHUNK_ROWS):
        self.shards = [RowShard(x, chunk_size) for x in parts]

    @property
    def rows(self) -> list[int]:
        return [s.rows for s in self.shards]

    def subset(self, keep: list[torch.Tensor | None]) -> None:
        for shard, k in zip(self.shards, keep):
            shard.subset(k)

    def epoch(self, weights: torch.Tensor, size: int, search: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [s.epoch(weights, size, search) for s in self.shards]

    def errors(self, weights: torch.Tensor, size: int, search: str) -> list[tuple[float, int, int]]:
        return [s.errors(weights, size, search) for s in self.shards]


class SelfOrganizingMap:
    """Batch SOM on a ``size x size`` grid with a Gaussian neighbourhood.

    Parameters
    ----------
    size : int
        Grid side K (paper: 56, i.e. 3136 nodes).
    rough_epochs, fine_epochs : int
        Epochs of the two phases of the radius schedule (paper code: about 20 and 15).
    max_samples : int or None
        Train on a seeded random subset of at most this many vectors (``None``: all).
    seed : int
    chunk_size : int
        Rows per step when accumulating the epoch's node sums (bounds the float64 copy of the samples).
    search : {"exact", "ivf"}, default "exact"
        How each epoch finds the best-matching units (see ``somad.som.node_search``).

    Attributes
    ----------
    weights_ : tensor (K*K, D) float32
    quantization_error_ : float
        Mean Euclidean distance of the training vectors to their BMU.
    topographic_error_ : float
        Fraction of training vectors whose two nearest nodes are not grid neighbours (8-neighbourhood).
    """

    def __init__(
        self,
        *,
        size: int = 56,
        rough_epochs: int = 20,
        fine_epochs: int = 15,
        max_samples: int | None = 100_000,
        seed: int = 0,
        chunk_size: int = 8192,
        search: str = "exact",
    ):
        self.size = size
        self.rough_epochs = rough_epochs
        self.fine_epochs = fine_epochs
        self.max_samples = max_samples
        self.seed = seed
        self.chunk_size = chunk_size
        self.search = search

    @staticmethod
    def position_mean_init(position_means: torch.Tensor, size: int) -> torch.Tensor:
        """Initial prototypes from the mean feature of each image position.

        Parameters
        ----------
        position_means : tensor (h, w, D)
        size : int

        Returns
        -------
        tensor (size*size, D): the position means themselves when ``h == w == size``, else resampled
        bilinearly (corners aligned) onto the ``size x size`` grid.
        """
        h, w, d = position_means.shape
        if (h, w) == (size, size):
            return position_means.reshape(-1, d).float().clone()
        grid = position_means.permute(2, 0, 1)[None].float()
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
        return grid[0].permute(1, 2, 0).reshape(-1, d).contiguous()

    def fit(self, x: torch.Tensor | Reducer, init: torch.Tensor) -> SelfOrganizingMap:
        """Train the map.

        Parameters
        ----------
        x : tensor (N, D), any float dtype (e.g. float16 to save memory), or a :class:`Reducer` over shards of
            the samples (a distributed fit's)
        init : tensor (K*K, D) initial prototypes (see :meth:`position_mean_init`)
        """
        if self.size < 2:
            raise SomadError(f"som size {self.size} is too small; use a grid side of at least 2")
        m = self.size * self.size
        d = x.shape[1] if isinstance(x, torch.Tensor) else init.shape[1]
        if tuple(init.shape) != (m, d):
            raise SomadError(f"init has shape {tuple(init.shape)}, expected ({m}, {d})")
        reducer = LocalReducer([x], self.chunk_size) if isinstance(x, torch.Tensor) else x
        reducer.subset(split_rows(subsample_rows(sum(reducer.rows), self.max_samples, self.seed), reducer.rows))
        weights = init.float().clone()
        radii = radius_schedule(self.size, self.rough_epochs, self.fine_epochs)
        offsets = torch.arange(self.size, device=init.device, dtype=torch.float32)
        sq_grid = (offsets[:, None] - offsets[None, :]) ** 2
        for epoch, r in enumerate(progress_bar(radii, desc="SOM epochs", unit="epoch")):
            parts = reducer.epoch(weights, self.size, self.search)
            sums = sum((p[0] for p in parts[1:]), parts[0][0])
            counts = sum((p[1] for p in parts[1:]), parts[0][1])
            # The Gaussian neighbourhood on a grid is separable: smooth rows, then columns (K^3 D, not K^4 D).
            h1 = torch.exp(-sq_grid / (2.0 * float(r) ** 2)).double()
            num = _smooth(sums.view(self.size, self.size, -1), h1).reshape(m, -1)
            den = _smooth(counts.view(self.size, self.size, 1), h1).reshape(m, 1)
            updated = den[:, 0] > 1e-12  # a node far from all data keeps its prototype instead of 0/0
            weights[updated] = (num[updated] / den[updated]).float()
            logger.debug("SOM epoch %d/%d radius %.2f", epoch + 1, len(radii), r)
        self.weights_ = weights
        parts = reducer.errors(weights, self.size, self.search)
        self.quantization_error_, self.topographic_error_ = map_errors(parts)
        self.n_samples_ = sum(p[2] for p in parts)
        logger.info(
            "SOM %dx%d trained on %d vectors: quantization error %.4f, topographic error %.4f",
            self.size,
            self.size,
            self.n_samples_,
            self.quantization_error_,
            self.topographic_error_,
        )
        return self

    def errors(self, x: torch.Tensor) -> tuple[float, float]:
        """Quantization error (mean distance to the BMU) and topographic error of ``x`` ``(N, D)``, with the
        map's own nearest-node ``search``."""
        return map_errors([error_parts(x, self.weights_, self.size, self.search)])


def _smooth(grid: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
    return torch.einsum("jb,ibd->ijd", h1, torch.einsum("ia,abd->ibd", h1, grid))
