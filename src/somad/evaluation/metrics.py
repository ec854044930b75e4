"""Evaluation metrics for anomaly detection and localization.

All functions are pure: they take labels / ground-truth masks and scores / anomaly maps and
return numbers, arrays or plain dicts. Convention throughout: a **higher score means more
anomalous**, and a sample (image or pixel) is called anomalous at threshold ``t`` when its
score is ``>= t``.

Image-level metrics take one label and one score per image. Pixel-level metrics take
*sequences* of 2-D ground-truth masks and 2-D anomaly maps; each mask has the shape of its map,
but shapes may differ between images (images are evaluated at their original resolution).
Pixels of all images are pooled. Masks are binarised with ``mask > 0`` (bool masks are used as
they are); a mask entry may be ``None`` for an image without a ground-truth file, which is then
treated as all-zero with the shape of its map.

Pixel-level curves are computed exactly (no threshold binning) with a single descending sort of
all pooled pixel scores; tied scores are merged into one curve point, as in scikit-learn and in
the MVTec AD reference evaluation. Memory stays linear in the number of pixels: scores are
pooled as ``float32`` and region ids as ``int32``; counts are integers, so pixel AUROC is exact
(integer trapezoid) and identical to :func:`sklearn.metrics.roc_auc_score` up to rounding.

The per-region overlap (PRO) curve and its normalised area (AU-PRO) follow the MVTec AD
evaluation code (``generic_util.trapezoid`` and ``pro_curve_util.compute_pro``): regions are the
8-connected components of every ground-truth mask, the false positive rate is taken over the
defect-free pixels of *all* images, and the curve is integrated up to a false positive rate of
``integration_limit`` (0.3 by default) and divided by that limit.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from somad.errors import SomadError

__all__ = [
    "MetricInputError",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "au_pro",
    "f1_max",
    "image_f1_max",
    "pixel_f1_max",
    "roc_curve_points",
    "pixel_roc_curve_points",
    "downsample_curve",
    "accuracy_at_threshold",
    "balanced_accuracy",
    "best_balanced_accuracy",
    "best_balanced_threshold",
    "split_half_balanced_accuracy",
    "oracle_balanced_accuracies",
    "mask_metrics",
    "evaluate_predictions",
]

#: 3x3 structuring element of ones: 8-connectivity, as in the MVTec AD reference evaluation.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


class MetricInputError(SomadError, ValueError):
    """Labels, scores, masks or maps handed to a metric are inconsistent or unusable."""


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_labels(labels, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D bool array; values must be 0/1 (or bool)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not (np.issubdtype(arr.dtype, np.number)):
        raise MetricInputError(f"{name} must be numeric 0/1 or bool, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if np.any(bad):
        raise MetricInputError(f"{name} must contain only 0 and 1, got {np.unique(arr[bad])[:5].tolist()}")
    return arr == 1


def _as_scores(scores, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a 1-D float64 array of length ``n`` without NaN."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise MetricInputError(f"{name} has {arr.shape[0]} entries but labels has {n}")
    if np.isnan(arr).any():
        first = int(np.flatnonzero(np.isnan(arr))[0])
        raise MetricInputError(f"{name} contain NaN (first at index {first})")
    return arr


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous (1)" if n_pos else "normal (0)"
        raise MetricInputError(
            f"{what} is undefined: all {y.size} {'samples' if y.size != 1 else 'sample'} are "
            f"{only}; both normal and anomalous samples are needed"
        )


def _check_pairs(masks, maps) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Validate mask/map pairs and return them as lists of arrays (masks may be ``None``)."""
    if maps is None:
        raise MetricInputError("anomaly maps are required for pixel-level metrics")
    maps = list(maps)
    masks = [None] * len(maps) if masks is None else list(masks)
    if len(masks) != len(maps):
        raise MetricInputError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if not maps:
        raise MetricInputError("no anomaly maps given")
    out_masks: list[np.ndarray | None] = []
    out_maps: list[np.ndarray] = []
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        amap = np.asarray(amap)
        if amap.ndim != 2:
            raise MetricInputError(f"anomaly map {i} must be 2-D, got shape {amap.shape}")
        if not np.issubdtype(amap.dtype, np.number) or np.iscomplexobj(amap):
            raise MetricInputError(f"anomaly map {i} must be real-valued, got dtype {amap.dtype}")
        if np.issubdtype(amap.dtype, np.floating) and np.isnan(amap).any():
            raise MetricInputError(f"anomaly map {i} contains NaN")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != amap.shape:
                raise MetricInputError(f"mask {i} has shape {mask.shape} but anomaly map {i} has shape {amap.shape}")
            mask = mask if mask.dtype == bool else mask > 0
        out_masks.append(mask)
        out_maps.append(amap)
    return out_masks, out_maps


@dataclass
class _PooledPixels:
    """All pixels of all images, flattened into one vector.

    Attributes
    ----------
    scores : ndarray, shape (P,), float32
        Pooled anomaly scores.
    ids : ndarray, shape (P,), int32
        0 for a defect-free pixel; otherwise a positive id. With ``regions=True`` the id is the
        1-based index of the pixel's 8-connected ground-truth region (unique over all images);
        otherwise every anomalous pixel has id 1.
    region_sizes : ndarray, shape (R,), int64 or None
        Pixel count of each region (``region_sizes[k - 1]`` for id ``k``); ``None`` without regions.
    n_anomalous : int
        Number of ground-truth anomalous pixels.
    """

    scores: np.ndarray
    ids: np.ndarray
    region_sizes: np.ndarray | None
    n_anomalous: int


def _pool_pixels(masks, maps, *, regions: bool) -> _PooledPixels:
    masks, maps = _check_pairs(masks, maps)
    total = sum(m.size for m in maps)
    scores = np.empty(total, dtype=np.float32)
    ids = np.zeros(total, dtype=np.int32)
    sizes: list[np.ndarray] = []
    n_regions = 0
    n_anomalous = 0
    start = 0
    for mask, amap in zip(masks, maps):
        stop = start + amap.size
        scores[start:stop] = amap.ravel()
        if mask is not None and mask.any():
            if regions:
                labeled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
                flat = labeled.ravel()
                sizes.append(np.bincount(flat, minlength=n + 1)[1:].astype(np.int64))
                fg = flat > 0
                ids[start:stop][fg] = flat[fg] + n_regions
                n_regions += n
            else:
                ids[start:stop] = mask.ravel()
            n_anomalous += int(np.count_nonzero(mask))
        start = stop
    region_sizes = None
    if regions:
        region_sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
    return _PooledPixels(scores, ids, region_sizes, n_anomalous)


# --------------------------------------------------------------------------------------------
# Exact ranking shared by all curves
# --------------------------------------------------------------------------------------------


@dataclass
class _Ranked:
    """Cumulative counts at every distinct score, in descending score order.

    Attributes
    ----------
    thresholds : ndarray, shape (T,)
        Distinct scores, descending.
    tps : ndarray, shape (T,), int32 (int64 for >= 2**31 samples)
        Number of positives with score >= ``thresholds[j]``.
    fps : ndarray, shape (T,), same dtype as ``tps``
        Number of negatives with score >= ``thresholds[j]``.
    pos_ids : ndarray, shape (n_pos,), int32
        Ids of the positives in descending score order (region ids for PRO).
    n_pos, n_neg : int
        Totals.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    pos_ids: np.ndarray
    n_pos: int
    n_neg: int


_CHUNK = 1 << 22  # elements per block in chunked reductions over curve points


def _rank(scores: np.ndarray, ids: np.ndarray) -> _Ranked:
    """Sort ``scores`` descending once and count positives (``ids > 0``) per distinct score.

    Parameters
    ----------
    scores : ndarray, shape (P,)
    ids : ndarray, shape (P,), integer or bool; positive entries mark positives.

    Returns
    -------
    _Ranked
        Counts are ``int32`` when ``P < 2**31`` (halves memory on ~50 M pixels), else ``int64``.
    """
    n = scores.shape[0]
    if n == 0:
        raise MetricInputError("no samples to evaluate")
    count_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    order = np.argsort(scores)[::-1]
    s = scores[order]
    r = ids[order]
    del order
    # Last index of each run of equal scores (descending order), as in the MVTec reference
    # (keep_mask) and sklearn (threshold_idxs).
    ends = np.flatnonzero(s[1:] != s[:-1]).astype(count_dtype)
    ends = np.append(ends, np.array([n - 1], dtype=count_dtype))
    thresholds = s[ends]
    del s
    pos = np.flatnonzero(r).astype(count_dtype)
    pos_ids = r[pos]
    del r
    # positives among the first ends[j] + 1 ranked samples
    tps = np.searchsorted(pos, ends, side="right").astype(count_dtype)
    del pos
    fps = ends  # reuse the buffer: negatives = ranked samples - positives
    fps += 1
    fps -= tps
    return _Ranked(thresholds, tps, fps, pos_ids, int(tps[-1]), int(fps[-1]))


def _auroc_from_ranked(rk: _Ranked) -> float:
    """Exact ROC AUC (trapezoid rule, like sklearn) with integer arithmetic.

    ``2 * AUC * n_pos * n_neg = sum_j (fp_j - fp_{j-1}) * (tp_j + tp_{j-1})`` with
    ``tp_{-1} = fp_{-1} = 0``; evaluated exactly in int64 blocks.
    """
    twice = 0
    prev_tp, prev_fp = 0, 0
    for a in range(0, rk.tps.shape[0], _CHUNK):
        tp = rk.tps[a : a + _CHUNK].astype(np.int64)
        fp = rk.fps[a : a + _CHUNK].astype(np.int64)
        tp_prev = np.concatenate(([prev_tp], tp[:-1]))
        fp_prev = np.concatenate(([prev_fp], fp[:-1]))
        twice += int(np.dot(fp - fp_prev, tp + tp_prev))
        prev_tp, prev_fp = int(tp[-1]), int(fp[-1])
    return twice / (2.0 * rk.n_pos * rk.n_neg)


def _f1_from_ranked(rk: _Ranked) -> dict:
    """Maximum F1 over all distinct thresholds; F1 = 2 TP / (TP + FP + P)."""
    if rk.n_pos == 0:
        raise MetricInputError("F1 is undefined: there are no anomalous (positive) samples")
    best_f1, best_idx = -1.0, 0
    for a in range(0, rk.tps.shape[0], _CHUNK):
        tp = rk.tps[a : a + _CHUNK].astype(np.float64)
        f1 = 2.0 * tp / (tp + rk.fps[a : a + _CHUNK] + rk.n_pos)
        j = int(np.argmax(f1))  # first max = highest threshold reaching it
        if f1[j] > best_f1:
            best_f1, best_idx = float(f1[j]), a + j
    return {"f1": best_f1, "threshold": float(rk.thresholds[best_idx])}


def _pro_from_ranked(
    rk: _Ranked, region_sizes: np.ndarray, fpr_limit: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve from ranked counts (see :func:`pro_curve`).

    With ``fpr_limit`` the curve is cut after its first point with FPR > ``fpr_limit``: the
    part that trapezoid integration up to ``fpr_limit`` reads, without the memory of the rest.
    """
    n_regions = region_sizes.shape[0]
    if n_regions == 0:
        raise MetricInputError("PRO is undefined: no ground-truth mask has any anomalous pixel (no regions)")
    if rk.n_neg == 0:
        raise MetricInputError("PRO is undefined: every pixel is anomalous (no defect-free pixels)")
    n_points = rk.fps.shape[0]
    if fpr_limit is not None:
        # index of the first point with FPR > fpr_limit (FPR is non-decreasing): kept as the
        # right end of the interpolation at the limit, everything after it is dropped
        n_neg = float(rk.n_neg)
        first_over = bisect.bisect_right(rk.fps, fpr_limit, key=lambda v: v / n_neg)
        n_points = min(n_points, first_over + 1)
    tps = rk.tps[:n_points]
    fprs = np.empty(n_points + 2, dtype=np.float64)
    pros = np.empty(n_points + 2, dtype=np.float64)
    fprs[0] = pros[0] = 0.0
    fprs[-1] = pros[-1] = 1.0
    np.divide(rk.fps[:n_points], float(rk.n_neg), out=fprs[1:-1])
    # Each anomalous pixel adds 1 / region_size; the sum is divided by the number of regions.
    n_used = int(tps[-1])
    cum = np.empty(n_used + 1, dtype=np.float64)
    cum[0] = 0.0
    np.cumsum(1.0 / region_sizes[rk.pos_ids[:n_used] - 1], out=cum[1:])
    np.take(cum, tps, out=pros[1:-1])
    pros[1:-1] /= n_regions
    pros[1:-1][tps == rk.n_pos] = 1.0  # every region fully covered; avoids 0.9999999999999998
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    if n_points < rk.fps.shape[0]:  # truncated: drop the (1, 1) end point
        fprs, pros = fprs[:-1], pros[:-1]
    return fprs, pros


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` for ``x <= x_max`` (MVTec ``generic_util.trapezoid``).

    When ``x_max`` is not a curve point, the curve is linearly interpolated at ``x_max`` and the
    last partial trapezoid is added. ``x`` must be non-decreasing with ``x[0] < x_max <= x[-1]``.
    """
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # == bisect.bisect(x, x_max)
        if not 0 < ins < x.shape[0]:
            raise MetricInputError(f"integration limit {x_max} lies outside the curve's range")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    xk, yk = x[keep], y[keep]
    return float(np.sum(0.5 * (yk[1:] + yk[:-1]) * (xk[1:] - xk[:-1])) + correction)


def _check_limit(integration_limit: float) -> float:
    limit = float(integration_limit)
    if not 0.0 < limit <= 1.0:
        raise MetricInputError(f"integration_limit must be in (0, 1], got {integration_limit}")
    return limit


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image-level anomaly scores.

    Parameters
    ----------
    labels : array_like, shape (N,)
        Ground truth, 1 (or True) for an anomalous image, 0 for a good one.
    scores : array_like, shape (N,)
        Image anomaly scores (higher = more anomalous).

    Returns
    -------
    float
        ROC AUC in [0, 1] (:func:`sklearn.metrics.roc_auc_score`).

    Raises
    ------
    ValueError
        If only one class is present, shapes disagree or a score is NaN.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    _require_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def f1_max(labels_or_mask_pixels, scores) -> dict:
    """Maximum F1 score over all thresholds.

    Exact: every distinct score is tried as threshold (score >= threshold is anomalous), i.e.
    the maximum of ``2 P R / (P + R)`` over the points of the precision-recall curve.

    Parameters
    ----------
    labels_or_mask_pixels : array_like, shape (N,)
        Binary ground truth (0/1 or bool), image labels or flattened mask pixels.
    scores : array_like, shape (N,)
        Anomaly scores.

    Returns
    -------
    dict
        ``{"f1": float, "threshold": float}``; ``threshold`` is the highest threshold that
        reaches the maximum.

    Raises
    ------
    ValueError
        If there is no positive sample, shapes disagree or a score is NaN.
    """
    y = _as_labels(labels_or_mask_pixels)
    s = _as_scores(scores, y.shape[0])
    if y.size == 0:
        raise MetricInputError("F1 is undefined for zero samples")
    return _f1_from_ranked(_rank(s, y))


def image_f1_max(labels, scores) -> dict:
    """Maximum image-level F1; see :func:`f1_max`.

    Parameters
    ----------
    labels : array_like, shape (N,)
    scores : array_like, shape (N,)

    Returns
    -------
    dict
        ``{"f1": float, "threshold": float}``.
    """
    return f1_max(labels, scores)


def accuracy_at_threshold(labels, scores, threshold: float) -> float:
    """Fraction of correctly classified samples when ``score > threshold`` means anomalous (the decision rule
    of ``somad.verdicts``).

    Parameters
    ----------
    labels : array_like, shape (N,)
        0/1 ground truth.
    scores : array_like, shape (N,)
        Anomaly scores.
    threshold : float

    Returns
    -------
    float
        Accuracy in [0, 1].
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    if y.size == 0:
        raise MetricInputError("accuracy is undefined for zero samples")
    return float(np.mean((s > threshold) == y))


def balanced_accuracy(labels, decisions) -> float:
    """Mean of the true-positive and true-negative rates of boolean ``decisions`` (True = anomalous)."""
    y = _as_labels(labels)
    d = np.asarray(decisions, dtype=bool).reshape(-1)
    if d.shape != y.shape:
        raise MetricInputError(f"decisions has {d.size} values but labels has {y.size}")
    _require_both_classes(y, "balanced accuracy")
    return float((d[y == 1].mean() + (~d[y == 0]).mean()) / 2.0)


def _best_cut(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The highest balanced accuracy of ``score > t`` over all ``t``, and a ``t`` that reaches it: the midpoint
    of the gap between the scores on either side of the best cut (``-inf`` / ``inf`` when flagging all / none
    is best)."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # flag the top j images (j = 0..N); only cuts between distinct scores are realisable thresholds
    tp = np.concatenate([[0], np.cumsum(y_sorted)])
    fp = np.concatenate([[0], np.cumsum(1 - y_sorted)])
    cut = np.concatenate([[True], s_sorted[1:] < s_sorted[:-1], [True]])
    bacc = np.where(cut, (tp / y.sum() + 1.0 - fp / (y.size - y.sum())) / 2.0, -np.inf)
    j = int(np.argmax(bacc))
    if j == 0:
        return float(bacc[j]), np.inf  # flag none
    if j == s.size:
        return float(bacc[j]), -np.inf  # flag all
    return float(bacc[j]), float((s_sorted[j - 1] + s_sorted[j]) / 2.0)


def best_balanced_accuracy(labels, scores) -> float:
    """The highest balanced accuracy over all thresholds ``score > t`` (an oracle, as F1-max is).

    It picks the threshold on the images it then scores, so on a small test set it is optimistic; see
    :func:`split_half_balanced_accuracy` for the same oracle scored on images it did not see.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    _require_both_classes(y, "balanced accuracy")
    return _best_cut(y, s)[0]


def best_balanced_threshold(labels, scores) -> float:
    """A threshold at which ``score > t`` reaches :func:`best_balanced_accuracy` (an oracle): the midpoint of
    the gap between the scores on either side of the best cut; ``-inf`` / ``inf`` where flagging every / no
    image is best."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    _require_both_classes(y, "balanced accuracy")
    return _best_cut(y, s)[1]


def split_half_balanced_accuracy(labels, scores, n_splits: int = 200, seed: int = 0) -> float:
    """The balanced accuracy that the best threshold of one half of the images reaches on the other half.

    The images are split at random into two halves, each with half of the good and half of the defective
    images; the threshold of :func:`best_balanced_accuracy` on one half is scored (``score > t``) on the other.
    The mean over ``n_splits`` seeded splits is what picking the threshold with labelled defects can be
    expected to reach on new images, without the optimism of scoring it on the images it was picked on.

    Parameters
    ----------
    labels, scores : array_like, shape (N,)
        0/1 ground truth (at least 2 of each) and anomaly scores.
    n_splits : int, default 200
    seed : int, default 0

    Returns
    -------
    float
        Mean balanced accuracy in [0, 1].
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    _require_both_classes(y, "balanced accuracy")
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    if min(g.size for g in groups) < 2:
        raise MetricInputError("a split-half balanced accuracy needs at least 2 good and 2 defective images")
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(int(n_splits)):
        first = np.zeros(y.size, dtype=bool)
        for g in groups:
            first[rng.choice(g, g.size // 2, replace=False)] = True
        t = _best_cut(y[first], s[first])[1]
        found.append(balanced_accuracy(y[~first], s[~first] > t))
    return float(np.mean(found))


def oracle_balanced_accuracies(labels, scores) -> dict:
    """The two oracle balanced accuracies shown next to the one at a model's threshold:
    ``best_balanced_accuracy`` and, where each class has at least 2 images, ``split_half_balanced_accuracy``."""
    out = {"best_balanced_accuracy": best_balanced_accuracy(labels, scores)}
    if min(np.bincount(_as_labels(labels), minlength=2)) >= 2:
        out["split_half_balanced_accuracy"] = split_half_balanced_accuracy(labels, scores)
    return out


def mask_metrics(masks: Sequence, predicted: Sequence) -> dict:
    """Quality of binary predicted masks against ground-truth masks (pooled over images).

    Returns ``pixel_f1`` (F1 of all pooled pixels; ``None`` when no mask has a defect pixel: there is nothing to
    find, so no F1), ``region_overlap`` (the mean, over every 8-connected ground-truth region, of its IoU with the
    predicted mask of its image) and ``good_fp_rate`` (the fraction of pixels of defect-free images that are
    predicted defective; ``None`` without such an image).
    """
    from scipy import ndimage

    tp = fp = fn = good_fp = good_n = 0
    ious = []
    for gt, pm in zip(masks, predicted):
        gt = np.asarray(gt, dtype=bool)
        pm = np.asarray(pm, dtype=bool)
        if gt.shape != pm.shape:
            raise MetricInputError(f"predicted mask {pm.shape} and ground truth {gt.shape} differ in size")
        tp += int((gt & pm).sum())
        fp += int((~gt & pm).sum())
        fn += int((gt & ~pm).sum())
        if not gt.any():
            good_fp += int(pm.sum())
            good_n += pm.size
            continue
        labels, n = ndimage.label(gt, structure=np.ones((3, 3), dtype=bool))
        for i in range(1, n + 1):
            region = labels == i
            ious.append(float((region & pm).sum()) / float((region | pm).sum()))
    return {
        "pixel_f1": 2.0 * tp / (2 * tp + fp + fn) if tp + fn else None,
        "region_overlap": float(np.mean(ious)) if ious else None,
        "good_fp_rate": good_fp / good_n if good_n else None,
    }


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


def pixel_auroc(masks: Sequence, maps: Sequence) -> float:
    """ROC AUC over all pooled pixels.

    Parameters
    ----------
    masks : sequence of array_like, each shape (H_i, W_i), or None entries
        Ground-truth masks (``> 0`` is anomalous); ``None`` means all-zero.
    maps : sequence of array_like, each shape (H_i, W_i)
        Anomaly maps, same shape as the matching mask.

    Returns
    -------
    float
        Exact ROC AUC with sklearn's tie handling, computed from one sort of the pooled
        ``float32`` scores (linear memory; fine for ~50 million pixels).

    Raises
    ------
    ValueError
        On a mask/map shape mismatch, NaN in a map, or when the pooled pixels hold only one
        class.
    """
    pooled = _pool_pixels(masks, maps, regions=False)
    _require_both_classes(pooled.ids, "pixel AUROC")
    return _auroc_from_ranked(_rank(pooled.scores, pooled.ids))


def pixel_f1_max(masks: Sequence, maps: Sequence) -> dict:
    """Maximum F1 over all pooled pixels; see :func:`f1_max`.

    Parameters
    ----------
    masks : sequence of array_like, each shape (H_i, W_i), or None entries
    maps : sequence of array_like, each shape (H_i, W_i)

    Returns
    -------
    dict
        ``{"f1": float, "threshold": float}``.
    """
    pooled = _pool_pixels(masks, maps, regions=False)
    return _f1_from_ranked(_rank(pooled.scores, pooled.ids))


def pro_curve(masks: Sequence, maps: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region overlap (PRO) curve, as in the MVTec AD reference evaluation.

    Regions are the 8-connected components of each ground-truth mask, pooled over all images
    (images with an empty mask contribute only defect-free pixels). At threshold ``t`` the
    false positive rate is the fraction of all defect-free pixels with score ``>= t`` and the PRO
    is the mean over regions of the fraction of the region's pixels with score ``>= t``.

    Parameters
    ----------
    masks : sequence of array_like, each shape (H_i, W_i), or None entries
        Ground-truth masks (``> 0`` is anomalous).
    maps : sequence of array_like, each shape (H_i, W_i)
        Anomaly maps.

    Returns
    -------
    fprs : ndarray, shape (T + 2,), float64
        False positive rates, non-decreasing, from 0 to 1.
    pros : ndarray, shape (T + 2,), float64
        PRO values. One point per distinct score ``T`` (descending threshold), with ``(0, 0)``
        prepended and ``(1, 1)`` appended; values clipped to at most 1.

    Raises
    ------
    ValueError
        If no mask has an anomalous pixel, there is no defect-free pixel, shapes mismatch or a
        map contains NaN.
    """
    pooled = _pool_pixels(masks, maps, regions=True)
    if pooled.region_sizes.shape[0] == 0:
        raise MetricInputError("PRO is undefined: no ground-truth mask has any anomalous pixel (no regions)")
    return _pro_from_ranked(_rank(pooled.scores, pooled.ids), pooled.region_sizes)


def au_pro(masks: Sequence, maps: Sequence, integration_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to a false positive rate limit.

    Trapezoid integration of :func:`pro_curve` from FPR 0 to ``integration_limit`` (the curve is
    linearly interpolated at the limit), divided by ``integration_limit`` so that a perfect map
    scores 1.0.

    Parameters
    ----------
    masks : sequence of array_like, each shape (H_i, W_i), or None entries
    maps : sequence of array_like, each shape (H_i, W_i)
    integration_limit : float, default 0.3
        Upper FPR limit in (0, 1].

    Returns
    -------
    float
        AU-PRO in [0, 1].
    """
    limit = _check_limit(integration_limit)
    pooled = _pool_pixels(masks, maps, regions=True)
    if pooled.region_sizes.shape[0] == 0:
        raise MetricInputError("PRO is undefined: no ground-truth mask has any anomalous pixel (no regions)")
    rk = _rank(pooled.scores, pooled.ids)
    pooled.scores = pooled.ids = None
    fprs, pros = _pro_from_ranked(rk, pooled.region_sizes, fpr_limit=limit)
    return _trapezoid(fprs, pros, limit) / limit


# --------------------------------------------------------------------------------------------
# Curves for plotting
# --------------------------------------------------------------------------------------------


def downsample_curve(x, y, max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a curve to at most ``max_points`` points for plotting.

    Points are picked evenly along the curve's arc length (after scaling both axes to [0, 1]),
    so sharp corners and steep parts keep their shape; the first and last points are always
    kept. For display only: never compute metrics from a downsampled curve.

    Parameters
    ----------
    x, y : array_like, shape (M,)
        Curve coordinates in drawing order.
    max_points : int, default 500
        At least 2.

    Returns
    -------
    x, y : ndarray, shape (K,), float64, K <= max_points
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise MetricInputError(f"x has shape {x.shape} but y has shape {y.shape}")
    if max_points < 2:
        raise MetricInputError(f"max_points must be at least 2, got {max_points}")
    n = x.shape[0]
    if n <= max_points:
        return x.copy(), y.copy()
    xs = (x - x.min()) / (np.ptp(x) or 1.0)
    ys = (y - y.min()) / (np.ptp(y) or 1.0)
    arc = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))))
    if arc[-1] > 0:
        targets = np.linspace(0.0, arc[-1], max_points)[1:-1]
        inner = np.searchsorted(arc, targets, side="left")
    else:
        inner = np.linspace(0, n - 1, max_points).astype(np.int64)[1:-1]
    idx = np.unique(np.concatenate(([0], np.clip(inner, 0, n - 1), [n - 1])))
    return x[idx], y[idx]


def roc_curve_points(labels, scores, max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve for plotting, downsampled to at most ``max_points`` points.

    Parameters
    ----------
    labels : array_like, shape (N,)
        0/1 ground truth (image labels or flattened mask pixels).
    scores : array_like, shape (N,)
    max_points : int, default 500

    Returns
    -------
    fpr, tpr : ndarray, shape (K,), float64
        From (0, 0) to (1, 1), one point per distinct threshold before downsampling.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    _require_both_classes(y, "ROC curve")
    return _roc_points_from_ranked(_rank(s, y), max_points)


def pixel_roc_curve_points(masks: Sequence, maps: Sequence, max_points: int = 500):
    """Pixel-level ROC curve for plotting; see :func:`roc_curve_points` and :func:`pixel_auroc`.

    Parameters
    ----------
    masks : sequence of array_like, each shape (H_i, W_i), or None entries
    maps : sequence of array_like, each shape (H_i, W_i)
    max_points : int, default 500

    Returns
    -------
    fpr, tpr : ndarray, shape (K,), float64
    """
    pooled = _pool_pixels(masks, maps, regions=False)
    _require_both_classes(pooled.ids, "pixel ROC curve")
    return _roc_points_from_ranked(_rank(pooled.scores, pooled.ids), max_points)


def _roc_points_from_ranked(rk: _Ranked, max_points: int):
    fpr = np.concatenate(([0.0], rk.fps / float(rk.n_neg)))
    tpr = np.concatenate(([0.0], rk.tps / float(rk.n_pos)))
    return downsample_curve(fpr, tpr, max_points)


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


def evaluate_predictions(labels, scores, masks, maps, *, integration_limit: float = 0.3) -> dict:
    """Image- and pixel-level metrics of one set of predictions.

    Parameters
    ----------
    labels : array_like, shape (N,)
        Image labels, 1 = anomalous.
    scores : array_like, shape (N,)
        Image anomaly scores.
    masks : sequence of length N of array_like (H_i, W_i) or None; or None
        Ground-truth masks; ``None`` entries (or ``masks=None``) are all-zero masks.
    maps : sequence of length N of array_like (H_i, W_i); or None
        Anomaly maps. With ``maps=None`` the pixel metrics are ``None``.
    integration_limit : float, default 0.3
        FPR limit of AU-PRO.

    Returns
    -------
    dict
        ``image_auroc``, ``image_f1_max`` (floats) and ``pixel_auroc``, ``au_pro``,
        ``pixel_f1_max`` (floats, or ``None`` when no mask has an anomalous pixel or no maps
        are given). The pixel metrics share one sort of all pooled pixels.

    Raises
    ------
    ValueError
        On inconsistent lengths or shapes, NaN, or single-class image labels.
    """
    limit = _check_limit(integration_limit)
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0])
    result = {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": None,
        "au_pro": None,
        "image_f1_max": image_f1_max(y, s)["f1"],
        "pixel_f1_max": None,
    }
    if maps is None:
        return result
    maps = list(maps)
    if len(maps) != y.shape[0]:
        raise MetricInputError(f"got {len(maps)} anomaly maps but {y.shape[0]} labels")
    result.update(pixel_metrics(masks, maps, integration_limit=limit))
    return result


def pixel_metrics(masks, maps, *, integration_limit: float = 0.3) -> dict:
    """Pixel AUROC, AU-PRO and pixel F1-max from one sort of all pooled pixels.

    Parameters
    ----------
    masks : sequence of (H_i, W_i) arrays or None (None = all-zero mask); or None
    maps : sequence of (H_i, W_i) arrays

    Returns
    -------
    dict with ``pixel_auroc``, ``au_pro``, ``pixel_f1_max``; all ``None`` when no mask has a defect pixel.
    """
    limit = _check_limit(integration_limit)
    result = {"pixel_auroc": None, "au_pro": None, "pixel_f1_max": None}
    pooled = _pool_pixels(masks, list(maps), regions=True)
    if pooled.n_anomalous == 0:
        return result
    _require_both_classes(pooled.ids, "pixel AUROC")
    rk = _rank(pooled.scores, pooled.ids)
    pooled.scores = pooled.ids = None  # free the pooled copies before building curves
    result["pixel_auroc"] = _auroc_from_ranked(rk)
    result["pixel_f1_max"] = _f1_from_ranked(rk)["f1"]
    fprs, pros = _pro_from_ranked(rk, pooled.region_sizes, fpr_limit=limit)
    result["au_pro"] = _trapezoid(fprs, pros, limit) / limit
    return result
