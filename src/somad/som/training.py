"""A vectorised batch Self-Organizing Map on a square grid (torch; CPU or GPU).

One responsibility: learn ``K*K`` prototype vectors arranged on a ``K x K`` grid so that neighbouring nodes
hold similar prototypes, and find the nearest nodes of new vectors.

Training follows SOMAD: nodes start at the mean feature of their image position; each epoch assigns every
sample to its best-matching unit (BMU), then sets every node to the Gaussian-neighbourhood-weighted mean of
the samples, with a radius shrinking linearly over ``rough_epochs`` (``K/3 -> K/18``) and then
``fine_epochs`` (``K/12 -> 1``).
"""

from __future__ import annotations

import logging

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

    def fit(self, x: torch.Tensor, init: torch.Tensor) -> SelfOrganizingMap:
        """Train the map.

        Parameters
        ----------
        x : tensor (N, D), any float dtype (e.g. float16 to save memory)
        init : tensor (K*K, D) initial prototypes (see :meth:`position_mean_init`)
        """
        if self.size < 2:
            raise SomadError(f"som size {self.size} is too small; use a grid side of at least 2")
        m = self.size * self.size
        if init.shape[0] != m or init.shape[1] != x.shape[1]:
            raise SomadError(f"init has shape {tuple(init.shape)}, expected ({m}, {x.shape[1]})")
        device = init.device
        x = self._subsample(x).float()  # the epochs read it 35 times: keep it at full precision
        weights = init.float().clone()
        radii = radius_schedule(self.size, self.rough_epochs, self.fine_epochs)
        offsets = torch.arange(self.size, device=device, dtype=torch.float32)
        sq_grid = (offsets[:, None] - offsets[None, :]) ** 2
        search = projected = None
        for epoch, r in enumerate(progress_bar(radii, desc="SOM epochs", unit="epoch")):
            # 4 probes, not scoring's 8: a missed BMU is a near node and only nudges a neighbourhood average.
            # Each epoch's index starts from the previous one's clusters: the prototypes move little per epoch.
            search = make_search(weights, self.size, self.search, nprobe=4, warm_start=search)
            # The warm-started indices keep the first one's principal axes: the samples are projected once.
            projected = search.project(x, reuse=projected)
            _, bmu = search.search(x, 1, projected=projected)
            sums, counts = self._accumulate(x, bmu[:, 0], m, weights.shape[1], device)
            # The Gaussian neighbourhood on a grid is separable: smooth rows, then columns (K^3 D, not K^4 D).
            h1 = torch.exp(-sq_grid / (2.0 * float(r) ** 2)).double()
            num = self._smooth(sums.view(self.size, self.size, -1), h1).reshape(m, -1)
            den = self._smooth(counts.view(self.size, self.size, 1), h1).reshape(m, 1)
            updated = den[:, 0] > 1e-12  # a node far from all data keeps its prototype instead of 0/0
            weights[updated] = (num[updated] / den[updated]).float()
            logger.debug("SOM epoch %d/%d radius %.2f", epoch + 1, len(radii), r)
        self.weights_ = weights
        self.quantization_error_, self.topographic_error_ = self.errors(x)
        self.n_samples_ = int(x.shape[0])
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
        sq, idx = make_search(self.weights_, self.size, self.search)(x, 2)
        qe = float(sq[:, 0].double().sqrt().mean())
        r1, c1 = idx[:, 0] // self.size, idx[:, 0] % self.size
        r2, c2 = idx[:, 1] // self.size, idx[:, 1] % self.size
        apart = torch.maximum((r1 - r2).abs(), (c1 - c2).abs()) > 1  # not among the 8 grid neighbours
        return qe, float(apart.double().mean())

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_samples is None or x.shape[0] <= self.max_samples:
            return x
        gen = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(x.shape[0], generator=gen)[: self.max_samples].sort().values
        return x[keep.to(x.device)]

    def _accumulate(self, x, bmu, m, d, device):
        sums = torch.zeros(m, d, dtype=torch.float64, device=device)
        counts = torch.zeros(m, dtype=torch.float64, device=device)
        for start in range(0, x.shape[0], self.chunk_size):
            b = bmu[start : start + self.chunk_size]
            sums.index_add_(0, b, x[start : start + self.chunk_size].to(device, torch.float64))
            counts.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        return sums, counts

    @staticmethod
    def _smooth(grid: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        return torch.einsum("jb,ibd->ijd", h1, torch.einsum("ia,abd->ibd", h1, grid))
