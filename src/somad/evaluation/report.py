"""The static HTML report of ``somad evaluate``.

One responsibility: turn an evaluation result (see :func:`somad.evaluation.protocol.evaluate_model`) and the
prediction files next to it into ``report.html``, a single page that works when opened from the file
system: no JavaScript, no network, no external style sheets. It holds

* the model (method, backbone, settings), the test counts and the decision threshold with how it was
  chosen;
* a table of the overall and per-defect-type metrics;
* ROC (image, pixel) and PRO curves and a score distribution, drawn here as inline SVG;
* every test image, highest score first: original, ground truth, heatmap overlay and the predicted mask's
  outline drawn on the image,
  with its score and decision;
* the unreadable (skipped) files.

Thumbnails (longest side :data:`THUMB_SIZE` pixels) are written under ``report_files/``; the
thumbnails of the heatmaps and predicted masks link to the full-size files written by
:func:`somad.io.outputs.write_predictions`. Every link is relative, so the output folder can be moved.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
from pathlib import Path, PurePath
from urllib.parse import quote

import numpy as np
from PIL import Image

from somad._version import __version__
from somad.io.images import load_image, load_mask
from somad.io.model_files import atomic_write_text
from somad.io.outputs import output_relpath, save_png
from somad.verdicts import FALSE_ALARM_LEVEL

__all__ = ["THUMB_SIZE", "FILES_DIR", "write_report"]

logger = logging.getLogger(__name__)

#: Longest side, in pixels, of the thumbnails in ``report_files/``.
THUMB_SIZE = 256
#: Folder (inside the output folder) holding the report's own files.
FILES_DIR = "report_files"
#: FPR limit of AU-PRO, marked on the PRO plot.
PRO_LIMIT = 0.3

_METRIC_COLUMNS = [
    ("image_auroc", "Image AUROC", "area under the ROC curve of the image scores"),
    ("pixel_auroc", "Pixel AUROC", "area under the ROC curve of all pixels pooled"),
    ("au_pro", "AU-PRO@0.3", "normalised area under the per-region-overlap curve up to FPR 0.3"),
    ("image_f1_max", "F1-max image", "best F1 over all image-score thresholds (an oracle threshold)"),
    ("pixel_f1_max", "F1-max pixel", "best F1 over all pixel thresholds (an oracle threshold)"),
    ("balanced_accuracy", "Balanced acc.", "mean of the true-positive and true-negative rates at the model threshold"),
    ("best_balanced_accuracy", "Best bal. acc.", "best balanced accuracy over all thresholds (an oracle threshold)"),
    (
        "split_half_balanced_accuracy",
        "Split-half bal. acc.",
        "the best threshold of one half of the test images, scored on the other half (mean of 200 splits)",
    ),
    ("pixel_f1", "Pixel F1", "F1 of the predicted masks (at the model thresholds) against the ground truth"),
    ("region_overlap", "Region IoU", "mean IoU of each ground-truth region with its image's predicted mask"),
    ("good_fp_rate", "Good FP px", "fraction of the pixels of good test images inside a predicted mask"),
]

# Stops of matplotlib's "jet" colour map, for the colour-scale bar.
_JET = "#00007f 0%, #0000ff 12.5%, #00ffff 37.5%, #ffff00 62.5%, #ff0000 87.5%, #7f0000 100%"


# ------------------------------------------------------------------------------------------ entry point
def write_report(out: Path, result: dict, *, model) -> Path:
    """Write ``out/report.html`` and its thumbnails under ``out/report_files/``.

    Parameters
    ----------
    out : pathlib.Path
        The evaluation output folder; it already holds ``heatmaps/`` (and ``masks/`` when the model has
        a threshold) as written by :func:`somad.io.outputs.write_predictions`.
    result : dict
        The result of :func:`somad.evaluation.protocol.evaluate_model`: ``overall``, ``per_defect_type``,
        ``records``, ``curves``, ``threshold``, ``n_images``, ``skipped``, ``timing``,
        ``eval_resolution``. Missing entries are shown as unavailable.
    model : fitted detector
        Used for ``method``, ``backbone``, ``get_params()`` and (if present) ``display_range_``.

    Returns
    -------
    pathlib.Path
        The path of ``report.html``.
    """
    out = Path(out)
    records = sorted(result.get("records") or [], key=_sort_key)
    rows = [_image_row(out, rank, rec) for rank, rec in enumerate(records, start=1)]
    page = _page(result, model, records, rows)
    path = out / "report.html"
    atomic_write_text(path, page)
    logger.info("wrote %s (%d images)", path, len(records))
    return path


def _sort_key(rec: dict):
    score = rec.get("score")
    if not isinstance(score, (int, float)) or math.isnan(score):
        score = -math.inf
    return (-score, str(rec.get("name", "")))


# ------------------------------------------------------------------------------------------ helpers
def _e(value) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def _url(rel: PurePath | str) -> str:
    """A relative URL for a path inside the output folder, percent-encoded and HTML-escaped."""
    return _e(quote(PurePath(rel).as_posix(), safe="/"))


def _number(value) -> float | None:
    if isinstance(value, dict):
        value = value.get("f1")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value, digits: int = 4) -> str:
    v = _number(value)
    if v is None:
        return "–"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.{digits}f}"


def _fmt_score(value) -> str:
    v = _number(value)
    if v is None:
        return "–"
    return f"{v:.6g}"


# ------------------------------------------------------------------------------------------ thumbnails
def _thumb_rgb(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS)
    return image


def _thumb_mask(mask: np.ndarray) -> Image.Image:
    """White-on-black thumbnail of a boolean mask; a thumbnail pixel is white when any source pixel is."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    h, w = mask.shape
    scale = min(1.0, THUMB_SIZE / max(h, w, 1))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.BOX).point(lambda v: 255 if v > 0 else 0)
    return image


#: Colour of the predicted-mask outline drawn on the image.
OUTLINE_RGB = (255, 0, 255)


def _thumb_outline(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Thumbnail of ``image`` with the outline of the predicted ``mask`` (any size) drawn on it, 2 px wide."""
    from scipy import ndimage

    thumb = _thumb_rgb(image)
    small = (
        np.asarray(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").resize(thumb.size, Image.BOX)) > 0
    )  # a thumbnail pixel is inside when any source pixel is
    edge = ndimage.binary_dilation(small & ~ndimage.binary_erosion(small, border_value=0))
    pixels = np.asarray(thumb).copy()
    pixels[edge] = OUTLINE_RGB
    return Image.fromarray(pixels)


def _make_thumb(source: Path, target: Path, kind: str, mask: Path | None = None) -> bool:
    """Write a thumbnail of ``source`` to ``target``; ``kind`` is "image", "mask" or "outline" (the image with
    the outline of ``mask`` drawn on it). False on failure."""
    try:
        if kind == "mask":
            save_png(_thumb_mask(load_mask(source)), target)
        elif kind == "outline":
            save_png(_thumb_outline(load_image(source), load_mask(mask)), target)
        else:
            save_png(_thumb_rgb(load_image(source)), target)
        return True
    except Exception as exc:  # a report must not fail for one unreadable picture
        logger.warning("report: no thumbnail for %s (%s)", source, str(exc).splitlines()[0] if str(exc) else exc)
        return False


def _figure(thumb_rel: PurePath | None, link_rel: PurePath | None, alt: str, placeholder: str) -> str:
    if thumb_rel is None:
        return f'<div class="cell"><div class="placeholder">{_e(placeholder)}</div></div>'
    img = f'<img src="{_url(thumb_rel)}" alt="{_e(alt)}" loading="lazy">'
    if link_rel is not None:
        img = f'<a href="{_url(link_rel)}" title="open full size">{img}</a>'
    return f'<div class="cell">{img}</div>'


def _image_row(out: Path, rank: int, rec: dict) -> str:
    """Write the thumbnails of one record and return its grid row."""
    name = str(rec.get("name", ""))
    rel = output_relpath(name, ".png")
    files = PurePath(FILES_DIR)

    original = None
    if rec.get("path") and _make_thumb(Path(rec["path"]), out / files / "originals" / rel, "image"):
        original = files / "originals" / rel

    truth, truth_note = None, "no defect" if rec.get("label") == 0 else "no ground-truth mask"
    if rec.get("mask_path"):
        if _make_thumb(Path(rec["mask_path"]), out / files / "ground_truth" / rel, "mask"):
            truth = files / "ground_truth" / rel
        else:
            truth_note = "unreadable mask"

    cells = [
        _figure(original, None, f"{name}: image", "image not readable"),
        _figure(truth, None, f"{name}: ground truth", truth_note),
    ]
    heatmap = out / "heatmaps" / rel
    thumb = (
        files / "heatmaps" / rel
        if heatmap.is_file() and _make_thumb(heatmap, out / files / "heatmaps" / rel, "image")
        else None
    )
    cells.append(_figure(thumb, PurePath("heatmaps") / rel if thumb else None, f"{name}: heatmap", "no heatmap"))
    # The predicted mask as an outline on the image (what an operator looks at); it links to the binary mask.
    mask = out / "masks" / rel
    thumb = None
    if (
        mask.is_file()
        and rec.get("path")
        and _make_thumb(Path(rec["path"]), out / files / "outlines" / rel, "outline", mask)
    ):
        thumb = files / "outlines" / rel
    missing = "no threshold: no mask" if rec.get("is_anomalous") is None else "mask not readable"
    cells.append(_figure(thumb, PurePath("masks") / rel if thumb else None, f"{name}: predicted mask outline", missing))

    label = rec.get("label")
    truth_text = "defective" if label == 1 else "good" if label == 0 else "unknown"
    decision = rec.get("is_anomalous")
    if decision is None:
        verdict, outcome = '<span class="badge none">no decision</span>', ""
        state = "none"
    else:
        verdict = (
            '<span class="badge anomalous">anomalous</span>' if decision else '<span class="badge good">good</span>'
        )
        correct = label in (0, 1) and bool(decision) == bool(label)
        state = "correct" if correct else "incorrect"
        kind = (
            ("true positive" if decision else "true negative")
            if correct
            else ("false positive" if decision else "false negative")
        )
        mark = "✓ correct" if correct else "✗ incorrect"
        outcome = f'<span class="outcome {state}" title="{kind}">{mark}</span> <span class="kind">{kind}</span>'
    info = (
        f'<div class="info"><div class="rank">#{rank}</div>'
        f'<div class="name" title="{_e(name)}">{_e(name)}</div>'
        f"<div>type <b>{_e(rec.get('defect_type', ''))}</b> · label {truth_text}</div>"
        f'<div>score <b class="score">{_fmt_score(rec.get("score"))}</b></div>'
        + (f'<div class="warn">{_e(rec["status"])}</div>' if rec.get("status", "ok") != "ok" else "")
        + f"<div>{verdict} {outcome}</div></div>"
    )
    score = _number(rec.get("score"))
    return (
        f'<div class="row {state}" data-name="{_e(name)}" data-score="{_e(repr(score))}">{info}{"".join(cells)}</div>'
    )


# ------------------------------------------------------------------------------------------ SVG plots
_W, _H = 380, 330
_ML, _MR, _MT, _MB = 52, 14, 30, 46
_PW, _PH = _W - _ML - _MR, _H - _MT - _MB


def _px(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return _ML + (x - lo) / max(hi - lo, 1e-300) * _PW


def _py(y: float) -> float:
    return _MT + (1.0 - y) * _PH


def _svg_open(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 {_W} {_H}" width="{_W}" '
        f'height="{_H}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>',
        f'<text x="{_W / 2:.1f}" y="18" class="ptitle" text-anchor="middle">{_e(title)}</text>',
    ]


def _svg_axes(xlabel: str, ylabel: str, xticks: list[tuple[float, str]], y_unit: bool = True) -> list[str]:
    parts = []
    for x, text in xticks:
        parts.append(
            f'<line x1="{x:.1f}" y1="{_MT}" x2="{x:.1f}" y2="{_MT + _PH}" class="grid"/>'
            f'<text x="{x:.1f}" y="{_MT + _PH + 15}" class="tick" text-anchor="middle">{_e(text)}</text>'
        )
    if y_unit:
        for i in range(6):
            y = i / 5
            parts.append(
                f'<line x1="{_ML}" y1="{_py(y):.1f}" x2="{_ML + _PW}" y2="{_py(y):.1f}" class="grid"/>'
                f'<text x="{_ML - 6}" y="{_py(y) + 4:.1f}" class="tick" text-anchor="end">{y:.1f}</text>'
            )
    parts.append(f'<rect x="{_ML}" y="{_MT}" width="{_PW}" height="{_PH}" class="frame"/>')
    parts.append(f'<text x="{_ML + _PW / 2:.1f}" y="{_H - 8}" class="alabel" text-anchor="middle">{_e(xlabel)}</text>')
    if ylabel:
        parts.append(
            f'<text x="14" y="{_MT + _PH / 2:.1f}" class="alabel" text-anchor="middle" '
            f'transform="rotate(-90 14 {_MT + _PH / 2:.1f})">{_e(ylabel)}</text>'
        )
    return parts


def _unit_ticks() -> list[tuple[float, str]]:
    return [(_px(i / 5), f"{i / 5:.1f}") for i in range(6)]


def _polyline(xs, ys, css: str) -> str:
    xs = np.clip(np.asarray(xs, dtype=np.float64), 0.0, 1.0)
    ys = np.clip(np.asarray(ys, dtype=np.float64), 0.0, 1.0)
    keep = np.isfinite(xs) & np.isfinite(ys)
    pts = " ".join(f"{_px(x):.2f},{_py(y):.2f}" for x, y in zip(xs[keep], ys[keep]))
    return f'<polyline points="{pts}" class="{css}"/>'


def _svg_missing(title: str, why: str) -> str:
    parts = _svg_open(title)
    parts.append(f'<rect x="{_ML}" y="{_MT}" width="{_PW}" height="{_PH}" class="frame"/>')
    parts.append(
        f'<text x="{_ML + _PW / 2:.1f}" y="{_MT + _PH / 2:.1f}" class="missing" '
        f'text-anchor="middle">{_e(why)}</text></svg>'
    )
    return "".join(parts)


def _svg_roc(curve: dict | None, title: str, auroc, why_missing: str) -> str:
    if not curve or not curve.get("fpr") or not curve.get("tpr"):
        return _svg_missing(title, why_missing)
    parts = _svg_open(title)
    parts += _svg_axes("false positive rate", "true positive rate", _unit_ticks())
    parts.append(f'<line x1="{_px(0):.1f}" y1="{_py(0):.1f}" x2="{_px(1):.1f}" y2="{_py(1):.1f}" class="chance"/>')
    parts.append(_polyline(curve["fpr"], curve["tpr"], "curve"))
    parts.append(
        f'<text x="{_ML + _PW - 8}" y="{_MT + _PH - 10}" class="legend" text-anchor="end">'
        f"AUROC {_fmt(auroc)}</text></svg>"
    )
    return "".join(parts)


def _svg_pro(curve: dict | None, au_pro) -> str:
    title = "PRO curve (per-region overlap)"
    if not curve or not curve.get("fpr") or not curve.get("pro"):
        return _svg_missing(title, "no ground-truth defect regions")
    parts = _svg_open(title)
    parts.append(
        f'<rect x="{_px(0):.1f}" y="{_MT}" width="{_px(PRO_LIMIT) - _px(0):.1f}" height="{_PH}" class="limitzone"/>'
    )
    parts += _svg_axes("false positive rate", "PRO", _unit_ticks())
    x = _px(PRO_LIMIT)
    parts.append(f'<line x1="{x:.1f}" y1="{_MT}" x2="{x:.1f}" y2="{_MT + _PH}" class="limit"/>')
    parts.append(f'<text x="{_px(PRO_LIMIT) + 4:.1f}" y="{_MT + 12}" class="limittext">FPR limit {PRO_LIMIT}</text>')
    parts.append(_polyline(curve["fpr"], curve["pro"], "curve"))
    parts.append(
        f'<text x="{_ML + _PW - 8}" y="{_MT + _PH - 10}" class="legend" text-anchor="end">'
        f"AU-PRO@{PRO_LIMIT} {_fmt(au_pro)}</text></svg>"
    )
    return "".join(parts)


def _svg_scores(records: list[dict], threshold) -> str:
    """Dot plot of the image scores, good and defective on separate lines, with the threshold."""
    title = "Image scores"
    scored = [(r, _number(r.get("score"))) for r in records]
    scored = [(r, s) for r, s in scored if s is not None and math.isfinite(s)]
    if not scored:
        return _svg_missing(title, "no scores")
    values = [s for _, s in scored]
    t = _number(threshold)
    lo, hi = min(values + ([t] if t is not None else [])), max(values + ([t] if t is not None else []))
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    parts = _svg_open(title)
    ticks = [(_px(v, lo, hi), f"{v:.3g}") for v in np.linspace(lo, hi, 5)]
    parts += _svg_axes("image score", "", ticks, y_unit=False)
    lanes = {0: ("good", 0.72, "dgood"), 1: ("defective", 0.28, "dbad")}
    for text, y, _ in lanes.values():
        parts.append(f'<text x="{_ML + 6}" y="{_py(y + 0.17):.1f}" class="tick">{text}</text>')
    for i, (rec, s) in enumerate(scored):
        text, y, css = lanes.get(rec.get("label"), ("?", 0.5, "dunknown"))
        jitter = ((i * 0.6180339887) % 1.0 - 0.5) * 0.22
        parts.append(
            f'<circle cx="{_px(s, lo, hi):.2f}" cy="{_py(y + jitter):.2f}" r="3.2" class="{css}">'
            f"<title>{_e(rec.get('name', ''))}: {_fmt_score(s)}</title></circle>"
        )
    if t is not None:
        x = _px(t, lo, hi)
        right = x > _ML + _PW / 2  # label on the side with room
        parts.append(
            f'<line x1="{x:.1f}" y1="{_MT}" x2="{x:.1f}" y2="{_MT + _PH}" class="limit"/>'
            f'<text x="{x - 4 if right else x + 4:.1f}" y="{_MT + 12}" class="limittext" '
            f'text-anchor="{"end" if right else "start"}">threshold {_fmt_score(t)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ page sections
def _kv_table(pairs: list[tuple[str, str]], css: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="{css}">{body}</table>'


def _settings(model) -> str:
    try:
        params = dict(model.get_params())
    except Exception as exc:
        logger.warning("report: model settings unavailable (%s)", exc)
        params = {}
    return _kv_table([(k, _e(v)) for k, v in params.items()])


def _threshold_text(result: dict, model) -> str:
    thr = result.get("threshold") or {}
    image_t = thr.get("image")
    if image_t is None:
        return (
            "<p>The model has <b>no decision threshold</b> (it was fitted without held-out good images, "
            "<code>val_fraction=0</code>), so the images are ranked but not classified and no masks are "
            "predicted.</p>"
        )
    q, n_val = thr.get("quantile"), thr.get("n_val_images")
    info = thr.get("info") or {}
    if info.get("source") == "command line":
        origin = "set on the command line (<code>--threshold</code>, <code>--pixel-threshold</code>)."
        n_val = None
    else:
        where = (
            "given to <code>somad calibrate</code>" if info.get("source") == "calibrate" else "held out from fitting"
        )
        if info.get("rule") == "cross_fit":
            where = (
                f"all trained on, each scored by a model fitted without it ({_e(info.get('folds'))}-fold cross-fitting)"
            )
        rate = info.get("expected_false_alarm_rate", 1 - q if isinstance(q, (int, float)) else None)
        interval = info.get("false_alarm_rate_interval")
        pq = info.get("pixel_quantile")
        origin = (
            f"the {_e(q)}-quantile of the scores of <b>{_e(n_val)}</b> good images {where} (expected false-alarm "
            f"rate {_e(_fmt(rate, 3))}"
            + (
                f", {100 * FALSE_ALARM_LEVEL:.0f}% interval {_e(_fmt(interval[0], 3))} to {_e(_fmt(interval[1], 3))}"
                if interval
                else ""
            )
            + ")"
            + (f", and the {_e(pq)}-quantile of their map pixels." if pq is not None else ".")
        )
    text = (
        f"<p>Image threshold <b>{_fmt_score(image_t)}</b>, pixel threshold <b>{_fmt_score(thr.get('pixel'))}</b>: "
        f"{origin} An image is <i>anomalous</i> when its score exceeds the image threshold, or when the input "
        "gate refuses it (a blank, saturated or mostly blank frame); a flagged image's mask is every pixel whose "
        "map value exceeds the pixel threshold, plus its peak. The test set was <b>not</b> used to choose the "
        "thresholds (the F1-max and best balanced accuracy columns, in contrast, use the best threshold found on "
        "the test set itself).</p>"
    )
    if isinstance(n_val, int) and n_val < 10:
        text += (
            f'<p class="warn">Only {n_val} good image{"s" if n_val != 1 else ""} set the threshold: it is a '
            "rough estimate; fit on more good images or a larger validation fraction.</p>"
        )
    return text


def _colour_scale(model) -> str:
    rng = getattr(model, "display_range_", None)
    bar = f'<span class="jet" style="background: linear-gradient(to right, {_JET})"></span>'
    if rng:
        return (
            f"<p>Heatmap colours: {bar} from {_fmt_score(rng[0])} (median of a good image's map) to "
            f"{_fmt_score(rng[1])}, the same scale for every image; the threshold lies in the middle "
            "(yellow-green).</p>"
        )
    return (
        f"<p>Heatmap colours: {bar} scaled per image (the model has no threshold), so colours are not "
        "comparable across images.</p>"
    )


def _counts(result: dict, records: list[dict]) -> str:
    n = result.get("n_images")
    if not isinstance(n, dict):
        n = {
            "total": len(records),
            "good": sum(r.get("label") == 0 for r in records),
            "defective": sum(r.get("label") == 1 for r in records),
            "skipped": len(result.get("skipped") or []),
        }
    pairs = [
        ("test images", _e(n.get("total", len(records)))),
        ("good", _e(n.get("good", "–"))),
        ("defective", _e(n.get("defective", "–"))),
        ("skipped (unreadable)", _e(n.get("skipped", 0))),
    ]
    decided = [r for r in records if r.get("is_anomalous") is not None and r.get("label") in (0, 1)]
    if decided:
        tp = sum(bool(r["is_anomalous"]) and r["label"] == 1 for r in decided)
        fp = sum(bool(r["is_anomalous"]) and r["label"] == 0 for r in decided)
        fn = sum((not r["is_anomalous"]) and r["label"] == 1 for r in decided)
        tn = len(decided) - tp - fp - fn
        pairs.append(
            ("at the threshold", f"{tp} true positive, {fp} false positive, {tn} true negative, {fn} false negative")
        )
    pairs.append(("mask comparison", _e(_resolution_text(result.get("eval_resolution")))))
    timing = result.get("timing") or {}
    if _number(timing.get("predict_ms_per_image")) is not None:
        pairs.append(
            (
                "prediction time",
                f"{_fmt(timing.get('predict_seconds'), 1)} s, "
                f"{_fmt(timing.get('predict_ms_per_image'), 1)} ms per image",
            )
        )
    return _kv_table(pairs)


def _resolution_text(value) -> str:
    if value == "original":
        return "at each mask's original resolution (MVTec reference protocol)"
    if value == "model":
        return "at the model input resolution (masks resized and cropped like the images)"
    return str(value) if value else "unknown"


def _metrics_table(result: dict) -> str:
    head = "".join(f'<th title="{_e(tip)}">{_e(label)}</th>' for _, label, tip in _METRIC_COLUMNS)
    rows = [("overall", result.get("overall") or {}, "all test images")]
    for name, m in sorted((result.get("per_defect_type") or {}).items()):
        rows.append((name, m or {}, f"{name} images and all good images"))
    body = []
    for name, m, tip in rows:
        cells = []
        for key, _, _ in _METRIC_COLUMNS:
            v = m.get(key)
            title = ""
            if isinstance(v, dict) and _number(v.get("threshold")) is not None:
                title = f' title="at threshold {_e(_fmt_score(v["threshold"]))}"'
            elif v is None:
                title = ' title="not available (needs good and defective images, masks or a threshold)"'
            cells.append(f'<td class="num"{title}>{_fmt(v)}</td>')
        css = ' class="overall"' if name == "overall" else ""
        body.append(
            f'<tr{css}><th title="{_e(tip)}">{_e(name)}</th><td class="num">{_e(m.get("n_images", "–"))}</td>'
            f"{''.join(cells)}</tr>"
        )
    notes = "".join(f'<p class="warn">{_e(name)}: {_e(m["note"])}</p>' for name, m, _ in rows if m.get("note"))
    return (
        f'<table class="metrics"><thead><tr><th>subset</th><th title="number of images">images</th>{head}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table>{notes}"
        '<p class="note">Per defect type: that type\'s images against all good test images. '
        "F1-max uses the best threshold on the test set (an upper bound); the accuracies use the model's own "
        "threshold. “–”: not available (one class only, no masks, or no threshold).</p>"
    )


def _plots(result: dict, records: list[dict]) -> str:
    curves = result.get("curves") or {}
    overall = result.get("overall") or {}
    one_class = "needs good and defective images"
    plots = [
        _svg_roc(curves.get("image_roc"), "Image-level ROC", overall.get("image_auroc"), one_class),
        _svg_roc(
            curves.get("pixel_roc"),
            "Pixel-level ROC",
            overall.get("pixel_auroc"),
            "no ground-truth defect pixels" if curves.get("image_roc") else one_class,
        ),
        _svg_pro(curves.get("pro"), overall.get("au_pro")),
        _svg_scores(records, (result.get("threshold") or {}).get("image")),
    ]
    return '<div class="plots">' + "".join(f"<figure>{p}</figure>" for p in plots) + "</div>"


def _skipped(result: dict) -> str:
    skipped = result.get("skipped") or []
    if not skipped:
        return "<p>No file was skipped.</p>"
    items = "".join(f"<li><code>{_e(s)}</code></li>" for s in skipped)
    return (
        f'<p class="warn">{len(skipped)} file{"s were" if len(skipped) != 1 else " was"} unreadable and left out '
        f'of every metric:</p><ul class="skipped">{items}</ul>'
    )


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f4f5f7}
main{max-width:1320px;margin:0 auto;padding:20px 24px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d5d9de;padding-bottom:4px}
.sub{color:#5b6570;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 14px;flex:1 1 300px;min-width:280px}
.card h3{font-size:14px;margin:0 0 8px;color:#3a4550}
.card p{margin:6px 0}
table{border-collapse:collapse}
.kv th{text-align:left;font-weight:500;color:#5b6570;padding:2px 12px 2px 0;vertical-align:top;white-space:nowrap}
.kv td{padding:2px 0;overflow-wrap:anywhere}
.metrics{background:#fff;border:1px solid #dde1e6;width:100%}
.metrics th,.metrics td{padding:6px 10px;border-bottom:1px solid #e6e9ec;text-align:right}
.metrics thead th{background:#eef1f4;font-weight:600;cursor:help}
.metrics tbody th{text-align:left;font-weight:500}
.metrics tr.overall{background:#f7faff;font-weight:600}
.num{font-variant-numeric:tabular-nums}
.note{color:#5b6570;font-size:12.5px}
.warn{color:#8a4b00;background:#fff4e0;border-left:3px solid #e59a1c;padding:4px 8px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}
.plots figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:4px}
.plot{display:block;width:100%;height:auto;max-width:420px;margin:0 auto;font-family:inherit}
.plot .ptitle{font-size:15px;font-weight:600;fill:#1d232a}
.plot .tick{font-size:12px;fill:#5b6570}
.plot .alabel{font-size:13px;fill:#3a4550}
.plot .grid{stroke:#eceff2;stroke-width:1}
.plot .frame{fill:none;stroke:#9aa3ad;stroke-width:1}
.plot .chance{stroke:#b5bcc4;stroke-dasharray:4 4;stroke-width:1}
.plot .curve{fill:none;stroke:#1f6fd1;stroke-width:2;stroke-linejoin:round}
.plot .legend{font-size:14px;font-weight:600;fill:#1f6fd1}
.plot .limitzone{fill:#fff1d6}
.plot .limit{stroke:#d9822b;stroke-width:1.5;stroke-dasharray:5 3}
.plot .limittext{font-size:12px;fill:#b36414}
.plot .missing{font-size:14px;fill:#8a939c}
.plot .dgood{fill:#2e9e5b;fill-opacity:.75}.plot .dbad{fill:#d03b3b;fill-opacity:.75}.plot .dunknown{fill:#777}
.jet{display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid #999}
.grid-head,.row{display:grid;grid-template-columns:240px repeat(4,minmax(0,1fr));gap:8px;align-items:center}
.grid-head{position:sticky;top:0;background:#f4f5f7;z-index:1;padding:6px 8px;font-weight:600;color:#3a4550;
  border-bottom:1px solid #d5d9de}
.grid-head div:not(:first-child){text-align:center}
.row{background:#fff;border:1px solid #dde1e6;border-left:5px solid #b5bcc4;border-radius:4px;padding:6px 8px;margin:6px 0}
.row.correct{border-left-color:#2e9e5b}.row.incorrect{border-left-color:#d03b3b;background:#fff7f7}
.info{font-size:13px;min-width:0}
.info .rank{color:#8a939c;font-size:12px}
.info .name{font-weight:600;overflow-wrap:anywhere;margin-bottom:2px}
.cell{width:100%;aspect-ratio:1/1;background:#111;display:flex;align-items:center;justify-content:center;
  border-radius:3px;overflow:hidden}
.cell a{display:flex;width:100%;height:100%}
.cell img{width:100%;height:100%;object-fit:contain;display:block}
.placeholder{color:#9aa3ad;font-size:12px;text-align:center;padding:8px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.badge.anomalous{background:#d03b3b}.badge.good{background:#2e9e5b}.badge.none{background:#8a939c}
.outcome{font-size:12px;font-weight:600}.outcome.correct{color:#22774a}.outcome.incorrect{color:#c02626}
.kind{display:block;font-size:11.5px;color:#5b6570}
.skipped code{font-size:12.5px;overflow-wrap:anywhere}
footer{margin-top:30px;color:#8a939c;font-size:12px}
"""


def _page(result: dict, model, records: list[dict], rows: list[str]) -> str:
    method = getattr(model, "method", "?")
    backbone = getattr(model, "backbone", "?")
    created = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    grid = "".join(rows) if rows else "<p>No test image was scored.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>somad evaluation: {_e(method)} / {_e(backbone)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>Anomaly detection evaluation</h1>
<p class="sub">method <b>{_e(method)}</b> · backbone <b>{_e(backbone)}</b> · {len(records)} test images · {_e(created)}</p>
</header>
<section class="cards">
<div class="card"><h3>Test set</h3>{_counts(result, records)}</div>
<div class="card"><h3>Decision threshold</h3>{_threshold_text(result, model)}{_colour_scale(model)}</div>
<div class="card"><h3>Model settings</h3>{_settings(model)}</div>
</section>
<h2>Metrics</h2>
{_metrics_table(result)}
<h2>Curves</h2>
{_plots(result, records)}
<h2>Test images, highest score first</h2>
<p class="note">Left border: green = decision correct, red = incorrect, grey = no threshold. The last column draws
the predicted defect mask's outline (magenta) on the image: a flagged image's mask is every pixel above the pixel
threshold, and always holds the map's peak. Click a heatmap or an outline to open the full-size file.</p>
<div class="grid-head"><div>image</div><div>original</div><div>ground truth</div><div>heatmap overlay</div>
<div>predicted mask outline</div></div>
<div class="grid">{grid}</div>
<h2>Skipped files</h2>
{_skipped(result)}
<footer>Written by somad {_e(__version__)}. A static page: no scripts, no network access.</footer>
</main>
</body>
</html>
"""
