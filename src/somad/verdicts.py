"""From scores and maps to decisions: thresholds, the pass/fail rule, predicted masks, regions, the input gate.

Pure functions on numpy arrays and PIL images; every detector and every output path (``predict``,
``evaluate``, the report) decides through them, so one rule holds everywhere:

* **The decision rule.** An image is anomalous when ``score > image_threshold`` (:func:`is_anomalous`), or when
  the input gate refused its frame (:func:`decide`, the whole verdict); a pixel when ``map > pixel_threshold``.
  The comparison is strict, everywhere.
* **Masks agree with verdicts.** A flagged image's mask is every pixel above the pixel threshold, plus the
  map's peak pixel, so it is never empty; an image that is not flagged has an empty mask
  (:func:`predicted_mask`). This holds at any resolution the map is resampled to, because the mask is
  computed on the map at that resolution and the peak pixel is always part of it.
* **Thresholds from good images only** (:func:`estimate_thresholds`): the image threshold is the
  ``threshold_quantile`` of held-out good images' scores (the expected false-alarm rate is about one minus it,
  :func:`false_alarm_rate` gives it with its interval from the number of images); the
  pixel threshold is the ``pixel_threshold_quantile`` of all pixels of their maps, so the masks cover the
  defect's extent rather than only its peak (measured in docs/benchmarks.md).
* **The normalised score** (:func:`normalized_score`): a [0, 1] reading of the score, the threshold at exactly
  0.5, from the held-out good scores kept in ``threshold_info`` (one function for every output and the runtime).
* **Images offered as good** to calibrate or update: far above the threshold (:func:`far_above`) they are refused
  unless accepted; of another kind than the training images (:func:`kind_difference`) they are warned about.
* **The input gate** (:func:`check_frame`): constant, saturated or mostly blank frames are refused as
  ``invalid_input`` with a reason; they are flagged, never passed as good, and their mask is the whole frame.
  ``fit`` learns the gate's limits from the training images (:class:`FrameGate`), so a product whose good frames
  are mostly black and white (binary images) is not refused as saturated; a blank frame always is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from somad.resize import resize_bilinear

#: ``status`` of an image that passed the input gate.
OK = "ok"
#: Prefix of the ``status`` of an image refused by the input gate.
INVALID = "invalid_input"

#: The input gate works on a grey copy of the frame resized to this square (``"resized"`` statistics; models
#: fitted before somad 0.11: a BOX thumbnail whose longest side is at most this, ``"thumbnail"``).
GATE_SIZE = 256
#: How a gate's statistics are taken (:func:`frame_stats`): ``"resized"``, in integers on a grey copy of the frame
#: resized to :data:`GATE_SIZE` square (``somad.resize.resize_bilinear``), which the exported graph repeats bit for
#: bit; ``"thumbnail"``, on Pillow's grey conversion and BOX thumbnail (somad 0.7-0.10; kept for their files). A
#: frame smaller than 256 px is upscaled by the former: black-and-white noise from pixel to pixel blends there and
#: is not counted as saturated (black or white areas are; a test holds both).
GATE_STATISTICS = ("resized", "thumbnail")
#: ITU-R 601-2 luma in 16-bit fixed point, as Pillow's ``convert("L")``: ``(R r + G g + B b + 2**15) >> 16``.
LUMA_WEIGHTS = (19595, 38470, 7471)
#: A frame whose grey levels vary by less than this (standard deviation, 8-bit levels) is blank.
BLANK_STD = 2.0
#: A frame with more than this fraction of pixels at 0-2 or 253-255 is saturated.
SATURATED_FRACTION = 0.9
#: Side of the blocks tested for blankness, and the block standard deviation under which one is blank.
FLAT_BLOCK, FLAT_STD = 8, 0.5
#: A frame with more than this fraction of blank blocks is mostly blank (an empty fixture, a covered lens).
FLAT_FRACTION = 0.6


def is_anomalous(score: float, threshold: float | None) -> bool | None:
    """The decision rule: ``score > threshold`` (``None`` without a threshold)."""
    return None if threshold is None else bool(score > threshold)


def decide(score: float, threshold: float | None, *, valid: bool = True) -> bool | None:
    """An image's verdict: a frame the input gate refused (``valid`` False) is always anomalous, any other is
    :func:`is_anomalous`; ``None`` without a threshold. The rule of every detector (the exported graph mirrors it)."""
    if threshold is None:
        return None
    return True if not valid else is_anomalous(score, threshold)


def predicted_mask(
    anomaly_map: np.ndarray, flagged: bool | None, pixel_threshold: float | None, *, valid: bool = True
) -> np.ndarray | None:
    """Boolean mask of a map ``(H, W)`` at any resolution; ``None`` when the model has no threshold.

    Not flagged: empty. Flagged: ``map > pixel_threshold`` plus the peak pixel (never empty). An invalid
    input (refused by the gate) is flagged as a whole: every pixel.
    """
    if flagged is None or pixel_threshold is None:
        return None
    if not valid:
        return np.ones(anomaly_map.shape, dtype=bool)
    if not flagged:
        return np.zeros(anomaly_map.shape, dtype=bool)
    mask = anomaly_map > pixel_threshold
    mask.flat[int(np.argmax(anomaly_map))] = True
    return mask


@dataclass(frozen=True)
class Region:
    """One connected predicted defect region (8-connected), in the pixels of the map it was found on."""

    area: int
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int  # exclusive
    peak: float
    mean: float

    def as_row(self) -> list:
        return [self.area, self.x0, self.y0, self.x1, self.y1, f"{self.peak:.6f}", f"{self.mean:.6f}"]


REGION_COLUMNS = ["area", "x0", "y0", "x1", "y1", "peak_score", "mean_score"]


def regions(mask: np.ndarray, anomaly_map: np.ndarray) -> list[Region]:
    """The 8-connected regions of ``mask``, largest first; their areas sum to ``mask.sum()``."""
    from scipy import ndimage

    if mask is None or not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    out = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        values = anomaly_map[box][labels[box] == i]
        out.append(
            Region(
                int(values.size),
                box[1].start,
                box[0].start,
                box[1].stop,
                box[0].stop,
                float(values.max()),
                float(values.mean()),
            )
        )
    return sorted(out, key=lambda r: -r.area)


# ----------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds and what they rest on."""

    image: float
    pixel: float
    n_images: int
    quantile: float
    pixel_quantile: float
    reference: float  #: the median good score (the normalised scale's reference above the threshold)
    good_scores: tuple[float, ...] = ()  #: the sorted good scores (:func:`good_score_summary`): the scale's CDF

    @property
    def expected_false_alarm_rate(self) -> float:
        """The probability that a new good image scores above the image threshold (:func:`false_alarm_rate`)."""
        return false_alarm_rate(self.n_images, self.quantile)[0]

    @property
    def false_alarm_interval(self) -> tuple[float, float]:
        """The central :data:`FALSE_ALARM_LEVEL` interval of the false-alarm rate (:func:`false_alarm_rate`)."""
        return false_alarm_rate(self.n_images, self.quantile)[1:]


def pool_pixels(anomaly_map) -> np.ndarray:
    """The pixels of a map at the model input that calibration pools: every second pixel of every second row
    (the maps are blurred, so neighbours carry the same information), as float32. A quarter of the map, so
    calibrating on thousands of images holds a quarter of their maps, not every map whole."""
    return np.array(np.asarray(anomaly_map, dtype=np.float32)[::2, ::2].ravel())


def image_threshold(scores: Sequence[float], quantile: float) -> float:
    """The image threshold from good images' scores: their ``quantile`` (linear interpolation between order
    statistics, distribution-free). A new good image then scores above it with probability about
    ``1 - quantile`` when they are many; :func:`false_alarm_rate` gives the rate for few."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


#: The probability covered by the false-alarm interval that fit, calibrate and the reports state.
FALSE_ALARM_LEVEL = 0.9


def false_alarm_rate(n_images: int, quantile: float, level: float = FALSE_ALARM_LEVEL) -> tuple[float, float, float]:
    """The false-alarm rate of an :func:`image_threshold` set on ``n_images`` good scores: its expected value and
    the central ``level`` interval, ``(mean, low, high)``, over the draws of those images.

    The threshold is order statistic ``r = 1 + (n - 1) * quantile`` of ``n`` exchangeable good scores (what
    ``np.quantile`` interpolates), so the chance that a new good image scores above it is Beta-distributed,
    ``Beta(n + 1 - r, r)``, whatever the scores' distribution: mean ``(n - (n - 1) q) / (n + 1)``, which is
    ``1 - q`` only for many images (10 images at q = 0.9: 0.17, with a 90% interval of 0.03 to 0.38). This is
    exact when ``(n - 1) * q`` is a whole number; between two order statistics it is the Beta of the interpolated
    order: in simulations of uniform, normal and exponential scores its mean and upper end lie at most 0.05 above
    the true ones at n = 5, 0.02 at n = 10 and 0.01 from n = 20 (tests/test_verdicts.py). Thresholds from
    out-of-fold scores (cross-fitting, ``BaseDetector`` parameter ``cv``) come from models fitted on fewer images
    than the final one, which score good images a little higher: the rate stated for them errs on the high side.
    """
    from scipy.stats import beta

    n = int(n_images)
    if n < 1:
        raise ValueError(f"a false-alarm rate needs at least one good score, got n_images={n_images}")
    r = 1.0 + (n - 1) * float(quantile)
    dist = beta(n + 1.0 - r, r)
    tail = (1.0 - float(level)) / 2.0
    return float(dist.mean()), float(dist.ppf(tail)), float(dist.ppf(1.0 - tail))


def estimate_thresholds(
    scores: Sequence[float], pixels: Sequence[np.ndarray], quantile: float, pixel_quantile: float
) -> Thresholds:
    """Thresholds from good images only: ``quantile`` of their scores, ``pixel_quantile`` of their map pixels.

    ``pixels`` holds each image's :func:`pool_pixels`. The result depends only on these images, never on
    defective ones.
    """
    scores = np.asarray(scores, dtype=np.float64)
    pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in pixels])
    return Thresholds(
        image_threshold(scores, quantile),
        float(np.quantile(pixels, pixel_quantile)),
        int(scores.size),
        float(quantile),
        float(pixel_quantile),
        float(np.median(scores)),
        tuple(good_score_summary(scores)),
    )


#: At most this many held-out good scores are kept for the normalised scale (their quantiles when there are more).
MAX_GOOD_SCORES = 1000


def good_score_summary(scores: Sequence[float]) -> list[float]:
    """The sorted good scores the normalised scale rests on: all of them, or :data:`MAX_GOOD_SCORES` evenly
    spaced quantiles (mid-points of equal-probability bins) when there are more."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size > MAX_GOOD_SCORES:
        s = np.quantile(s, (np.arange(MAX_GOOD_SCORES) + 0.5) / MAX_GOOD_SCORES)
    return [float(v) for v in s]


def normalized_score(score, threshold: float, info: dict | None) -> np.ndarray:
    """Scores on a [0, 1] scale with the threshold at exactly 0.5; ``threshold_info`` (``info``) says what the
    good parts scored. Monotone in the score, so ``normalized > 0.5`` exactly when ``score > threshold``
    (:func:`is_anomalous`); the scale only reads more easily, it decides nothing.

    * **Below the threshold**: ``0.5 * F(s) / F(t)``, where ``F`` is the empirical CDF of the held-out good
      scores (``info["good_scores"]``: order statistic ``i`` of ``n`` at ``i / (n + 1)``, linear between them
      and from 0 at score 0 to the smallest). 0.25 reads "half as far up the good parts' distribution as the
      threshold"; its resolution is ``1 / n`` (:func:`scale_resolution`). A threshold above every good score
      (set by hand) is the last knot.
    * **Above the threshold**: ``1 - 0.5 * (t - m) / (s - m)``, with ``m`` the median good score: 0.75 is twice
      as far from a typical good part as the threshold, 0.95 ten times. Strictly increasing and below 1 for every
      finite score: it never saturates before the raw score does (in float64 it reaches 1.0 only past about
      1e15 times the threshold's distance from the median).
    * **Files of somad 0.7** record only the median ``m`` (``good_score_median``): below the threshold the scale
      is then linear through 0 at score 0, ``0.25 / quantile`` at ``m`` (where the CDF scale puts the median
      when ``F(t)`` is the threshold's quantile) and 0.5 at the threshold; above it, the same as above.

    Raises ``ValueError`` when ``info`` records neither the good scores nor their median.
    """
    s = np.asarray(score, dtype=np.float64)
    t = float(threshold)
    info = info or {}
    good, median = info.get("good_scores"), info.get("good_score_median")
    if good:
        xs, ranks = np.unique(np.asarray(good, dtype=np.float64), return_counts=True)
        cdf = np.cumsum(ranks) / (len(good) + 1.0)  # ties: the CDF at a repeated score counts all of them
        m = float(np.median(np.asarray(good, dtype=np.float64)) if median is None else median)
        f_t = None  # the CDF at the threshold, interpolated below
    elif median is not None:  # a somad 0.7 file: its median at CDF 0.5, the threshold at its quantile
        m = float(median)
        xs, cdf, f_t = np.array([m]), np.array([0.5]), max(float(info.get("quantile") or 0.9), 0.5)
    else:
        raise ValueError("the thresholds record neither the good images' scores nor their median")
    x0 = 0.0 if xs[0] > 0 else xs[0] - 1.0  # the CDF rises linearly from 0 here to the smallest good score
    if t <= x0:  # a threshold at or below zero (set by hand): a single linear step
        knots_x, knots_y = np.array([t - 1.0, t]), np.array([0.0, 0.5])
    else:
        if f_t is None or not xs[-1] < t:
            f_t = float(np.interp(t, np.r_[x0, xs], np.r_[0.0, cdf])) if t <= xs[-1] else 1.0
        keep = xs < t
        knots_x, knots_y = np.r_[x0, xs[keep], t], np.r_[0.0, 0.5 * cdf[keep] / f_t, 0.5]
    if not m < t:  # a threshold at or below the typical good score (quantile < 0.5, or set by hand): distances
        m = float(knots_x[0])  # are measured from the scale's zero instead
    with np.errstate(divide="ignore", invalid="ignore"):
        above = 1.0 - 0.5 * (t - m) / (s - m)
    above = np.maximum(above, np.nextafter(0.5, 1.0))  # s > t, but s - m rounded to t - m: still above 0.5
    return np.where(s > t, above, np.interp(np.minimum(s, t), knots_x, knots_y))


def scale_resolution(info: dict | None) -> float | None:
    """The finest step of the normalised scale below the threshold: one over the number of good scores it rests
    on (``None`` for files that record only their median)."""
    good = (info or {}).get("good_scores")
    return 1.0 / len(good) if good else None


def normalized_or_none(score: float, threshold: float | None, threshold_info: dict | None) -> float | None:
    """One score's :func:`normalized_score` from a model's threshold and ``threshold_info_``, or ``None`` where
    they do not allow it (no threshold; files from before somad 0.7, which record no good scores)."""
    info = threshold_info or {}
    if threshold is None or (not info.get("good_scores") and info.get("good_score_median") is None):
        return None
    return float(normalized_score(score, threshold, info))


# ----------------------------------------------------------------------------------------- images offered as good
#: ``calibrate`` and ``update`` refuse images offered as good whose normalised score (:func:`normalized_score`) is
#: above this and whose raw score is above every held-out good score, unless told to accept them: 0.75 is twice as
#: far from the median good score as the threshold. Chosen by measurement on the shared data (docs/benchmarks.md).
OUTLIER_LEVEL = 0.75


def far_above(scores, threshold: float | None, info: dict | None) -> np.ndarray | None:
    """Which of ``scores`` (images offered as good to calibrate or update) lie far above the current threshold:
    above the largest held-out good score (``info["good_scores"]``) and with a normalised score above
    :data:`OUTLIER_LEVEL`, i.e. ``s > max(g_max, m + 2 (t - m))`` with ``m`` the median good score. Files that
    record only the median (somad 0.7) use the second condition alone. ``None`` where the model cannot tell (no
    threshold, no good scores recorded).

    On the shared data's test images (default SOMAD; docs/benchmarks.md) it refuses 70 of 71 metal_plate defects,
    24 of 87 tire defects and 82 of 392 magnetic_tile defects, and none of their 241 good test images; the normalised
    level alone (0.75) refused 4 of magnetic_tile's 190 good images, whose held-out scores have a long upper tail.
    """
    if normalized_or_none(0.0, threshold, info) is None:
        return None
    s = np.asarray(scores, dtype=np.float64)
    good = (info or {}).get("good_scores")
    return (normalized_score(s, threshold, info) > OUTLIER_LEVEL) & (s > (max(good) if good else -np.inf))


#: An image whose colour channels differ by less than this on average (8-bit levels: max - min per pixel) is grey.
GREY_CHROMA = 1.0
#: Training images whose median chroma is at least this are colour images (shared data: tire 5.3, metal_plate 35).
COLOUR_CHROMA = 3.0
#: An image side more than this factor below the training images' smallest, or above their largest, is far off.
SIZE_FACTOR = 2.0


def chroma(image: Image.Image) -> float:
    """How far from grey an image is: the mean over the pixels of a thumbnail (64 px) of max - min of R, G, B."""
    small = image.convert("RGB")
    small.thumbnail((64, 64))
    a = np.asarray(small, dtype=np.int16)
    return float((a.max(-1) - a.min(-1)).mean())


def input_profile(chromas: Sequence[float], sizes: Sequence[tuple[int, int]]) -> dict:
    """What the training images look like, for :func:`kind_difference`: their median :func:`chroma` and the
    median, smallest and largest ``(height, width)``."""
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return {
        "chroma": float(np.median(chromas)) if len(chromas) else None,
        "n_chroma_images": len(chromas),
        "median_size": [int(v) for v in np.median(hw, axis=0)] if len(hw) else None,
        "min_size": [int(v) for v in hw.min(axis=0)] if len(hw) else None,
        "max_size": [int(v) for v in hw.max(axis=0)] if len(hw) else None,
    }


def kind_difference(profile: dict | None, image_chroma: float, size: tuple[int, int]) -> str | None:
    """How an image differs in kind from the training images (``profile``, :func:`input_profile`): ``"grey-scale"``
    into a colour model, ``"colour"`` into a grey-scale one, or ``"size"`` far outside the training sizes; ``None``
    when it does not (or the profile is not recorded)."""
    if not profile:
        return None
    c = profile.get("chroma")
    if c is not None and c >= COLOUR_CHROMA and image_chroma < GREY_CHROMA:
        return "grey-scale"
    if c is not None and c < GREY_CHROMA and image_chroma >= COLOUR_CHROMA:
        return "colour"
    lo, hi = profile.get("min_size"), profile.get("max_size")
    if lo and hi and any(v * SIZE_FACTOR < a or v > b * SIZE_FACTOR for v, a, b in zip(size, lo, hi)):
        return "size"
    return None


# ----------------------------------------------------------------------------------------- input gate
@dataclass(frozen=True)
class FrameStats:
    """What the input gate measures on a frame (its grey copy, longest side at most :data:`GATE_SIZE`)."""

    std: float  #: standard deviation of the grey levels (8-bit)
    mean: float  #: mean grey level
    clipped: float  #: fraction of pixels at 0-2 or 253-255
    flat: float  #: fraction of :data:`FLAT_BLOCK`-pixel blocks without texture (0 for a frame smaller than one)


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """8-bit grey levels ``(H, W)`` int64 of RGB ``(H, W, 3)`` uint8: :data:`LUMA_WEIGHTS` in integers."""
    weighted = rgb.astype(np.int64) @ np.asarray(LUMA_WEIGHTS, np.int64)
    return (weighted + (1 << 15)) >> 16


#: The ``"resized"`` statistics in integers (``n`` pixels, ``S1 = sum g``, ``S2 = sum g^2``; per 8x8 block ``s1``,
#: ``s2``): ``std < BLANK_STD`` exactly when ``n S2 - S1^2 < (BLANK_STD n)^2``, a block is without texture when
#: ``64 s2 - s1^2 < (FLAT_STD 64)^2``; the fractions have powers of two below them (``n = 256^2``, 1024 blocks).
#: The exported graph compares the same integers (``somad.export.onnx.gate_nodes``).
BLANK_BOUND = int(np.ceil((BLANK_STD * GATE_SIZE**2) ** 2))
FLAT_BOUND = int(np.ceil((FLAT_STD * FLAT_BLOCK**2) ** 2))


def frame_stats(image: Image.Image, statistics: str = "resized") -> FrameStats:
    """The input gate's statistics of one decoded frame, taken as ``statistics`` says (:data:`GATE_STATISTICS`)."""
    if statistics == "resized":
        g = grey_levels(np.asarray(resize_bilinear(image.convert("RGB"), (GATE_SIZE, GATE_SIZE)), np.uint8))
        n, b = g.size, FLAT_BLOCK
        s1, s2 = int(g.sum()), int((g * g).sum())
        blocks = g.reshape(GATE_SIZE // b, b, GATE_SIZE // b, b)
        b1, b2 = blocks.sum(axis=(1, 3)), (blocks * blocks).sum(axis=(1, 3))
        flat = float(np.mean(b * b * b2 - b1 * b1 < FLAT_BOUND))
        clipped = float(np.mean((g <= 2) | (g >= 253)))
        return FrameStats(float(np.sqrt(n * s2 - s1 * s1) / n), s1 / n, clipped, flat)
    grey = image.convert("L")
    if max(grey.size) > GATE_SIZE:
        grey = grey.copy()
        grey.thumbnail((GATE_SIZE, GATE_SIZE), Image.BOX)
    g = np.asarray(grey, dtype=np.float32)
    clipped = float(((g <= 2) | (g >= 253)).mean())
    h, w = (s - s % FLAT_BLOCK for s in g.shape)
    flat = 0.0
    if h and w:
        blocks = g[:h, :w].reshape(h // FLAT_BLOCK, FLAT_BLOCK, w // FLAT_BLOCK, FLAT_BLOCK).std(axis=(1, 3))
        flat = float((blocks < FLAT_STD).mean())
    return FrameStats(float(g.std()), float(g.mean()), clipped, flat)


#: A learned limit sits above this quantile of the training images' statistic (a few odd training frames, e.g.
#: a covered lens, do not move it) ...
GATE_QUANTILE = 0.99
#: ... by the larger of this and the statistic's range (that quantile minus the opposite one): good frames the
#: training images did not show may lie as far beyond them as they spread.
GATE_MARGIN = 0.05
#: ``fit`` refuses a training set of which the learned gate would refuse more than this fraction.
MAX_REFUSED_FRACTION = 0.1


@dataclass(frozen=True)
class FrameGate:
    """The input gate's limits: the fixed rule (natural photographs), or limits learned from a product's training
    images (:meth:`learn`), which are never stricter than the fixed ones.

    A frame is refused as saturated when more than ``saturated_fraction`` of its pixels are black or white, and as
    mostly blank when more than ``flat_fraction`` of its blocks lack texture. For a product whose good frames are
    like that (binary images: scanned circuit boards, thresholded X-rays) the learned limits sit above what its
    training images show, or past 1 (the rule never fires). A blank frame (grey levels varying by less than
    :data:`BLANK_STD`) is refused by every gate: it shows no product.
    """

    saturated_fraction: float = SATURATED_FRACTION
    flat_fraction: float = FLAT_FRACTION
    n_images: int = 0  #: the training images the limits were learned from (0: the fixed rule)
    train_clipped: float | None = None  #: the :data:`GATE_QUANTILE` of the training images' clipped fraction
    train_flat: float | None = None  #: and of their fraction of blocks without texture
    statistics: str = "thumbnail"  #: how its statistics are taken (:func:`frame_stats`); learned gates: "resized"

    @classmethod
    def learn(cls, stats: Sequence[FrameStats], statistics: str = "resized") -> FrameGate:
        """Limits from the statistics of a product's training images: each fixed limit, raised to the training
        images' :data:`GATE_QUANTILE` plus a margin (:data:`GATE_MARGIN`, or their range if wider) where they reach
        it. Natural photographs stay far below the fixed limits, so their gate is the fixed rule."""
        if not stats:
            return cls(statistics=statistics)
        clipped = np.array([s.clipped for s in stats], dtype=np.float64)
        flat = np.array([s.flat for s in stats], dtype=np.float64)

        def limit(values: np.ndarray, fixed: float) -> tuple[float, float]:
            top, bottom = np.quantile(values, [GATE_QUANTILE, 1.0 - GATE_QUANTILE]).tolist()
            return max(fixed, top + max(GATE_MARGIN, top - bottom)), top

        saturated, top_clipped = limit(clipped, SATURATED_FRACTION)
        flat_limit, top_flat = limit(flat, FLAT_FRACTION)
        return cls(saturated, flat_limit, len(stats), top_clipped, top_flat, statistics)

    @property
    def learned(self) -> bool:
        return self.n_images > 0

    def check(self, stats: FrameStats) -> str:
        """``OK``, or ``"invalid_input: <reason>"`` (see :func:`check_frame`)."""
        if stats.std < BLANK_STD:
            mean = stats.mean
            kind = "black" if mean < 16 else "white" if mean > 239 else f"constant grey {mean:.0f}"
            return f"{INVALID}: blank frame ({kind})"
        if stats.clipped > self.saturated_fraction:
            seen = f"; the training images show up to {100 * self.train_clipped:.0f}%" if self.learned else ""
            return f"{INVALID}: saturated frame ({100 * stats.clipped:.0f}% of pixels black or white{seen})"
        if stats.flat > self.flat_fraction:
            seen = f"; the training images show up to {100 * self.train_flat:.0f}%" if self.learned else ""
            return (
                f"{INVALID}: mostly blank frame ({100 * stats.flat:.0f}% without texture{seen}; "
                "empty fixture or covered lens?)"
            )
        return OK

    def as_dict(self) -> dict:
        """The JSON form stored in model files and exports (:meth:`from_dict` reads it back)."""
        return {
            "saturated_fraction": self.saturated_fraction,
            "flat_fraction": self.flat_fraction,
            "n_images": self.n_images,
            "train_clipped": self.train_clipped,
            "train_flat": self.train_flat,
            "statistics": self.statistics,
        }

    @classmethod
    def from_dict(cls, table: dict | None) -> FrameGate | None:
        """The gate :meth:`as_dict` wrote; ``None`` for files without one (somad 0.7.1 and earlier: the fixed rule).
        Raises ``ValueError`` for a table that is not such a gate."""
        if table is None:
            return None
        keys = set(cls().as_dict())
        if not isinstance(table, dict) or set(table) not in (keys, keys - {"statistics"}):  # 0.7-0.10: no statistics
            raise ValueError(f"input_gate must be a table of {', '.join(cls().as_dict())}")
        statistics = table.get("statistics", "thumbnail")
        if statistics not in GATE_STATISTICS:
            raise ValueError(f"input_gate statistics must be one of: {', '.join(GATE_STATISTICS)}")
        limits = [table["saturated_fraction"], table["flat_fraction"]]
        seen = [v for v in (table["train_clipped"], table["train_flat"]) if v is not None]
        fixed = [SATURATED_FRACTION, FLAT_FRACTION] + [0.0] * len(seen)

        def number(v, low: float, high: float) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and low <= v <= high

        if not all(number(v, low, 10.0 if i < 2 else 1.0) for i, (v, low) in enumerate(zip(limits + seen, fixed))):
            raise ValueError(
                f"input_gate limits must be numbers from the fixed ones ({SATURATED_FRACTION}, {FLAT_FRACTION}) up, "
                "its training statistics fractions from 0 to 1"
            )
        n = table["n_images"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (n > 0 and len(seen) != 2):
            raise ValueError("input_gate n_images must be a count, with the training statistics when it is not 0")
        clipped, flat = (float(v) for v in seen) if n else (None, None)
        return cls(float(limits[0]), float(limits[1]), n, clipped, flat, statistics)


def check_frame(image: Image.Image, gate: FrameGate | None = None) -> str:
    """``OK``, or ``"invalid_input: <reason>"`` for a frame no inspection should pass as good.

    Refused: a blank frame (grey levels varying by less than :data:`BLANK_STD`: black, white, any constant
    grey), a saturated one (over the gate's ``saturated_fraction``, by default :data:`SATURATED_FRACTION`, of its
    pixels at the ends of the range), and one that is mostly blank (over ``flat_fraction``, by default
    :data:`FLAT_FRACTION`, of its 8x8 blocks without texture, e.g. an empty fixture or a covered lens: real camera
    images have sensor noise, which synthetic or dead regions lack). ``gate``: a model's learned
    :class:`FrameGate` (``None``: the fixed rule, as for model files of somad 0.7.1 and earlier).
    """
    gate = gate or FrameGate()
    return gate.check(frame_stats(image, gate.statistics))
