"""Writing results: output folders that appear whole, heatmap overlays, masks, maps and CSV files.

One responsibility: turn predictions into files. An output folder is built in a temporary sibling folder
and renamed into place when complete, so an interrupted run never leaves a half-written result, and an
existing folder is replaced only with ``overwrite=True`` (it is kept until the new one is complete).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from .errors import SomadError
from .model_io import atomic_write, current_umask
from .progress import progress_bar


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` when the block finishes without error.

    On any error (including KeyboardInterrupt) the temporary folder is removed and an existing ``out`` is
    left as it was. The finished folder gets the permissions of a plain ``mkdir`` (``0o777`` less the umask).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SomadError(f"{out}: output folder already exists; pass --overwrite or choose another -o")
    if out.exists() and not out.is_dir():
        raise SomadError(f"{out}: exists and is not a folder; choose another -o")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise SomadError(f"{out}: cannot create the output folder ({exc.strerror or exc}); check the path") from exc
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the previous result back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SomadError(f"{out}: cannot write the output folder ({exc.strerror or exc}); "
                             "check the path, its permissions and free space") from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> Image.Image:
    """Colour (jet) overlay of ``anomaly_map`` ``(H, W)`` on ``image`` with a fixed colour scale ``[vmin, vmax]``."""
    from matplotlib import colormaps

    span = max(vmax - vmin, 1e-12)
    unit = np.clip((anomaly_map - vmin) / span, 0.0, 1.0)
    colour = colormaps["jet"](unit)[..., :3]
    base = np.asarray(image.convert("RGB").resize(anomaly_map.shape[::-1]), dtype=np.float32) / 255.0
    return Image.fromarray(np.uint8(np.round(255 * ((1 - alpha) * base + alpha * colour))))


def mask_image(anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """Binary mask PNG: 255 where the map exceeds ``threshold``."""
    return Image.fromarray(np.where(anomaly_map > threshold, 255, 0).astype(np.uint8), mode="L")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write a CSV file atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    atomic_write(path, write)


def write_predictions(model, items, out: Path, *, save_maps: bool, on_error: str, on_map=None):
    """Score ``items`` with a fitted ``model`` and write its result files into ``out``.

    Writes ``scores.csv`` (path, score, is_anomalous), ``heatmaps/<relpath>.png`` (colour overlay),
    ``masks/<relpath>.png`` (binary, when the model has a threshold), ``maps/<relpath>.npy`` (``save_maps``:
    float32 map at the original resolution) and ``skipped.csv`` (unreadable inputs).

    Parameters
    ----------
    on_map : callable(prediction, full_map), optional
        Called with each prediction and its map at the original resolution (used by evaluation).

    Returns
    -------
    rows : list of [name, score, is_anomalous]
    skipped : list of str, one message per unreadable input
    """
    from .features import to_original_resolution

    seen: dict[PurePath, str] = {}
    for item in items:
        rel = output_relpath(item.name, "")
        if rel in seen:
            raise SomadError(f"{item.name} and {seen[rel]} would write the same output files; rename one of them")
        seen[rel] = item.name
    rows = []
    geometry = model.extractor_.geometry
    threshold = model.image_threshold_
    bar = progress_bar(total=len(items), desc="predict", unit="img")
    try:  # close (erase) the bar on errors too, so that the error line starts a line of its own
        for pred in model.predict_iter(items, on_error=on_error):
            full = to_original_resolution(pred.map[None], geometry, [pred.original_size])[0]
            lo, hi = model.display_range_ or (float(full.min()), float(full.max()))  # no threshold: per-image scale
            save_png(heatmap_overlay(pred.image, full, lo, hi), out / "heatmaps" / output_relpath(pred.item.name, ".png"))
            if threshold is not None:
                save_png(mask_image(full, model.pixel_threshold_), out / "masks" / output_relpath(pred.item.name, ".png"))
            if save_maps:
                save_map(full, out / "maps" / output_relpath(pred.item.name, ".npy"))
            if on_map is not None:
                on_map(pred, full)
            rows.append([pred.item.name, f"{pred.score:.6f}", "" if threshold is None else int(pred.score > threshold)])
            bar.update(1)
    finally:
        bar.close()
    write_csv(out / "scores.csv", ["path", "score", "is_anomalous"], rows)
    skipped = list(model.skipped_)
    if skipped:
        write_csv(out / "skipped.csv", ["error"], [[m] for m in skipped])
    return rows, skipped
