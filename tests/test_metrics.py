"""Tests of somad.evaluation.metrics against brute-force references and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from somad.evaluation import metrics
from somad.evaluation.metrics import (
    accuracy_at_threshold,
    au_pro,
    downsample_curve,
    evaluate_predictions,
    f1_max,
    image_auroc,
    image_f1_max,
    pixel_auroc,
    pixel_f1_max,
    pixel_roc_curve_points,
    pro_curve,
    roc_curve_points,
)

_trapz = getattr(np, "trapezoid", None) or np.trapz


# ------------------------------------------------------------------------------------------
# Brute-force references (deliberately naive: one explicit pass per threshold)
# ------------------------------------------------------------------------------------------


def brute_pro_curve(masks, maps):
    """Sweep every distinct score; FPR and per-region overlap computed explicitly."""
    maps = [np.asarray(a, dtype=np.float32) for a in maps]
    masks = [np.zeros(a.shape, bool) if m is None else np.asarray(m) > 0 for m, a in zip(masks, maps)]
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = np.concatenate([a[~m] for m, a in zip(masks, maps)])
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(maps[i][r] >= t) for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return np.array(fprs), np.array(pros)


def brute_au_pro(masks, maps, limit=0.3):
    x, y = brute_pro_curve(masks, maps)
    last = np.flatnonzero(x <= limit)[-1]
    if x[last] == limit:
        xs, ys = x[: last + 1], y[: last + 1]
    else:
        y_lim = y[last] + (y[last + 1] - y[last]) * (limit - x[last]) / (x[last + 1] - x[last])
        xs = np.append(x[: last + 1], limit)
        ys = np.append(y[: last + 1], y_lim)
    return _trapz(ys, xs) / limit


def brute_f1_max(labels, scores):
    labels = np.asarray(labels, bool)
    best = -1.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        best = max(best, f1)
    return best


def random_case(seed, *, n_images=5, quant=None):
    """Variable-size images, several regions of different sizes, ties, one good image."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n_images):
        h, w = int(rng.integers(6, 20)), int(rng.integers(6, 20))
        mask = np.zeros((h, w), dtype=np.uint8)
        if i > 0:  # image 0 is a good image with an empty mask
            for _ in range(int(rng.integers(1, 4))):
                y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
                dh, dw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
                mask[y0 : y0 + dh, x0 : x0 + dw] = 255
            # a diagonal chain: connected only under 8-connectivity
            if h > 4 and w > 4:
                mask[h - 1, 0] = mask[h - 2, 1] = mask[h - 3, 2] = 1
            mask[rng.random((h, w)) < 0.03] = 1  # scattered single pixels
        amap = rng.random((h, w)).astype(np.float32) + 0.6 * (mask > 0)
        if quant:  # heavy ties
            amap = (np.round(amap * quant) / quant).astype(np.float32)
        masks.append(mask)
        maps.append(amap)
    return masks, maps


# ------------------------------------------------------------------------------------------
# AU-PRO / PRO curve
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quant", [None, 4, 10])
def test_au_pro_matches_brute_force(seed, quant):
    masks, maps = random_case(seed, quant=quant)
    assert au_pro(masks, maps) == pytest.approx(brute_au_pro(masks, maps), abs=1e-9)


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
def test_au_pro_other_limits(limit):
    masks, maps = random_case(11, quant=20)
    got = au_pro(masks, maps, integration_limit=limit)
    assert got == pytest.approx(brute_au_pro(masks, maps, limit), abs=1e-9)


@pytest.mark.parametrize("quant", [None, 5])
def test_pro_curve_points_match_brute_force(quant):
    masks, maps = random_case(3, quant=quant)
    fprs, pros = pro_curve(masks, maps)
    bf, bp = brute_pro_curve(masks, maps)
    assert fprs.shape == bf.shape
    np.testing.assert_allclose(fprs, bf, atol=1e-12)
    np.testing.assert_allclose(pros, bp, atol=1e-12)
    assert fprs[0] == 0 and pros[0] == 0 and fprs[-1] == 1 and pros[-1] == 1
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_limit_hits_a_curve_point_exactly():
    # 10 normal pixels -> FPR steps of 0.1, so 0.3 is an exact curve point.
    mask = np.zeros((1, 12), bool)
    mask[0, :2] = True
    amap = np.array([[0.5, 0.05] + [1 - 0.09 * k for k in range(10)]], np.float32)
    got = au_pro([mask], [amap])
    assert got == pytest.approx(brute_au_pro([mask], [amap]), abs=1e-12)


@given(st.integers(0, 10_000), st.sampled_from([None, 3, 8]))
@settings(max_examples=25, deadline=None)
def test_au_pro_property(seed, quant):
    masks, maps = random_case(seed, n_images=3, quant=quant)
    assert au_pro(masks, maps) == pytest.approx(brute_au_pro(masks, maps), abs=1e-9)


def test_eight_connectivity():
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region under 8-connectivity
    mask[6, 6] = True  # second region
    amap = np.zeros((8, 8), np.float32)
    amap[1, 1] = 1.0
    fprs, pros = pro_curve([mask], [amap])
    # Threshold 1 covers half of region A and nothing of region B: (0.5 + 0) / 2.
    # (4-connectivity would give three regions and 1/3.)
    assert fprs[1] == 0.0
    assert pros[1] == pytest.approx(0.25)


def test_perfect_and_inverted_maps():
    masks, _ = random_case(5)
    perfect = [(m > 0).astype(np.float32) for m in masks]
    assert au_pro(masks, perfect) == 1.0
    assert pixel_auroc(masks, perfect) == 1.0
    inverted = [1.0 - p for p in perfect]
    assert au_pro(masks, inverted) < 0.05
    assert pixel_auroc(masks, inverted) == 0.0


def test_pro_weights_regions_equally():
    mask = np.zeros((64, 64), bool)
    mask[2:4, 2:4] = True  # small region: 4 pixels
    mask[30:50, 30:50] = True  # large region: 400 pixels
    amap = np.zeros((64, 64), np.float32)
    amap[2:4, 2:4] = 1.0  # detects only the small region
    fprs, pros = pro_curve([mask], [amap])
    pro_at_zero_fpr = pros[fprs == 0].max()
    assert pro_at_zero_fpr == pytest.approx(0.5)
    fpr, tpr = pixel_roc_curve_points([mask], [amap])
    tpr_at_zero_fpr = tpr[fpr == 0].max()
    assert tpr_at_zero_fpr == pytest.approx(4 / 404)
    # Curve (0,0) (0,0.5) (1,1): PRO at FPR 0.3 is 0.65 -> area 0.3 * (0.5 + 0.65) / 2.
    assert au_pro([mask], [amap]) == pytest.approx((0.5 + 0.65) / 2)


def test_none_mask_equals_zero_mask():
    masks, maps = random_case(7)
    with_none = [None] + masks[1:]
    assert au_pro(with_none, maps) == au_pro(masks, maps)
    assert pixel_auroc(with_none, maps) == pixel_auroc(masks, maps)


# ------------------------------------------------------------------------------------------
# AUROC, F1, accuracy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [None, 3, 50])
def test_pixel_auroc_matches_sklearn(quant):
    masks, maps = random_case(21, n_images=6, quant=quant)
    y = np.concatenate([np.ravel(m) > 0 for m in masks])
    s = np.concatenate([np.ravel(a) for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_image_auroc():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1) + 0.2 * y
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert image_auroc(y.astype(bool), s) == image_auroc(y, s)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 2)
    got = f1_max(y, s)
    assert got["f1"] == pytest.approx(brute_f1_max(y, s), abs=1e-12)
    # the reported threshold reaches that F1
    pred = s >= got["threshold"]
    tp = np.sum(pred & (y == 1))
    assert 2 * tp / (np.sum(pred) + np.sum(y)) == pytest.approx(got["f1"])
    # same maximum as sklearn's precision-recall curve
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0)
    assert got["f1"] == pytest.approx(f1.max(), abs=1e-12)
    assert image_f1_max(y, s) == got


def test_pixel_f1_max():
    masks, maps = random_case(4, quant=10)
    y = np.concatenate([np.ravel(m) > 0 for m in masks])
    s = np.concatenate([np.ravel(a) for a in maps])
    assert pixel_f1_max(masks, maps)["f1"] == pytest.approx(brute_f1_max(y, s), abs=1e-12)


def test_f1_perfect_separation():
    res = f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert res == {"f1": 1.0, "threshold": pytest.approx(0.7)}


def test_accuracy_at_threshold():
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.5, 0.9, 0.2]
    # > 0.5 is anomalous (the one decision rule): predictions 0,0,0,1,0 -> 3 of 5 correct
    assert accuracy_at_threshold(labels, scores, 0.5) == pytest.approx(0.6)
    # > 0.4999: 0,1,1,1,0 -> 3 of 5; > 0.0: all anomalous -> 3 of 5; > 1.0: none -> 2 of 5
    assert accuracy_at_threshold(labels, scores, 0.4999) == pytest.approx(0.6)
    assert accuracy_at_threshold(labels, scores, 0.0) == pytest.approx(0.6)
    assert accuracy_at_threshold(labels, scores, 1.0) == pytest.approx(0.4)


def test_balanced_accuracy_and_its_best_over_thresholds():
    from somad.evaluation.metrics import balanced_accuracy, best_balanced_accuracy

    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    assert balanced_accuracy(labels, scores > 0.75) == pytest.approx((0.5 + 0.75) / 2)
    # brute force over every cut: flag the scores above each distinct value (and above -inf)
    brute = max(balanced_accuracy(labels, scores > t) for t in np.r_[scores, -np.inf])
    assert best_balanced_accuracy(labels, scores) == pytest.approx(brute) == pytest.approx((1 + 0.75) / 2)
    # the threshold that reaches it: midway between 0.3 (the highest not flagged) and 0.7 (the lowest flagged)
    assert metrics.best_balanced_threshold(labels, scores) == pytest.approx(0.5)
    # reversed scores: no cut beats 0.5, and of the cuts that reach it the one that flags fewest is taken
    assert metrics.best_balanced_threshold([0, 1, 1], [0.9, 0.2, 0.3]) == np.inf
    # ties: two images with one score are flagged together, never one of them alone
    assert best_balanced_accuracy([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_split_half_balanced_accuracy_scores_each_half_s_best_threshold_on_the_other_half():
    from somad.evaluation.metrics import best_balanced_accuracy, split_half_balanced_accuracy

    # Goods 0, 1 and defects 2, 3: the four stratified splits pick their threshold between their own good and
    # defect (1.5, 1, 2 or 1.5 on the first half) and score the rest: 1, 1, 0.5 (3 > 2 but not 2 > 2), 1.
    assert split_half_balanced_accuracy([0, 0, 1, 1], [0, 1, 2, 3], n_splits=4000) == pytest.approx(0.875, abs=0.01)
    assert best_balanced_accuracy([0, 0, 1, 1], [0, 1, 2, 3]) == 1.0
    # a wide gap between goods and defects: every half's threshold falls in it
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    wide = np.r_[np.linspace(0, 1, 10), np.linspace(10, 11, 10)]
    assert split_half_balanced_accuracy(y, wide) == 1.0
    # scores that carry no information: the best threshold of a test set looks good, out of sample it is chance
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(25, int), np.ones(87, int)]
    noise = rng.random(y.size)
    assert best_balanced_accuracy(y, noise) > 0.55
    assert abs(split_half_balanced_accuracy(y, noise) - 0.5) < 0.05
    # seeded, and refused where a half would lack a class
    assert split_half_balanced_accuracy(y, noise, seed=3) == split_half_balanced_accuracy(y, noise, seed=3)
    with pytest.raises(metrics.MetricInputError, match="at least 2 good and 2 defective"):
        split_half_balanced_accuracy([0, 1, 1], [0.1, 0.5, 0.9])


def test_mask_metrics_f1_region_overlap_and_good_false_positives():
    from somad.evaluation.metrics import mask_metrics

    gt = np.zeros((10, 10), bool)
    gt[0:2, 0:2] = True  # region A: 4 px
    gt[5:10, 5:10] = True  # region B: 25 px
    pred = np.zeros((10, 10), bool)
    pred[0:2, 0:2] = True  # covers A exactly
    pred[5:10, 5:7] = True  # 10 of B's 25 px
    good_pred = np.zeros((4, 5), bool)
    good_pred[0, :2] = True
    m = mask_metrics([gt, np.zeros((4, 5), bool)], [pred, good_pred])
    tp, fp, fn = 14, 2, 15
    assert m["pixel_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # IoU with the whole predicted mask of the image: A 4/(4+10), B 10/(25+4)
    assert m["region_overlap"] == pytest.approx((4 / 14 + 10 / 29) / 2)
    assert m["good_fp_rate"] == pytest.approx(2 / 20)
    # no ground-truth defect pixel (good images only, or no masks): no F1 to give, not 0
    only_good = mask_metrics([np.zeros((4, 5), bool)], [good_pred])
    assert only_good["pixel_f1"] is None and only_good["region_overlap"] is None
    assert only_good["good_fp_rate"] == pytest.approx(2 / 20)


# ------------------------------------------------------------------------------------------
# Curves for plotting
# ------------------------------------------------------------------------------------------


def test_roc_curve_points_and_downsampling():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    s = rng.random(5000) + 0.5 * y
    fpr, tpr = roc_curve_points(y, s, max_points=100)
    assert len(fpr) <= 100 and len(fpr) == len(tpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # the downsampled curve still integrates close to the exact AUC
    assert _trapz(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=5e-3)

    x = np.linspace(0, 1, 10)
    xd, yd = downsample_curve(x, x**2, max_points=500)
    np.testing.assert_array_equal(xd, x)
    masks, maps = random_case(2)
    fprs, pros = pro_curve(masks, maps)
    xd, yd = downsample_curve(fprs, pros, max_points=20)
    assert 2 <= len(xd) <= 20 and xd[0] == 0 and xd[-1] == 1 and yd[-1] == 1


# ------------------------------------------------------------------------------------------
# evaluate_predictions
# ------------------------------------------------------------------------------------------


def test_evaluate_predictions_consistent():
    masks, maps = random_case(8)
    labels = np.array([0] + [1] * (len(maps) - 1) + [0])
    masks = masks + [None]
    maps = maps + [np.random.default_rng(0).random((9, 7)).astype(np.float32)]
    scores = np.array([a.max() for a in maps])
    res = evaluate_predictions(labels, scores, masks, maps)
    assert set(res) == {"image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max"}
    assert res["image_auroc"] == image_auroc(labels, scores)
    assert res["image_f1_max"] == image_f1_max(labels, scores)["f1"]
    assert res["pixel_auroc"] == pixel_auroc(masks, maps)
    assert res["au_pro"] == au_pro(masks, maps)
    assert res["pixel_f1_max"] == pixel_f1_max(masks, maps)["f1"]
    assert all(isinstance(v, float) for v in res.values())


def test_evaluate_predictions_without_mask_pixels():
    maps = [np.full((4, 4), v, np.float32) for v in (0.1, 0.9, 0.2)]
    res = evaluate_predictions([0, 1, 0], [0.1, 0.9, 0.2], [None, np.zeros((4, 4)), None], maps)
    assert res["image_auroc"] == 1.0
    assert res["pixel_auroc"] is None and res["au_pro"] is None and res["pixel_f1_max"] is None
    res = evaluate_predictions([0, 1, 0], [0.1, 0.9, 0.2], None, None)
    assert res["au_pro"] is None


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_shape_mismatch_names_index_and_shapes():
    masks = [np.zeros((4, 4)), np.ones((5, 6))]
    maps = [np.zeros((4, 4)), np.zeros((6, 5))]
    for fn in (pixel_auroc, au_pro, pro_curve, pixel_f1_max):
        with pytest.raises(ValueError, match=r"mask 1 .*\(5, 6\).*map 1 .*\(6, 5\)"):
            fn(masks, maps)
    with pytest.raises(ValueError, match="2 masks but 1"):
        au_pro(masks, maps[:1])


def test_single_class_raises():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc([np.zeros((3, 3))], [np.ones((3, 3))])


def test_no_regions_raises():
    masks = [np.zeros((5, 5)), None]
    maps = [np.random.default_rng(0).random((5, 5)), np.zeros((3, 3))]
    with pytest.raises(ValueError, match="no regions"):
        au_pro(masks, maps)
    with pytest.raises(ValueError, match="no regions"):
        pro_curve(masks, maps)


def test_nan_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="NaN"):
        au_pro([np.eye(3)], [np.full((3, 3), np.nan)])
    with pytest.raises(ValueError, match="0 and 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="entries"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="2-D"):
        pixel_auroc([np.zeros(4)], [np.zeros(4)])
    with pytest.raises(ValueError, match="integration_limit"):
        au_pro([np.eye(3)], [np.eye(3)], integration_limit=0)
    with pytest.raises(ValueError, match="no anomalous"):
        f1_max([0, 0], [0.1, 0.2])


def test_errors_are_somad_errors():
    from somad.errors import SomadError

    with pytest.raises(SomadError):
        image_auroc([1], [0.5])
    assert issubclass(metrics.MetricInputError, ValueError)
