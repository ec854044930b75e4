"""From scores and maps to decisions: thresholds, the pass/fail rule, predicted masks, regions, the input gate.

Pure functions on numpy arrays and PIL images; every detector and every output path (``predict``,
``evaluate``, the report) decides through them, so one rule holds everywhere:

* **The decision rule.** An image is anomalous when ``score > image_threshold`` (:func:`is_anomalous`);
  a pixel when ``map > pixel_threshold``. The comparison is strict, everywhere.
* **Masks agree with verdicts.** A flagged image's mask is every pixel above the pixel threshold, plus the
  map's peak pixel, so it is never empty; an image that is not flagged has an empty mask
  (:func:`predicted_mask`). This holds at any resolution the map is resampled to, because the mask is
  computed on the map at that resolution and the peak pixel is always part of it.
* **Thresholds from good images only** (:func:`estimate_thresholds`): the image threshold is the
  ``threshold_quantile`` of held-out good images' scores (the expected false-alarm rate is one minus it); the
  pixel threshold is the ``pixel_threshold_quantile`` of all pixels of their maps, so the masks cover the
  defect's extent rather than only its peak (measured in docs/benchmarks.md).
* **The input gate** (:func:`check_frame`): constant, saturated or mostly blank frames are refused as
  ``invalid_input`` with a reason; they are flagged, never passed as good, and their mask is the whole frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: ``status`` of an image that passed the input gate.
OK = "ok"
#: Prefix of the ``status`` of an image refused by the input gate.
INVALID = "invalid_input"

#: The input gate works on a grey copy whose longest side is at most this many pixels.
GATE_SIZE = 256
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
    reference: float  #: the median good score: 0 on the normalised scale

    @property
    def expected_false_alarm_rate(self) -> float:
        return 1.0 - self.quantile


def pool_pixels(anomaly_map) -> np.ndarray:
    """The pixels of a map at the model input that calibration pools: every second pixel of every second row
    (the maps are blurred, so neighbours carry the same information), as float32. A quarter of the map, so
    calibrating on thousands of images holds a quarter of their maps, not every map whole."""
    return np.array(np.asarray(anomaly_map, dtype=np.float32)[::2, ::2].ravel())


def image_threshold(scores: Sequence[float], quantile: float) -> float:
    """The image threshold from good images' scores: their ``quantile`` (linear interpolation between order
    statistics, distribution-free). A new good image then scores above it with probability about
    ``1 - quantile``."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile))


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
    )


def normalized_score(score, threshold: float, reference: float) -> np.ndarray:
    """Scores on a [0, 1] scale with the threshold at 0.5, as anomalib users know them.

    Linear in the score: ``reference`` (the median score of the good images the threshold came from) maps to 0,
    the threshold to 0.5 and ``threshold + (threshold - reference)`` to 1; values beyond are clipped. It is
    monotone, so ``normalized > 0.5`` exactly when ``score > threshold`` (:func:`is_anomalous`); the scale
    only reads more easily, it decides nothing.
    """
    spread = max(float(threshold) - float(reference), 1e-12)
    n = 0.5 + 0.5 * (np.asarray(score, dtype=np.float64) - float(threshold)) / spread
    return np.clip(n, 0.0, 1.0)


def normalized_or_none(score: float, threshold: float | None, threshold_info: dict | None) -> float | None:
    """One score's :func:`normalized_score` from a model's threshold and ``threshold_info_`` (its median good
    score), or ``None`` where they do not record it (no threshold; files from before somad 0.7)."""
    reference = (threshold_info or {}).get("good_score_median")
    if threshold is None or reference is None:
        return None
    return float(normalized_score(score, threshold, reference))


# ----------------------------------------------------------------------------------------- input gate
def check_frame(image: Image.Image) -> str:
    """``OK``, or ``"invalid_input: <reason>"`` for a frame no inspection should pass as good.

    Refused: a blank frame (grey levels varying by less than :data:`BLANK_STD`: black, white, any constant
    grey), a saturated one (over :data:`SATURATED_FRACTION` of its pixels at the ends of the range), and one
    that is mostly blank (over :data:`FLAT_FRACTION` of its 8x8 blocks without texture, e.g. an empty fixture
    or a covered lens: real camera images have sensor noise, which synthetic or dead regions lack).
    """
    grey = image.convert("L")
    if max(grey.size) > GATE_SIZE:
        grey = grey.copy()
        grey.thumbnail((GATE_SIZE, GATE_SIZE), Image.BOX)
    g = np.asarray(grey, dtype=np.float32)
    std, mean = float(g.std()), float(g.mean())
    if std < BLANK_STD:
        kind = "black" if mean < 16 else "white" if mean > 239 else f"constant grey {mean:.0f}"
        return f"{INVALID}: blank frame ({kind})"
    clipped = float(((g <= 2) | (g >= 253)).mean())
    if clipped > SATURATED_FRACTION:
        return f"{INVALID}: saturated frame ({100 * clipped:.0f}% of pixels black or white)"
    h, w = (s - s % FLAT_BLOCK for s in g.shape)
    if h and w:
        blocks = g[:h, :w].reshape(h // FLAT_BLOCK, FLAT_BLOCK, w // FLAT_BLOCK, FLAT_BLOCK).std(axis=(1, 3))
        flat = float((blocks < FLAT_STD).mean())
        if flat > FLAT_FRACTION:
            return f"{INVALID}: mostly blank frame ({100 * flat:.0f}% without texture; empty fixture or covered lens?)"
    return OK
