"""Writing results: output folders that appear whole, heatmap overlays, masks, maps and CSV files.

One responsibility: turn predictions into files. An output folder is built in a temporary sibling folder
and renamed into place when complete, so an interrupted run never leaves a half-written result, and an
existing folder is replaced only with ``overwrite=True`` (it is kept until the new one is complete).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageDraw

from somad.errors import ImageLoadError, SomadError
from somad.io.images import load_image
from somad.io.model_files import ANOTHER_RUN, atomic_write, current_umask, remove_leftovers, temp_prefix
from somad.progress import progress_bar
from somad.verdicts import REGION_COLUMNS, normalized_or_none, regions

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` when the block finishes without error.

    On any error (including KeyboardInterrupt) the temporary folder is removed and an existing ``out`` is
    left as it was. The finished folder gets the permissions of a plain ``mkdir`` (``0o777`` less the umask).
    ``out`` may never be, or contain, one of ``inputs`` (files or folders the command reads): with
    ``overwrite`` it would be deleted.
    """
    out = Path(out)
    _refuse_inputs(out, inputs)
    _refuse_working_folder(out)
    if out.exists() and not out.is_dir():  # before the --overwrite hint: overwriting a file is refused too
        raise SomadError(f"{out}: exists and is not a folder; choose another -o")
    if out.exists() and not overwrite:
        raise SomadError(f"{out}: output folder already exists; pass --overwrite or choose another -o")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out, ".partial")
        remove_leftovers(out, ".old")
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise SomadError(f"{out}: cannot create the output folder ({exc.strerror or exc}); check the path") from exc
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if overwrite and out.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        # One atomic step: renaming a folder onto a non-empty one fails (ENOTEMPTY), so without --overwrite the
        # results another run placed since the check above are never replaced.
        os.rename(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the previous result back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise SomadError(ANOTHER_RUN.format(path=out)) from exc
        if isinstance(exc, OSError):
            raise SomadError(
                f"{out}: cannot write the output folder ({exc.strerror or exc}); "
                "check the path, its permissions and free space"
            ) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _refuse_inputs(out: Path, inputs) -> None:
    for entry in inputs:
        if inside(entry, out):
            raise SomadError(
                f"{out}: is or contains the input {entry}; write the results to another -o "
                "(an output folder is replaced whole, and nothing read is ever deleted)"
            )


def _refuse_working_folder(out: Path) -> None:
    """An output folder is replaced whole, by a rename: the current folder (``-o .``) or one above it cannot be."""
    try:
        here = Path.cwd()
    except OSError:  # the current folder was removed
        return
    if inside(here, out):
        raise SomadError(
            f"{out}: is the current folder{'' if inside(out, here) else ' or one above it'}, which an output folder "
            "cannot be (it is written whole and renamed into place); name a new folder, e.g. -o results"
        )


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved: links and ``..`` followed)."""
    try:
        p, f = Path(path).resolve(), Path(folder).resolve()
    except OSError:
        return False
    return p == f or f in p.parents


def output_relpath(name: str, suffix: str) -> PurePath:
    """Relative output path for an input name: the extension replaced, never escaping the output folder."""
    parts = [p for p in PurePath(name).parts if p not in ("", ".", "..", "/")]
    rel = PurePath(*parts) if parts else PurePath("image")
    return rel.with_suffix(suffix)


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def save_map(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(array, dtype=np.float32), allow_pickle=False)


#: Overlays are blended a band of rows at a time, each band about this many pixels.
_BAND_PIXELS = 1 << 18


@functools.lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    """matplotlib's ``jet`` colour map at its 256 entries, ``(256, 3)`` float64 in ``[0, 1]``."""
    from matplotlib import colormaps

    return colormaps["jet"](np.arange(256))[:, :3]  # integers index the table directly


def heatmap_overlay(
    image: Image.Image, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> Image.Image:
    """Colour (jet) overlay of ``anomaly_map`` ``(H, W)`` on ``image`` with a fixed colour scale ``[vmin, vmax]``.

    Built a band of rows at a time into one ``uint8`` image: about 3 bytes per pixel plus one band in float
    (a float64 colour image of the whole frame would take about 120 bytes per pixel). The colours are
    matplotlib's ``jet`` as ``colormaps["jet"](unit)`` gives them (its 256 entries, indexed the same way).
    """
    height, width = anomaly_map.shape
    rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height))
    base = np.asarray(rgb)
    out = np.empty((height, width, 3), dtype=np.uint8)
    span = max(vmax - vmin, 1e-12)
    lut = _jet()
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        unit = np.clip((anomaly_map[band] - vmin) / span, 0.0, 1.0)
        index = np.minimum((unit * 256).astype(np.intp), 255)  # as matplotlib's Colormap.__call__
        blend = (1 - alpha) * (base[band].astype(np.float32) / 255.0) + alpha * lut[index]
        out[band] = np.round(255 * blend).astype(np.uint8)
    return Image.fromarray(out)


def mask_image(mask: np.ndarray) -> Image.Image:
    """Binary mask PNG: 255 on the predicted defect pixels (one byte per pixel, no wider temporary)."""
    return Image.fromarray(np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255), mode="L")


#: A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A value as written to CSV: text that a spreadsheet would run as a formula is prefixed with ``'``
    (OWASP's advice); numbers are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write a UTF-8 CSV file atomically. File names that are not valid UTF-8 (bytes the file system allowed)
    are written with those bytes escaped (``\\udcNN``, Python's surrogate escape), and formula-like text cells
    are neutralised."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([csv_cell(v) for v in row] for row in rows)

    atomic_write(path, write)


def _listed(item, skipped: list[str]) -> bool:
    """Is ``item`` among the ``skipped`` messages (each starts with the path or name of its image)?"""
    keys = {item.name} | ({str(item.path)} if item.path is not None else set())
    return any(m.split(": ", 1)[0] in keys for m in skipped)


def _write_one(
    model, pred, out: Path, *, save_maps: bool, on_map, explain: Explanations | None = None, references=True
):
    """The output files of one prediction; returns its ``scores.csv`` row and its ``regions.csv`` rows (with their
    normal references, where the model keeps them: :func:`normal_references`). ``explain``: also write one explanation
    image per region (:func:`explanation_image`), the run's record of them."""
    full = model.original_map(pred)
    lo, hi = model.display_range_ or (float(full.min()), float(full.max()))  # no threshold: per-image scale
    save_png(heatmap_overlay(pred.image, full, lo, hi), out / "heatmaps" / output_relpath(pred.item.name, ".png"))
    flagged = model.verdict(pred)
    mask = model.mask(pred, full)
    found = []
    if mask is not None:
        save_png(mask_image(mask), out / "masks" / output_relpath(pred.item.name, ".png"))
        found_regions = regions(mask, full)
        peaks = [peak_pixel(mask, full, r) for r in found_regions]
        t0 = time.perf_counter()
        refs = normal_references(model, pred, peaks) if references or explain is not None else [None] * len(peaks)
        found = [
            [pred.item.name, i] + r.as_row() + _reference_cells(ref)
            for i, (r, ref) in enumerate(zip(found_regions, refs), 1)
        ]
        if explain is not None:
            _write_explanations(model, pred, mask, found_regions, peaks, refs, out, explain)
            explain.seconds += time.perf_counter() - t0
    if save_maps:
        save_map(full, out / "maps" / output_relpath(pred.item.name, ".npy"))
    if on_map is not None:
        on_map(pred, full, flagged)
    row = [pred.item.name, f"{pred.score:.6f}", "" if flagged is None else int(flagged), pred.status]
    return row + [_normalized(model, pred.score)], found


def _normalized(model, score: float) -> str:
    """The ``normalized_score`` cell (``somad.verdicts.normalized_or_none``); empty where the model's thresholds
    do not record what it needs."""
    n = normalized_or_none(score, getattr(model, "image_threshold_", None), getattr(model, "threshold_info_", None))
    return "" if n is None else f"{n:.6f}"


SCORE_COLUMNS = ["path", "score", "is_anomalous", "status", "normalized_score"]
#: A region's normal reference (``SOMAD.region_references``): a training image (relative to the training folder),
#: the centre of its patch there in its pixels, and the distance of the region's peak patch to its nearest node.
REFERENCE_COLUMNS = ["reference_image", "reference_x", "reference_y", "reference_distance"]
REGION_FILE_COLUMNS = ["path", "region"] + REGION_COLUMNS + REFERENCE_COLUMNS


def peak_pixel(mask: np.ndarray, full: np.ndarray, region) -> tuple[int, int]:
    """The ``(x, y)`` of the highest map value among the mask pixels of ``region``'s bounding box."""
    box = (slice(region.y0, region.y1), slice(region.x0, region.x1))
    values = np.where(mask[box], full[box], -np.inf)
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return region.x0 + int(x), region.y0 + int(y)


def normal_references(model, pred, peaks) -> list:
    """Each region's normal reference ``(image, x, y, distance)``, or ``None`` each where the model keeps none
    (any model without ``region_references``: PaDiM, an exported model; SOMAD and PatchCore files from before, or
    fitted tiled or distributed)."""
    ask = getattr(model, "region_references", None)
    refs = ask(pred, peaks) if ask is not None and peaks else None
    return list(refs) if refs is not None else [None] * len(peaks)


def _reference_cells(ref) -> list:
    if ref is None:
        return [""] * len(REFERENCE_COLUMNS)
    name, x, y, distance = ref
    return [name, int(x), int(y), f"{distance:.6f}"]


#: Side, in pixels, of the shorter panel of an explanation image (small crops are enlarged to it).
EXPLANATION_SIDE = 256
_OUTLINE = (255, 32, 32)
_REFERENCE_OUTLINE = (255, 220, 0)


def _inside(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) shifted to lie inside a ``width x height`` image where it can, then cut to it."""
    x0, y0, x1, y1 = box
    dx = max(0, -x0) - max(0, x1 - width)
    dy = max(0, -y0) - max(0, y1 - height)
    return max(0, x0 + dx), max(0, y0 + dy), min(width, x1 + dx), min(height, y1 + dy)


def explanation_image(pred, mask: np.ndarray, region, peak, ref, reference: Image.Image | None, title: str):
    """The region's crop with its outline (red) beside the same-sized crop of the normal reference ``reference``
    around its patch centre (the peak placed where the reference patch is, the outline drawn there in yellow), both
    enlarged alike, labelled.
    ``reference=None``: the reference panel says it could not be read."""
    from scipy import ndimage

    margin = max(16, (region.x1 - region.x0) // 2, (region.y1 - region.y0) // 2)
    height, width = mask.shape
    box = (max(0, region.x0 - margin), max(0, region.y0 - margin))
    box += (min(width, region.x1 + margin), min(height, region.y1 + margin))
    test = np.array(pred.image.convert("RGB").crop(box))
    labels, _ = ndimage.label(mask[box[1] : box[3], box[0] : box[2]], structure=np.ones((3, 3), dtype=bool))
    inside = labels == labels[peak[1] - box[1], peak[0] - box[0]]  # this region only: the peak is one of its pixels
    edge = inside & ~ndimage.binary_erosion(inside, border_value=0)
    test[edge] = _OUTLINE
    left = Image.fromarray(test)
    scale = max(1.0, EXPLANATION_SIDE / min(left.size))
    size = (round(left.width * scale), round(left.height * scale))
    left = left.resize(size, Image.NEAREST)
    if reference is not None:
        dx, dy = ref[1] - peak[0], ref[2] - peak[1]  # the test crop moved so that the peak lands on the reference
        moved = _inside((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy), reference.width, reference.height)
        right = np.array(reference.convert("RGB").crop(moved))
        ys, xs = np.nonzero(edge)  # the region's outline where it would lie on the reference (yellow)
        ys, xs = ys + box[1] + dy - moved[1], xs + box[0] + dx - moved[0]
        keep = (ys >= 0) & (ys < right.shape[0]) & (xs >= 0) & (xs < right.shape[1])
        right[ys[keep], xs[keep]] = _REFERENCE_OUTLINE
        right = Image.fromarray(right)
        right = right.resize((round(right.width * scale), round(right.height * scale)), Image.NEAREST)
        label = f"normal reference: {ref[0]} at ({ref[1]}, {ref[2]}), distance {ref[3]:.3g}"
    else:
        right = Image.new("RGB", size, (64, 64, 64))
        label = f"normal reference {ref[0]}: not readable"
    band = 18
    canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + 2 * band), "white")
    canvas.paste(left, (0, band))
    canvas.paste(right, (left.width + 8, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black")
    draw.text((2, canvas.height - band + 3), label, fill="black")
    return canvas


@dataclass(frozen=True)
class Explained:
    """One explanation image :func:`write_predictions` wrote: the image's region ``region`` (from 1, as in
    ``regions.csv``), the file (relative to the output folder), the region's peak value and normal reference
    ``(training image, x, y, distance)``, and whether that training image could be read (its crop is shown)."""

    region: int
    path: PurePath
    peak: float
    reference: tuple[str, int, int, float]
    readable: bool


@dataclass
class Explanations:
    """A run's explanations (:func:`write_predictions` with ``explain``), filled as it goes: each image's
    :class:`Explained` regions by its name, whether the model keeps no references (``no_references``), where the
    first training image that could not be read was looked for (``unreadable``; the model was moved), and the
    seconds spent on the references and the images (``seconds``: evaluation leaves them out of its timing)."""

    regions: dict[str, list[Explained]] = field(default_factory=dict)
    no_references: bool = False
    unreadable: str | None = None
    seconds: float = 0.0
    last_image: tuple = (None, None)  # (name, image or None): consecutive regions often share their reference


def explanation_title(pred, number: int, region) -> str:
    """The label above region ``number`` (from 1, as in ``regions.csv``) of a prediction's explanation image."""
    return f"{pred.item.name} region {number}: peak {region.peak:.3g}"


def reference_image(model, name: str) -> tuple[Image.Image | None, str]:
    """Training image ``name`` (a region reference's) as the model's fit read it, and where it was looked for;
    ``None`` when it cannot be read (the model was moved, or it was an image held in memory at fit)."""
    path = model.reference_path(name)
    try:
        image = load_image(path) if path is not None else None
    except (ImageLoadError, OSError):
        image = None
    return image, str(path) if path is not None else f"{name} (an image held in memory at fit)"


def _write_explanations(model, pred, mask, found_regions, peaks, refs, out: Path, state: Explanations) -> None:
    """One image per region under ``out/explanations`` (:func:`explanation_image`). A training image that cannot
    be read (the model was moved) is said once per run, in one line; its panels say so and the rest is written."""
    if any(ref is None for ref in refs):
        if not state.no_references:
            logger.warning(
                "no explanations: this model keeps no normal references (SOMAD and PatchCore models fitted locally "
                "and untiled by somad >= 0.9 (PatchCore: 0.10) keep them; PaDiM never does); refit it with "
                "`somad fit` to explain its regions"
            )
            state.no_references = True
        return
    rel = output_relpath(pred.item.name, "")
    written = state.regions.setdefault(pred.item.name, [])
    for i, (region, peak, ref) in enumerate(zip(found_regions, peaks, refs), 1):
        name, reference = state.last_image
        if name != ref[0]:
            reference, where = reference_image(model, ref[0])
            if reference is None and state.unreadable is None:
                logger.warning("the training image %s cannot be read: explanations show no reference", where)
                state.unreadable = where
            state.last_image = (ref[0], reference)
        image = explanation_image(pred, mask, region, peak, ref, reference, explanation_title(pred, i, region))
        target = PurePath("explanations", rel.with_name(f"{rel.name}_region{i}.png"))
        save_png(image, out / target)
        written.append(Explained(i, target, float(region.peak), tuple(ref), reference is not None))


def write_predictions(
    model, items, out: Path, *, save_maps: bool, on_error: str, on_map=None, explain=False, references=True
):
    """Score ``items`` with a fitted ``model`` and write its result files into ``out``. ``model``: anything that
    scores as a detector does (``predict_iter``, ``original_map``, ``verdict``, ``mask``, the thresholds), a
    native detector or an exported one (``somad.runtime.OnnxDetector``); this module does not import torch.

    Writes ``scores.csv`` (path, score, is_anomalous, status, normalized_score: the [0, 1] scale with the
    threshold at 0.5, empty for models from before 0.7), ``regions.csv`` (one row per connected
    predicted defect region of each flagged image: area in pixels, bounding box ``x0, y0, x1, y1`` with
    exclusive ends, peak and mean map value, at the original resolution, and its normal reference
    (:data:`REFERENCE_COLUMNS`, empty cells for models that keep none)), ``explanations/<relpath>_regionN.png``
    (``explain``: each region beside its normal reference), ``heatmaps/<relpath>.png`` (colour
    overlay), ``masks/<relpath>.png`` (binary, when the model has a threshold), ``maps/<relpath>.npy``
    (``save_maps``: float32 map at the original resolution) and ``skipped.csv`` (unreadable inputs).
    Decisions and masks follow ``somad.verdicts``: a mask is non-empty exactly when the image is flagged.
    "Original resolution" is the decoded image's: an image of more than ``images.MAX_DECODED_PIXELS`` pixels is
    reduced on decoding, and its outputs are at that size. Memory per image is a few bytes per output pixel
    (uint8 overlays built in bands, a float32 map). An image whose outputs run out of memory is skipped
    (``on_error="skip"``, listed in ``skipped.csv``) or fails in one line naming it; running out of memory while
    scoring a batch fails in one line naming its first image.

    Parameters
    ----------
    on_map : callable(prediction, full_map, is_anomalous), optional
        Called with each prediction, its map at the original resolution and its verdict (used by evaluation).
    explain : bool or Explanations, default False
        Write the explanation images (and fill the reference columns); an :class:`Explanations` given here records
        what was written (the evaluation report shows it).
    references : bool, default True
        Fill the reference columns of ``regions.csv`` (SOMAD: one more backbone pass per flagged image, about 7%
        of metal_plate's predict time where 71 of 97 images are flagged); ``False`` leaves them empty, unless
        ``explain`` (the benchmark, whose timings compare the methods' scoring alone).

    Returns
    -------
    rows : list of [name, score, is_anomalous, status, normalized_score]
    skipped : list of str, one message per unreadable input
    """
    seen: dict[PurePath, str] = {}
    for item in items:
        rel = output_relpath(item.name, "")
        if rel in seen:
            raise SomadError(f"{item.name} and {seen[rel]} would write the same output files; rename one of them")
        seen[rel] = item.name
    rows, region_rows, skipped = [], [], []
    explain_state = explain if isinstance(explain, Explanations) else Explanations() if explain else None
    done: set[str] = set()
    bar = progress_bar(total=len(items), desc="predict", unit="img")
    try:  # close (erase) the bar on errors too, so that the error line starts a line of its own
        for pred in model.predict_iter(items, on_error=on_error, skipped=skipped):
            done.add(pred.item.name)
            try:
                row, found = _write_one(
                    model, pred, out, save_maps=save_maps, on_map=on_map, explain=explain_state, references=references
                )
            except MemoryError:
                h, w = pred.original_size
                message = (
                    f"{pred.item.name}: not enough memory to write its outputs ({w}x{h} pixels); "
                    "free memory, or remove it or use --on-error skip"
                )
                if on_error == "fail":
                    raise SomadError(message) from None
                for folder, suffix in (("heatmaps", ".png"), ("masks", ".png"), ("maps", ".npy")):
                    (out / folder / output_relpath(pred.item.name, suffix)).unlink(missing_ok=True)  # no half result
                logger.warning("skipped %s", message)
                skipped.append(message)
                continue
            rows.append(row)
            region_rows.extend(found)
            bar.update(1)
    except MemoryError:
        # Decoding turns a MemoryError into an ImageLoadError of its image; this one came from scoring a batch.
        first = next((it.name for it in items if it.name not in done and not _listed(it, skipped)), "an image")
        raise SomadError(
            f"{first}: not enough memory to score it (in a batch of {getattr(model, 'batch_size', 'several')}); "
            "lower --batch-size, free memory, or remove it"
        ) from None
    finally:
        bar.close()
    write_csv(out / "scores.csv", SCORE_COLUMNS, rows)
    if model.image_threshold_ is not None:
        write_csv(out / "regions.csv", REGION_FILE_COLUMNS, region_rows)
    if skipped:
        write_csv(out / "skipped.csv", ["error"], [[m] for m in skipped])
    return rows, skipped
