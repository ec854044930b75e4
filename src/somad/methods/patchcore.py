"""PatchCore: a coreset memory bank of locally aware patch features (Roth et al., CVPR 2022).

Features: the stride-8 and stride-16 stages only, each averaged over its 3 x 3 neighbourhood (stride 1)
and upsampled to the stride-8 grid (``features.FeatureExtractor`` with ``stages=(1, 2)`` and
``local_aggregation=3``; 40 + 112 = 152 channels for EfficientNet-Lite0).

Fit: collect every training patch, then keep a coreset chosen by greedy k-center selection
(:func:`greedy_coreset`): starting from a seeded random patch, repeatedly add the patch farthest from the
patches chosen so far, until ``ceil(coreset_ratio * N)`` are chosen. Distances for the selection are taken
after a seeded Gaussian random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss); the
memory bank stores the full features.

Score (:class:`PatchcoreScorer`, the module ``predict`` runs and ``somad export`` traces): each test patch's
distance to its nearest bank element (exact search) is the patch map. The image
score reweights the largest patch distance ``s* = ||x* - m*||`` by how isolated ``m*`` is in the bank
(:func:`reweighted_score`): ``s = (1 - exp(||x* - m*||) / sum_{m in N_b(m*)} exp(||x* - m||)) * s*`` with
``N_b(m*)`` the ``num_neighbors`` nearest bank elements of ``m*`` (``m*`` itself included).

Explanations: the bank is made of training patches, so the bank row nearest to a region's peak patch is its normal
reference. A local fit of an untiled model keeps, for each bank row, its training image and patch centre in that
image's pixels (``bank_references_``, 12 bytes a row; ``methods.references``, shared with SOMAD). They never touch
scoring.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from somad.errors import NumericalError, SomadError
from somad.io.schema import FLOAT_DTYPES, Array, Nullable
from somad.methods.base import BaseDetector
from somad.methods.references import REFERENCE_STATE_FIELDS, REFERENCES_ARRAY, NormalReferences
from somad.params import Interval, Param
from somad.som.node_search import nearest_nodes

logger = logging.getLogger(__name__)


def random_projection(d: int, k: int, *, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Seeded Gaussian random projection matrix ``(d, k)`` with entries ``N(0, 1/k)`` (distances kept on average)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.randn(d, k, generator=g, dtype=torch.float64) / math.sqrt(k)).to(device=device, dtype=dtype)


def coreset_size(n: int, ratio: float) -> int:
    """``ceil(ratio * n)``, at least 1 and at most ``n`` (``ratio * n`` rounded to 9 digits first, so that
    e.g. ``0.1 * 30`` gives 3, not 4)."""
    return min(int(n), max(1, math.ceil(round(float(ratio) * int(n), 9))))


def greedy_coreset(x: torch.Tensor, n_select: int, *, projection_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Greedy k-center coreset: indices of ``n_select`` rows of ``x`` covering it with the smallest radius.

    The first row is drawn at random (``torch.randint(N)`` from a generator seeded with ``seed``); each
    next one is the row whose distance to the nearest row chosen so far is the largest (ties: the lowest
    index). Distances are Euclidean, computed in the dtype of ``x`` after the projection
    ``x @ random_projection(D, projection_dim, seed=seed + 1)`` when ``projection_dim < D`` (``None``: never).

    Parameters
    ----------
    x : tensor (N, D)
    n_select : int, 1..N
    projection_dim : int or None, default 128
    seed : int

    Returns
    -------
    int64 tensor (n_select,), in selection order, on the device of ``x``
    """
    n, d = x.shape
    if not 1 <= n_select <= n:
        raise SomadError(f"cannot select {n_select} of {n} patches")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    start = int(torch.randint(n, (1,), generator=g))
    if projection_dim is not None and int(projection_dim) < d:
        # A separate seed stream for the matrix, so that the start point does not depend on projection_dim.
        x = x @ random_projection(d, int(projection_dim), seed=seed + 1, dtype=x.dtype, device=x.device)
    sq_norm = (x * x).sum(1)
    selected = torch.empty(n_select, dtype=torch.int64, device=x.device)
    selected[0] = start
    min_dist = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    idx = selected[0]
    for i in range(1, n_select):
        c = x[idx]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per step.
        dist = torch.addmv(sq_norm + sq_norm[idx], x, c, alpha=-2.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[idx] = -1.0  # chosen rows are never chosen again (even with duplicate rows)
        idx = torch.argmax(min_dist)
        selected[i] = idx
    return selected


def reweighted_score(
    x_star: torch.Tensor, bank: torch.Tensor, m_star: torch.Tensor, num_neighbors: int
) -> torch.Tensor:
    """PatchCore's image score from the most anomalous test patch of each image.

    Parameters
    ----------
    x_star : tensor (B, D)
        The test patch with the largest nearest-neighbour distance, per image.
    bank : tensor (M, D)
        Memory bank.
    m_star : int64 tensor (B,)
        Index of the nearest bank element of each ``x_star``.
    num_neighbors : int
        Size ``b`` of the neighbourhood ``N_b(m*)`` (the nearest bank elements of ``m*``, itself included);
        ``1`` disables the reweighting.

    Returns
    -------
    tensor (B,) float32: ``(1 - exp(||x* - m*||) / sum_{m in N_b(m*)} exp(||x* - m||)) * ||x* - m*||``
    """
    x_star = x_star.float()
    s_star = torch.linalg.vector_norm(x_star - bank[m_star].float(), dim=1)
    k = min(int(num_neighbors), bank.shape[0])
    if k <= 1:
        return s_star
    _, neighbours = nearest_nodes(bank[m_star], bank, k)  # (B, k), m* (or an exact duplicate) first
    dist = torch.linalg.vector_norm(x_star[:, None, :] - bank[neighbours].float(), dim=2)  # (B, k)
    # exp(s*) / sum exp(d_b), computed as exp(s* - logsumexp(d)) (no overflow for large distances).
    weight = 1.0 - torch.exp(s_star - torch.logsumexp(dist, dim=1))
    return weight * s_star


class PatchcoreScorer(nn.Module):
    """PatchCore's scoring: features ``(B, D, h, w)`` -> each patch's distance to its nearest bank element
    ``(B, h, w)`` (exact search, :func:`~somad.som.node_search.nearest_nodes`) and each image's
    :func:`reweighted_score` ``(B,)``. What ``PatchCore.predict`` runs and ``somad export`` traces. ``bank``
    ``(M, D)`` float32 is held as it is, not copied.
    """

    def __init__(self, bank: torch.Tensor, num_neighbors: int):
        super().__init__()
        self.register_buffer("bank", bank)
        self.num_neighbors = int(num_neighbors)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, d, h, w = feats.shape
        bank = self.bank
        x = feats.permute(0, 2, 3, 1).reshape(-1, d).to(bank.device, torch.float32)
        chunk = max(1, (1 << 24) // bank.shape[0])  # bounds the distance block to 2^24 floats
        sq_dist, nearest = nearest_nodes(x, bank, 1, chunk_size=chunk)
        patch = sq_dist[:, 0].sqrt().view(b, h * w)
        star = patch.argmax(1) + torch.arange(b, device=patch.device) * (h * w)  # flat index of x* per image
        scores = reweighted_score(x[star], bank, nearest[star, 0], self.num_neighbors)
        return patch.view(b, h, w), scores


class PatchCore(NormalReferences, BaseDetector):
    """PatchCore anomaly detector.

    Parameters
    ----------
    coreset_ratio : float, default 0.1
        Fraction of the training patches kept in the memory bank (``ceil(ratio * N)``; 1 keeps all).
    num_neighbors : int, default 9
        Bank neighbourhood size ``b`` of the image-score reweighting (anomalib's default 9; 1 = none).
    projection_dim : int or None, default 128
        Dimension of the random projection used for the coreset distances (``None``: full features).
    **common
        See :class:`somad.methods.base.BaseDetector` (backbone, image_size, crop_size, dims, device, ...). The
        features come from the stride-8 and stride-16 stages only, so ``dims`` counts their channels.

    Attributes
    ----------
    memory_bank_ : tensor (M, D) float32
    bank_references_ : int32 tensor (M, 3) or None
        Each bank row's training image (an index into ``reference_images_``) and patch centre ``x, y`` in its
        pixels; ``None`` after a tiled fit and in files from before.
    n_patches_ : int
        Training patches before subsampling.
    """

    method = "patchcore"
    _stages = (1, 2)
    _local_aggregation = 3
    _parameters = {
        "coreset_ratio": Param(
            Interval(float, 0.0, 1.0, open_low=True), "fraction of training patches kept in the memory bank"
        ),
        "num_neighbors": Param(Interval(int, 1, None), "bank neighbours of the image-score reweighting (1 = none)"),
        "projection_dim": Param(
            Interval(int, 1, None), "random-projection dimension for the coreset search", none="full dimension"
        ),
    }

    _state_fields = {
        "n_patches": Nullable(Interval(int, 0)),
        "memory_bank_size": Nullable(Interval(int, 1)),
        **REFERENCE_STATE_FIELDS,  # absent before bank references were kept
    }
    _array_fields = {"memory_bank": Array(FLOAT_DTYPES, 2), "bank_references": REFERENCES_ARRAY}

    def __init__(self, *, coreset_ratio=0.1, num_neighbors=9, projection_dim=128, **common):
        super().__init__(**common)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim

    def _fit_features(self, batches, n_images: int) -> None:
        x, n, h, w = None, 0, 0, 0
        for feats in batches:
            b, d, h, w = feats.shape
            if x is None:
                x = torch.empty(n_images * h * w, d, dtype=torch.float32, device=feats.device)
            x[n : n + b * h * w] = feats.permute(0, 2, 3, 1).reshape(-1, d)
            n += b * h * w
        x = x[:n]
        if not torch.isfinite(x).all():
            raise NumericalError("non-finite training features; check the images")
        n_select = coreset_size(n, self.coreset_ratio)
        if n_select < n:
            logger.info("coreset: selecting %d of %d patches (greedy k-center)", n_select, n)
            idx = greedy_coreset(x, n_select, projection_dim=self.projection_dim, seed=self.seed)
            self.memory_bank_ = x[idx].contiguous()
        else:
            idx = torch.arange(n)
            self.memory_bank_ = x
        self.bank_references_ = self._patch_references(idx.cpu(), n, h, w)
        self.n_patches_ = n

    # ------------------------------------------------------------------ score
    @property
    def scorer_(self) -> PatchcoreScorer:
        """The patch and image scoring over ``memory_bank_`` as a module (built on first use, again when the bank
        or ``num_neighbors`` change): what :meth:`_patch_scores` runs and ``somad export`` traces."""
        scorer = self.__dict__.get("_scorer")
        if scorer is None or scorer.bank is not self.memory_bank_ or scorer.num_neighbors != int(self.num_neighbors):
            scorer = self._scorer = PatchcoreScorer(self.memory_bank_, self.num_neighbors)
        return scorer

    def _patch_scores(self, feats):
        return self.scorer_(feats)

    def _kept_references(self) -> torch.Tensor | None:
        """Each bank row's training patch (``bank_references_``), or ``None``."""
        return getattr(self, "bank_references_", None)

    def _nearest_references(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank row nearest to each patch of ``x`` (exact, as scoring searches) and the distance to it: the
        patch's score before the map's upsampling and blur."""
        sq_dist, nearest = nearest_nodes(x.to(self.memory_bank_.device), self.memory_bank_, 1)
        return nearest[:, 0].cpu(), sq_dist[:, 0].clamp_min(0).sqrt()

    def export_scoring(self) -> PatchcoreScorer:
        return self.scorer_

    def export_constant_bytes(self) -> int:
        return 4 * self.memory_bank_.numel()

    def scoring_info(self) -> dict:
        return {"memory_bank_size": int(self.memory_bank_.shape[0]), "num_neighbors": int(self.num_neighbors)}

    def _state_to(self, device) -> None:
        self.memory_bank_ = self.memory_bank_.to(device)

    # ------------------------------------------------------------------ persistence
    def _state_arrays(self):
        refs = getattr(self, "bank_references_", None)
        return {"memory_bank": self.memory_bank_.float(), **({"bank_references": refs} if refs is not None else {})}

    def _state_info(self):
        return {
            "n_patches": self.n_patches_,
            "memory_bank_size": int(self.memory_bank_.shape[0]),
            **self._reference_state(),
        }

    def _set_state(self, arrays, state):
        bank = arrays["memory_bank"].float()
        if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] != len(self.channel_indices_):
            raise ValueError(f"memory_bank has shape {tuple(bank.shape)}, expected (M, {len(self.channel_indices_)})")
        if state.get("memory_bank_size") is not None and int(state["memory_bank_size"]) != bank.shape[0]:
            raise ValueError(f"memory_bank has {bank.shape[0]} patches, the config says {state['memory_bank_size']}")
        self.memory_bank_ = bank.to(self.device_)
        self.n_patches_ = state.get("n_patches")
        self.bank_references_ = self._loaded_references(
            arrays.get("bank_references"), state, len(bank), "bank_references"
        )
