"""PaDiM: one multivariate Gaussian per patch position (Defard et al., ICPR Workshops 2020).

Fit: stream the patch features of the good images and accumulate, per position of the patch grid, the sum
and the sum of outer products (float64, around a per-position reference taken from the first batch for
numerical stability); no feature is kept. Each position gets the mean and the unbiased covariance plus
``eps * I`` (the paper's 0.01), stored as the inverse of its Cholesky factor. Score: the Mahalanobis
distance of each test patch to the Gaussian of its own position (:class:`PadimScorer`, the module ``predict``
runs and ``somad export`` traces); the shared pipeline of :class:`somad.methods.base.BaseDetector` then upsamples,
blurs and takes the map maximum as image score.

Explanations: none (no ``region_references``, unlike SOMAD and PatchCore, ``methods.references``). A position's
Gaussian is fitted on every training image alike, so no training patch stands for it; a reference per position
(e.g. the training image whose patch there is nearest the mean) would need the features kept or a second pass.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from somad.errors import ModelFileError, NumericalError, SomadError
from somad.io.schema import FLOAT_DTYPES, MAX_IMAGE_SIZE, Array, ListOf, Nullable
from somad.methods.base import BaseDetector
from somad.params import Interval, Param
from somad.som.node_stats import inverse_cholesky

logger = logging.getLogger(__name__)


class PadimScorer(nn.Module):
    """PaDiM's patch scoring: features ``(B, D, h, w)`` -> the Mahalanobis distance of each patch to its position's
    Gaussian, ``||W_p (x - mu_p)||``, ``(B, h, w)``. What ``PaDiM.predict`` runs and ``somad export`` traces.

    ``means`` ``(h*w, D)`` and ``whiteners`` ``(h*w, D, D)`` (lower triangular) are held as they are, not copied;
    the positions go in chunks of at most ``max_elements`` floats of products.
    """

    def __init__(self, means: torch.Tensor, whiteners: torch.Tensor, max_elements: int = 1 << 24):
        super().__init__()
        self.register_buffer("means", means)
        self.register_buffer("whiteners", whiteners)
        self.max_elements = int(max_elements)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, d, h, w = feats.shape
        x = feats.permute(2, 3, 0, 1).reshape(h * w, b, d).to(self.means.device, torch.float32)
        step = max(1, self.max_elements // (d * max(b, d)))
        parts = []
        for lo in range(0, h * w, step):
            centred = x[lo : lo + step] - self.means[lo : lo + step, None, :]  # (p, b, D)
            z = centred @ self.whiteners[lo : lo + step].transpose(1, 2)  # W (x - mu), batched over positions
            parts.append((z * z).sum(-1))
        return torch.cat(parts).sqrt_().T.reshape(b, h, w)


class PaDiM(BaseDetector):
    """PaDiM anomaly detector.

    Parameters
    ----------
    eps : float, default 0.01
        Ridge added to every position's covariance (paper: 0.01).
    aspect : {"square", "auto", "keep"}, default "square"
        As :class:`somad.methods.base.BaseDetector`'s, whose default (``"auto"``) PaDiM does not take: with tire's
        frame kept (256x336) its image AUROC fell 5.8 points (0.803 -> 0.745; docs/benchmarks.md, "The aspect
        ratio kept"), where SOMAD and PatchCore gained in AU-PRO.
    **common
        See :class:`somad.methods.base.BaseDetector` (backbone, image_size, crop_size, dims, device, ...). ``dims``
        is the paper's random channel subset (100 of 448 for ResNet-18, 550 of 1792 for Wide-ResNet50-2).

    Attributes
    ----------
    means_ : tensor (h*w, D) float32
        Mean feature of each grid position (row-major).
    whiteners_ : tensor (h*w, D, D) float32
        Lower-triangular ``L^{-1}`` per position, with ``Sigma = L L^T``, so that the Mahalanobis distance
        is ``||W (x - mu)||``.
    grid_shape_ : (int, int)
        ``(h, w)`` of the patch grid the Gaussians were fitted on.
    """

    method = "padim"
    _parameters = {"eps": Param(Interval(float, 0.0, None), "covariance ridge eps*I")}
    _state_fields = {
        "grid_shape": ListOf(Interval(int, 1, MAX_IMAGE_SIZE), length=2),
        "n_images_fitted": Nullable(Interval(int, 0)),
    }
    _required_state = ("grid_shape",)
    _array_fields = {"position_means": Array(FLOAT_DTYPES, 2), "position_whiteners_tril": Array(FLOAT_DTYPES, 2)}

    def __init__(self, *, eps=0.01, aspect="square", **common):
        super().__init__(aspect=aspect, **common)
        self.eps = eps

    # ------------------------------------------------------------------ fit
    def _fit_features(self, batches, n_images: int) -> None:
        ref = sums = outer = None
        n = 0
        for feats in batches:
            b, d, h, w = feats.shape
            x = feats.permute(2, 3, 0, 1).reshape(h * w, b, d).double()  # (positions, images, D)
            if ref is None:
                ref = x.mean(1, keepdim=True)  # per-position shift: sums of small numbers, no cancellation
                sums = torch.zeros(h * w, d, dtype=torch.float64, device=x.device)
                outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=x.device)
                self.grid_shape_ = (h, w)
            x = x - ref
            sums += x.sum(1)
            outer.baddbmm_(x.transpose(1, 2), x)  # += sum over images of the outer products, per position
            n += b
        if n < 2:
            logger.warning("PaDiM fitted on %d image: the covariances are eps*I only", n)
        centred_mean = sums / n
        # Scatter around the mean: sum (x - m)(x - m)^T = sum x x^T - n m m^T (x and m relative to ref);
        # then the unbiased covariance + eps * I. All in place: (h*w, D, D) float64 is the largest array.
        cov = outer.baddbmm_(centred_mean[:, :, None], centred_mean[:, None, :], alpha=-float(n))
        cov.div_(max(n - 1, 1)).diagonal(dim1=-2, dim2=-1).add_(float(self.eps))
        self.means_ = (centred_mean + ref[:, 0]).float()
        self.whiteners_ = self._whiten(cov)
        self.n_images_fitted_ = n
        if not (torch.isfinite(self.whiteners_).all() and torch.isfinite(self.means_).all()):
            raise NumericalError("non-finite PaDiM statistics (NaN/Inf in the training features?); check the images")

    @staticmethod
    def _whiten(cov: torch.Tensor, max_elements: int = 1 << 25) -> torch.Tensor:
        """Inverse Cholesky factors of ``(L, D, D)`` float64 covariances, in position chunks, as float32."""
        n_pos, d = cov.shape[0], cov.shape[-1]
        out = torch.empty(n_pos, d, d, dtype=torch.float32, device=cov.device)
        step = max(1, max_elements // (d * d))
        for lo in range(0, n_pos, step):
            out[lo : lo + step] = inverse_cholesky(cov[lo : lo + step]).float()
        return out

    # ------------------------------------------------------------------ score
    @property
    def scorer_(self) -> PadimScorer:
        """The patch scoring over ``means_`` and ``whiteners_`` as a module (built on first use, again when they are
        replaced): what :meth:`_patch_scores` runs and ``somad export`` traces."""
        scorer = self.__dict__.get("_scorer")
        if scorer is None or scorer.means is not self.means_ or scorer.whiteners is not self.whiteners_:
            scorer = self._scorer = PadimScorer(self.means_, self.whiteners_)
        return scorer

    def _patch_scores(self, feats):
        b, d, h, w = feats.shape
        if (h, w) != tuple(self.grid_shape_):
            raise SomadError(
                f"feature grid {h}x{w} does not match the fitted grid "
                f"{self.grid_shape_[0]}x{self.grid_shape_[1]}; use the model's image and crop sizes"
            )
        return self.scorer_(feats), None

    def export_scoring(self) -> PadimScorer:
        return self.scorer_

    def export_constant_bytes(self) -> int:
        p, d = self.means_.shape
        return 4 * p * d * (d + 1)

    def _state_to(self, device) -> None:
        self.means_, self.whiteners_ = self.means_.to(device), self.whiteners_.to(device)

    # ------------------------------------------------------------------ persistence
    def _state_arrays(self):
        d = self.means_.shape[1]
        rows, cols = torch.tril_indices(d, d)
        return {
            "position_means": self.means_,
            "position_whiteners_tril": self.whiteners_[:, rows, cols],  # lower triangle only: half the file size
        }

    def _state_info(self):
        return {"grid_shape": list(self.grid_shape_), "n_images_fitted": self.n_images_fitted_}

    @classmethod
    def _rebuild(cls, config, arrays, path, device, scoring):
        model = super()._rebuild(config, arrays, path, device, scoring)
        g = model.extractor_.grid_shape  # the grid the model's geometry gives: found at load, not at predict
        if tuple(model.grid_shape_) != g:
            raise ModelFileError(
                f"{path}: state.grid_shape is {list(model.grid_shape_)}, but the model's geometry gives a "
                f"{g[0]}x{g[1]} patch grid; re-run `somad fit`"
            )
        return model

    def _set_state(self, arrays, state):
        means = arrays["position_means"].float()
        n_pos, d = means.shape
        h, w = (int(v) for v in state["grid_shape"])
        if h * w != n_pos:
            raise ValueError(f"position_means has {n_pos} rows, the grid is {h}x{w}")
        if d != len(self.channel_indices_):
            raise ValueError(f"position_means has {d} features, channel_indices {len(self.channel_indices_)}")
        rows, cols = torch.tril_indices(d, d)
        whiteners = torch.zeros(n_pos, d, d)
        whiteners[:, rows, cols] = arrays["position_whiteners_tril"].float()
        self.means_ = means.to(self.device_)
        self.whiteners_ = whiteners.to(self.device_)
        self.grid_shape_ = (h, w)
        self.n_images_fitted_ = state.get("n_images_fitted")
