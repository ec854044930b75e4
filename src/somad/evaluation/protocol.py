"""Evaluation of a fitted detector on a labelled test set, by the MVTec AD protocol.

One responsibility: predict every test image, compare with labels and masks, and write ``metrics.json``
(overall and per defect type), the prediction files and the HTML report.

Masks are compared at their own (original) resolution by default, as in the MVTec reference; with
``eval_resolution="model"`` the masks are resized (nearest) and cropped like the images and compared with
the maps at the model input resolution. The decision thresholds come from held-out good training images;
no test-set statistic is used anywhere.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from somad.errors import DataError, SomadError
from somad.evaluation import metrics
from somad.features.extractor import to_original_resolution
from somad.io.datasets import Sample, folder_test_samples, mvtec_test_samples, validate_masks
from somad.io.images import load_mask
from somad.io.model_files import atomic_write_text
from somad.io.outputs import Explanations, write_predictions
from somad.methods.base import BaseDetector, ImageItem

logger = logging.getLogger(__name__)

EVAL_RESOLUTIONS = ("original", "model")


def load_test_samples(category: Path | None = None, *, good_dir=None, defect_dirs=(), mask_dir=None) -> list[Sample]:
    """Test samples of an MVTec category, or of the plain folder layout."""
    if category is not None:
        # Evaluation reads test/ (and ground_truth/) only: a category without train/ is fine.
        category = Path(category)
        if not category.is_dir():
            what = "does not exist" if not category.exists() else "is not a folder"
            raise DataError(f"{category}: {what}; pass an MVTec category folder (with test/<defect type>/ folders)")
        if not (category / "test").is_dir():
            raise DataError(
                f"{category}: not an MVTec category: no test/ folder (expected test/good/ and test/<defect type>/; "
                "train/ is not needed to evaluate); for plain folders use --good-dir/--defect-dir/--mask-dir"
            )
        return mvtec_test_samples(category)
    return folder_test_samples(good_dir, defect_dirs, mask_dir)


def _model_resolution_mask(mask: np.ndarray, model: BaseDetector, shape: tuple[int, int]) -> np.ndarray:
    """The ground truth as the model saw the image: resized (nearest) and cropped like it, ``shape`` = the map's."""
    g = model.extractor_.geometry
    if g.tile_size is not None:  # tiled: the map covers the whole frame, resized with its aspect ratio
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)) > 127
    height, width = g.resized
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST))
    o, (h, w) = g.crop_offset, g.input_shape
    return resized[o : o + h, o : o + w] > 127


def evaluate_model(
    model: BaseDetector,
    samples: list[Sample],
    *,
    out: Path | None = None,
    save_maps: bool = False,
    eval_resolution: str = "original",
    on_error: str = "skip",
    explain: bool = False,
) -> dict:
    """Predict ``samples`` and compute the metrics.

    Parameters
    ----------
    model : fitted detector
    samples : list of Sample
    out : folder for prediction files (``heatmaps/``, ``masks/``, ``maps/``, ``scores.csv``), or None
    eval_resolution : {"original", "model"}
    explain : bool, default False
        Also write ``out/explanations/`` (each flagged image's regions beside their normal references, as
        ``somad predict --explain``; models that keep references: SOMAD, PatchCore), for the report. Their time is
        left out of ``timing``; scores are not touched.

    Returns
    -------
    dict with ``overall`` and ``per_defect_type`` metrics, ``n_images``, ``timing`` and the per-image
    ``records`` (name, label, defect type, score, decision, file paths; with ``explain``, ``explanations``: each
    region's explanation image, peak and reference) for the report; with ``explain``, ``explanations``: what the
    model keeps (``method_keeps``: False for a method that has none, PaDiM; ``no_references``: True for a file
    without them) and ``unreadable``, where a training image was looked for in vain (the model was moved).
    """
    if eval_resolution not in EVAL_RESOLUTIONS:
        raise SomadError(
            f"eval_resolution={eval_resolution!r} is invalid; choose one of: {', '.join(EVAL_RESOLUTIONS)}"
        )
    validate_masks(samples)  # a missing or mis-sized mask fails now, not after every image is scored
    by_name = {str(s.relpath): s for s in samples}
    method_keeps = hasattr(model, "region_references")
    explanations = Explanations() if explain and out is not None and method_keeps else None
    t0 = time.perf_counter()
    kept, skipped = _predict(
        model,
        [ImageItem(name, path=s.path) for name, s in by_name.items()],
        out=out,
        save_maps=save_maps,
        eval_resolution=eval_resolution,
        on_error=on_error,
        explain=explanations,
    )
    seconds = time.perf_counter() - t0 - (explanations.seconds if explanations is not None else 0.0)
    names = [n for n in by_name if n in kept]
    if not names:
        raise DataError("no readable test images; check the test folders")
    labels = np.array([by_name[n].label for n in names])
    scores = np.array([kept[n].score for n in names], dtype=np.float64)
    maps = [kept[n].map for n in names]
    masks = [_ground_truth(by_name[n], kept[n], model, eval_resolution) for n in names]
    flags = [kept[n].flagged for n in names]
    predicted = [kept[n].mask for n in names]
    result = {"overall": prediction_metrics(labels, scores, masks, maps, flags, predicted), "per_defect_type": {}}
    for t in sorted({by_name[n].defect_type for n in names} - {"good"}):
        sel = [i for i, n in enumerate(names) if by_name[n].defect_type in (t, "good")]
        pick = lambda values: [values[i] for i in sel]  # noqa: B023 - used at once
        result["per_defect_type"][t] = prediction_metrics(
            labels[sel], scores[sel], pick(masks), pick(maps), pick(flags), pick(predicted)
        )
    result["records"] = [_record(by_name[n], kept[n]) for n in names]
    if explain and out is not None:
        result["explanations"] = {
            "method_keeps": method_keeps,
            "no_references": bool(explanations and explanations.no_references),
            "unreadable": explanations.unreadable if explanations else None,
        }
        for rec in result["records"] if explanations else ():
            rec["explanations"] = [
                {
                    "region": e.region,
                    "path": e.path.as_posix(),
                    "peak": e.peak,
                    "reference": list(e.reference),
                    "readable": e.readable,
                }
                for e in explanations.regions.get(rec["name"], ())
            ]
    known = [i for i, m in enumerate(masks) if m is not None]
    result["curves"] = _curves(labels, scores, [masks[i] for i in known], [maps[i] for i in known])
    result["n_images"] = {
        "total": len(names),
        "good": int((labels == 0).sum()),
        "defective": int((labels == 1).sum()),
        "skipped": len(skipped),
    }
    result["skipped"] = list(skipped)
    result["timing"] = {"predict_seconds": seconds, "predict_ms_per_image": 1000.0 * seconds / len(names)}
    result["eval_resolution"] = eval_resolution
    result["threshold"] = {
        "image": model.image_threshold_,
        "pixel": model.pixel_threshold_,
        "quantile": model.threshold_quantile,
        "n_val_images": model.n_val_images_,
        "info": getattr(model, "threshold_info_", None),
    }
    return result


@dataclass
class _Scored:
    """What evaluation keeps of one prediction: the map at the evaluation resolution and the verdicts."""

    score: float
    map: np.ndarray
    flagged: bool | None
    mask: np.ndarray | None
    status: str
    original_size: tuple[int, int]


def _predict(
    model, items, *, out, save_maps, eval_resolution, on_error, explain=None
) -> tuple[dict[str, _Scored], list[str]]:
    """Score ``items`` (writing the prediction files when ``out`` is given, and the explanations into ``explain``,
    an ``Explanations``); unreadable ones are listed."""
    kept: dict[str, _Scored] = {}
    skipped: list[str] = []

    def keep(pred, full, flagged):
        m = pred.map.cpu().numpy().astype(np.float32) if eval_resolution == "model" else full
        kept[pred.item.name] = _Scored(pred.score, m, flagged, model.mask(pred, m), pred.status, pred.original_size)

    if out is not None:
        # Normal references only for the report's explanations (timed apart): the benchmark compares the scoring.
        skipped = write_predictions(
            model,
            items,
            out,
            save_maps=save_maps,
            on_error=on_error,
            on_map=keep,
            explain=explain if explain is not None else False,
            references=False,
        )[1]
        return kept, skipped
    geometry = model.extractor_.geometry
    for p in model.predict_iter(items, on_error=on_error, skipped=skipped):
        full = (
            None if eval_resolution == "model" else to_original_resolution(p.map[None], geometry, [p.original_size])[0]
        )
        keep(p, full, model.verdict(p))
    return kept, skipped


def _ground_truth(sample: Sample, scored: _Scored, model, eval_resolution: str) -> np.ndarray | None:
    """The sample's mask at its map's resolution: empty for a good image, None for a defective one without."""
    shape = scored.map.shape
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool) if sample.label == 0 else None
    if eval_resolution == "model":
        return _model_resolution_mask(load_mask(sample.mask_path, shape=scored.original_size), model, shape)
    return load_mask(sample.mask_path, shape=shape)


def _record(sample: Sample, scored: _Scored) -> dict:
    return {
        "name": str(sample.relpath),
        "path": str(sample.path),
        "mask_path": str(sample.mask_path or ""),
        "label": int(sample.label),
        "defect_type": sample.defect_type,
        "score": float(scored.score),
        "is_anomalous": scored.flagged,
        "status": scored.status,
    }


def prediction_metrics(labels, scores, masks, maps, flags, predicted) -> dict:
    """Image metrics over every image; pixel metrics over the images with a known mask (``masks[i]`` not None:
    a good image's is empty, a defective image without a mask file has none). ``evaluate`` and the benchmark
    compute their figures here.

    A metric that the test set cannot give (AUROC of a test set with one class only) is ``None``, and ``note``
    says why, in words (metrics.json, the report and the printed table show it).

    ``flags`` and ``predicted`` are the model's verdicts and predicted masks (None without a threshold): the
    metrics "at the saved threshold" are computed from them, so they are exactly what the outputs show.
    """
    out = {"n_images": int(len(labels))}
    both = len(set(labels.tolist())) == 2
    notes = []
    if both:
        out.update(metrics.evaluate_predictions(labels, scores, None, None))
        out.update(metrics.oracle_balanced_accuracies(labels, scores))
    else:
        out["image_auroc"] = None
        only = "defective" if len(labels) and labels.all() else "good"
        notes.append(f"AUROC needs both good and defective images; the test set has only {only} ones")
    known = [i for i, m in enumerate(masks) if m is not None]
    out["n_images_pixel"] = len(known)
    if known:
        out.update(metrics.pixel_metrics([masks[i] for i in known], [maps[i] for i in known]))
        if out.get("pixel_auroc") is None and both:
            notes.append("pixel AUROC and AU-PRO need ground-truth defect pixels; no mask of the test set has one")
    if notes:
        out["note"] = "; ".join(notes)
    if flags and flags[0] is not None:
        decided = np.array(flags, dtype=bool)
        out["image_accuracy"] = float(np.mean(decided == labels.astype(bool)))
        if both:
            out["balanced_accuracy"] = metrics.balanced_accuracy(labels, decided)
        if known:
            out.update(metrics.mask_metrics([masks[i] for i in known], [predicted[i] for i in known]))
    return out


def _curves(labels, scores, masks, maps) -> dict:
    if len(set(labels.tolist())) < 2:
        return {}
    fpr, tpr = metrics.roc_curve_points(labels, scores)
    curves = {"image_roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    if any(m.any() for m in masks):
        pf, pt = metrics.pixel_roc_curve_points(masks, maps)
        curves["pixel_roc"] = {"fpr": pf.tolist(), "tpr": pt.tolist()}
        x, y = metrics.pro_curve(masks, maps)
        x, y = metrics.downsample_curve(x, y)
        curves["pro"] = {"fpr": np.asarray(x).tolist(), "pro": np.asarray(y).tolist()}
    return curves


def write_metrics_json(path: Path, result: dict) -> None:
    public = {k: v for k, v in result.items() if k not in ("records", "curves")}
    atomic_write_text(path, json.dumps(public, indent=2, sort_keys=True))


def format_metrics_table(result: dict) -> str:
    """Plain-text table of the overall and per-type metrics."""
    keys = {
        "image_auroc": "img AUROC",
        "pixel_auroc": "pix AUROC",
        "au_pro": "AU-PRO",
        "balanced_accuracy": "bal acc",
        "best_balanced_accuracy": "best bal acc",
        "split_half_balanced_accuracy": "split-half",
        "pixel_f1": "pix F1",
        "pixel_f1_max": "pix F1-max",
        "region_overlap": "region IoU",
        "good_fp_rate": "good FP px",
    }
    rows = [("overall", result["overall"])] + sorted(result["per_defect_type"].items())
    lines = [f"{'':<14}" + "".join(f"{h:>13}" for h in keys.values())]
    for name, m in rows:
        cells = []
        for k in keys:
            v = m.get(k)
            v = v.get("f1") if isinstance(v, dict) else v
            cells.append(f"{v:>13.4f}" if isinstance(v, (int, float)) else f"{'-':>13}")
        lines.append(f"{name:<14}" + "".join(cells))
    lines.extend(f"note ({name}): {m['note']}" for name, m in rows if m.get("note"))
    return "\n".join(lines)
