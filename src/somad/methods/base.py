"""What every detector shares: parameters, fitting (feature streaming, the input gate), prediction, the
scikit-learn wrappers and the export hooks, composed with the jobs that have their own modules:

* the images a detector accepts: ``somad.io.inputs`` (``ImageItem``, ``as_items``, decoding; torch-free, shared
  with the ONNX runtime);
* the thresholds (held-out split, cross-fitting, ``calibrate``): ``methods.thresholds`` (:class:`ThresholdsMixin`);
* the model file (``save``, ``check_file``, the detector rebuilt from a file): ``methods.persistence``
  (:class:`PersistenceMixin`);
* tiled prediction (input counts, stitching): ``methods.tiling``;
* the verdict rule (a refused frame is anomalous, else ``score > threshold``): ``somad.verdicts.decide``.

A prediction, top to bottom:

1. :meth:`BaseDetector.predict_iter` decodes each image (``io.inputs.decoded``) and preprocesses it;
2. ``features.FeatureExtractor`` turns the batch into patch features ``(B, D, h, w)``;
3. the method's ``_patch_scores`` (e.g. ``SOMAD``: k nearest SOM nodes, min Mahalanobis) gives ``(B, h, w)``;
4. :meth:`BaseDetector._anomaly_maps` upsamples (bilinear) to the model input and blurs (Gaussian, sigma 4);
   the image score is the map maximum (or the method's own image score); tiles are stitched first
   (``tiling.stitch_maps``);
5. ``features.to_original_resolution`` puts the map back onto the original image when asked.

Sign convention: higher = more anomalous, everywhere. Nothing is normalised with test-set statistics.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from somad.errors import ImageLoadError, NotFittedError, NumericalError, SomadError
from somad.features.backbones import BACKBONES, backbone_spec
from somad.features.extractor import (
    FeatureExtractor,
    FeatureGraph,
    Geometry,
    TileLayout,
    resize_blur_matrix,
    resolve_device,
    select_channels,
    to_original_resolution,
    upsample_blur,
)
from somad.io.images import image_size
from somad.io.inputs import ImageItem, as_items, decoded, training_fingerprints, warn_defect_folders
from somad.io.schema import BATCH_SIZE, MAX_IMAGE_SIZE
from somad.methods.persistence import PersistenceMixin
from somad.methods.prediction import Prediction
from somad.methods.thresholds import CROSS_FIT_BELOW, CROSS_FIT_FOLDS, ThresholdsMixin
from somad.methods.tiling import count_inputs, stitch_maps
from somad.params import Either, Interval, Options, Param, Params, Text, validate
from somad.progress import progress_bar
from somad.resize import frame_size
from somad.verdicts import (
    MAX_REFUSED_FRACTION,
    OK,
    FrameGate,
    check_frame,
    chroma,
    decide,
    frame_stats,
    input_profile,
    normalized_score,
    predicted_mask,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
#: ``augment``: the copies of each training image's model inputs ``(K, 3, S, S)`` that ``fit`` learns, as the dims
#: each copy flips (``()``: the inputs themselves, always first).
AUGMENTATIONS = {"flips": ((), (-1,), (-2,), (-2, -1))}


class BaseDetector(ThresholdsMixin, PersistenceMixin, Params):
    """Shared machinery of SOMAD, PaDiM and PatchCore. Subclasses implement ``_fit_features``,
    ``_patch_scores``, ``_state_arrays`` and ``_set_state`` (and may add rows to ``_state_fields`` and
    ``_array_fields``: ``methods.persistence``), and may set the class attributes ``_stages``
    (backbone stages used, default all three) and ``_local_aggregation`` (see ``features.FeatureExtractor``).
    To be exported (``somad export``), they answer :meth:`export_scoring` and ``_state_to`` (and may say
    :meth:`export_constant_bytes` and :meth:`scoring_info`): the exporter asks, and never looks at the method.

    Parameters (common to every method)
    -----------------------------------
    backbone : str, default "efficientnet_lite0"
    weights : str, default "default"
        ``"default"`` (ImageNet), a local state-dict path, or ``"none"`` (random init: tests only).
    image_size : int, default 256
    crop_size : int or None, default None
        Center-crop side after the resize; ``None`` (default) scores every pixel of the frame (the paper
        crops 224: ``preset="paper"``).
    dims : int or None, default None
        Random channel subset size; ``None`` keeps all channels up to 550.
    blur_sigma : float, default 4.0
    val_fraction : float, default 0.1
        Fraction of the good training images held out to set the thresholds (``cv="holdout"``). An MVTec
        category with a ``validation/good`` folder (MVTec 3D-AD) holds out those images instead, and trains on
        all of ``train/good``. 0 sets no thresholds (with any ``cv``).
    cv : "auto", "holdout" or int, default "auto"
        How ``fit`` estimates the good images' scores for the thresholds when the category has no
        ``validation/good`` folder. An int K >= 2: K-fold cross-fitting: the images are split into K seeded folds,
        a model with the same parameters is fitted on K - 1 of them and scores the held-out fold, and the final
        model is fitted on all images; the thresholds come from the out-of-fold scores and maps of all images (K
        above the number of images: one fold per image). ``"holdout"``: a seeded ``val_fraction`` of the images is
        held out and not trained on. ``"auto"``: :data:`CROSS_FIT_FOLDS` folds below :data:`CROSS_FIT_BELOW` good
        images, else the hold-out (measured in docs/benchmarks.md, "Few good images"). ``threshold_info_["rule"]``
        records which was used.
    threshold_quantile : float, default 0.9
        Quantile of the held-out images' scores used as the image threshold (expected false-alarm rate:
        about one minus it; ``somad.verdicts.false_alarm_rate`` for few images). 0.9 was chosen by measurement
        (docs/benchmarks.md): on the shared data, a threshold at a
        1% false-alarm rate cost up to 19 points of balanced accuracy where defects and good parts overlap.
    pixel_threshold_quantile : float, default 0.999
        Quantile of all held-out map pixels used as the pixel threshold (see ``somad.verdicts``): about 0.1% of
        a good image's pixels are expected above it. Chosen by measurement (docs/benchmarks.md).
    tile_size : int or None, default None
        Tiling for large or elongated images: the image is resized with its aspect ratio kept (shorter side
        ``image_size``) and covered by square tiles of this side (a multiple of 16), overlapping by
        ``tile_overlap``; the tiles' patch scores are stitched (averaged where they overlap) into one map of the
        whole frame. ``None``: one model input per image (its shape: ``aspect``). Needs ``crop_size=None``.
    tile_overlap : float, default 0.25
        Fraction of a tile shared with its neighbour (at least; tiles are spread evenly over the frame).
    aspect : {"auto", "keep", "square"}, default "auto"
        The model input's shape without tiles or crop. ``"square"``: every image resized to ``image_size`` square
        (the papers'; an elongated part is squashed). ``"keep"``: resized to the training images' frame, their
        (median) aspect ratio kept, the shorter side ``image_size`` and each side a multiple of 16
        (``somad.resize.frame_size``; learned as ``input_frame_``); every image is resized to that frame.
        ``"auto"``: ``"keep"`` when the training images share one frame (a fixed camera: every line's case), else
        ``"square"`` (images of many shapes, e.g. crops, have no one aspect ratio to keep). Measured
        (docs/benchmarks.md, "The aspect ratio kept"): tire's 300x400 frames kept 256x336 gave image AUROC / AU-PRO
        / balanced accuracy +1.9 / +2.3 / +6.3 points; magnetic_tile's crops of many shapes, each kept, -3.9 image
        AUROC: there ``"auto"`` resizes square. A crop (``crop_size``) is of a square: with it, ``"auto"`` is square.
    augment : {None, "flips"}, default None
        ``"flips"``: ``fit`` also learns each training image's horizontal, vertical and 180-degree flips
        (:data:`AUGMENTATIONS`; the copies of an image follow it, in that order). For few images of textures or of
        parts that look the same mirrored: from 10 images, magnetic_tile's image AUROC rose 5.8 points and its
        AU-PRO 2.3, metal_plate's AU-PRO 0.7, tire's image AUROC +4.4 and -1.9 on two seeds (docs/benchmarks.md,
        "Flips of few images"). Not for parts whose mirror image is a defect (a part inserted the wrong way
        round, a label on the wrong side): the model learns mirrored parts as good. The held-out and cross-fitted
        images that set the thresholds are never flipped.
    batch_size : int, default 16
    device : {"auto", "cpu", "cuda"}, default "auto"
    seed : int, default 0
    on_error : {"fail", "skip"}, default "fail"
        What ``fit`` does with an unreadable training image.
    """

    method = "base"
    _stages: tuple[int, ...] = (0, 1, 2)  # backbone stages the features come from (0/1/2 = stride 4/8/16)
    _local_aggregation: int = 1  # neighbourhood-mean kernel applied to each stage (1 = none)
    _scoring: tuple[str, ...] = ()  # parameters that only affect scoring: load() may override them
    #: Where ``fit`` holds the training patches: ``None``, in this process; a method that can shard its fit
    #: (SOMAD) takes a hook here (``somad.distributed.ray`` sets one). Cross-fitted fold models get it too.
    fit_shards = None
    _parameters = {
        "backbone": Param(
            Options(tuple(BACKBONES)), "feature extractor; efficientnet_lite0/2 ship their ImageNet weights offline"
        ),
        "weights": Param(
            Text(),
            "'default' = ImageNet weights; a path = local state-dict file; 'none' = random "
            "initialisation, FOR TESTS ONLY (meaningless features)",
        ),
        "image_size": Param(Interval(int, 32, MAX_IMAGE_SIZE), "resize side in pixels (with --tile: the shorter side)"),
        "crop_size": Param(
            Interval(int, 16, MAX_IMAGE_SIZE),
            "center-crop side after the resize",
            flag="--crop",
            none="every pixel of the frame is scored",
        ),
        "tile_size": Param(
            Interval(int, 32, MAX_IMAGE_SIZE),
            "tiling for large or elongated images: keep the aspect "
            "ratio and score overlapping SIDE x SIDE tiles (a multiple of 16), stitched into one map; "
            "needs --crop none",
            flag="--tile",
            none="no tiles",
            metavar="SIDE",
        ),
        "tile_overlap": Param(Interval(float, 0.0, 1.0, open_high=True), "fraction shared by neighbouring tiles"),
        "aspect": Param(
            Options(("auto", "keep", "square")),
            "model input shape: 'keep' = the training images' aspect ratio (shorter side --image-size), 'square' = "
            "squashed to --image-size square, 'auto' = keep when the training images share one frame (a fixed "
            "camera), else square",
        ),
        "dims": Param(
            Interval(int, 1, 4096),
            "keep a seeded random subset of this many feature channels",
            none="all channels, at most 550",
        ),
        "blur_sigma": Param(Interval(float, 0.0, 64.0), "Gaussian blur of the maps"),
        "val_fraction": Param(
            Interval(float, 0.0, 1.0, open_high=True),
            "fraction of good training images held out to set the thresholds (MVTec 3D: validation/good instead)",
        ),
        "cv": Param(
            Either((Options(("auto", "holdout")), Interval(int, 2, None))),
            f"how the thresholds' good scores are estimated: K = K-fold cross-fitting (each good image scored by a "
            f"model fitted without it, the final model on all), 'holdout' = hold out --val-fraction, 'auto' = "
            f"{CROSS_FIT_FOLDS} folds below {CROSS_FIT_BELOW} good images, else the hold-out",
            metavar="{auto,holdout,K}",
        ),
        "threshold_quantile": Param(
            Interval(float, 0.0, 1.0, open_low=True),
            "image threshold = this quantile of the held-out good scores (expected false-alarm rate: 1 - it)",
        ),
        "pixel_threshold_quantile": Param(
            Interval(float, 0.0, 1.0, open_low=True),
            "pixel threshold = this quantile of the held-out good maps' pixels",
        ),
        "augment": Param(
            Options(tuple(AUGMENTATIONS)),
            "also learn each training image's horizontal, vertical and 180-degree flips (few images of textures or "
            "mirror-symmetric parts; never where a mirrored part is a defect)",
            none="the training images as they are",
        ),
        "batch_size": Param(BATCH_SIZE, "images per backbone batch", cli=False),
        "device": Param(Options(("auto", "cpu", "cuda")), "device", cli=False),
        "seed": Param(Interval(int, 0, 2**32 - 1), "random seed"),
        "on_error": Param(
            Options(ON_ERROR_CHOICES), "unreadable training images: stop, or skip and list them", cli=False
        ),
    }

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="default",
        image_size=256,
        crop_size=None,
        dims=None,
        blur_sigma=4.0,
        val_fraction=0.1,
        cv="auto",
        threshold_quantile=0.9,
        pixel_threshold_quantile=0.999,
        tile_size=None,
        tile_overlap=0.25,
        aspect="auto",
        augment=None,
        batch_size=16,
        device="auto",
        seed=0,
        on_error="fail",
    ):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.dims = dims
        self.blur_sigma = blur_sigma
        self.val_fraction = val_fraction
        self.cv = cv
        self.threshold_quantile = threshold_quantile
        self.pixel_threshold_quantile = pixel_threshold_quantile
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.aspect = aspect
        self.augment = augment
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.on_error = on_error

    # ------------------------------------------------------------------ parameters
    def _validate_params(self, where: str = "") -> None:
        """The parameter table's rules (``somad.params``), then the rules that tie parameters together."""
        params = self.get_params()
        if isinstance(params.get("device"), str) and params["device"].startswith("cuda:"):
            params["device"] = "cuda"
        validate(type(self), params, where)
        prefix = f"{where}: " if where else ""
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise SomadError(
                f"{prefix}crop_size={self.crop_size} is larger than image_size={self.image_size}; "
                "use a crop <= the resize"
            )
        if self.tile_size is not None and (
            self.crop_size is not None
            or self.tile_size > self.image_size
            or self.tile_size % 16
            or self.image_size % 16
        ):
            raise SomadError(
                f"{prefix}tile_size={self.tile_size} needs crop_size=None and a multiple of 16 up to "
                f"image_size ({self.image_size}, itself a multiple of 16)"
            )
        if self.aspect == "keep" and (self.crop_size is not None or self.tile_size is not None):
            raise SomadError(
                f"{prefix}aspect='keep' resizes the whole image to one frame: it needs crop_size=None and no tiles "
                "(tiles keep each image's aspect ratio themselves); use --aspect square or auto"
            )

    # ------------------------------------------------------------------ fit
    def fit(self, images, y=None) -> BaseDetector:
        """Fit on defect-free images.

        Parameters
        ----------
        images : folder, MVTec category, paths, PIL images, numpy frames, or a list of these (``io.inputs.as_items``)
        y : ignored
        """
        self._validate_params()
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        train, val = self.held_out_split(images)
        warn_defect_folders(train + val)
        self.input_frame_ = self._learn_frame(train)
        self._prepare_extraction()
        logger.info(
            "fitting %s on %d images (%d held out), %d features per patch",
            self.method,
            len(train),
            len(val),
            self.extractor_.dims,
        )
        self.gate_ = self._learn_gate(train)
        self._fit_items(train)
        self.n_train_images_ = len(train) - len(self.skipped_)
        self.train_set_sha256_, self.train_image_digests_ = training_fingerprints(train)
        self.input_profile_ = training_profile(train)
        self.image_threshold_ = self.pixel_threshold_ = self.display_range_ = None
        self.n_val_images_ = 0
        self.threshold_info_ = None
        self._fit_thresholds(images, train, val)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _prepare_extraction(self) -> None:
        """fit's first step (and each worker's of a distributed fit): the device, the seeded channel subset and
        the feature extractor."""
        self.device_ = resolve_device(self.device)
        self.channel_indices_ = select_channels(self._feature_channels(), self.dims, self.seed)
        self.extractor_ = self._make_extractor()
        self.skipped_ = []

    def _feature_channels(self) -> int:
        """How many feature channels the backbone stages used give, before the ``dims`` subset."""
        return sum(backbone_spec(self.backbone).channels[s] for s in self._stages)

    def _make_extractor(self) -> FeatureExtractor:
        return FeatureExtractor(
            self.backbone,
            weights=self.weights,
            image_size=self.image_size,
            crop_size=self.crop_size,
            channel_indices=self.channel_indices_,
            device=self.device_,
            seed=self.seed,
            stages=self._stages,
            local_aggregation=self._local_aggregation,
            tile_size=self.tile_size,
            tile_overlap=self.tile_overlap,
            frame=getattr(self, "input_frame_", None),
        )

    def _learn_frame(self, train: list[ImageItem]) -> tuple[int, int] | None:
        """The frame every image is resized to, by :attr:`aspect` and the training images' sizes (read from the
        file headers): ``None`` for ``image_size`` square (``"square"``, a crop, tiles, or ``"auto"`` over
        training images of several frames), else ``somad.resize.frame_size`` of their median size."""
        if self.aspect == "square" or self.crop_size is not None or self.tile_size is not None:
            return None
        sizes = header_sizes(train)
        frames = {frame_size(h, w, self.image_size) for h, w in sizes}
        if not sizes or (self.aspect == "auto" and len(frames) > 1):
            if len(frames) > 1:
                logger.info(
                    "model input %dx%d (aspect='auto'): the training images come in %d frame sizes, so none is kept",
                    self.image_size, self.image_size, len(frames),
                )  # fmt: skip
            return None
        height, width = (int(v) for v in np.median(np.asarray(sizes), axis=0))
        frame = frame_size(height, width, self.image_size)
        if frame == (self.image_size, self.image_size):
            return None
        logger.info(
            "model input %dx%d: the training images' aspect ratio kept (%dx%d; aspect=%r)",
            frame[1], frame[0], width, height, self.aspect,
        )  # fmt: skip
        return frame

    def _count_inputs(self, items: list[ImageItem]) -> int:
        """How many model inputs a fit on ``items`` makes: one per image, or each image's tiles
        (``tiling.count_inputs``), times the copies of :attr:`augment`."""
        return count_inputs(self.extractor_.geometry, items) * len(self._copies())

    def _copies(self) -> tuple[tuple[int, ...], ...]:
        """The copies ``fit`` makes of each training image's model inputs: the dims each flips (:data:`AUGMENTATIONS`;
        ``((),)``, the inputs alone, without :attr:`augment`)."""
        return AUGMENTATIONS.get(self.augment, ((),))

    def _augmented(self, inputs: torch.Tensor) -> torch.Tensor:
        """A training image's model inputs ``(K, 3, S, S)`` followed by their copies of :attr:`augment`."""
        copies = self._copies()
        return inputs if len(copies) == 1 else torch.cat([inputs.flip(dims) if dims else inputs for dims in copies])

    def _decoded(
        self, items: list[ImageItem], on_error: str, skipped: list[str]
    ) -> Iterator[tuple[ImageItem, torch.Tensor, Image.Image, TileLayout]]:
        """Decode (``somad.io.inputs.decoded``: unreadable images raised with ``on_error="fail"``, else logged and
        appended to ``skipped``) and preprocess images one at a time into their model inputs and layout."""
        for item, image in decoded(items, on_error, skipped):
            inputs, layout = self.extractor_.tiles(image)  # (K, 3, S, S): K = 1 without tiles
            yield item, inputs, image, layout

    def _learn_gate(self, train: list[ImageItem]) -> FrameGate:
        """The input gate learned from the training images (``somad.verdicts.FrameGate.learn``), each read once
        before the features are; stops with the fix when it would refuse more than ``MAX_REFUSED_FRACTION`` of
        them. Unreadable images are left to the feature pass (raised or skipped there, by ``on_error``)."""
        stats, names = [], []
        bar = progress_bar(total=len(train), desc="input gate", unit="img")
        try:
            for item in train:
                bar.update(1)
                try:
                    image = item.load()
                except ImageLoadError:
                    if self.on_error == "fail":
                        raise
                    continue
                stats.append(frame_stats(image, "resized"))
                names.append(item.name)
        finally:
            bar.close()
        gate = FrameGate.learn(stats, "resized")
        refused = [(name, status) for name, s in zip(names, stats) if (status := gate.check(s)) != OK]
        if len(refused) > MAX_REFUSED_FRACTION * len(stats):
            raise SomadError(
                f"the input gate refuses {len(refused)} of {len(stats)} training images, more than "
                f"{100 * MAX_REFUSED_FRACTION:.0f}% ({_gate_summary(refused)}); a training folder holds good frames "
                "of the product only: remove the refused ones (or fix the exposure) and fit again"
            )
        logger.info(
            "input gate learned from %d training images: saturated above %.0f%%, mostly blank above %.0f%% of blocks",
            gate.n_images,
            100 * gate.saturated_fraction,
            100 * gate.flat_fraction,
        )
        return gate

    def _feature_batches(self, items: list[ImageItem]) -> Iterator[torch.Tensor]:
        """Features ``(b, D, h, w)`` of the training images, ``batch_size`` at a time, with a progress bar. Frames the
        model's input gate refuses are left out (listed in ``skipped_``, and in one warning)."""
        pending, names, refused = [], [], []
        bar = progress_bar(total=len(items), desc="features", unit="img")
        try:  # close (erase) the bar on errors too, so that the error line starts a line of its own
            for item, inputs, image, _ in self._decoded(items, self.on_error, self.skipped_):
                status = check_frame(image, getattr(self, "gate_", None))
                if status != OK:
                    logger.debug("%s: left out of training, %s", item.name, status)
                    self.skipped_.append(f"{item.name}: {status}")
                    refused.append((item.name, status))
                    continue
                inputs = self._augmented(inputs)
                pending.extend(inputs)
                names.extend([item] * len(inputs))
                bar.update(1)
                while len(pending) >= self.batch_size:
                    yield self._checked_features(torch.stack(pending[: self.batch_size]), names[: self.batch_size])
                    pending, names = pending[self.batch_size :], names[self.batch_size :]
            if pending:
                yield self._checked_features(torch.stack(pending), names)
        finally:
            bar.close()
        if refused:
            logger.warning(
                "%d of %d training images left out: the input gate refused them (%s); check the training folder",
                len(refused),
                len(items),
                _gate_summary(refused),
            )
        if len(self.skipped_) == len(items):
            raise SomadError(
                f"no readable training images: all {len(items)} were skipped, the first as {self.skipped_[0]}"
                if self.skipped_
                else "no training images"
            )

    def _checked_features(self, batch: torch.Tensor, items: Sequence[ImageItem] = ()) -> torch.Tensor:
        feats = self.extractor_(batch)
        if not torch.isfinite(feats).all():
            where = ""
            if items:
                bad = [it.name for it, ok in zip(items, torch.isfinite(feats).flatten(1).all(1).tolist()) if not ok]
                where = f" for {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NumericalError(
                f"the backbone produced NaN/Inf features{where}; check the images and the weights file"
            )
        return feats

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "extractor_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load a model file")

    @torch.no_grad()
    def predict_iter(
        self, images, *, on_error: str = "fail", batch_size: int | None = None, skipped: list[str] | None = None
    ) -> Iterator[Prediction]:
        """Score images one batch at a time, yielding a :class:`Prediction` per readable image.

        Unreadable images raise :class:`ImageLoadError` (``on_error="fail"``) or are logged, appended to
        ``skipped`` (one message each) and left out (``"skip"``). Frames refused by the input gate
        (``somad.verdicts.check_frame``) are scored but carry their reason in ``Prediction.status``. The model
        is not changed.
        """
        self._check_fitted()
        if on_error not in ON_ERROR_CHOICES:
            raise SomadError(f"on_error={on_error!r} is invalid; choose one of: {', '.join(ON_ERROR_CHOICES)}")
        items = as_items(images)
        batch_size = self.batch_size if batch_size is None else batch_size
        validate(BaseDetector, {"batch_size": batch_size})  # 0 or -1 would score the whole run as one batch
        skipped = [] if skipped is None else skipped
        pending: list[tuple[ImageItem, torch.Tensor, Image.Image, TileLayout]] = []
        for entry in self._decoded(items, on_error, skipped):
            pending.append(entry)
            if len(pending) == batch_size:
                yield from self._predict_batch(pending)
                pending = []
        if pending:
            yield from self._predict_batch(pending)

    def _predict_batch(self, pending) -> Iterator[Prediction]:
        inputs = torch.cat([p[1] for p in pending])
        feats = self._checked_features(inputs, [p[0] for p in pending for _ in range(len(p[1]))])
        maps, scores = self._anomaly_maps(feats, [p[3] for p in pending])
        for (item, _, image, _), m, s in zip(pending, maps, scores):
            status = check_frame(image, getattr(self, "gate_", None))
            yield Prediction(item, float(s), m, (image.height, image.width), image, status)

    def predict(self, images, *, on_error: str = "fail") -> np.ndarray:
        """scikit-learn's meaning (``IsolationForest.predict``): ``(N,)`` int labels, ``-1`` anomalous, ``+1`` normal.

        An image is anomalous when its score is above the saved threshold or the input gate refused the frame
        (:meth:`verdict`). For scores and maps use :meth:`predict_maps`; for everything per image (score, map,
        status) :meth:`predict_iter`. Needs a threshold.
        """
        self._require_threshold()
        flagged = [self.verdict(p) for p in self.predict_iter(images, on_error=on_error)]
        return np.where(np.asarray(flagged, dtype=bool), -1, 1).astype(np.int64)

    def predict_maps(self, images, *, resolution: str = "input", on_error: str = "fail"):
        """Anomaly scores and maps.

        Parameters
        ----------
        images : folder, paths, PIL images, numpy frames, or a list of these (``io.inputs.as_items``)
        resolution : {"input", "original"}
            ``"input"``: maps at the model input ``(N, S, S)``; ``"original"``: a list of ``(H_i, W_i)`` maps
            at each image's own size (the crop put back in place; see ``features.to_original_resolution``).

        Returns
        -------
        scores : ndarray (N,) float32, higher = more anomalous
        maps : ndarray (N, S, S) float32, or a list of (H_i, W_i) arrays (``"original"``, or tiled frames of
            different sizes)
        """
        if resolution not in ("input", "original"):
            raise SomadError(f"resolution={resolution!r} is invalid; choose one of: input, original")
        scores, maps = [], []
        for p in self.predict_iter(images, on_error=on_error):
            scores.append(p.score)
            if resolution == "input":
                maps.append(p.map.cpu().numpy())
            else:
                maps.extend(to_original_resolution(p.map[None], self.extractor_.geometry, [p.original_size]))
        scores = np.asarray(scores, dtype=np.float32)
        same = resolution == "input" and maps and len({m.shape for m in maps}) == 1  # tiled frames may differ
        return scores, (np.stack(maps) if same else maps)

    def score_samples(self, images) -> np.ndarray:
        """scikit-learn's meaning: the opposite of the anomaly score, ``(N,)`` (the lower, the more abnormal)."""
        return -self.predict_maps(images)[0]

    def decision_function(self, images) -> np.ndarray:
        """scikit-learn's meaning: ``image_threshold_ - score``, ``(N,)``; negative = anomalous (frames refused by
        the input gate are not marked here: use :meth:`verdict`). Needs a threshold."""
        self._require_threshold()
        return self.image_threshold_ + self.score_samples(images)

    def normalized_scores(self, scores) -> np.ndarray:
        """Anomaly scores on a [0, 1] scale with the image threshold at exactly 0.5 (``somad.verdicts.
        normalized_score``): below it, how far up the held-out good scores' distribution a score lies (0.25: half
        as far as the threshold); above it, ``1 - 0.5 * (t - m) / (s - m)`` (0.75: twice as far from the median
        good score as the threshold). Needs thresholds set by fit or calibrate in somad 0.7 or later."""
        self._require_threshold()
        info = self.threshold_info_ or {}
        if not info.get("good_scores") and info.get("good_score_median") is None:
            raise SomadError(
                "this model's thresholds do not record the good images' scores, which the normalised scale "
                "needs (a file from before somad 0.7); run `somad calibrate` with good images"
            )
        return normalized_score(scores, self.image_threshold_, info)

    def _require_threshold(self) -> None:
        self._check_fitted()
        if self.image_threshold_ is None:
            raise SomadError(
                "this model has no threshold (fitted with val_fraction=0 or a single image); "
                "refit with --val-fraction > 0, or run `somad calibrate`"
            )

    def verdict(self, prediction: Prediction) -> bool | None:
        """Is this image anomalous? Frames refused by the input gate always are; ``None`` without a threshold."""
        return decide(prediction.score, self.image_threshold_, valid=prediction.valid)

    def mask(self, prediction: Prediction, anomaly_map: np.ndarray) -> np.ndarray | None:
        """The predicted defect mask of ``anomaly_map`` (this prediction's map at any resolution): non-empty
        exactly when :meth:`verdict` is True (``somad.verdicts.predicted_mask``); ``None`` without a threshold."""
        return predicted_mask(anomaly_map, self.verdict(prediction), self.pixel_threshold_, valid=prediction.valid)

    def _anomaly_maps(self, feats: torch.Tensor, layouts: Sequence[TileLayout] | None = None):
        """Features ``(B, D, h, w)`` of the model inputs -> one map per image and image scores ``(N,)``.

        Without tiles (``layouts`` None or one input per image): maps ``(B, S, S)`` at the model input. With
        tiles: each image's tiles' patch scores are placed in its frame's patch grid, averaged where tiles
        overlap, and the stitched grid is upsampled and blurred to the frame (a list of ``(H, W)`` maps); the
        image score is the map maximum, or the largest of its tiles' own image scores (PatchCore).
        """
        patch, tile_scores = self._patch_scores(feats)
        if self.extractor_.geometry.tile_size is None:
            s = self.extractor_.geometry.input_shape
            maps = upsample_blur(patch, s, self.blur_sigma)  # bilinear to the input size, then the Gaussian blur
            _check_finite(maps)
            return maps, (maps.flatten(1).max(1).values if tile_scores is None else tile_scores)
        maps, scores = stitch_maps(patch, layouts, self.extractor_.stride, self.blur_sigma, tile_scores)
        for m in maps:
            _check_finite(m)
        return maps, scores

    # ------------------------------------------------------------------ subclass hooks
    def _fit_items(self, train: list[ImageItem]) -> None:
        """Learn from the training images (their unreadable ones appended to ``skipped_``): here, streamed through
        the extractor into ``_fit_features``."""
        self._fit_features(self._feature_batches(train), self._count_inputs(train))

    def _fit_features(self, batches: Iterable[torch.Tensor], n_images: int) -> None:
        raise NotImplementedError

    def _patch_scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch score grid ``(B, h, w)`` and, optionally, the method's own image scores ``(B,)``."""
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _set_state(self, arrays: dict[str, torch.Tensor], state: dict) -> None:
        raise NotImplementedError

    def _state_info(self) -> dict:
        return {}

    def _state_to(self, device: torch.device) -> None:
        """Put the learned state on ``device`` (:meth:`cpu_copy`): new arrays, the old ones untouched."""
        raise NotImplementedError

    # ------------------------------------------------------------------ export (somad export asks, each method answers)
    def export_scoring(self):
        """The patch scoring of the exported graph: the torch module :meth:`_patch_scores` runs (features
        ``(N, D, h, w)`` -> patch scores ``(N, h, w)`` and the method's own image scores ``(N,)`` or ``None``), which
        the exporter traces; or, where the native scoring cannot be traced, a function ``features_name -> (ONNX
        nodes, initializers, patch scores name)`` that mirrors it."""
        raise SomadError(f"{self.method} models cannot be exported")

    def export_constant_bytes(self) -> int:
        """Bytes of the scoring constants the exported graph holds (the backbone aside)."""
        return 0

    def scoring_info(self) -> dict:
        """What an export's description records of the scoring (``somad_export.json``, ``"scoring"``)."""
        return {}

    def feature_graph(self) -> torch.nn.Module:
        """The feature stage as a traceable module: uint8 ``(N, S, S, 3)`` -> features (``features.FeatureGraph``)."""
        return FeatureGraph(self.extractor_)

    def map_matrices(self, layout: TileLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (H, h), cols (W, w))``: the bilinear upsampling of a patch grid ``(h, w)`` to a map ``(H, W)`` and
        the Gaussian blur, one matrix per axis, as :meth:`_anomaly_maps` applies them (``map = rows @ grid @
        cols.T``): the model input's square without ``layout``; with a tiled model's ``layout``, its frame, whose
        grid is the stitched one (``tiling.stitch_maps``)."""
        ex = self.extractor_
        if layout is None:
            sizes, grids = ex.geometry.input_shape, ex.grid_shape
        else:
            sizes, grids = layout.size, tuple(n // ex.stride for n in layout.size)
        cpu, sigma = torch.device("cpu"), float(self.blur_sigma)
        rows, cols = (resize_blur_matrix(n, g, sigma, cpu).clone() for n, g in zip(sizes, grids))
        return rows, cols

    def original_map(self, prediction: Prediction) -> np.ndarray:
        """The prediction's map on its original image, ``(H, W)`` (``features.to_original_resolution``)."""
        return to_original_resolution(prediction.map[None], self.extractor_.geometry, [prediction.original_size])[0]

    def cpu_copy(self, **scoring) -> BaseDetector:
        """This detector scoring on CPU, with the scoring-only parameters ``scoring`` changed (``_scoring``, e.g.
        SOMAD's ``search``), without touching this one (its learned arrays are shared where already on CPU)."""
        self._check_fitted()
        for name in scoring:
            if name not in self._scoring:
                valid = ", ".join(self._scoring) or "none"
                raise SomadError(f"{name!r} cannot be changed on a {self.method} model; valid: {valid}")
        validate(type(self), scoring)
        clone = copy.copy(self)
        for name, value in scoring.items():
            setattr(clone, name, value)
        cpu = torch.device("cpu")
        clone._state_to(cpu)
        clone.device_ = cpu
        if self.device_.type != "cpu":
            clone.device = "cpu"
            clone.extractor_ = clone._make_extractor()
        return clone


def _check_finite(maps: torch.Tensor) -> None:
    if not torch.isfinite(maps).all():
        raise NumericalError("NaN/Inf in anomaly maps; check the model file and the input images")


#: How many training images ``fit`` decodes to record their colour (``somad.verdicts.input_profile``).
PROFILE_SAMPLE = 16


def training_profile(items: Sequence[ImageItem]) -> dict:
    """What the training images look like (``somad.verdicts.input_profile``): their sizes (from the file headers)
    and the colour of up to :data:`PROFILE_SAMPLE` of them, evenly spread; unreadable ones are left out."""
    sizes, chromas = header_sizes(items), []
    step = max(1, len(items) // PROFILE_SAMPLE)
    for item in list(items)[::step][:PROFILE_SAMPLE]:
        try:
            chromas.append(chroma(item.load()))
        except ImageLoadError:
            continue
    return input_profile(chromas, sizes)


def header_sizes(items: Sequence[ImageItem]) -> list[tuple[int, int]]:
    """The ``(height, width)`` of each readable image of ``items``, from the file headers (or the image given)."""
    sizes = []
    for item in items:
        try:
            sizes.append((item.image.height, item.image.width) if item.path is None else image_size(item.path))
        except ImageLoadError:
            continue
    return sizes


def _gate_summary(refused: list[tuple[str, str]]) -> str:
    """Frames the input gate refused, in a few words: how many for each reason, and the first one."""
    kinds: dict[str, int] = {}
    for _, status in refused:
        kind = status.split(": ", 1)[-1].split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return f"{counts}; the first, {refused[0][0]}: {refused[0][1].split(': ', 1)[-1]}"


#: ``ImageItem``, ``as_items`` (``somad.io.inputs``) and ``Prediction`` (``methods.prediction``) are named here too,
#: where callers have always imported them from.
__all__ = ["BaseDetector", "Geometry", "ImageItem", "Prediction", "as_items"]
