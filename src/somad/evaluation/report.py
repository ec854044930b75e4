"""The static HTML report of ``somad evaluate``.

One responsibility: turn an evaluation result (see :func:`somad.evaluation.protocol.evaluate_model`) and the
prediction files next to it into ``report.html``, a single page that works when opened from the file
system: no JavaScript, no network, no external style sheets. It holds

* the model (method, backbone, settings), the test counts and the decision threshold with how it was
  chosen;
* a table of the overall and per-defect-type metrics;
* ROC (image, pixel) and PRO curves and a score distribution, drawn as inline SVG;
* every test image, highest score first: original, ground truth, heatmap overlay and the predicted mask's
  outline drawn on the image,
  with its score and decision; under a flagged image, its main regions each beside its normal reference (the
  explanation images ``somad.io.outputs.write_predictions`` writes with ``explain``: the region's crop and the same
  area of the training image the model finds most similar there, at the same scale), captioned;
* the unreadable (skipped) files.

Thumbnails (longest side :data:`THUMB_SIZE` pixels) are written under ``report_files/``; the
thumbnails of the heatmaps and predicted masks link to the full-size files written by
:func:`somad.io.outputs.write_predictions`. Every link is relative, so the output folder can be moved.

It is made in three steps, each testable alone: :func:`write_thumbnails` writes one record's pictures and
returns their paths; :func:`page_view` (with :func:`row_view` and the ``*_plot`` functions) turns the result
into plain view data (:class:`Page`: texts, formatted numbers, link paths and plot coordinates), reading no
file; :func:`render_page` fills the Jinja2 template ``templates/report.html.j2`` (autoescaped: every name
from the data set is escaped) with it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePath
from urllib.parse import quote

import jinja2
import numpy as np
from PIL import Image

from somad._version import __version__
from somad.errors import SomadError
from somad.io.images import load_image, load_mask
from somad.io.model_files import atomic_write_text
from somad.io.outputs import output_relpath, save_png
from somad.verdicts import FALSE_ALARM_LEVEL

__all__ = [
    "THUMB_SIZE",
    "FILES_DIR",
    "FRAME",
    "Thumbnails",
    "Reference",
    "Page",
    "write_report",
    "write_thumbnails",
    "page_view",
    "row_view",
    "roc_plot",
    "pro_plot",
    "scores_plot",
    "render_page",
]

logger = logging.getLogger(__name__)

#: Longest side, in pixels, of the thumbnails in ``report_files/``.
THUMB_SIZE = 256
#: Folder (inside the output folder) holding the report's own files.
FILES_DIR = "report_files"
#: FPR limit of AU-PRO, marked on the PRO plot.
PRO_LIMIT = 0.3
#: Regions of a flagged image shown beside their normal references (the highest peaks); the rest are only in
#: ``explanations/``.
SHOWN_REFERENCES = 3

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
    thumbnails = [write_thumbnails(out, rec) for rec in records]
    created = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = page_view(result, model, records, thumbnails, created=created)
    path = out / "report.html"
    atomic_write_text(path, render_page(page))
    logger.info("wrote %s (%d images)", path, len(records))
    return path


def _sort_key(rec: dict):
    score = rec.get("score")
    if not isinstance(score, (int, float)) or math.isnan(score):
        score = -math.inf
    return (-score, str(rec.get("name", "")))


# ------------------------------------------------------------------------------------------ helpers
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
def _thumb_rgb(image: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.LANCZOS)
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


def _main_regions(rec: dict) -> list[dict]:
    """A record's explained regions (``rec["explanations"]``), the highest peak first."""
    return sorted(rec.get("explanations") or (), key=lambda e: (-(_number(e.get("peak")) or 0.0), e["region"]))


@dataclass(frozen=True)
class Thumbnails:
    """One record's thumbnails, as paths relative to the output folder; None where the picture is missing or
    unreadable. ``explanations``: ``(explanation image, its thumbnail or None)`` for each explanation image shown
    (the record's :data:`SHOWN_REFERENCES` highest-peak regions)."""

    original: PurePath | None = None
    ground_truth: PurePath | None = None
    heatmap: PurePath | None = None
    outline: PurePath | None = None
    explanations: tuple[tuple[PurePath, PurePath | None], ...] = ()


def write_thumbnails(out: Path, rec: dict) -> Thumbnails:
    """Write the thumbnails of one record under ``out/report_files/`` and return their paths relative to ``out``.

    ``originals/``: the image (``rec["path"]``); ``ground_truth/``: its ground-truth mask
    (``rec["mask_path"]``), white on black; ``heatmaps/``: the overlay ``out/heatmaps/`` holds; ``outlines/``:
    the image with the outline of the predicted mask ``out/masks/`` drawn on it; ``explanations/``: the explanation
    images (a region beside its normal reference) of the :data:`SHOWN_REFERENCES` highest-peak regions of
    ``rec["explanations"]``, longest side ``2 * THUMB_SIZE``. Each file is written as ``somad predict`` writes
    its heatmaps (``somad.io.outputs.save_png``): the folder ``somad evaluate`` writes into is staged and renamed
    into place whole, so a per-file fsync would only slow the report down (2.5-4x, measured on 120 images). A
    picture that is missing or cannot be read gets None and a logged warning (a report must not fail for one
    unreadable picture); a file that cannot be written is a one-line SomadError naming it.
    """
    rel = output_relpath(str(rec.get("name", "")), ".png")
    image = Path(rec["path"]) if rec.get("path") else None
    truth = Path(rec["mask_path"]) if rec.get("mask_path") else None
    heatmap, mask = out / "heatmaps" / rel, out / "masks" / rel

    def thumbnail(folder: str, source: Path, make, name: PurePath = rel) -> PurePath | None:
        try:
            picture = make()
        except Exception as exc:  # a report must not fail for one unreadable picture
            logger.warning("report: no thumbnail for %s (%s)", source, str(exc).splitlines()[0] if str(exc) else exc)
            return None
        target = PurePath(FILES_DIR, folder, name)
        try:
            save_png(picture, out / target)
        except OSError as exc:
            raise SomadError(f"{out / target}: cannot write the thumbnail ({exc.strerror or exc})") from None
        return target

    return Thumbnails(
        original=thumbnail("originals", image, lambda: _thumb_rgb(load_image(image))) if image else None,
        ground_truth=thumbnail("ground_truth", truth, lambda: _thumb_mask(load_mask(truth))) if truth else None,
        heatmap=thumbnail("heatmaps", heatmap, lambda: _thumb_rgb(load_image(heatmap))) if heatmap.is_file() else None,
        outline=(
            thumbnail("outlines", image, lambda: _thumb_outline(load_image(image), load_mask(mask)))
            if image and mask.is_file()
            else None
        ),
        explanations=tuple(
            (path, thumbnail("", out / path, lambda p=out / path: _thumb_rgb(load_image(p), 2 * THUMB_SIZE), path))
            for path in (PurePath(e["path"]) for e in _main_regions(rec)[:SHOWN_REFERENCES])
        ),
    )


# ------------------------------------------------------------------------------------------ view data: the grid
@dataclass(frozen=True)
class Cell:
    """One picture of a grid row: a thumbnail (opening ``link``, the full-size file, when there is one) or,
    without a thumbnail, the ``placeholder`` text. Paths are relative to the output folder."""

    thumb: PurePath | None
    link: PurePath | None
    alt: str
    placeholder: str


@dataclass(frozen=True)
class Reference:
    """One region of a flagged image beside its normal reference: the explanation image's thumbnail and the image
    itself (paths relative to the output folder; the thumbnail is the image where it could not be made), its alt
    text, the caption a person reads and its tooltip."""

    picture: PurePath
    link: PurePath
    alt: str
    caption: str
    tip: str
    readable: bool  # the training image could be read: its crop is shown (else a grey panel)


#: What the pictures of a :class:`Reference` show, as its tooltip says it.
REFERENCE_TIP = (
    "left: the region in this image (red outline); right: the same area, at the same scale, of the training image "
    "holding the normal patch the model matches to the region's peak (SOMAD: the patch its nearest SOM node keeps; "
    "PatchCore: the nearest patch of its memory bank), the region's outline drawn there in yellow; distance: how far "
    "the peak patch lies from that node or patch, in feature space"
)


def reference_view(name: str, explained: dict, thumbnail: PurePath | None = None) -> Reference:
    """The view of one explained region of image ``name`` (an entry of a record's ``explanations``) whose
    explanation image's thumbnail is ``thumbnail``."""
    image, x, y, distance = explained["reference"]
    region = explained["region"]
    caption = f"Region {region} (peak {_fmt_score(explained.get('peak'))}): normal reference: {image} at ({x}, {y}), "
    caption += f"distance {_fmt_score(distance)}"
    if not explained.get("readable", True):
        caption += " (training image not readable: grey)"
    return Reference(
        thumbnail or PurePath(explained["path"]),
        PurePath(explained["path"]),
        f"{name} region {region} beside its normal reference {image}",
        caption,
        REFERENCE_TIP,
        bool(explained.get("readable", True)),
    )


@dataclass(frozen=True)
class Row:
    """One test image of the grid: its texts, its decision, its four pictures and, flagged, its main regions
    beside their normal references (the rest: ``more_references``)."""

    rank: int
    name: str
    defect_type: str
    label: str  # "good", "defective" or "unknown"
    score: str  # formatted for display
    score_value: float | None  # the row's data-score attribute
    status: str | None  # the input gate's note, when the status is not "ok"
    decision: str | None  # "anomalous", "good", or None (no threshold)
    state: str  # "correct", "incorrect" or "none" (no decision)
    outcome: str | None  # "true positive", "false positive", "true negative", "false negative"; None: no decision
    cells: tuple[Cell, ...]  # original, ground truth, heatmap, predicted-mask outline
    references: tuple[Reference, ...] = ()  # the highest-peak regions first
    more_references: int = 0


def row_view(rank: int, rec: dict, thumbnails: Thumbnails) -> Row:
    """The grid row of one record (``rank``: its place, from 1) whose thumbnails are ``thumbnails``."""
    name = str(rec.get("name", ""))
    rel = output_relpath(name, ".png")
    label, decision = rec.get("label"), rec.get("is_anomalous")
    if rec.get("mask_path"):
        truth_note = "unreadable mask"  # shown only where its thumbnail could not be made
    else:
        truth_note = "no defect" if label == 0 else "no ground-truth mask"
    cells = (
        Cell(thumbnails.original, None, f"{name}: image", "image not readable"),
        Cell(thumbnails.ground_truth, None, f"{name}: ground truth", truth_note),
        Cell(
            thumbnails.heatmap,
            PurePath("heatmaps", rel) if thumbnails.heatmap else None,
            f"{name}: heatmap",
            "no heatmap",
        ),
        # The predicted mask as an outline on the image (what an operator looks at); it links to the binary mask.
        Cell(
            thumbnails.outline,
            PurePath("masks", rel) if thumbnails.outline else None,
            f"{name}: predicted mask outline",
            "no threshold: no mask" if decision is None else "mask not readable",
        ),
    )
    if decision is None:
        state, outcome = "none", None
    else:
        correct = label in (0, 1) and bool(decision) == bool(label)
        state = "correct" if correct else "incorrect"
        outcome = f"{'true' if correct else 'false'} {'positive' if decision else 'negative'}"
    explained = _main_regions(rec)
    return Row(
        rank=rank,
        name=name,
        defect_type=str(rec.get("defect_type", "")),
        label="defective" if label == 1 else "good" if label == 0 else "unknown",
        score=_fmt_score(rec.get("score")),
        score_value=_number(rec.get("score")),
        status=str(rec["status"]) if rec.get("status", "ok") != "ok" else None,
        decision=None if decision is None else "anomalous" if decision else "good",
        state=state,
        outcome=outcome,
        cells=cells,
        references=tuple(
            reference_view(name, e, dict(thumbnails.explanations).get(PurePath(e["path"])))
            for e in explained[:SHOWN_REFERENCES]
        ),
        more_references=max(0, len(explained) - SHOWN_REFERENCES),
    )


# ------------------------------------------------------------------------------------------ view data: plots
@dataclass(frozen=True)
class Frame:
    """The geometry of every plot, in SVG pixels: the picture, its margins and the plotting area inside them."""

    width: int = 380
    height: int = 330
    left: int = 52
    right: int = 14
    top: int = 30
    bottom: int = 46

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    def x(self, value: float, lo: float = 0.0, hi: float = 1.0) -> float:
        """The SVG x of ``value`` on an axis from ``lo`` (left edge) to ``hi`` (right edge)."""
        return float(self.left + (value - lo) / max(hi - lo, 1e-300) * self.plot_width)

    def y(self, value: float) -> float:
        """The SVG y of ``value`` on an axis from 0 (bottom) to 1 (top)."""
        return float(self.top + (1.0 - value) * self.plot_height)


FRAME = Frame()


@dataclass(frozen=True)
class Marker:
    """A vertical line across the plotting area at ``x``, labelled at its top by ``text``, which starts (anchor
    "start") or ends ("end") at ``label_x``."""

    x: float
    text: str
    label_x: float
    anchor: str


@dataclass(frozen=True)
class Dot:
    """One image of the score plot; ``css`` is "dgood", "dbad" or "dunknown"; ``title`` its tooltip."""

    x: float
    y: float
    css: str
    title: str


@dataclass(frozen=True)
class Plot:
    """One plot, in SVG coordinates of :data:`FRAME`; the template's ``plot`` macro draws the parts in this order.

    With ``missing`` set, only the title, an empty frame and that text (why there is nothing to draw)."""

    title: str
    missing: str | None = None
    zone: tuple[float, float] | None = None  # (x, width) of a shaded band over the whole height
    xlabel: str = ""
    ylabel: str = ""
    xticks: tuple[tuple[float, str], ...] = ()  # (x, label): a vertical grid line and its label below
    yticks: tuple[tuple[float, str], ...] = ()  # (y, label): a horizontal grid line and its label left
    chance: tuple[float, float, float, float] | None = None  # the chance diagonal (x1, y1, x2, y2)
    lanes: tuple[tuple[float, float, str], ...] = ()  # (x, y, text): the names of the dot lanes
    dots: tuple[Dot, ...] = ()
    markers: tuple[Marker, ...] = ()
    curve: tuple[tuple[float, float], ...] = ()  # the points of the curve's polyline
    legend: str | None = None  # bottom right, e.g. "AUROC 0.9123"


def _unit_ticks() -> dict:
    return {
        "xticks": tuple((FRAME.x(i / 5), f"{i / 5:.1f}") for i in range(6)),
        "yticks": tuple((FRAME.y(i / 5), f"{i / 5:.1f}") for i in range(6)),
    }


def _curve(xs, ys) -> tuple[tuple[float, float], ...]:
    """The finite points of a curve on the unit square (values outside clipped to it), in SVG coordinates."""
    xs = np.clip(np.asarray(xs, dtype=np.float64), 0.0, 1.0)
    ys = np.clip(np.asarray(ys, dtype=np.float64), 0.0, 1.0)
    keep = np.isfinite(xs) & np.isfinite(ys)
    return tuple((FRAME.x(x), FRAME.y(y)) for x, y in zip(xs[keep], ys[keep]))


def roc_plot(curve: dict | None, title: str, auroc, why_missing: str) -> Plot:
    """A ROC curve (``curve``: ``fpr``, ``tpr``) with the chance diagonal and its AUROC."""
    if not curve or not curve.get("fpr") or not curve.get("tpr"):
        return Plot(title, missing=why_missing)
    return Plot(
        title,
        xlabel="false positive rate",
        ylabel="true positive rate",
        **_unit_ticks(),
        chance=(FRAME.x(0), FRAME.y(0), FRAME.x(1), FRAME.y(1)),
        curve=_curve(curve["fpr"], curve["tpr"]),
        legend=f"AUROC {_fmt(auroc)}",
    )


def pro_plot(curve: dict | None, au_pro) -> Plot:
    """The PRO curve (``curve``: ``fpr``, ``pro``) with the FPR range of AU-PRO shaded and its limit marked."""
    title = "PRO curve (per-region overlap)"
    if not curve or not curve.get("fpr") or not curve.get("pro"):
        return Plot(title, missing="no ground-truth defect regions")
    x0, limit = FRAME.x(0), FRAME.x(PRO_LIMIT)
    return Plot(
        title,
        zone=(x0, limit - x0),
        xlabel="false positive rate",
        ylabel="PRO",
        **_unit_ticks(),
        markers=(Marker(limit, f"FPR limit {PRO_LIMIT}", limit + 4, "start"),),
        curve=_curve(curve["fpr"], curve["pro"]),
        legend=f"AU-PRO@{PRO_LIMIT} {_fmt(au_pro)}",
    )


def scores_plot(records: list[dict], threshold) -> Plot:
    """Dot plot of the image scores, good and defective on separate lanes, with the threshold."""
    title = "Image scores"
    scored = [(r, _number(r.get("score"))) for r in records]
    scored = [(r, s) for r, s in scored if s is not None and math.isfinite(s)]
    if not scored:
        return Plot(title, missing="no scores")
    values = [s for _, s in scored]
    t = _number(threshold)
    lo, hi = min(values + ([t] if t is not None else [])), max(values + ([t] if t is not None else []))
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    lanes = {0: ("good", 0.72, "dgood"), 1: ("defective", 0.28, "dbad")}
    dots = []
    for i, (rec, s) in enumerate(scored):
        _, y, css = lanes.get(rec.get("label"), ("?", 0.5, "dunknown"))
        jitter = ((i * 0.6180339887) % 1.0 - 0.5) * 0.22
        dots.append(Dot(FRAME.x(s, lo, hi), FRAME.y(y + jitter), css, f"{rec.get('name', '')}: {_fmt_score(s)}"))
    markers = ()
    if t is not None:
        x = FRAME.x(t, lo, hi)
        right = x > FRAME.left + FRAME.plot_width / 2  # label on the side with room
        markers = (Marker(x, f"threshold {_fmt_score(t)}", x - 4 if right else x + 4, "end" if right else "start"),)
    return Plot(
        title,
        xlabel="image score",
        xticks=tuple((FRAME.x(v, lo, hi), f"{v:.3g}") for v in np.linspace(lo, hi, 5)),
        lanes=tuple((FRAME.left + 6, FRAME.y(y + 0.17), text) for text, y, _ in lanes.values()),
        dots=tuple(dots),
        markers=markers,
    )


def _plots(result: dict, records: list[dict]) -> tuple[Plot, ...]:
    curves = result.get("curves") or {}
    overall = result.get("overall") or {}
    one_class = "needs good and defective images"
    return (
        roc_plot(curves.get("image_roc"), "Image-level ROC", overall.get("image_auroc"), one_class),
        roc_plot(
            curves.get("pixel_roc"),
            "Pixel-level ROC",
            overall.get("pixel_auroc"),
            "no ground-truth defect pixels" if curves.get("image_roc") else one_class,
        ),
        pro_plot(curves.get("pro"), overall.get("au_pro")),
        scores_plot(records, (result.get("threshold") or {}).get("image")),
    )


# ------------------------------------------------------------------------------------------ view data: the page
@dataclass(frozen=True)
class Threshold:
    """How the decision thresholds were set, for their paragraph; numbers formatted for display."""

    image: str
    pixel: str
    origin: str  # "command line", "held out", "calibrate" or "cross_fit"
    quantile: str = ""  # the rest: where a quantile of good images' scores set them (not from the command line)
    n_val: str = ""
    folds: str = ""
    false_alarm_rate: str = ""
    interval: tuple[str, str] | None = None  # the false-alarm rate's interval at level ``level`` percent
    level: str = ""
    pixel_quantile: str | None = None
    few: int | None = None  # the number of good images that set them, when under 10 (a warning)


@dataclass(frozen=True)
class MetricRow:
    """One row of the metrics table: a subset (``overall`` or a defect type) and its formatted metrics, each
    ``(text, tooltip or None)`` in the order of the columns."""

    name: str
    tip: str
    n_images: str
    cells: tuple[tuple[str, str | None], ...]
    overall: bool = False


@dataclass(frozen=True)
class Page:
    """Everything ``report.html.j2`` shows, as plain texts, formatted numbers, paths and plot coordinates."""

    method: str
    backbone: str
    created: str
    version: str
    n_records: int
    counts: tuple[tuple[str, str], ...]  # (name, value) of the test-set card
    threshold: Threshold | None  # None: the model has no threshold
    colour_range: tuple[str, str] | None  # the heatmaps' fixed colour scale; None: scaled per image
    settings: tuple[tuple[str, str], ...]  # the model's parameters
    metric_columns: tuple[tuple[str, str], ...]  # (label, tooltip)
    metrics: tuple[MetricRow, ...]
    notes: tuple[tuple[str, str], ...]  # (subset, note) for subsets whose metrics carry a note
    plots: tuple[Plot, ...]
    rows: tuple[Row, ...]
    skipped: tuple[str, ...]
    frame: Frame = FRAME
    reference_note: str | None = None  # one line: why no or grey normal references are shown


def page_view(result: dict, model, records: list[dict], thumbnails: list[Thumbnails], *, created: str = "") -> Page:
    """The view data of the whole page. Reads no file.

    ``records`` are shown in the given order (:func:`write_report` puts the highest score first) and
    ``thumbnails[i]`` are those of ``records[i]``; ``created`` is the date shown in the header. See
    :func:`write_report` for ``result`` and ``model``.
    """
    if len(thumbnails) != len(records):
        raise ValueError(f"page_view: {len(thumbnails)} thumbnails for {len(records)} records; give one per record")
    rng = getattr(model, "display_range_", None)
    metrics, notes = _metrics(result)
    return Page(
        method=str(getattr(model, "method", "?")),
        backbone=str(getattr(model, "backbone", "?")),
        created=created,
        version=__version__,
        n_records=len(records),
        counts=_counts(result, records),
        threshold=_threshold(result),
        colour_range=(_fmt_score(rng[0]), _fmt_score(rng[1])) if rng else None,
        settings=_settings(model),
        metric_columns=tuple((label, tip) for _, label, tip in _METRIC_COLUMNS),
        metrics=metrics,
        notes=notes,
        plots=_plots(result, records),
        rows=tuple(row_view(rank, rec, t) for rank, (rec, t) in enumerate(zip(records, thumbnails), start=1)),
        skipped=tuple(str(s) for s in result.get("skipped") or []),
        reference_note=_reference_note(result.get("explanations"), str(getattr(model, "method", "?"))),
    )


def _reference_note(explanations: dict | None, method: str) -> str | None:
    """One line on the normal references when they are not all shown: the method keeps none (PaDiM), the file
    has none, or the training images cannot be read (the model was moved). None otherwise, and without
    explanations (``evaluate_model(explain=False)``)."""
    if not explanations:
        return None
    if not explanations.get("method_keeps"):
        return (
            f"No normal references: a {method} model keeps none (PaDiM's Gaussians are per image position, not "
            "training patches); SOMAD and PatchCore models show one beside each flagged region."
        )
    if explanations.get("no_references"):
        return (
            "No normal references: this model file keeps none (fitted before they were kept, with tiles, or on a "
            "Ray cluster); refit it with `somad fit` to see one beside each flagged region."
        )
    if explanations.get("unreadable"):
        return (
            f"The training images cannot be read (looked for {explanations['unreadable']}; was the model or its "
            "training folder moved?): the references are named, their crops are grey."
        )
    return None


def _settings(model) -> tuple[tuple[str, str], ...]:
    try:
        params = dict(model.get_params())
    except Exception as exc:
        logger.warning("report: model settings unavailable (%s)", exc)
        params = {}
    return tuple((str(k), str(v)) for k, v in params.items())


def _threshold(result: dict) -> Threshold | None:
    thr = result.get("threshold") or {}
    image_t = thr.get("image")
    if image_t is None:
        return None
    shown = {"image": _fmt_score(image_t), "pixel": _fmt_score(thr.get("pixel"))}
    info = thr.get("info") or {}
    if info.get("source") == "command line":
        return Threshold(**shown, origin="command line")
    q, n_val = thr.get("quantile"), thr.get("n_val_images")
    rate = info.get("expected_false_alarm_rate", 1 - q if isinstance(q, (int, float)) else None)
    interval = info.get("false_alarm_rate_interval")
    pq = info.get("pixel_quantile")
    origin = "held out"
    if info.get("rule") == "cross_fit":
        origin = "cross_fit"
    elif info.get("source") == "calibrate":
        origin = "calibrate"
    return Threshold(
        **shown,
        origin=origin,
        quantile=str(q),
        n_val=str(n_val),
        folds=str(info.get("folds")),
        false_alarm_rate=_fmt(rate, 3),
        interval=(_fmt(interval[0], 3), _fmt(interval[1], 3)) if interval else None,
        level=f"{100 * FALSE_ALARM_LEVEL:.0f}",
        pixel_quantile=None if pq is None else str(pq),
        few=n_val if isinstance(n_val, int) and n_val < 10 else None,
    )


def _counts(result: dict, records: list[dict]) -> tuple[tuple[str, str], ...]:
    n = result.get("n_images")
    if not isinstance(n, dict):
        n = {
            "total": len(records),
            "good": sum(r.get("label") == 0 for r in records),
            "defective": sum(r.get("label") == 1 for r in records),
            "skipped": len(result.get("skipped") or []),
        }
    pairs = [
        ("test images", str(n.get("total", len(records)))),
        ("good", str(n.get("good", "–"))),
        ("defective", str(n.get("defective", "–"))),
        ("skipped (unreadable)", str(n.get("skipped", 0))),
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
    pairs.append(("mask comparison", _resolution_text(result.get("eval_resolution"))))
    timing = result.get("timing") or {}
    if _number(timing.get("predict_ms_per_image")) is not None:
        pairs.append(
            (
                "prediction time",
                f"{_fmt(timing.get('predict_seconds'), 1)} s, "
                f"{_fmt(timing.get('predict_ms_per_image'), 1)} ms per image",
            )
        )
    return tuple(pairs)


def _resolution_text(value) -> str:
    if value == "original":
        return "at each mask's original resolution (MVTec reference protocol)"
    if value == "model":
        return "at the model input resolution (masks resized and cropped like the images)"
    return str(value) if value else "unknown"


def _metrics(result: dict) -> tuple[tuple[MetricRow, ...], tuple[tuple[str, str], ...]]:
    """The rows of the metrics table (overall, then each defect type) and the notes some of them carry."""
    subsets = [("overall", result.get("overall") or {}, "all test images")]
    for name, m in sorted((result.get("per_defect_type") or {}).items()):
        subsets.append((name, m or {}, f"{name} images and all good images"))
    rows = []
    for name, m, tip in subsets:
        cells = []
        for key, _, _ in _METRIC_COLUMNS:
            v = m.get(key)
            title = None
            if isinstance(v, dict) and _number(v.get("threshold")) is not None:
                title = f"at threshold {_fmt_score(v['threshold'])}"
            elif v is None:
                title = "not available (needs good and defective images, masks or a threshold)"
            cells.append((_fmt(v), title))
        rows.append(MetricRow(str(name), tip, str(m.get("n_images", "–")), tuple(cells), overall=name == "overall"))
    notes = tuple((str(name), str(m["note"])) for name, m, _ in subsets if m.get("note"))
    return tuple(rows), notes


# ------------------------------------------------------------------------------------------ rendering
def _url(rel: PurePath | str) -> str:
    """A relative URL for a path inside the output folder, percent-encoded (the template escapes it)."""
    return quote(PurePath(rel).as_posix(), safe="/")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("somad.evaluation", "templates"),
        autoescape=True,  # every value is escaped: names come from the data set
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["url"] = _url
    env.filters["fixed"] = lambda value, digits: f"{value:.{digits}f}"
    return env


def render_page(page: Page) -> str:
    """The HTML of the report: ``templates/report.html.j2`` filled with ``page``."""
    return _environment().get_template("report.html.j2").render(page=page)
