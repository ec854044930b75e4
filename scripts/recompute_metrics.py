#!/usr/bin/env python
"""Independent re-computation of anomaly detection metrics from saved anomaly maps.

Cross-checks ``somad evaluate``: this script does not import somad and computes every metric by
its own route (scikit-learn for the AUROCs, a searchsorted formulation for AU-PRO).

Usage::

    python scripts/recompute_metrics.py --maps OUT/maps --category CAT_DIR [--json OUT/metrics.json]

Inputs
------
* ``CAT_DIR/test/<defect_type>/<name>.<ext>``: test images (only their size is read).
* ``MAPS/test/<defect_type>/<name>.npy``: float anomaly map of that image at its original
  resolution (the image's path relative to ``CAT_DIR`` with the extension replaced by ``.npy``).
* ``CAT_DIR/ground_truth/<defect_type>/<name>_mask.png``: ground-truth mask (8-bit: > 127 is
  anomalous; other depths: > 0). ``good`` images get an all-zero mask; defect images without a
  mask file count in the image metrics only (they are left out of the pixel metrics).

Metrics
-------
Image score = max of the anomaly map; label 0 for ``test/good``, 1 otherwise.
Image AUROC, pixel AUROC (all pixels pooled) and AU-PRO up to FPR 0.3 (8-connected ground-truth
regions pooled over all images; FPR over all defect-free pixels; exact curve over every distinct
score; trapezoid integration with linear interpolation at the limit, divided by the limit), for
all images ("overall") and per defect type (that type's images plus all good images).

With ``--json`` the values are compared to ``overall.<metric>`` and
``per_defect_type.<type>.<metric>`` of that metrics.json; exit status 1 when a value differs by
more than ``--tolerance`` (default 1e-4) or is missing, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
METRICS = ("image_auroc", "pixel_auroc", "au_pro")
_trapz = getattr(np, "trapezoid", None) or np.trapz


class InputError(Exception):
    """Missing or inconsistent files."""


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode == "1":
            return np.array(img, dtype=bool)
        if img.mode in ("L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr"):
            return np.array(img.convert("L")) > 127
        arr = np.array(img)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr > 0


def load_scores(path: Path | None) -> dict:
    """Image scores by relative image path from a somad ``scores.csv`` (columns path, score, ...)."""
    if path is None or not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(f)}


def load_category(maps_dir: Path, category: Path, scores: dict | None = None):
    """Return a list of (defect_type, label, anomaly map float32, mask bool or None, image score).

    The image score is the one in ``scores`` (somad's scores.csv: the maximum of the map at the model's input
    resolution, as in the paper) when given, else the maximum of the saved map.
    """
    scores = scores or {}
    test_dir = category / "test"
    if not test_dir.is_dir():
        raise InputError(f"no test folder: {test_dir}")
    items = []
    missing = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for img_path in sorted(type_dir.iterdir()):
            if img_path.name.startswith(".") or img_path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = img_path.relative_to(category)
            map_path = maps_dir / rel.with_suffix(".npy")
            if not map_path.is_file():
                missing.append(str(map_path))
                continue
            amap = np.load(map_path).astype(np.float32, copy=False)
            if amap.ndim != 2:
                raise InputError(f"{map_path}: anomaly map must be 2-D, got shape {amap.shape}")
            if np.isnan(amap).any():
                raise InputError(f"{map_path}: anomaly map contains NaN")
            with Image.open(img_path) as img:
                width, height = img.size
            if amap.shape != (height, width):
                raise InputError(
                    f"{map_path}: map shape {amap.shape} != image size (H, W) {(height, width)} of {img_path}"
                )
            mask = np.zeros(amap.shape, dtype=bool) if defect_type == "good" else None
            if defect_type != "good":
                mask_path = category / "ground_truth" / defect_type / f"{img_path.stem}_mask.png"
                if mask_path.is_file():
                    mask = load_mask(mask_path)
                    if mask.shape != amap.shape:
                        raise InputError(f"{mask_path}: mask shape {mask.shape} != map shape {amap.shape}")
            score = scores.get(str(rel), float(amap.max()))
            items.append((defect_type, int(defect_type != "good"), amap, mask, score))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(f"{len(missing)} anomaly maps missing, e.g. {missing[:5]}{more}")
    if not items:
        raise InputError(f"no test images under {test_dir}")
    return items


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def compute_au_pro(masks, maps, limit: float = 0.3) -> float | None:
    """AU-PRO by per-threshold counting with searchsorted on separately sorted score sets.

    FPR(t)  = #{defect-free pixels with score >= t} / #defect-free pixels
    PRO(t)  = (1 / R) * sum over regions r of #{pixels of r with score >= t} / |r|
            = (1 / R) * sum of weights 1/|r(p)| over anomalous pixels p with score >= t,
    evaluated at every distinct score t (descending) that the integral up to ``limit`` needs.
    """
    normal_parts, anom_parts, weight_parts = [], [], []
    n_regions = 0
    for mask, amap in zip(masks, maps):
        normal_parts.append(amap[~mask])
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        sizes = np.bincount(lab.ravel())  # sizes[k] = pixels of region k (k >= 1)
        inside = lab > 0
        anom_parts.append(amap[inside])
        weight_parts.append(1.0 / sizes[lab[inside]])
        n_regions += n
    if n_regions == 0:
        return None
    normal = np.sort(np.concatenate(normal_parts))
    n_normal = normal.shape[0]
    if n_normal == 0:
        return None
    anom = np.concatenate(anom_parts)
    order = np.argsort(anom, kind="stable")
    anom = anom[order]
    weights = np.concatenate(weight_parts)[order]
    # below[k] = total weight of the k lowest-scoring anomalous pixels
    below = np.concatenate(([0.0], np.cumsum(weights)))
    total = below[-1]

    # Smallest normal count m with m / n_normal > limit; its threshold is the first curve
    # point beyond the limit, so only distinct scores >= that threshold are needed.
    m = max(1, int(math.floor(limit * n_normal)))
    while m > 1 and (m - 1) / n_normal > limit:
        m -= 1
    while m <= n_normal and not m / n_normal > limit:
        m += 1
    if m <= n_normal:
        t_cut = normal[n_normal - m]
        thresholds = np.unique(np.concatenate((normal[n_normal - m :], anom[anom >= t_cut])))
        add_end = False
    else:
        thresholds = np.unique(np.concatenate((normal, anom)))
        add_end = True
    thresholds = thresholds[::-1]

    fp = n_normal - np.searchsorted(normal, thresholds, side="left")
    fpr = fp / n_normal
    pro = (total - below[np.searchsorted(anom, thresholds, side="left")]) / n_regions
    pro = np.clip(pro, 0.0, 1.0)
    x = np.concatenate(([0.0], fpr, [1.0] if add_end else []))
    y = np.concatenate(([0.0], pro, [1.0] if add_end else []))

    upto = x <= limit
    xs, ys = x[upto], y[upto]
    if xs[-1] < limit:
        j = int(np.flatnonzero(~upto)[0])  # first point beyond the limit
        y_lim = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
        xs = np.append(xs, limit)
        ys = np.append(ys, y_lim)
    return float(_trapz(ys, xs) / limit)


def compute_metrics(items, limit: float) -> dict:
    labels = np.array([it[1] for it in items])
    scores = np.array([it[4] for it in items])
    maps = [it[2] for it in items if it[3] is not None]  # pixel metrics: images with a known mask
    masks = [it[3] for it in items if it[3] is not None]
    out = {m: None for m in METRICS}
    out["n_good"] = int(np.sum(labels == 0))
    out["n_anomalous"] = int(np.sum(labels == 1))
    if 0 < labels.sum() < labels.size:
        out["image_auroc"] = float(roc_auc_score(labels, scores))
    y = np.concatenate([m.ravel() for m in masks])
    if 0 < np.count_nonzero(y) < y.size:
        s = np.concatenate([a.ravel() for a in maps])
        out["pixel_auroc"] = float(roc_auc_score(y, s))
        del s
    del y
    out["au_pro"] = compute_au_pro(masks, maps, limit)
    return out


# ------------------------------------------------------------------------------------------
# Report and comparison
# ------------------------------------------------------------------------------------------


def fmt(v) -> str:
    return "     -" if v is None else f"{v:.6f}"


def print_table(results: dict) -> None:
    header = ("subset", "good", "anom", "image_auroc", "pixel_auroc", "au_pro")
    print("{:<24} {:>5} {:>5} {:>12} {:>12} {:>10}".format(*header))
    for name, r in results.items():
        print(
            f"{name:<24} {r['n_good']:>5} {r['n_anomalous']:>5} {fmt(r['image_auroc']):>12} "
            f"{fmt(r['pixel_auroc']):>12} {fmt(r['au_pro']):>10}"
        )


def compare(results: dict, json_path: Path, tol: float) -> int:
    data = json.loads(json_path.read_text())
    problems = []
    max_diff = 0.0
    checks = []  # (key, ours, theirs)
    overall = data.get("overall") or {}
    for m in METRICS:
        checks.append((f"overall.{m}", results["overall"][m], overall.get(m, "missing")))
    per_type = data.get("per_defect_type") or {}
    for name, r in results.items():
        if name == "overall":
            continue
        theirs = per_type.get(name)
        for m in METRICS:
            value = "missing" if theirs is None else theirs.get(m, "missing")
            checks.append((f"per_defect_type.{name}.{m}", r[m], value))
    for extra in sorted(set(per_type) - set(results)):
        problems.append(f"per_defect_type.{extra} in {json_path} but no such defect type here")
    print(f"\ncomparison with {json_path} (tolerance {tol:g}):")
    for key, ours, theirs in checks:
        if isinstance(theirs, str):
            problems.append(f"{key}: missing in json (recomputed {fmt(ours)})")
            continue
        if ours is None or theirs is None:
            if ours is not theirs:
                problems.append(f"{key}: recomputed {fmt(ours)} vs json {theirs}")
            continue
        diff = abs(float(theirs) - ours)
        max_diff = max(max_diff, diff)
        flag = "  <-- DIFFERS" if diff > tol else ""
        print(f"  {key:<40} recomputed {ours:.6f}  json {float(theirs):.6f}  |diff| {diff:.2e}{flag}")
        if diff > tol:
            problems.append(f"{key}: |diff| {diff:.3e} > {tol:g}")
    print(f"max abs difference: {max_diff:.3e}")
    if problems:
        print("MISMATCH:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: all metrics agree")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", required=True, type=Path, help="maps folder (holds test/<type>/*.npy)")
    ap.add_argument("--category", required=True, type=Path, help="category folder (test/, ground_truth/)")
    ap.add_argument("--json", type=Path, help="metrics.json to compare against")
    ap.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="image scores (somad scores.csv); default: scores.csv beside the maps folder if present, "
        "else the maximum of each saved map",
    )
    ap.add_argument("--integration-limit", type=float, default=0.3, help="AU-PRO FPR limit")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |difference|")
    args = ap.parse_args(argv)
    try:
        scores_csv = args.scores if args.scores is not None else args.maps.parent / "scores.csv"
        items = load_category(args.maps, args.category, load_scores(scores_csv))
        if args.json is not None and not args.json.is_file():
            raise InputError(f"no such metrics file: {args.json}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = {"overall": compute_metrics(items, args.integration_limit)}
    good = [it for it in items if it[0] == "good"]
    for defect_type in sorted({it[0] for it in items} - {"good"}):
        subset = good + [it for it in items if it[0] == defect_type]
        results[defect_type] = compute_metrics(subset, args.integration_limit)
    print_table(results)
    if args.json is not None:
        return compare(results, args.json, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
