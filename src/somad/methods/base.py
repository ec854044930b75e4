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

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
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
    Geometry,
    TileLayout,
    resolve_device,
    select_channels,
    to_original_resolution,
    upsample_blur,
)
from somad.io.datasets import resolve_train_dir
from somad.io.images import image_size, list_images, load_image, to_rgb
from somad.io.model_files import save_model
from somad.params import Interval, Options, Param, Params, Text, validate
from somad.progress import progress_bar
from somad.verdicts import (
    OK,
    Thresholds,
    check_frame,
    estimate_thresholds,
    is_anomalous,
    normalized_score,
    pool_pixels,
    predicted_mask,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
MAX_IMAGE_SIZE = 4096  # model inputs larger than this exhaust memory before they help


@dataclass
class ImageItem:
    """One input image: a name for outputs, and how to get its pixels."""

    name: str
    path: Path | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        return self.image if self.image is not None else load_image(self.path)


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


def as_items(images, *, train: bool = False) -> list[ImageItem]:
    """Normalise the accepted image inputs to a list of :class:`ImageItem`.

    Accepts a folder (an MVTec category when ``train``: its ``train/good``), an image path, a sequence of
    paths / folders / PIL images / ImageItems, or a uint8 array: one colour image ``(H, W, 3)``, or a batch
    ``(N, H, W)`` or ``(N, H, W, 3)``. PIL images are decoded by the same rules as files
    (``images.to_rgb``).
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[-1] == 3:  # one (H, W, 3) colour image, not H images of W x 3
            images = images[None]
        if (
            images.ndim not in (3, 4)
            or images.dtype != np.uint8
            or (images.ndim == 4 and images.shape[-1] != 3)
            or 0 in images.shape[1:3]
        ):
            raise SomadError(
                f"image arrays must be uint8 of shape (H, W, 3), (N, H, W) or (N, H, W, 3), "
                f"got {images.dtype} {images.shape}"
            )
        return [ImageItem(f"array_{i:05d}", image=Image.fromarray(a).convert("RGB")) for i, a in enumerate(images)]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    items: list[ImageItem] = []
    for entry in images:
        if isinstance(entry, ImageItem):
            items.append(entry)
            continue
        if isinstance(entry, Image.Image):
            items.append(ImageItem(f"image_{len(items):05d}", image=to_rgb(entry, f"image_{len(items):05d}")))
            continue
        path = Path(entry)
        if path.is_dir() or (train and not path.exists()):  # a missing training folder: a DataError naming it
            folder = resolve_train_dir(path) if train else path
            items.extend(ImageItem(str(p.relative_to(folder)), path=p) for p in list_images(folder))
        else:
            items.append(ImageItem(path.name, path=path))
    if not items:
        raise SomadError("no images given; pass a folder of images or a list of image files")
    return items


class BaseDetector(Params):
    """Shared machinery of SOMAD, PaDiM and PatchCore. Subclasses implement ``_fit_features``,
    ``_patch_scores``, ``_state_arrays`` and ``_set_state``, and may set the class attributes ``_stages``
    (backbone stages used, default all three) and ``_local_aggregation`` (see ``features.FeatureExtractor``).

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
        Fraction of the good training images held out to set the thresholds. An MVTec category with a
        ``validation/good`` folder (MVTec 3D-AD) holds out those images instead, and trains on all of
        ``train/good``.
    threshold_quantile : float, default 0.9
        Quantile of the held-out images' scores used as the image threshold (expected false-alarm rate:
        one minus it). 0.9 was chosen by measurement (docs/benchmarks.md): on the shared data, a threshold at a
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
        "threshold_quantile": Param(
            Interval(float, 0.0, 1.0, open_low=True),
            "image threshold = this quantile of the held-out good scores (expected false-alarm rate: 1 - it)",
        ),
        "pixel_threshold_quantile": Param(
            Interval(float, 0.0, 1.0, open_low=True),
            "pixel threshold = this quantile of the held-out good maps' pixels",
        ),
        "batch_size": Param(Interval(int, 1, 4096), "images per backbone batch", cli=False),
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
        images : folder, MVTec category, paths, PIL images or uint8 array (N, H, W[, 3])
        y : ignored
        """
        self._validate_params()
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        train, val = self.held_out_split(images)
        _warn_defect_folders(train + val)
        self.device_ = resolve_device(self.device)
        total = sum(_channels(self.backbone)[s] for s in self._stages)
        self.channel_indices_ = select_channels(total, self.dims, self.seed)
        self.extractor_ = self._make_extractor()
        self.skipped_ = []
        logger.info(
            "fitting %s on %d images (%d held out), %d features per patch",
            self.method,
            len(train),
            len(val),
            self.extractor_.dims,
        )
        self._fit_items(train)
        self.n_train_images_ = len(train) - len(self.skipped_)
        self.train_set_sha256_ = training_set_hash(train)
        self.image_threshold_ = self.pixel_threshold_ = self.display_range_ = None
        self.n_val_images_ = 0
        self.threshold_info_ = None
        if val:
            self._set_thresholds(val, source="fit")
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def calibrate(self, images) -> BaseDetector:
        """Re-estimate the image and pixel thresholds from good images, without refitting.

        The same estimate as ``fit`` makes from its held-out images (``threshold_quantile``,
        ``pixel_threshold_quantile``; see ``somad.verdicts.estimate_thresholds``): calibrating on the images a fit
        held out gives that fit's thresholds. Unreadable images are skipped (logged); frames refused by the
        input gate are left out.
        """
        self._check_fitted()
        self._validate_params()
        if not self._set_thresholds(as_items(images, train=True), source="calibrate"):
            raise SomadError("no usable good image to calibrate on (all unreadable or refused by the input gate)")
        return self

    def held_out_split(self, images) -> tuple[list[ImageItem], list[ImageItem]]:
        """The images ``fit`` trains on, and the good images it holds out to set the thresholds.

        An MVTec 3D-AD category's own ``validation/good`` folder is the held-out set when it has one (and every
        training image is trained on); otherwise a seeded ``val_fraction`` of the training images is.
        """
        items = as_items(images, train=True)
        held_out = validation_items(images) if self.val_fraction else []
        if held_out:
            return items, held_out
        return self._split(items)

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

    def _feature_batches(self, items: list[ImageItem]) -> Iterator[torch.Tensor]:
        """Features ``(b, D, h, w)`` of the training images, ``batch_size`` at a time, with a progress bar."""
        pending, names = [], []
        bar = progress_bar(total=len(items), desc="features", unit="img")
        try:  # close (erase) the bar on errors too, so that the error line starts a line of its own
            for item, inputs, image, _ in self._decoded(items, self.on_error, self.skipped_):
                status = check_frame(image)
                if status != OK:
                    logger.warning("%s: left out of training, %s; check the training folder", item.name, status)
                    self.skipped_.append(f"{item.name}: {status}")
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

    def _set_thresholds(self, val: list[ImageItem], *, source: str) -> bool:
        """Thresholds from good images ``val`` (``somad.verdicts.estimate_thresholds``); False if none is usable."""
        scores, pixels, medians, names = [], [], [], []
        for p in self.predict_iter(val, on_error="skip"):
            if p.valid:
                m = p.map.cpu().numpy()
                scores.append(p.score)
                pixels.append(pool_pixels(m))  # a quarter of each map is kept, not the maps whole
                medians.append(float(np.median(m)))
                names.append(p.item.name)
        if not scores:
            return False
        t = estimate_thresholds(scores, pixels, float(self.threshold_quantile), float(self.pixel_threshold_quantile))
        self._apply_thresholds(t, source)
        # Fixed colour scale for heatmaps: a typical good pixel (median) to twice the distance to the pixel threshold.
        floor = float(np.median(medians))
        self.display_range_ = (floor, floor + 2.0 * max(self.pixel_threshold_ - floor, 1e-6))
        _warn_outliers(np.asarray(scores), names)
        logger.info(
            "image threshold %.4f = %.3f-quantile of %d good images' scores (expected false alarms %.1f%%); "
            "pixel threshold %.4f",
            t.image,
            t.quantile,
            t.n_images,
            100 * t.expected_false_alarm_rate,
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
            "good_score_median": t.reference,
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
        batch_size = batch_size or self.batch_size
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
            yield Prediction(item, float(s), m, (image.height, image.width), image, check_frame(image))

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
        images : folder, paths, PIL images or uint8 array (N, H, W[, 3])
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
        """Anomaly scores on a [0, 1] scale with the image threshold at 0.5 (``somad.verdicts.normalized_score``):
        the median held-out good score maps to 0. Needs thresholds set by fit or calibrate in somad 0.7 or later."""
        self._require_threshold()
        reference = (self.threshold_info_ or {}).get("good_score_median")
        if reference is None:
            raise SomadError(
                "this model's thresholds do not record the good images' median score, which the normalised scale "
                "needs (a file from before somad 0.7); run `somad calibrate` with good images"
            )
        return normalized_score(scores, self.image_threshold_, reference)

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
        the extractor into ``_fit_features``; ``somad.distributed`` replaces it to shard the work over workers."""
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

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, overwrite: bool = True) -> Path:
        """Write the fitted model atomically to ``path`` (safetensors + JSON config; see ``model_io``); with
        ``overwrite=False`` an existing file is never replaced, also one another process wrote meanwhile."""
        self._check_fitted()
        arrays = {"channel_indices": torch.as_tensor(self.channel_indices_)}
        arrays.update(self._state_arrays())
        state = {
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "n_train_images": self.n_train_images_,
            "train_set_sha256": getattr(self, "train_set_sha256_", None),
            "n_val_images": self.n_val_images_,
            "fit_seconds": self.fit_seconds_,
            "display_range": self.display_range_,
            "threshold_info": self.threshold_info_,
            **self._state_info(),
        }
        config = {"method": self.method, "somad_version": __version__, "params": self.get_params(), "state": state}
        return save_model(path, config, arrays, overwrite=overwrite)

    @classmethod
    def _from_file(
        cls, config: dict, arrays: dict[str, torch.Tensor], path: Path, device: str | None, scoring: dict | None = None
    ):
        """Rebuild from a verified file; config or arrays that do not fit raise a one-line ModelFileError."""
        try:
            return cls._rebuild(config, arrays, path, device, scoring or {})
        except SomadError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:100]
            raise ModelFileError(
                f"{path}: the model file's config and arrays do not fit a {cls.method} model "
                f"({reason}); re-run `somad fit`"
            ) from None

    @classmethod
    def _rebuild(cls, config: dict, arrays: dict[str, torch.Tensor], path: Path, device: str | None, scoring: dict):
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
        model.n_val_images_ = state["n_val_images"]
        model.fit_seconds_ = state["fit_seconds"]
        model.display_range_ = tuple(state["display_range"]) if state.get("display_range") else None
        model.threshold_info_ = state.get("threshold_info")
        if not isinstance(model.threshold_info_, (dict, type(None))):
            raise ModelFileError(
                f"{path}: threshold_info is {model.threshold_info_!r}, not a table; re-run `somad fit`"
            )
        median = (model.threshold_info_ or {}).get("good_score_median")
        checked = {"image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_}
        for key, value in {**checked, "threshold_info.good_score_median": median}.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)
            ):
                raise ModelFileError(
                    f"{path}: {key} is {value!r}, not a finite number; re-run `somad fit` or `somad calibrate`"
                )
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


def training_set_hash(items: Sequence[ImageItem]) -> str:
    """SHA-256 over the training images in order: each one's name, then its file's bytes (or, for an in-memory
    image, its pixels). Saved in the model so that the training set can be identified later."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.name}|".encode(errors="surrogateescape"))
        if item.path is None:
            h.update(item.image.tobytes())
            continue
        try:
            with open(item.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()


def _all_finite(a: torch.Tensor) -> bool:
    """Whether every entry is finite, from one wide sum (NaN and Inf propagate through it; a float16 or float32
    array cannot overflow a float64 sum): about 3x faster than ``isfinite(a).all()`` on the 100 MB of float16
    whiteners read at every load."""
    return bool(torch.isfinite(a.sum(dtype=torch.float64 if a.dtype == torch.float32 else torch.float32)))


def _check_finite(maps: torch.Tensor) -> None:
    if not torch.isfinite(maps).all():
        raise NumericalError("NaN/Inf in anomaly maps; check the model file and the input images")


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


def _channels(backbone: str) -> tuple[int, ...]:
    return backbone_spec(backbone).channels


__all__ = ["BaseDetector", "ImageItem", "Prediction", "Geometry", "as_items"]
