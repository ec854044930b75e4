"""What every detector shares: inputs, feature streaming, thresholds, the anomaly-map pipeline, files.

A prediction, top to bottom:

1. :meth:`BaseDetector.predict_iter` decodes each image (``images.load_image``) and preprocesses it;
2. ``features.FeatureExtractor`` turns the batch into patch features ``(B, D, h, w)``;
3. the method's ``_patch_scores`` (e.g. ``SOMAD``: k nearest SOM nodes, min Mahalanobis) gives ``(B, h, w)``;
4. :meth:`BaseDetector._anomaly_maps` upsamples (bilinear) to the model input and blurs (Gaussian, sigma 4);
   the image score is the map maximum (or the method's own image score);
5. ``features.to_original_resolution`` puts the map back onto the original image when asked.

Sign convention: higher = more anomalous, everywhere. Nothing is normalised with test-set statistics.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image

from somad._version import __version__
from somad.errors import ImageLoadError, ModelFileError, NotFittedError, NumericalError, SomadError
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
from somad.io.images import image_size, list_images
from somad.io.inputs import ImageItem, as_items
from somad.io.model_files import save_model
from somad.io.schema import (
    BATCH_SIZE,
    DISPLAY_RANGE,
    INTEGER_DTYPES,
    MAX_IMAGE_SIZE,
    THRESHOLD,
    THRESHOLD_INFO,
    Array,
    Hex,
    Kind,
    ListOf,
    Nullable,
    Table,
    describe,
    problem,
)
from somad.params import Either, Interval, Options, Param, Params, Text, validate
from somad.progress import progress_bar
from somad.verdicts import (
    FALSE_ALARM_LEVEL,
    MAX_REFUSED_FRACTION,
    OK,
    OUTLIER_LEVEL,
    FrameGate,
    Thresholds,
    check_frame,
    chroma,
    estimate_thresholds,
    far_above,
    frame_stats,
    input_profile,
    is_anomalous,
    kind_difference,
    normalized_score,
    pool_pixels,
    predicted_mask,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
#: ``cv="auto"`` cross-fits with this many folds when there are fewer good images than ``CROSS_FIT_BELOW``: there a
#: 10% hold-out is 1 or 2 images (the threshold is one image's score), while the K extra fits of so few images
#: take seconds to a few minutes. From 30 images on, the hold-out has 3 or more and the fit its usual cost.
CROSS_FIT_FOLDS, CROSS_FIT_BELOW = 5, 30
#: ``fit`` on fewer good images than this warns what to expect (docs/benchmarks.md, "Few good images").
FEW_IMAGES = 20
#: Hex digits kept of each training image's SHA-256 fingerprint (64 bits: a chance match between a million
#: training images and a million others is about 1 in 30 million).
DIGEST_HEX = 16
#: ``input_profile`` in a model file (``somad.verdicts.input_profile``): the training images' colour and sizes.
_SIZE = Nullable(ListOf(Interval(int, 1), length=2))
INPUT_PROFILE = Table(
    {
        "chroma": Nullable(Interval(float, 0.0)),
        "n_chroma_images": Nullable(Interval(int, 0)),
        "median_size": _SIZE,
        "min_size": _SIZE,
        "max_size": _SIZE,
    }
)


@dataclass
class Prediction:
    """Result for one image.

    Attributes
    ----------
    item : ImageItem
    score : float
    map : tensor (S, S), anomaly map at the model input resolution
    original_size : (height, width)
    image : the decoded RGB input (for overlays)
    """

    item: ImageItem
    score: float
    map: torch.Tensor
    original_size: tuple[int, int]
    image: Image.Image | None = None
    status: str = OK  # or "invalid_input: <reason>" (somad.verdicts.check_frame)

    @property
    def valid(self) -> bool:
        return self.status == OK


class BaseDetector(Params):
    """Shared machinery of SOMAD, PaDiM and PatchCore. Subclasses implement ``_fit_features``,
    ``_patch_scores``, ``_state_arrays`` and ``_set_state``, and may set the class attributes ``_stages``
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
        whole frame. ``None``: every image is resized to ``image_size`` square. Needs ``crop_size=None``.
    tile_overlap : float, default 0.25
        Fraction of a tile shared with its neighbour (at least; tiles are spread evenly over the frame).
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
    #: What a model file's ``config["state"]`` and arrays may hold (``somad.io.schema``), checked at load before
    #: anything is used (:meth:`check_file`); each method adds its own rows, merged along the class hierarchy.
    _state_fields = {
        "image_threshold": THRESHOLD,
        "pixel_threshold": THRESHOLD,
        "n_train_images": Nullable(Interval(int, 0)),
        "train_set_sha256": Nullable(Hex()),
        "n_val_images": Nullable(Interval(int, 0)),
        "fit_seconds": Nullable(Interval(float, 0.0)),
        "display_range": DISPLAY_RANGE,
        "threshold_info": Nullable(THRESHOLD_INFO),
        "train_image_digests": Nullable(ListOf(Nullable(Hex(DIGEST_HEX)))),  # absent in files of 0.7.1 and before
        "input_profile": Nullable(INPUT_PROFILE),
    }
    _required_state: tuple[str, ...] = (
        "image_threshold",
        "pixel_threshold",
        "n_train_images",
        "n_val_images",
        "fit_seconds",
    )
    _array_fields = {"channel_indices": Array(INTEGER_DTYPES, 1)}  # Nullable(Array): an optional array
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
        _warn_defect_folders(train + val)
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

    def calibrate(self, images, *, accept_outliers: bool = False) -> BaseDetector:
        """Re-estimate the image and pixel thresholds from good images, without refitting.

        The same estimate as ``fit`` makes from its held-out images (``threshold_quantile``,
        ``pixel_threshold_quantile``; see ``somad.verdicts.estimate_thresholds``): calibrating on the images a fit
        held out gives that fit's thresholds. Unreadable images are skipped (logged); frames refused by the
        input gate are left out.

        The images must be good parts the model never trained on (:meth:`check_held_out`: an MVTec category
        means its ``validation/good``; images the fit or an update trained on are refused). Images scoring far
        above the current threshold (``somad.verdicts.far_above``: defects among them would raise the threshold)
        are refused, listed, unless ``accept_outliers``; images of another kind than the training images
        (grey-scale into a colour model, a very different size) are warned about.
        """
        self._check_fitted()
        self._validate_params()
        items = self.check_held_out(images)
        screen = IncomingCheck(self, "calibrate", accept_outliers)
        if not self._set_thresholds(items, source="calibrate", screen=screen):
            raise SomadError("no usable good image to calibrate on (all unreadable or refused by the input gate)")
        return self

    def check_held_out(self, images, *, also=None) -> list[ImageItem]:
        """The good images to calibrate on, refused in one line if the model trained on any of them.

        A folder that is an MVTec category means its ``validation/good`` (never its ``train/good``, which the fit
        trained on); a category without one is refused. Each image's fingerprint (``image_digests``) is compared
        with those of the training images (``train_image_digests_``, recorded by ``fit`` and ``update``) and of
        ``also`` (images about to be merged by an update): trained images score biased low, and a threshold set
        from them flags good parts. Models written before the fingerprints were recorded (somad 0.7.1 and
        earlier) cannot tell: a warning.
        """
        items = calibration_items(images)
        recorded = getattr(self, "train_image_digests_", None)
        known = set(recorded or ()) | (set(image_digests(as_items(also, train=True))) if also is not None else set())
        if recorded is None:
            logger.warning(
                "this model's file records no fingerprints of its training images (written by somad 0.7.1 or "
                "earlier), so it cannot check that the %d images to calibrate on were not trained on: their scores "
                "would be biased low; use good images the fit never saw",
                len(items),
            )
        known.discard(None)
        trained = [it for it, d in zip(items, image_digests(items)) if d in known]
        if trained:
            raise SomadError(
                f"{len(trained)} of {len(items)} images to calibrate on were trained on by this model (e.g. "
                f"{trained[0].name}): their scores are biased low, so a threshold set from them flags good parts; "
                "pass good images the fit never saw instead (CATEGORY/validation/good, or new good parts)"
            )
        return items

    def screen_incoming(self, items: list[ImageItem], *, action: str, accept_outliers: bool) -> None:
        """Score images offered as good with the current model and check them (:class:`IncomingCheck`): far above
        the threshold, refused unless ``accept_outliers``; of another kind, a warning. ``update``'s first pass
        (``calibrate`` checks within its own scoring pass). Frames the input gate refuses are left out here, as
        training leaves them out."""
        screen = IncomingCheck(self, action, accept_outliers)
        for p in self.predict_iter(items, on_error=self.on_error, skipped=[]):
            if p.valid:
                screen.see(p)
        screen.finish()

    def held_out_split(self, images) -> tuple[list[ImageItem], list[ImageItem]]:
        """The images ``fit`` trains on, and the good images it holds out to set the thresholds.

        An MVTec 3D-AD category's own ``validation/good`` folder is the held-out set when it has one (and every
        training image is trained on); otherwise a seeded ``val_fraction`` of the training images is, unless
        ``fit`` cross-fits (:meth:`cross_fit_folds`): then every image is trained on and none is held out.
        """
        items = as_items(images, train=True)
        held_out = validation_items(images) if self.val_fraction else []
        if held_out:
            return items, held_out
        if self.cross_fit_folds(len(items)):
            return items, []
        return self._split(items)

    def cross_fit_folds(self, n_images: int) -> int:
        """How many folds ``fit`` cross-fits over for ``n_images`` good images without a ``validation/good`` folder
        (the rule of ``cv``); 0: none (a hold-out, or no thresholds with ``val_fraction=0`` or a single image)."""
        if not self.val_fraction or n_images < 2 or self.cv == "holdout":
            return 0
        if self.cv == "auto":
            return min(CROSS_FIT_FOLDS, n_images) if n_images < CROSS_FIT_BELOW else 0
        return min(int(self.cv), n_images)

    def _fit_thresholds(self, images, train: list[ImageItem], val: list[ImageItem]) -> None:
        """``fit``'s thresholds by the rule of ``cv``, said in one log line with the reason, recorded in
        ``threshold_info_`` (``rule``, ``folds``); then the warning for fits on few images."""
        folds = 0 if val else self.cross_fit_folds(len(train))
        from_folder = bool(val) and bool(validation_items(images))
        n = len(train) + (0 if from_folder else len(val))  # the good training images fit was given
        if val:
            rule = "validation_folder" if from_folder else "holdout"
            why = (
                f"the category's validation/good folder, {len(val)} images"
                if from_folder
                else f"{len(val)} of {n} good images held out (val_fraction={self.val_fraction:g}"
                + (f"; cv='auto' cross-fits below {CROSS_FIT_BELOW} images)" if self.cv == "auto" else ")")
            )
        elif folds:
            rule = "cross_fit"
            why = (
                f"{folds}-fold cross-fitting: each of the {n} good images scored by a model fitted without it, "
                "the final model fitted on all"
                + (
                    f" (cv='auto': fewer than {CROSS_FIT_BELOW} images, where a {self.val_fraction:g} hold-out "
                    f"would leave {int(round(self.val_fraction * n))})"
                    if self.cv == "auto"
                    else f" (cv={self.cv})"
                )
            )
        if val or folds:
            logger.info("thresholds from %s", why)
            predictions = self._out_of_fold_predictions(train, folds) if folds else None
            if self._set_thresholds(val or train, source="fit", predictions=predictions):
                self.threshold_info_.update(rule=rule, folds=folds or None)
        if n < FEW_IMAGES:
            _warn_few_images(n, self.threshold_info_)

    def _out_of_fold_predictions(self, items: list[ImageItem], folds: int) -> Iterator[Prediction]:
        """Each image's prediction by a model fitted without it: ``items`` split into ``folds`` seeded folds, a
        model with this one's parameters (and no thresholds of its own) fitted on all folds but one, which it
        scores. The fold models use this model's input gate, and one is held at a time; their own log lines are
        kept down to errors. They are fitted through this model's :attr:`fit_shards` too."""
        order = np.random.default_rng(self.seed).permutation(len(items))
        gate = getattr(self, "gate_", None)
        for k in range(folds):
            held = set(order[k::folds].tolist())
            fold = type(self)(**{**self.get_params(), "val_fraction": 0.0})
            fold.fit_shards = self.fit_shards
            if gate is not None:  # the final fit's input gate: a fold leaves out the frames the final fit left out
                fold._learn_gate = lambda train, gate=gate: gate
            logger.info("cross-fitting: fold %d of %d, fitted on %d images", k + 1, folds, len(items) - len(held))
            with _only_errors():
                fold.fit([it for i, it in enumerate(items) if i not in held])
            yield from fold.predict_iter([items[i] for i in sorted(held)], on_error="skip")

    def _split(self, items: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
        n_val = int(round(self.val_fraction * len(items)))
        if n_val and len(items) - n_val < 1:
            n_val = 0
        if self.val_fraction and not n_val:
            logger.warning(
                "val_fraction=%g of %d training image(s) holds out none, so no thresholds are set",
                self.val_fraction,
                len(items),
            )
        order = np.random.default_rng(self.seed).permutation(len(items))
        val = sorted(order[:n_val].tolist())
        held = set(val)
        return [it for i, it in enumerate(items) if i not in held], [items[i] for i in val]

    def _prepare_extraction(self) -> None:
        """fit's first step (and each worker's of a distributed fit): the device, the seeded channel subset and
        the feature extractor."""
        self.device_ = resolve_device(self.device)
        total = sum(_channels(self.backbone)[s] for s in self._stages)
        self.channel_indices_ = select_channels(total, self.dims, self.seed)
        self.extractor_ = self._make_extractor()
        self.skipped_ = []

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
        )

    def _count_inputs(self, items: list[ImageItem]) -> int:
        """How many model inputs ``items`` make: one per image, or each image's tiles (read from the headers)."""
        g = self.extractor_.geometry
        if g.tile_size is None:
            return len(items)
        total = 0
        for it in items:
            try:
                h, w = (it.image.height, it.image.width) if it.image is not None else image_size(it.path)
            except ImageLoadError:
                continue  # counted when it is decoded (and skipped, or raised, there)
            total += len(g.layout(h, w).offsets)
        return total

    def _decoded(
        self, items: list[ImageItem], on_error: str, skipped: list[str]
    ) -> Iterator[tuple[ImageItem, torch.Tensor, Image.Image, TileLayout]]:
        """Decode and preprocess images one at a time (never all held at full size) into their model inputs and
        layout; unreadable ones are raised (``on_error="fail"``) or logged and appended to ``skipped``."""
        for item in items:
            try:
                image = item.load()
            except ImageLoadError as exc:
                if on_error == "fail":
                    raise
                logger.warning("skipped %s", exc)
                skipped.append(str(exc))
                continue
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
                stats.append(frame_stats(image))
                names.append(item.name)
        finally:
            bar.close()
        gate = FrameGate.learn(stats)
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

    def _set_thresholds(
        self,
        val: list[ImageItem],
        *,
        source: str,
        screen: IncomingCheck | None = None,
        predictions: Iterable[Prediction] | None = None,
    ) -> bool:
        """Thresholds from good images ``val`` (``somad.verdicts.estimate_thresholds``); False if none is usable.
        ``screen`` (calibrate) sees each usable prediction, and may refuse them all before anything changes.
        ``predictions`` (cross-fitting): the images' predictions by other models, instead of this model's."""
        scores, pixels, medians, names = [], [], [], []
        for p in self.predict_iter(val, on_error="skip") if predictions is None else predictions:
            if p.valid:
                m = p.map.cpu().numpy()
                scores.append(p.score)
                pixels.append(pool_pixels(m))  # a quarter of each map is kept, not the maps whole
                medians.append(float(np.median(m)))
                names.append(p.item.name)
                if screen is not None:
                    screen.see(p)
        if screen is not None:
            screen.finish()
        if not scores:
            return False
        t = estimate_thresholds(scores, pixels, float(self.threshold_quantile), float(self.pixel_threshold_quantile))
        self._apply_thresholds(t, source)
        # Fixed colour scale for heatmaps: a typical good pixel (median) to twice the distance to the pixel threshold.
        floor = float(np.median(medians))
        self.display_range_ = (floor, floor + 2.0 * max(self.pixel_threshold_ - floor, 1e-6))
        _warn_outliers(np.asarray(scores), names)
        logger.info(
            "image threshold %.4f = %.3f-quantile of %d good images' scores (expected false alarms %.1f%%, "
            "%.0f%% interval %.1f-%.1f%%); pixel threshold %.4f",
            t.image,
            t.quantile,
            t.n_images,
            100 * t.expected_false_alarm_rate,
            100 * FALSE_ALARM_LEVEL,
            *(100 * v for v in t.false_alarm_interval),
            t.pixel,
        )
        return True

    def _apply_thresholds(self, t: Thresholds, source: str) -> None:
        self.image_threshold_, self.pixel_threshold_, self.n_val_images_ = t.image, t.pixel, t.n_images
        self.threshold_info_ = {
            "source": source,
            "n_images": t.n_images,
            "quantile": t.quantile,
            "pixel_quantile": t.pixel_quantile,
            "expected_false_alarm_rate": t.expected_false_alarm_rate,
            "false_alarm_rate_interval": list(t.false_alarm_interval),  # central FALSE_ALARM_LEVEL (90%)
            "good_score_median": t.reference,
            "good_scores": list(t.good_scores),  # sorted, at most 1000: the normalised scale's CDF
        }

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
        if self.image_threshold_ is None:
            return None
        return True if not prediction.valid else is_anomalous(prediction.score, self.image_threshold_)

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
            s = self.extractor_.geometry.input_size
            maps = upsample_blur(patch, s, self.blur_sigma)  # bilinear to the input size, then the Gaussian blur
            _check_finite(maps)
            return maps, (maps.flatten(1).max(1).values if tile_scores is None else tile_scores)
        stride = self.extractor_.stride
        maps, scores, first = [], [], 0
        for layout in layouts:
            grids = patch[first : first + len(layout.offsets)]
            (th, tw), (fh, fw) = grids.shape[-2:], layout.size
            total = grids.new_zeros(fh // stride, fw // stride)
            count = grids.new_zeros(fh // stride, fw // stride)
            for (y, x), grid in zip(layout.offsets, grids):
                total[y // stride : y // stride + th, x // stride : x // stride + tw] += grid
                count[y // stride : y // stride + th, x // stride : x // stride + tw] += 1
            m = upsample_blur((total / count)[None], layout.size, self.blur_sigma)[0]
            _check_finite(m)
            maps.append(m)
            scores.append(m.max() if tile_scores is None else tile_scores[first : first + len(layout.offsets)].max())
            first += len(layout.offsets)
        return maps, torch.stack(scores)

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

    def map_matrix(self) -> torch.Tensor:
        """``(S, h)``: the bilinear upsampling of the patch grid to the model input and the Gaussian blur, one axis
        (the same matrix serves both axes of the square grid), as :meth:`_anomaly_maps` applies them."""
        ex = self.extractor_
        size, grid = ex.geometry.input_size, ex.grid_size
        return resize_blur_matrix(size, grid, float(self.blur_sigma), torch.device("cpu")).clone()

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

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, overwrite: bool = True, sign_key=None) -> Path:
        """Write the fitted model atomically to ``path`` (safetensors + JSON config; see ``model_io``); with
        ``overwrite=False`` an existing file is never replaced, also one another process wrote meanwhile.
        ``sign_key`` (the key's bytes or the path of its file) signs it (``somad.io.integrity``)."""
        self._check_fitted()
        arrays = {"channel_indices": torch.as_tensor(self.channel_indices_)}
        arrays.update(self._state_arrays())
        state = {
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "n_train_images": self.n_train_images_,
            "train_set_sha256": getattr(self, "train_set_sha256_", None),
            "train_image_digests": getattr(self, "train_image_digests_", None),  # calibrate refuses these images
            "input_profile": getattr(self, "input_profile_", None),  # colour and sizes of the training images
            "n_val_images": self.n_val_images_,
            "fit_seconds": self.fit_seconds_,
            "display_range": self.display_range_,
            "threshold_info": self.threshold_info_,
            "input_gate": self.gate_.as_dict() if getattr(self, "gate_", None) else None,
            **self._state_info(),
        }
        config = {"method": self.method, "somad_version": __version__, "params": self.get_params(), "state": state}
        return save_model(path, config, arrays, overwrite=overwrite, sign_key=sign_key)

    @classmethod
    def check_file(cls, config: dict, arrays: dict, path) -> None:
        """Refuse, in one :class:`ModelFileError` line naming the field, a model file whose config or arrays break
        their rules (``_state_fields``, ``_array_fields``: types, ranges, dtypes, dimensions)."""
        state, array_fields, required = {}, {}, set()
        for klass in reversed(cls.__mro__):
            state.update(klass.__dict__.get("_state_fields", {}))
            array_fields.update(klass.__dict__.get("_array_fields", {}))
            required.update(klass.__dict__.get("_required_state", ()))
        rule = Table(
            {
                "method": Kind(str, "a string"),
                "somad_version": Kind(str, "a string"),
                "preset": Nullable(Kind(str, "a string")),
                "params": Kind(dict, "a table"),
                "state": Table(state, required=tuple(sorted(required))),
            },
            required=("method", "params", "state"),
        )
        needed = tuple(k for k, r in array_fields.items() if not isinstance(r, Nullable))
        found = problem(rule, config, "") or problem(Table(array_fields, needed, strict=True), arrays, "arrays")
        if found:
            raise ModelFileError(f"{path}: {describe(found)}; re-run `somad fit` (or `somad calibrate`)")

    @classmethod
    def _from_file(
        cls, config: dict, arrays: dict[str, torch.Tensor], path: Path, device: str | None, scoring: dict | None = None
    ):
        """Rebuild from a verified file; config or arrays that do not fit raise a one-line ModelFileError."""
        try:
            return cls._rebuild(config, arrays, path, device, scoring or {})
        except SomadError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ModelFileError(f"{path}: {exc}") from None  # e.g. a weights file the config names: say whose
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:100]
            raise ModelFileError(
                f"{path}: the model file's config and arrays do not fit a {cls.method} model "
                f"({reason}); re-run `somad fit`"
            ) from None

    @classmethod
    def _rebuild(cls, config: dict, arrays: dict[str, torch.Tensor], path: Path, device: str | None, scoring: dict):
        cls.check_file(config, arrays, path)
        params = dict(config["params"])  # files of earlier versions are migrated on reading (model_io.MIGRATIONS)
        if device is not None:
            params["device"] = device
        for name, value in scoring.items():
            if name not in cls._scoring:
                valid = ", ".join(cls._scoring) or "none"
                raise SomadError(f"{path}: {name!r} cannot be changed on a loaded {cls.method} model; valid: {valid}")
            params[name] = value
        model = cls(**params)
        model._validate_params(where=str(path))  # the same rules as fit: a bad value fails here, not at predict
        model.device_ = resolve_device(model.device)
        model.channel_indices_ = arrays["channel_indices"].numpy()
        total = sum(_channels(model.backbone)[s] for s in model._stages)
        idx = model.channel_indices_
        if not (
            idx.ndim == 1
            and idx.dtype.kind in "iu"
            and idx.size
            and idx.min() >= 0
            and idx.max() < total
            and (np.diff(idx) > 0).all()
        ):
            raise ValueError(f"channel_indices must be increasing indices in [0, {total})")
        state = config["state"]
        model.image_threshold_ = state["image_threshold"]
        model.pixel_threshold_ = state["pixel_threshold"]
        model.n_train_images_ = state["n_train_images"]
        model.train_set_sha256_ = state.get("train_set_sha256")  # absent in files before 0.7
        model.train_image_digests_ = state.get("train_image_digests")  # absent in files of 0.7.1 and before
        model.input_profile_ = state.get("input_profile")
        model.n_val_images_ = state["n_val_images"]
        model.fit_seconds_ = state["fit_seconds"]
        model.display_range_ = tuple(float(v) for v in state["display_range"]) if state.get("display_range") else None
        model.threshold_info_ = state.get("threshold_info")
        try:
            model.gate_ = FrameGate.from_dict(state.get("input_gate"))  # None in files of 0.7.1: the fixed rule
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}; re-run `somad fit`") from None
        bad = [name for name, a in arrays.items() if a.is_floating_point() and not _all_finite(a)]
        if bad:  # a NaN prototype would score silently wrong: refuse the file instead
            raise ModelFileError(f"{path}: array {bad[0]} holds NaN or Inf; re-run `somad fit`")
        try:
            model._set_state(arrays, state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ModelFileError(
                f"{path}: arrays do not match the config ({type(exc).__name__}: {str(exc)[:80]}); re-run `somad fit`"
            ) from None
        model.extractor_ = model._make_extractor()
        return model


def training_fingerprints(items: Sequence[ImageItem]) -> tuple[str, list[str]]:
    """The training set's SHA-256 (:func:`training_set_hash`) and each image's own fingerprint
    (:func:`image_digests`), in one pass over the bytes."""
    h, digests = hashlib.sha256(), []
    for item in items:
        h.update(f"{item.name}|".encode(errors="surrogateescape"))
        one = hashlib.sha256()
        for chunk in _content(item):
            h.update(chunk or b"<unreadable>")
            one = one if chunk else None  # an unreadable file has no fingerprint
            if one is not None:
                one.update(chunk)
        digests.append(None if one is None else one.hexdigest()[:DIGEST_HEX])
    return h.hexdigest(), digests


def training_set_hash(items: Sequence[ImageItem]) -> str:
    """SHA-256 over the training images in order: each one's name, then its file's bytes (or, for an in-memory
    image, its pixels). Saved in the model so that the training set can be identified later."""
    return training_fingerprints(items)[0]


def image_digests(items: Sequence[ImageItem]) -> list[str | None]:
    """Each image's fingerprint: the first :data:`DIGEST_HEX` hex digits of the SHA-256 of its file's bytes (of
    its pixels, for an image held in memory), whatever its name or folder; ``None`` for an unreadable file.
    ``fit`` and ``update`` record those of the images they train on, so that ``calibrate`` can refuse them."""
    return training_fingerprints(items)[1]


def _content(item: ImageItem) -> Iterator[bytes]:
    """The bytes an image's fingerprint covers: its file's, read 1 MB at a time, or its pixels; ``b""`` at the end
    of a file that cannot be read."""
    if item.path is None:
        yield item.image.tobytes()
        return
    try:
        with open(item.path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
    except OSError:
        yield b""


def _all_finite(a: torch.Tensor) -> bool:
    """Whether every entry is finite, from one wide sum (NaN and Inf propagate through it; a float16 or float32
    array cannot overflow a float64 sum): about 3x faster than ``isfinite(a).all()`` on the 100 MB of float16
    whiteners read at every load."""
    return bool(torch.isfinite(a.sum(dtype=torch.float64 if a.dtype == torch.float32 else torch.float32)))


def _check_finite(maps: torch.Tensor) -> None:
    if not torch.isfinite(maps).all():
        raise NumericalError("NaN/Inf in anomaly maps; check the model file and the input images")


def calibration_items(images) -> list[ImageItem]:
    """The images ``calibrate`` is given, as items: a folder that is an MVTec category means its
    ``validation/good`` (MVTec 3D-AD), never its ``train/good``, which the fit trained on; a category without one
    is refused with the fix. Anything else as ``as_items`` reads a training folder."""
    if isinstance(images, (str, os.PathLike)) and (Path(images) / "train" / "good").is_dir():
        held_out = validation_items(images)
        if not held_out:
            raise SomadError(
                f"{images}: is an MVTec category without validation/good, and its train/good holds the images the fit "
                "trained on (their scores are biased low, so a threshold set from them flags good parts); pass a "
                "folder of good parts the fit never saw"
            )
        logger.info("calibrating on %s", Path(images) / "validation" / "good")
        return held_out
    return as_items(images, train=True)


#: How many training images ``fit`` decodes to record their colour (``somad.verdicts.input_profile``).
PROFILE_SAMPLE = 16


def training_profile(items: Sequence[ImageItem]) -> dict:
    """What the training images look like (``somad.verdicts.input_profile``): their sizes (from the file headers)
    and the colour of up to :data:`PROFILE_SAMPLE` of them, evenly spread; unreadable ones are left out."""
    sizes, chromas = [], []
    for item in items:
        try:
            sizes.append((item.image.height, item.image.width) if item.path is None else image_size(item.path))
        except ImageLoadError:
            continue
    step = max(1, len(items) // PROFILE_SAMPLE)
    for item in list(items)[::step][:PROFILE_SAMPLE]:
        try:
            chromas.append(chroma(item.load()))
        except ImageLoadError:
            continue
    return input_profile(chromas, sizes)


class IncomingCheck:
    """What ``calibrate`` and ``update`` check of the images offered to them as good, from one scoring pass
    (:meth:`see` each valid prediction, then :meth:`finish`):

    * scores far above the current threshold (``somad.verdicts.far_above``): defects among the good images, which
      would raise the threshold (calibrate) or be learned as normal (update). Refused, listed in one line, unless
      ``accept`` (``--accept-outliers``), when they are only logged;
    * images of another kind than the training images (``somad.verdicts.kind_difference``: grey-scale into a
      colour model, colour into a grey-scale one, a size far outside the training images'): a one-line warning.
    """

    HARM = {"calibrate": "raise the threshold, and defects like them would pass", "update": "be learned as normal"}

    def __init__(self, model: BaseDetector, action: str, accept: bool):
        self.model, self.action, self.accept = model, action, bool(accept)
        self.profile = getattr(model, "input_profile_", None)
        self.names: list[str] = []
        self.scores: list[float] = []
        self.kinds: dict[str, list[str]] = {}

    def see(self, p: Prediction) -> None:
        self.names.append(p.item.name)
        self.scores.append(p.score)
        if self.profile and p.image is not None:
            size = (p.image.height, p.image.width)
            kind = kind_difference(self.profile, chroma(p.image), size)
            if kind:
                shown = f"{p.item.name}, {size[0]}x{size[1]}" if kind == "size" else p.item.name
                self.kinds.setdefault(kind, []).append(shown)

    def finish(self) -> None:
        n = len(self.names)
        for kind, names in self.kinds.items():
            if kind == "size":
                lo, hi = self.profile["min_size"], self.profile["max_size"]
                what = f"far from the training images' sizes ({lo[0]}x{lo[1]} to {hi[0]}x{hi[1]})"
            else:
                trained = "colour" if kind == "grey-scale" else "grey-scale"
                what = f"{kind}, the model's training images {trained}"
            logger.warning(
                "%s: %d of %d images are %s (e.g. %s): their scores do not compare with the training images'; "
                "use images from the same camera and setup",
                self.action,
                len(names),
                n,
                what,
                names[0],
            )
        m = self.model
        far = far_above(np.asarray(self.scores), m.image_threshold_, m.threshold_info_) if n else None
        if far is None:
            if n:
                logger.warning(
                    "%s: this model records no threshold or good scores, so the images cannot be checked for defects",
                    self.action,
                )
            return
        listed = [f"{name} ({score:.4g})" for name, score, out in zip(self.names, self.scores, far) if out]
        if not listed:
            return
        message = (
            f"{self.action}: {len(listed)} of {n} images offered as good score far above the model's threshold "
            f"{m.image_threshold_:.4g} (above every held-out good score, normalised score over {OUTLIER_LEVEL:g}): "
            f"{', '.join(listed[:5])}"
            + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
            + f"; defects among them would {self.HARM.get(self.action, 'be taken as good')}"
        )
        if self.accept:
            logger.warning("%s; accepted (--accept-outliers)", message)
            return
        raise SomadError(
            f"{message}. Remove them, or pass --accept-outliers (accept_outliers=True) if they are good parts "
            "(e.g. after a change of lighting or camera)"
        )


def validation_items(images) -> list[ImageItem]:
    """The good images of an MVTec category's ``validation/good`` folder (MVTec 3D-AD), else none."""
    if not isinstance(images, (str, os.PathLike)):
        return []
    folder = Path(images) / "validation" / "good"
    if not (folder.is_dir() and (Path(images) / "train" / "good").is_dir()):
        return []
    return [ImageItem(str(p.relative_to(folder)), path=p) for p in list_images(folder)]


#: Folder names that suggest defective images in a training folder (matched per path component).
_DEFECT_WORDS = re.compile(
    r"(^|[^a-z])(test|defects?|defective|bad|ng|nok|anomal\w*|reject\w*|fail\w*|crack\w*|"
    r"scratch\w*|broken|damage\w*)([^a-z]|$)",
    re.IGNORECASE,
)


def _warn_defect_folders(items: list[ImageItem]) -> None:
    """Warn when training images sit in sub-folders named like defects (``test/``, ``bad/``, ``crack/``...)."""
    folders = sorted({str(PurePath(it.name).parent) for it in items if it.path is not None} - {"."})
    suspicious = [f for f in folders if any(_DEFECT_WORDS.search(part) for part in PurePath(f).parts)]
    if suspicious:
        logger.warning(
            "the training folder has sub-folder(s) named like defects (%s): somad trains on good images "
            "only; move defective images out of it",
            ", ".join(suspicious[:5]),
        )


def _warn_outliers(scores: np.ndarray, names: list[str]) -> None:
    """Warn about held-out good images that score far above the rest: a defect in the training folder?"""
    if scores.size < 5:
        return
    med = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - med)))
    far = [n for n, s in zip(names, scores) if spread > 0 and s > med + 10 * spread]
    if far:
        logger.warning(
            "held-out good image(s) %s score far above the others (over 10 robust deviations): do they "
            "show defects? Good training folders should hold good parts only",
            ", ".join(far[:5]),
        )


def _gate_summary(refused: list[tuple[str, str]]) -> str:
    """Frames the input gate refused, in a few words: how many for each reason, and the first one."""
    kinds: dict[str, int] = {}
    for _, status in refused:
        kind = status.split(": ", 1)[-1].split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return f"{counts}; the first, {refused[0][0]}: {refused[0][1].split(': ', 1)[-1]}"


def _warn_few_images(n: int, info: dict | None) -> None:
    """The one-line warning of a fit on fewer than :data:`FEW_IMAGES` good images: what to expect."""
    rate = ""
    if info and info.get("false_alarm_rate_interval"):
        low, high = info["false_alarm_rate_interval"]
        k = info["n_images"]
        rate = (
            f"; the threshold rests on {k} good score{'s' if k != 1 else ''} and will flag about "
            f"{100 * info['expected_false_alarm_rate']:.0f}% of good parts ({100 * FALSE_ALARM_LEVEL:.0f}% interval "
            f"{100 * low:.0f}-{100 * high:.0f}%)"
        )
    logger.warning(
        "only %d good image%s: expect a weaker ranking than from hundreds (SOMAD from 10: tire's image AUROC 0.73, "
        "0.78 with --som-size 28, against 0.82 from its 239; docs/benchmarks.md, 'Few good images')%s; refit, or "
        "`somad calibrate`, as more good images come",
        n,
        "s" if n != 1 else "",
        rate,
    )


@contextmanager
def _only_errors() -> Iterator[None]:
    """Keep somad's log records below ERROR out while the block runs (the fold fits of cross-fitting, whose
    warnings the final fit on all images gives once)."""
    log = logging.getLogger("somad")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _channels(backbone: str) -> tuple[int, ...]:
    return backbone_spec(backbone).channels


__all__ = ["BaseDetector", "ImageItem", "Prediction", "Geometry", "as_items"]
