"""How a detector sets its image and pixel thresholds from good images, and what it checks of them.

``fit`` holds good images out (an MVTec category's ``validation/good``, or a seeded ``val_fraction``), or
cross-fits (``cv``: each good image scored by a model fitted without it); ``calibrate`` re-estimates the thresholds
from good images the model never trained on (refusing the ones it did, by their fingerprints). Either way the
estimate is ``somad.verdicts.estimate_thresholds`` of the good images' scores and maps, recorded in
``threshold_info_``. Images offered as good (``calibrate``, ``SOMAD.update``) are screened (:class:`IncomingCheck`).

:class:`ThresholdsMixin` is composed into ``base.BaseDetector``, whose ``predict_iter``, ``fit`` and parameters
it uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from somad.errors import SomadError
from somad.io.inputs import ImageItem, as_items, calibration_items, image_digests, validation_items
from somad.methods.prediction import Prediction
from somad.verdicts import (
    FALSE_ALARM_LEVEL,
    OUTLIER_LEVEL,
    Thresholds,
    chroma,
    estimate_thresholds,
    far_above,
    kind_difference,
    pool_pixels,
)

logger = logging.getLogger(__name__)

#: ``cv="auto"`` cross-fits with this many folds when there are fewer good images than ``CROSS_FIT_BELOW``: there a
#: 10% hold-out is fewer than 10 images, and the threshold one of their top two scores. Measured from 50 images
#: (docs/benchmarks.md, "somad 0.10.0"): the hold-out's 5 images set thresholds that flagged 44-68% of tire's good
#: test images (stated: 23%), 5-fold cross-fitting's 50 out-of-fold scores 16% (stated: 12%), at 4-5x the fit
#: time. From 100 images on, the hold-out has 10 or more and the fit its usual cost.
CROSS_FIT_FOLDS, CROSS_FIT_BELOW = 5, 100
#: ``fit`` on fewer good images than this warns what to expect (docs/benchmarks.md, "Few good images").
FEW_IMAGES = 20

Detector = TypeVar("Detector", bound="ThresholdsMixin")


class ThresholdsMixin:
    """``fit``'s held-out split or cross-fitting and its thresholds, ``calibrate``, and the checks of images offered
    as good (``base.BaseDetector`` composes it)."""

    def calibrate(self: Detector, images, *, accept_outliers: bool = False) -> Detector:
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
            fold._learn_frame = lambda train, frame=self.input_frame_: frame  # and its model input
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

    def __init__(self, model: ThresholdsMixin, action: str, accept: bool):
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
        "only %d good image%s: expect a weaker ranking than from hundreds (SOMAD from 10: image AUROC 0.77 on tire, "
        "0.68 on magnetic_tile, against 0.84 and 0.94 from all their good images; docs/benchmarks.md, 'Few good "
        "images')%s; refit, or "
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


__all__ = ["CROSS_FIT_BELOW", "CROSS_FIT_FOLDS", "FEW_IMAGES", "IncomingCheck", "ThresholdsMixin"]
