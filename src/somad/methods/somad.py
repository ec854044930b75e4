"""SOMAD: a Self-Organizing Map of patch features with a Gaussian per node (ICIP 2021).

Fit: stream the patch features of the good images, initialise a K x K SOM with the mean feature of each
image position, train it (batch SOM), assign every training patch to its nearest node and fit one Gaussian
per node (``somad.som.node_stats``). Score: for each test patch, the k nearest nodes (Euclidean, to the SOM
prototypes), then the minimum Mahalanobis distance to their Gaussians.

What fit keeps in memory: every training patch once, in ``feature_dtype`` (float16 by default: half the
bytes, ~1e-3 relative rounding, far below the eps ridge) because the node statistics need every patch after
the SOM is trained; a float32 copy of the SOM's training subset (``som_samples``); the SOM; and the node
Gaussians. ``search="ivf"`` finds nearest nodes coarse-to-fine (``somad.som.node_search``) in training and
scoring; ``"exact"`` searches exhaustively.

Explanations: a local fit of an untiled model also keeps, for each node, the training patch that represents it best
(its member patch nearest the node's mean: ``node_references_``, training image and patch centre in that image's
pixels). :meth:`SOMAD.region_references` names, for a predicted region, the reference of the node nearest to its
peak patch: what normal looks like there (``methods.references``, shared with PatchCore). Explanations never touch
scoring.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math

import torch

from somad.errors import NumericalError, SomadError
from somad.io.inputs import as_items, training_fingerprints
from somad.io.schema import FLOAT_DTYPES, INTEGER_DTYPES, Array, Hex, ListOf, Nullable, Table
from somad.methods.base import BaseDetector
from somad.methods.references import REFERENCE_STATE_FIELDS, REFERENCES_ARRAY, NormalReferences
from somad.params import Either, Interval, Options, Param
from somad.som.node_search import SEARCH_CHOICES, IVFSearch, make_search
from somad.som.node_stats import (
    NodeGaussians,
    NodeMoments,
    fit_node_gaussians,
    gaussians_from_moments,
    mahalanobis,
    row_blocks,
    tril_size,
)
from somad.som.onnx_graph import scoring_nodes
from somad.som.training import RowShard, SelfOrganizingMap

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
SCATTER_DTYPES = {"float32": torch.float32, "float64": torch.float64}
NOT_UPDATABLE = (
    "{path}has no per-node scatter matrices (fitted without --updatable, or by somad < 0.7); "
    "refit with `somad fit --updatable` (somad >= 0.7) to enable update"
)


#: ``som_size="auto"``: the paper's side, shrunk so that each node has at least this many training patches on
#: average (measured in docs/benchmarks.md), never below ``AUTO_MIN_SIDE``.
AUTO_MAX_SIDE, PATCHES_PER_NODE, AUTO_MIN_SIDE = 56, 50, 4

#: Named configurations. ``paper``: the ICIP 2021 paper's pipeline as somad 0.5.0 ran it by default (resize 256,
#: center crop 224, no local aggregation, a 56x56 map, a tenth of the images held out for the thresholds; with this
#: library's backbones). The defaults depart from it in these values only, for the reasons measured in
#: docs/benchmarks.md.
PRESETS = {
    "default": {},
    "paper": {
        "som_size": 56,
        "cv": "holdout",
        "crop_size": 224,
        "aspect": "square",
        "local_aggregation": 1,
        "shrinkage": 0.0,
        "eps": 0.01,
    },
}


class SOMAD(NormalReferences, BaseDetector):
    """SOMAD anomaly detector.

    Parameters
    ----------
    som_size : int or "auto", default "auto"
        Side K of the SOM grid (K*K nodes; paper: 56). ``"auto"``: the paper's 56, or less where the training
        patches are too few to give each node ``PATCHES_PER_NODE`` (50) of them on average:
        ``K = min(56, floor(sqrt(N / 50)))`` for ``N`` training patches, at least 4 (and at least ``sqrt(k)``).
        With the default geometry (4096 patches per image) that is 56 from 40 images on, 40 at 20, 28 at 10 and
        20 at 5: a 56x56 map fitted on 10 images has 13 patches per node, too few for its covariances, and its
        image ranking was 1.6-4.7 points lower (docs/benchmarks.md, "The SOM's size from the data's size").
        The fitted side is ``som_.size``.
    k : int, default 4
        Nearest nodes searched per test patch (paper: 4; authors' code: 5).
    eps : float, default 3.0
        Ridge added to every node covariance (the paper: 0.01). On the shared data a strong ridge made both the
        image and the pixel rankings better (docs/benchmarks.md): the small-variance directions of a node's
        covariance are estimated from few patches and only add noise to the distance.
    rough_epochs, fine_epochs : int, default 20, 15
        Epochs of the rough (radius K/3 -> K/18) and fine (K/12 -> 1) phases.
    som_samples : int or None, default 100000
        The SOM is trained on a seeded random subset of at most this many patches (``None``: all); the node
        statistics always use every training patch.
    search : {"ivf", "exact"}, default "ivf"
        Nearest-node search in training and scoring: an inverted-file index over the SOM's nodes, or
        exhaustive (see ``somad.som.node_search`` and docs/benchmarks.md for the measured difference).
    feature_dtype : {"float16", "float32"}, default "float16"
        Precision of the training patches held between the SOM and the node statistics.
    shrinkage : float, default 0.0
        Weight ``a`` of the pooled within-node covariance ``P`` in each node's covariance:
        ``(1 - a) cov_i + a P + eps I`` (``somad.som.node_stats``); 0 = the paper's rule.
    local_aggregation : int, default 3
        Each backbone stage is averaged over a ``k x k`` neighbourhood of its own grid before upsampling
        (PatchCore's locally aware patch features; 1 = none, as in the paper). See docs/benchmarks.md for the
        measurement behind the default.
    factor_dtype : {"float16", "float32"}, default "float16"
        Storage of the node covariances' inverse Cholesky factors, in memory and in the model file. float16
        halves both and the bytes scoring reads per image (it computes in float32); on the shared datasets
        the metrics were identical to 4 decimals (docs/benchmarks.md). Factors that overflow float16 (a tiny
        ``eps``) are kept in float32, with a warning.
    scatter_dtype : {None, "float32", "float64"}, default None
        Keep each node's count, mean and scatter matrix (lower triangle) in the model, in this precision, so
        that :meth:`update` can merge more good images later (``somad fit --updatable`` = ``"float32"``).
        ``None``: not kept (the file is about 2.8x smaller at 176 dims; measured in docs/scaling.md).
    **common
        See :class:`somad.methods.base.BaseDetector` (backbone, image_size, crop_size, dims, device, ...).

    Attributes
    ----------
    som_ : SelfOrganizingMap, with ``weights_`` (K*K, D), ``quantization_error_``, ``topographic_error_``
    gaussians_ : NodeGaussians
    """

    method = "somad"
    _parameters = {
        "som_size": Param(
            Either((Options(("auto",)), Interval(int, 2, 256))),
            "SOM grid side K, K*K nodes; auto = 56, fewer where the training patches are too few for 50 per node",
        ),
        "k": Param(Interval(int, 1, None), "nearest nodes searched per patch"),
        "eps": Param(Interval(float, 0.0, None), "covariance ridge eps*I"),
        "shrinkage": Param(
            Interval(float, 0.0, 1.0), "weight of the pooled within-node covariance in each node's covariance"
        ),
        "rough_epochs": Param(Interval(int, 0, 1000), "rough-phase epochs"),
        "fine_epochs": Param(Interval(int, 0, 1000), "fine-phase epochs"),
        "som_samples": Param(Interval(int, 1, None), "train the SOM on at most this many random patches", none="all"),
        "search": Param(
            Options(SEARCH_CHOICES), "nearest-node search: an inverted-file index over the nodes (IVF) or exhaustive"
        ),
        "feature_dtype": Param(Options(tuple(DTYPES)), "precision of the training patches held during fit"),
        "factor_dtype": Param(
            Options(tuple(DTYPES)),
            "storage of the per-node covariance factors; float16 halves "
            "model memory and file and the bytes read per image",
        ),
        "local_aggregation": Param(
            Interval(int, 1, 15), "average each backbone stage over a KxK neighbourhood (odd K; 1 = none)"
        ),
        "scatter_dtype": Param(
            Options(tuple(SCATTER_DTYPES)),
            "keep per-node scatter matrices in the model in this precision, so that `somad update` can add good "
            "images later (--updatable = float32)",
            none="not kept, the model cannot be updated",
        ),
    }
    _scoring = ("k", "search")
    _state_fields = {
        "quantization_error": Nullable(Interval(float, 0.0)),
        "topographic_error": Nullable(Interval(float, 0.0, 1.0)),
        "n_patches": Nullable(Interval(int, 0)),
        "som_side": Nullable(Interval(int, 2, 256)),  # the fitted side (som_size "auto"); absent before 0.10
        "updates": Nullable(
            ListOf(
                Table(
                    {"n_images": Interval(int, 0), "n_patches": Interval(int, 0), "images_sha256": Nullable(Hex())},
                    required=("n_images", "n_patches"),
                )
            )
        ),
        **REFERENCE_STATE_FIELDS,  # absent before node references were kept
    }
    _array_fields = {
        "som_weights": Array(FLOAT_DTYPES, 2),
        "node_means": Array(FLOAT_DTYPES, 2),
        "node_whitener_strips": Array(FLOAT_DTYPES, 2),
        "node_counts": Array(INTEGER_DTYPES, 1),
        "node_scatter_tril": Nullable(Array(FLOAT_DTYPES, 2)),  # --updatable models only
        "node_references": REFERENCES_ARRAY,  # (M, 3): image, x, y; absent in older files
    }

    def __init__(
        self,
        *,
        som_size="auto",
        k=4,
        eps=3.0,
        rough_epochs=20,
        fine_epochs=15,
        som_samples=100_000,
        search="ivf",
        feature_dtype="float16",
        factor_dtype="float16",
        local_aggregation=3,
        shrinkage=0.0,
        scatter_dtype=None,
        **common,
    ):
        super().__init__(**common)
        self.scatter_dtype = scatter_dtype
        self.shrinkage = shrinkage
        self.local_aggregation = local_aggregation
        self.som_size = som_size
        self.k = k
        self.eps = eps
        self.rough_epochs = rough_epochs
        self.fine_epochs = fine_epochs
        self.som_samples = som_samples
        self.search = search
        self.feature_dtype = feature_dtype
        self.factor_dtype = factor_dtype

    @property
    def _local_aggregation(self) -> int:  # the extractor's neighbourhood mean (a class constant in the baselines)
        return self.local_aggregation

    def _validate_params(self, where: str = "") -> None:
        super()._validate_params(where)
        prefix = f"{where}: " if where else ""
        if self.som_size != "auto" and self.k > self.som_size**2:
            raise SomadError(f"{prefix}k={self.k} must be between 1 and the number of SOM nodes ({self.som_size**2})")
        if self.local_aggregation % 2 == 0:
            raise SomadError(f"{prefix}local_aggregation={self.local_aggregation} must be odd (1 = none)")

    def _fit_features(self, batches, n_images: int) -> None:
        x, position_sum, n = self._stack_patches(batches, n_images)
        self._fit_patches(x, position_sum / n)

    def _fit_items(self, train) -> None:
        """In this process (:meth:`_fit_features`), or, with :attr:`fit_shards` set, on its shards: the hook is
        called as ``fit_shards(model, train)`` and returns a context manager that yields the training patches held
        in shards, an object with ``rows`` (patches per shard), ``position_mean`` (the mean feature of each image
        position, ``(h, w, D)``), the SOM's reducer methods (``somad.som.training.Reducer``: each shard holds a
        :meth:`som_shard` of its rows) and ``moments(weights)``, each shard's :meth:`assign_moments` as they come.
        Its workers each extract with a :meth:`shard_worker` (:meth:`training_patches`). The SOM and the node
        Gaussians are this model's code either way (``somad.distributed.ray``)."""
        if self.fit_shards is None:
            super()._fit_items(train)  # NormalReferences records the training image of each model input
            return
        with self.fit_shards(self, train) as shards:
            self._fit_patches(shards, shards.position_mean)
        logger.info("a distributed fit keeps no node references: its predictions cannot be explained")

    def _fit_patches(self, patches, position_mean: torch.Tensor) -> None:
        """Fit the SOM and the node Gaussians on the training patches: rows ``(N, D)`` held here, or the shards of
        a distributed fit (:attr:`fit_shards`), whose moments are merged here as they come (Chan's formula)."""
        n_patches = int(patches.shape[0]) if isinstance(patches, torch.Tensor) else sum(patches.rows)
        som = SelfOrganizingMap(
            size=self.som_side(n_patches // len(self._copies())),  # flipped copies (augment) are not new patches
            rough_epochs=self.rough_epochs,
            fine_epochs=self.fine_epochs,
            max_samples=self.som_samples,
            seed=self.seed,
            search=self.search,
        )
        som.fit(patches, SelfOrganizingMap.position_mean_init(position_mean, som.size))
        self.node_references_, self.reference_images_, self.reference_root_ = None, None, None
        if isinstance(patches, torch.Tensor):
            assignment = self._fit_search(som.weights_)(patches, 1)[1][:, 0]
            gaussians = self.node_gaussians(som.weights_, patches=patches, assignment=assignment)
            h, w = position_mean.shape[:2]
            rows = representatives(patches, assignment, gaussians.means) if self._fit_log is not None else None
            self.node_references_ = None if rows is None else self._patch_references(rows, len(patches), h, w)
        else:
            merged = NodeMoments.zeros(*som.weights_.shape, device=som.weights_.device)
            for part in patches.moments(som.weights_):
                merged.merge(part, inplace=True)
            gaussians = self.node_gaussians(som.weights_, moments=merged)
        self.n_patches_ = n_patches
        self.som_, self.gaussians_ = som, gaussians.to(self.device_)
        self.updates_ = []
        self._searcher = None

    def som_side(self, n_patches: int) -> int:
        """The SOM's side for ``n_patches`` training patches: ``som_size``, or the ``"auto"`` rule (see the class
        docstring), logged with its reason."""
        if self.som_size != "auto":
            return int(self.som_size)
        floor = max(AUTO_MIN_SIDE, math.isqrt(self.k - 1) + 1)  # at least k nodes
        side = max(floor, min(AUTO_MAX_SIDE, math.isqrt(n_patches // PATCHES_PER_NODE)))
        if side < AUTO_MAX_SIDE:
            logger.info(
                "SOM %dx%d, not %dx%d (som_size=auto): %d training patches, %d per node on average; "
                "%dx%d needs %d",
                side, side, AUTO_MAX_SIDE, AUTO_MAX_SIDE, n_patches, n_patches // side**2,
                AUTO_MAX_SIDE, AUTO_MAX_SIDE, PATCHES_PER_NODE * AUTO_MAX_SIDE**2,
            )  # fmt: skip
        return side

    def node_gaussians(self, weights: torch.Tensor, *, patches=None, moments=None, assignment=None) -> NodeGaussians:
        """The node Gaussians by this model's rule (``eps``, ``factor_dtype``, ``shrinkage``; see
        ``somad.som.node_stats``) around SOM prototypes ``weights``: from the training ``patches`` ``(N, D)``,
        each assigned to its nearest node by the fit-time search (a local fit), or from node ``moments`` (a
        distributed fit's merged shards, :meth:`update`'s merged statistics). The moments are kept in the result
        where ``scatter_dtype`` is set, so that :meth:`update` can merge into them. ``assignment``: each patch's
        node, when the caller has already searched it."""
        rule = dict(dtype=DTYPES[self.factor_dtype], shrinkage=float(self.shrinkage))
        if moments is None:
            if assignment is None:
                assignment = self._fit_search(weights)(patches, 1)[1][:, 0]
            keep = self.scatter_dtype is not None
            return fit_node_gaussians(patches, assignment, weights, float(self.eps), keep_moments=keep, **rule)
        gaussians = gaussians_from_moments(moments, weights, float(self.eps), **rule)
        if self.scatter_dtype is None:
            gaussians.moments = None
        return gaussians

    def _kept_references(self) -> torch.Tensor | None:
        """Each node's representative training patch (``node_references_``), or ``None``."""
        return getattr(self, "node_references_", None)

    def _nearest_references(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The node nearest to each patch of ``x`` (Euclidean, to the SOM prototypes of the nodes with a reference:
        the non-empty ones) and the distance to it."""
        keep = torch.nonzero(self.node_references_[:, 0] >= 0).flatten().to(x.device)
        best, at = torch.cdist(x, self.som_.weights_[keep].float()).min(1)
        return keep[at].cpu(), best

    def _fit_search(self, weights: torch.Tensor):
        """The nearest-node search that assigns training patches to nodes (fit's, update's): over all nodes."""
        return make_search(weights, math.isqrt(weights.shape[0]), self.search)

    @classmethod
    def shard_worker(cls, params: dict, gate=None, frame: tuple[int, int] | None = None) -> SOMAD:
        """A model with ``params`` that extracts training patches as a fit with them does (device, channel subset,
        extractor, the fit's model input ``frame``: ``input_frame_``), behind the fit's input ``gate``
        (``somad.verdicts.FrameGate``): a distributed fit's worker."""
        model = cls(**params)
        model.input_frame_ = frame
        model._prepare_extraction()
        model.gate_ = gate
        return model

    def training_patches(self, items) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The patch rows ``(N, D)`` of training images ``items`` in ``feature_dtype``, in fit's order, their
        per-position sum ``(h, w, D)`` float64 and the number of model inputs, extracted as ``fit`` extracts them
        (unreadable images and frames the input gate refuses are listed in ``skipped_``): what each worker of a
        distributed fit holds of its shard."""
        return self._stack_patches(self._feature_batches(items), self._count_inputs(items))

    def _stack_patches(self, batches, n_images: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, position_sum, n = None, None, 0
        for feats in batches:
            b, d, h, w = feats.shape
            if x is None:  # room for every input up front: no second copy of the patches
                x = torch.empty(n_images * h * w, d, dtype=DTYPES[self.feature_dtype], device=feats.device)
                position_sum = torch.zeros(h, w, d, dtype=torch.float64, device=feats.device)
            x[n * h * w : (n + b) * h * w].copy_(self._patch_rows(feats))
            position_sum += feats.permute(0, 2, 3, 1).double().sum(0)
            n += b
        return x[: n * h * w], position_sum, n

    def som_shard(self, x: torch.Tensor):
        """The SOM's epoch accumulator over patch rows ``x`` held in this process (``somad.som.training.RowShard``):
        each worker of a distributed fit holds one over its rows, as a local fit holds one over all of them."""
        return RowShard(x)

    # ------------------------------------------------------------------ update
    def update(self, images, *, accept_outliers: bool = False) -> SOMAD:
        """Merge more good images into the node statistics, with the SOM held fixed; no refit.

        Each patch of ``images`` is assigned to its nearest node exactly as ``fit`` assigns its training patches
        (the fit-time ``search`` over all nodes, features rounded to ``feature_dtype``), and each node's count,
        mean and scatter are merged with the stored ones (``NodeMoments.merge``, float64). The Gaussians are
        then rebuilt by fit's rule (eps, shrinkage, one-member and empty nodes), so ``fit(A).update(B)`` gives
        the node statistics that fitting on ``A + B`` would give with the SOM that ``fit(A)`` trained (tested).
        Nodes that were empty and receive patches enter the scoring search.

        Why not ``partial_fit``: scikit-learn's ``partial_fit`` would also train the SOM on the new data; here
        the map is frozen (its topology and the IVF lists stay as fitted), only the Gaussians learn.

        The thresholds are kept: they were estimated on images held out of the fit, and the new images, now
        part of the statistics, would score optimistically low. Re-estimate them with :meth:`calibrate` on
        other held-out good images (``somad update --calibrate GOOD_DIR``).

        Needs a model fitted with ``scatter_dtype`` set (``somad fit --updatable``); the images go through the
        model's own feature extractor (backbone, image size, crop, tiles, channel subset).

        The images are scored with the current model first (``BaseDetector.screen_incoming``): those far above
        the threshold are refused, listed, unless ``accept_outliers`` (a defect merged as good is learned as
        normal); images of another kind than the training images are warned about. Their fingerprints join the
        training images' (``train_image_digests_``), so that ``calibrate`` refuses them afterwards.
        """
        self._check_fitted()
        self._validate_params()
        moments = stored = self.check_updatable()
        d = moments.dims
        search = self._fit_search(self.som_.weights_)
        items = as_items(images, train=True)
        self.screen_incoming(items, action="update", accept_outliers=accept_outliers)
        added, digests = training_fingerprints(items)
        known = set(getattr(self, "train_image_digests_", None) or ()) - {None}
        again = [it.name for it, d in zip(items, digests) if d in known]
        if again:
            logger.warning(
                "update: %d of %d images were already trained on (e.g. %s); their patches are counted again",
                len(again),
                len(items),
                again[0],
            )
        self.skipped_ = []
        n_before = int(moments.counts.sum())
        for feats in self._feature_batches(items):
            x = self._patch_rows(feats)
            if x.shape[1] != d:
                raise SomadError(
                    f"the features have {x.shape[1]} dimensions, the model's node statistics {d}: the images must "
                    f"go through the model's own extractor ({self.backbone}); refit instead"
                )
            batch = self.assign_moments(x, search)
            # The first merge copies the stored statistics to float64; later ones update that copy in place.
            moments = moments.merge(batch, inplace=moments is not stored)
        self.merge_moments(moments, n_images=len(items) - len(self.skipped_), n_before=n_before)
        # The training-set hash now names the history: the fit's images, then each update's, in order.
        self.updates_[-1]["images_sha256"] = added
        if getattr(self, "train_image_digests_", None) is not None:  # calibrate refuses the merged images too
            self.train_image_digests_ = [*self.train_image_digests_, *digests]
        if getattr(self, "train_set_sha256_", None):
            self.train_set_sha256_ = hashlib.sha256(f"{self.train_set_sha256_}+{added}".encode()).hexdigest()
        return self

    def assign_moments(self, x: torch.Tensor, search=None, *, weights=None) -> NodeMoments:
        """The node statistics of patch rows ``x`` ``(N, D)`` (already in ``feature_dtype``), each assigned to its
        nearest node as ``fit`` assigns (the fit-time search over all nodes) of the SOM, or of prototypes
        ``weights`` (a worker of a distributed fit, which has the driver's map only). Used by :meth:`update` and
        by distributed fits (per shard)."""
        weights = self.som_.weights_ if weights is None else weights
        _, assignment = (search or self._fit_search(weights))(x, 1)
        return NodeMoments.of(x, assignment[:, 0], weights.shape[0])

    def merge_moments(self, moments: NodeMoments, *, n_images: int, n_before: int | None = None) -> None:
        """Replace the node statistics by ``moments`` (the stored ones merged with new patches') and rebuild the
        Gaussians by fit's rule; ``n_images`` images were added."""
        n_before = int(self.gaussians_.counts.sum()) if n_before is None else n_before
        self.gaussians_ = self.node_gaussians(self.som_.weights_, moments=moments)
        added = int(moments.counts.sum()) - n_before
        self.n_patches_ = int(self.n_patches_ or n_before) + added
        self.n_train_images_ = int(self.n_train_images_) + int(n_images)
        self.updates_ = [*getattr(self, "updates_", []), {"n_images": int(n_images), "n_patches": added}]
        self._searcher = None
        logger.info("merged %d images (%d patches) into the node statistics", n_images, added)

    def check_updatable(self, path="") -> NodeMoments:
        """The stored node statistics; a one-line SomadError (naming ``path``) when the model has none."""
        moments = self.gaussians_.moments
        if moments is None or self.scatter_dtype is None:
            raise SomadError(NOT_UPDATABLE.format(path=f"{path}: " if path else "this model "))
        return moments

    def _patch_rows(self, feats: torch.Tensor) -> torch.Tensor:
        """Features ``(b, D, h, w)`` -> patch rows ``(b*h*w, D)`` in ``feature_dtype``, in fit's order."""
        d = feats.shape[1]
        x = feats.permute(0, 2, 3, 1).reshape(-1, d).to(DTYPES[self.feature_dtype])
        if not torch.isfinite(x).all():
            raise NumericalError(f"training features overflow {self.feature_dtype}; refit with feature_dtype='float32'")
        return x

    def _patch_scores(self, feats):
        b, d, h, w = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, d).contiguous()  # a view of channels-last features: no copy
        return self.node_distances(x, self.nearest_nodes(x)).min(1).values.view(b, h, w), None

    def nearest_nodes(self, x: torch.Tensor) -> torch.Tensor:
        """Scoring step 1: the ``k`` nearest non-empty nodes of each patch vector ``x`` ``(P, D)`` by the model's
        ``search`` (Euclidean, to the SOM prototypes): node indices ``(P, k)``."""
        self._check_fitted()
        return self._node_search()(x, self._searched_k())[1]

    def _searched_k(self) -> int:
        """``k``, at most the number of non-empty nodes (the ones searched)."""
        return min(int(self.k), int((~self.gaussians_.empty).sum()))

    def node_distances(self, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Scoring step 2: the Mahalanobis distance of each patch ``x`` ``(P, D)`` to each of its ``nodes``
        ``(P, k)``: ``(P, k)``. A patch's score is the minimum over its nodes."""
        self._check_fitted()
        return mahalanobis(x, nodes, self.gaussians_)

    def _node_search(self):
        """The scoring search over non-empty nodes, built once per (model, ``search``) and cached."""
        cached = getattr(self, "_searcher", None)
        if cached is None or cached[0] != self.search:
            cached = (
                self.search,
                make_search(self.som_.weights_, self.som_.size, self.search, exclude=self.gaussians_.empty),
            )
            self._searcher = cached
        return cached[1]

    # ------------------------------------------------------------------ export
    def export_scoring(self):
        """The native scoring groups (patch, node) pairs by node in C, which torch cannot trace: the ONNX nodes that
        mirror it (``somad.som.onnx_graph.scoring_nodes``), bound to the non-empty nodes' arrays and to this model's
        own search (its IVF index, when it probes)."""
        g = self.gaussians_
        keep = ~g.empty
        index = self._node_search()
        return functools.partial(
            scoring_nodes,
            prototypes=self.som_.weights_[keep],
            means=g.means[keep],
            whiteners=g.whiteners[keep],  # (M', D, D) lower triangular, as stored (float16 or float32)
            ids=torch.nonzero(keep).flatten(),
            k=self._searched_k(),
            grid=self.extractor_.grid_shape,
            search=index if isinstance(index, IVFSearch) else None,
        )

    def export_constant_bytes(self) -> int:
        m, d = self.gaussians_.means.shape
        factor = self.gaussians_.packed.element_size()  # float16 factors stay float16 in the graph
        return m * (4 * 3 * d + factor * sum((hi - lo) * hi for lo, hi in row_blocks(d)))

    def scoring_info(self) -> dict:
        n_empty = int(self.gaussians_.empty.sum())
        k = self._searched_k()
        index = self._node_search()
        info = {
            "search": "exact",
            "model_search": self.search,
            "k": k,
            "nodes": int(self.som_.weights_.shape[0]),
            "empty_nodes_excluded": n_empty,
        }
        if isinstance(index, IVFSearch) and not index.exhaustive_for(k):
            info.update(search="ivf", nlist=index.nlist, nprobe=index.nprobe, coarse_dims=index.coarse_dims)
        return info

    def _state_to(self, device) -> None:
        self.gaussians_ = self.gaussians_.to(device)
        som = copy.copy(self.som_)
        som.weights_ = self.som_.weights_.to(device)
        self.som_, self._searcher = som, None

    # ------------------------------------------------------------------ persistence
    def _state_arrays(self):
        g = self.gaussians_
        return {
            "som_weights": self.som_.weights_,
            "node_means": g.means,
            "node_whitener_strips": g.packed,  # packed whiteners, as held in memory (somad._native.layout.strip_layout)
            "node_counts": g.counts,
            **(
                {"node_scatter_tril": g.moments.scatter.to(SCATTER_DTYPES[self.scatter_dtype])}
                if self.scatter_dtype is not None and g.moments is not None
                else {}
            ),
            **(
                {"node_references": self.node_references_}
                if getattr(self, "node_references_", None) is not None
                else {}
            ),
        }

    def _state_info(self):
        return {
            "quantization_error": self.som_.quantization_error_,
            "topographic_error": self.som_.topographic_error_,
            "n_patches": self.n_patches_,
            "som_side": self.som_.size,
            "updates": getattr(self, "updates_", []),
            **self._reference_state(),
        }

    def _set_state(self, arrays, state):
        weights = arrays["som_weights"].float()
        m, d = weights.shape
        side = math.isqrt(m) if self.som_size == "auto" else int(self.som_size)
        if m != side**2 or state.get("som_side") not in (None, side):
            raise ValueError(f"som_weights has {m} nodes, config says {self.som_size}x{self.som_size}")
        if d != len(self.channel_indices_):
            raise ValueError(f"som_weights has {d} features, channel_indices {len(self.channel_indices_)}")
        counts = arrays["node_counts"]
        if tuple(counts.shape) != (m,) or bool((counts < 0).any()) or int(counts.sum()) == 0:
            raise ValueError(f"node_counts must be {m} non-negative counts, not all zero")
        if tuple(arrays["node_means"].shape) != (m, d):
            raise ValueError(f"node_means has shape {tuple(arrays['node_means'].shape)}, expected ({m}, {d})")
        g = NodeGaussians.from_arrays(arrays["node_means"], arrays["node_whitener_strips"], arrays["node_counts"])
        scatter = arrays.get("node_scatter_tril")
        if (scatter is None) != (self.scatter_dtype is None):
            raise ValueError(f"node_scatter_tril is {'absent' if scatter is None else 'present'}, config disagrees")
        if scatter is not None:
            if tuple(scatter.shape) != (m, tril_size(d)) or not scatter.is_floating_point():
                raise ValueError(f"node_scatter_tril has shape {tuple(scatter.shape)}, expected ({m}, {tril_size(d)})")
            g.moments = NodeMoments(g.counts, arrays["node_means"].double(), scatter)
        self.gaussians_ = g.to(self.device_)
        self.som_ = SelfOrganizingMap(size=side, seed=self.seed)
        self.som_.weights_ = weights.to(self.device_)
        self.som_.quantization_error_ = state.get("quantization_error")
        self.som_.topographic_error_ = state.get("topographic_error")
        self.n_patches_ = state.get("n_patches")
        self.updates_ = list(state.get("updates") or [])
        self._searcher = None
        self.node_references_ = self._loaded_references(arrays.get("node_references"), state, m, "node_references")


def representatives(patches: torch.Tensor, assignment: torch.Tensor, means: torch.Tensor, block: int = 1 << 16):
    """The row of each node's member patch nearest its mean (Euclidean; the first on ties), -1 for empty nodes:
    ``(M,)`` int64. ``patches`` ``(N, D)``, ``assignment`` ``(N,)`` each row's node, ``means`` ``(M, D)``."""
    n, m = patches.shape[0], means.shape[0]
    means = means.to(patches.device, torch.float32)
    assignment = assignment.to(patches.device)
    d = torch.empty(n, dtype=torch.float32, device=patches.device)
    for lo in range(0, n, block):
        a = assignment[lo : lo + block]
        d[lo : lo + block] = (patches[lo : lo + block].float() - means[a]).square().sum(1)
    nearest = torch.full((m,), float("inf"), device=d.device).scatter_reduce(0, assignment, d, "amin")
    hit = d == nearest[assignment]
    rows = torch.arange(n, device=d.device)
    first = torch.full((m,), n, dtype=torch.int64, device=d.device)
    first = first.scatter_reduce(0, assignment[hit], rows[hit], "amin")
    return torch.where(first < n, first, torch.full_like(first, -1)).cpu()
