"""``somad benchmark``: fit + evaluate every (method, category, setting) cell and tabulate accuracy and cost.

One responsibility: run the comparison and write ``OUT/results.csv`` and ``OUT/results.md``.

Each cell runs in two fresh subprocesses (fit, then predict/evaluate) so that peak RSS is measured per
phase and cells cannot influence each other. A finished cell is stored as ``OUT/cells/<id>.json`` and is
not recomputed unless ``--force``: an interrupted benchmark resumes where it stopped.

Predict latency is measured per image (batch size 1) after one warm-up image: ``predict ms`` is the median
of decode + preprocess + backbone + scoring + blur, ``backbone ms`` the median of the backbone alone and
``post ms`` the median of everything after it (node search, Mahalanobis, upsampling, blur).

SOMAD variants (``--somad-variants fast,exact``): ``fast`` is the default model (coarse-to-fine node search,
float16 training-feature store and node factors); ``exact`` is the unoptimised reference (exhaustive search,
float32 store and factors).
When SOMAD, PaDiM and PatchCore ran on a category, ``results.md`` ends with the performance targets as
ratios from the same run (:func:`target_table`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from somad.errors import DataError, SomadError
from somad.io.model_files import atomic_write_text
from somad.methods.base import Prediction
from somad.methods.somad import PRESETS
from somad.verdicts import check_frame

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["image_auroc", "pixel_auroc", "au_pro"]
#: At the model's saved thresholds (``somad.verdicts``), next to the best balanced accuracy over all thresholds.
DECISION_COLUMNS = [
    "balanced_accuracy",
    "best_balanced_accuracy",
    "split_half_balanced_accuracy",
    "pixel_f1",
    "pixel_f1_max",
    "region_overlap",
    "good_fp_rate",
]
#: A results.md cell whose figure the category cannot give (e.g. pixel metrics without ground-truth masks).
NOT_MEASURED = "n/a"
#: SOMAD's paper-size rows (the main cells): 56 named, the default ``auto`` (56 on a full category), or unset.
PAPER_SOM_SIZES = (56, "auto", None)
COST_COLUMNS = ["fit_s", "predict_ms", "backbone_ms", "post_ms", "fit_rss_gb", "predict_rss_gb", "model_mb"]
VARIANTS = {
    "fast": {"search": "ivf", "feature_dtype": "float16", "factor_dtype": "float16"},
    "exact": {"search": "exact", "feature_dtype": "float32", "factor_dtype": "float32"},
    "paper": {"search": "ivf", "feature_dtype": "float16", "factor_dtype": "float16", **PRESETS["paper"]},
}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0**2  # ru_maxrss is in KiB on Linux


def categories_of(root: Path) -> list[Path]:
    """An MVTec category, or every category below a data root (up to two levels deep)."""
    from somad.io.datasets import is_mvtec_category

    root = Path(root)
    if is_mvtec_category(root):
        return [root]
    found = sorted(
        {p.parent.parent for p in root.glob("*/train/good")} | {p.parent.parent for p in root.glob("*/*/train/good")}
    )
    found = [p for p in found if is_mvtec_category(p)]
    if not found:
        raise DataError(f"{root}: no MVTec category (CAT/train/good + CAT/test) found; pass a category or a data root")
    return found


def cell_id(cell: dict) -> str:
    parts = [cell["method"], cell["category_name"]] + [f"{k}{v}" for k, v in sorted(cell["grid"].items())]
    return "_".join(str(p).replace("/", "-") for p in parts)


# ----------------------------------------------------------------------------------------- one cell (subprocess)
def _run_fit(cell: dict) -> dict:
    import torch

    from somad.methods import METHODS

    torch.set_num_threads(cell["threads"])
    model = METHODS[cell["method"]](**{**cell["common"], **cell["params"]})  # a variant may set common ones (crop)
    t0 = time.perf_counter()
    model.fit(cell["category"])
    fit_s = time.perf_counter() - t0
    model.save(cell["model"])
    return {
        "fit_s": fit_s,
        "fit_rss_gb": _peak_rss_gb(),
        "model_mb": os.path.getsize(cell["model"]) / 1e6,
        "n_train": model.n_train_images_,
    }


def _timed_prediction(model, path):
    """Predict one image at batch size 1: (prediction, (total, backbone, after-backbone) seconds)."""
    from somad.io.images import load_image
    from somad.methods.base import ImageItem

    t0 = time.perf_counter()
    image = load_image(path)
    inputs, layout = model.extractor_.tiles(image)
    t1 = time.perf_counter()
    feats = model.extractor_(inputs)
    t2 = time.perf_counter()
    maps, scores = model._anomaly_maps(feats, [layout])
    t3 = time.perf_counter()
    pred = Prediction(
        ImageItem(Path(path).name, path=Path(path)),
        float(scores[0]),
        maps[0],
        (image.height, image.width),
        image,
        check_frame(image, model.gate_),
    )
    return pred, (t3 - t0, t2 - t1, t3 - t2)


def _run_latency(spec: dict) -> dict:
    """Interleaved latency: every model scores each image in turn (rotating the order), so a slower
    period of the machine affects all methods alike. Medians in ms per label."""
    import torch

    from somad.io.datasets import mvtec_test_samples
    from somad.methods import load

    torch.set_num_threads(spec["threads"])
    models = {label: load(path) for label, path in spec["models"].items()}
    samples = mvtec_test_samples(spec["category"])[: spec["n_images"] + 1]
    times = {label: [] for label in models}
    labels = list(models)
    with torch.no_grad():
        for i, s in enumerate(samples):
            order = labels[i % len(labels) :] + labels[: i % len(labels)]
            for label in order:
                t = _timed_prediction(models[label], s.path)[1]
                if i:  # the first image warms every model up
                    times[label].append(t)
    out = {}
    for label, ts in times.items():
        for j, name in enumerate(("predict_ms", "backbone_ms", "post_ms")):
            out.setdefault(label, {})[name] = 1000 * statistics.median(t[j] for t in ts)
    return {"n_images": len(samples) - 1, "methods": out}


def _run_predict(cell: dict) -> dict:
    import torch

    from somad.evaluation.protocol import prediction_metrics
    from somad.features.extractor import to_original_resolution
    from somad.io.datasets import mvtec_test_samples
    from somad.io.images import load_mask
    from somad.methods import load

    torch.set_num_threads(cell["threads"])
    model = load(cell["model"])
    samples = mvtec_test_samples(cell["category"])
    total, backbone, post, scores, maps, masks, flags, predicted = [], [], [], [], [], [], [], []
    with torch.no_grad():
        for i, s in enumerate(samples):
            pred, times = _timed_prediction(model, s.path)
            if i:  # the first image warms up the allocator and the kernels
                total.append(times[0])
                backbone.append(times[1])
                post.append(times[2])
            full = to_original_resolution(pred.map[None], model.extractor_.geometry, [pred.original_size])[0]
            scores.append(pred.score)
            maps.append(full)
            # As evaluate: a good image's mask is empty; a defective image without a mask file has none (None) and is
            # left out of the pixel metrics, which are None (n/a) when no defective image has a mask.
            if s.mask_path:
                masks.append(load_mask(s.mask_path, shape=full.shape))
            else:
                masks.append(np.zeros(full.shape, bool) if s.label == 0 else None)
            flags.append(model.verdict(pred))
            predicted.append(model.mask(pred, full))
    labels = np.array([s.label for s in samples])
    m = prediction_metrics(labels, np.array(scores), masks, maps, flags, predicted)
    return {
        **{k: m.get(k) for k in METRIC_COLUMNS},
        **{k: m.get(k) for k in DECISION_COLUMNS},
        "predict_ms": 1000 * statistics.median(total),
        "backbone_ms": 1000 * statistics.median(backbone),
        "post_ms": 1000 * statistics.median(post),
        "predict_rss_gb": _peak_rss_gb(),
        "n_test": len(samples),
    }


def _cell_main(argv: list[str]) -> int:
    phase, spec = argv
    cell = json.loads(Path(spec).read_text())
    logging.basicConfig(level=logging.WARNING)
    os.environ["SOMAD_NO_PROGRESS"] = "1"
    out = {"fit": _run_fit, "predict": _run_predict, "latency": _run_latency}[phase](cell)
    print("SOMAD_CELL_RESULT " + json.dumps(out))
    return 0


def _run_phase(phase: str, spec: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "somad.evaluation.benchmark", phase, str(spec)], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SOMAD_CELL_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SomadError(f"benchmark {phase} failed for {spec.stem}: {tail}")
    return json.loads(lines[-1].split(" ", 1)[1])


# ----------------------------------------------------------------------------------------- the grid
def expand_grid(methods: list[str], somad_grid: dict[str, list]) -> list[tuple[str, dict]]:
    """(method, grid values) for every cell; SOMAD expands over the ablation values (k, som_size)."""
    out = []
    for method in methods:
        if method == "somad" and somad_grid:
            keys = sorted(somad_grid)
            out.extend(
                (method, dict(zip(keys, values))) for values in itertools.product(*(somad_grid[k] for k in keys))
            )
        else:
            out.append((method, {}))
    return out


def run_benchmark(
    inputs: list[Path],
    out: Path,
    *,
    methods: list[str],
    common: dict,
    own: dict[str, dict],
    somad_grid: dict,
    force: bool = False,
    threads: int = 2,
) -> list[dict]:
    """Run (or resume) every cell and write the tables; returns the result rows.

    ``own[method]`` holds each method's own hyper-parameters; the SOMAD grid values override them.
    """
    cats = [c for root in inputs for c in categories_of(root)]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    rows = []
    for cat in cats:
        for method, grid in expand_grid(methods, somad_grid):
            params = {**own.get(method, {}), **grid}
            params.update(VARIANTS.get(params.pop("variant", None), {}))
            cell = {
                "method": method,
                "category": str(cat),
                "category_name": cat.name,
                "grid": grid,
                "params": params,
                "common": common,
                "threads": threads,
            }
            cid = cell_id(cell)
            done = out / "cells" / f"{cid}.json"
            if done.exists() and not force:
                rows.append(json.loads(done.read_text()))
                logger.info("%s: already done (use --force to recompute)", cid)
                continue
            # k only changes scoring: cells that differ only in k share one fitted model.
            fit_id = cell_id({**cell, "grid": {k: v for k, v in grid.items() if k != "k"}})
            cell["model"] = str(out / "models" / f"{fit_id}.safetensors")
            spec = out / "cells" / f"{cid}.spec.json"
            atomic_write_text(spec, json.dumps(cell))
            fit_done = out / "cells" / f"{fit_id}.fit.json"
            if fit_done.exists() and Path(cell["model"]).exists() and not force:
                fit = json.loads(fit_done.read_text())
            else:
                logger.info("%s: fit", cid)
                fit = _run_phase("fit", spec)
                atomic_write_text(fit_done, json.dumps(fit))
            logger.info("%s: predict + evaluate", cid)
            pred = _run_phase("predict", spec)
            row = {"method": method, "category": cat.name, **grid, **fit, **pred}
            atomic_write_text(done, json.dumps(row, indent=1))
            spec.unlink()
            rows.append(row)
    cells = _all_cells(out)
    for cat in cats:
        _interleaved_latency(out, cat, cells, force=force, threads=threads)
    write_tables(out, cells)
    return rows


def _interleaved_latency(
    out: Path, cat: Path, cells: list[dict], *, force: bool, threads: int, n_images: int = 60
) -> None:
    """Once SOMAD (56x56, k=4, default variant), PaDiM and PatchCore are fitted on ``cat``, time them
    interleaved image by image (``_run_latency``) into ``OUT/latency/<category>.json``."""
    done = out / "latency" / f"{cat.name}.json"
    if done.exists() and not force:
        return
    picked = {m: _main_cell(cells, m, cat.name) for m in ("somad", "padim", "patchcore")}
    if not all(picked.values()):
        return
    models = {m: str(out / "models" / f"{_fit_id(r)}.safetensors") for m, r in picked.items()}
    if not all(Path(p).exists() for p in models.values()):
        return
    logger.info("%s: interleaved latency of %s", cat.name, ", ".join(models))
    spec = out / "latency" / f"{cat.name}.spec.json"
    spec.parent.mkdir(exist_ok=True)
    atomic_write_text(
        spec, json.dumps({"models": models, "category": str(cat), "threads": threads, "n_images": n_images})
    )
    atomic_write_text(done, json.dumps(_run_phase("latency", spec), indent=1))
    spec.unlink()


def _fit_id(row: dict) -> str:
    """The fitted-model id of a result row (its cell id without k)."""
    grid = {k: row[k] for k in ("som_size", "variant") if row.get(k) is not None}
    return cell_id({"method": row["method"], "category_name": row["category"], "grid": grid})


def _main_cell(rows: list[dict], method: str, cat: str) -> dict | None:
    """The row of ``method`` on ``cat`` at SOMAD's paper settings (56x56, k=4, default variant)."""
    for r in rows:
        if (
            r["method"] == method
            and r["category"] == cat
            and (
                method != "somad"
                or (
                    r.get("som_size") in PAPER_SOM_SIZES
                    and r.get("k") in (4, None)
                    and r.get("variant") in ("fast", None)
                )
            )
        ):
            return r
    return None


def _latency(out: Path) -> dict:
    return (
        {
            p.stem: json.loads(p.read_text())
            for p in sorted((out / "latency").glob("*.json"))
            if not p.name.endswith(".spec.json")
        }
        if (out / "latency").is_dir()
        else {}
    )


def _all_cells(out: Path) -> list[dict]:
    """Every finished cell in ``out`` (also those of earlier invocations, e.g. another ablation grid)."""
    cells = [
        json.loads(p.read_text())
        for p in sorted((out / "cells").glob("*.json"))
        if not p.name.endswith((".spec.json", ".fit.json"))
    ]
    return sorted(
        cells,
        key=lambda r: (
            r["method"],
            r.get("variant") or "",
            str(r.get("som_size") or "").zfill(4),
            r.get("k") or 0,
            r["category"],
        ),
    )


def write_tables(out: Path, rows: list[dict]) -> None:
    """``results.csv`` (every cell) and ``results.md`` (per category and mean, like the paper's tables)."""
    keys = (
        ["method", "variant", "k", "som_size", "category"]
        + METRIC_COLUMNS
        + DECISION_COLUMNS
        + COST_COLUMNS
        + ["n_train", "n_test"]
    )
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([_fmt(r.get(k)) for k in keys])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown_table(rows, _latency(out)))


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _label(r: dict) -> str:
    extra = ", ".join(f"{k}={r[k]}" for k in ("som_size", "k", "variant") if r.get(k) is not None)
    return f"{r['method']} ({extra})" if extra else r["method"]


def markdown_table(rows: list[dict], latency: dict | None = None) -> str:
    """One table per figure family: accuracy per category + mean, then the cost columns."""
    cats = sorted({r["category"] for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    by = {(_label(r), r["category"]): r for r in rows}
    lines = []
    for metric, title in [
        ("image_auroc", "Image AUROC"),
        ("pixel_auroc", "Pixel AUROC"),
        ("au_pro", "AU-PRO (FPR 0.3)"),
        ("balanced_accuracy", "Balanced accuracy at the saved threshold"),
        ("best_balanced_accuracy", "Best balanced accuracy over all thresholds (oracle)"),
        (
            "split_half_balanced_accuracy",
            "Best threshold of one half of the test images, scored on the other half (mean of 200 splits)",
        ),
        ("pixel_f1", "Pixel F1 of the saved masks"),
        ("pixel_f1_max", "Pixel F1-max (oracle)"),
        ("region_overlap", "Mean IoU of each ground-truth region with the saved mask"),
        ("good_fp_rate", "False-positive pixel rate on good test images"),
    ]:
        lines += [f"### {title}", "", "| method | " + " | ".join(cats) + " | mean |", "|---" * (len(cats) + 2) + "|"]
        for lab in labels:
            vals = [by.get((lab, c), {}).get(metric) for c in cats]
            mean = float(np.mean([v for v in vals if v is not None])) if any(v is not None for v in vals) else None
            cells = [_fmt(v) if v is not None or (lab, c) not in by else NOT_MEASURED for v, c in zip(vals, cats)]
            lines.append(f"| {lab} | " + " | ".join(cells) + f" | {_fmt(mean)} |")
        lines.append("")
    if any(r.get(m) is None for r in rows for m in METRIC_COLUMNS + DECISION_COLUMNS):
        lines += [f"{NOT_MEASURED}: the category cannot give the figure (pixel metrics need ground-truth masks).", ""]
    lines += [
        "### Cost",
        "",
        "| method | category | fit s | predict ms/img | backbone ms/img | after-backbone ms/img "
        "| fit peak RSS GB | predict peak RSS GB | model MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lab in labels:
        for c in cats:
            r = by.get((lab, c))
            if r:
                lines.append(
                    f"| {lab} | {c} | {_fmt(r['fit_s'], 1)} | {_fmt(r['predict_ms'], 1)} | "
                    f"{_fmt(r['backbone_ms'], 1)} | {_fmt(r.get('post_ms'), 1)} | {_fmt(r['fit_rss_gb'], 2)} | "
                    f"{_fmt(r['predict_rss_gb'], 2)} | {_fmt(r['model_mb'], 1)} |"
                )
    targets = target_table(rows, latency)
    return "\n".join(lines) + "\n" + (f"\n{targets}" if targets else "")


@dataclass(frozen=True)
class Target:
    """One performance target of one category: ``value`` (a ratio, or points for accuracy) against ``limit``."""

    name: str
    value: float | None
    limit: float
    higher_is_better: bool = False

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def performance_targets(rows: list[dict], latency: dict | None = None) -> dict[str, dict]:
    """The performance targets of SOMAD at its paper settings (56x56, k=4, default variant), per category.

    Per category with a SOMAD, a PaDiM and a PatchCore cell: predict and fit time ratios, after-backbone
    time over backbone time, fit peak RSS against PaDiM's plus SOMAD's own arrays (its model file), and,
    when the ``exact`` variant ran too, the accuracy difference fast - exact in points. Predict figures come
    from the interleaved latency run (``latency[category]``) when there is one, else from the cells.
    Returns ``{category: {"targets": [Target, ...], "predict": {method: cell}, "source": str}}``.
    """
    out = {}
    for cat in sorted({r["category"] for r in rows}):
        s, pd, pc = (_main_cell(rows, m, cat) for m in ("somad", "padim", "patchcore"))
        if not (s and pd and pc):
            continue
        lat = (latency or {}).get(cat, {}).get("methods", {})
        ts, tpd, tpc = (lat.get(m, r) for m, r in (("somad", s), ("padim", pd), ("patchcore", pc)))
        ref = next(
            (
                r
                for r in rows
                if r["method"] == "somad"
                and r["category"] == cat
                and r.get("som_size") in PAPER_SOM_SIZES
                and r.get("k") == 4
                and r.get("variant") == "exact"
            ),
            None,
        )
        after = ts["post_ms"] / ts["backbone_ms"] if ts.get("post_ms") else None
        targets = [
            Target("predict ms: SOMAD / PaDiM", ts["predict_ms"] / tpd["predict_ms"], 1.25),
            Target("predict ms: SOMAD / PatchCore", ts["predict_ms"] / tpc["predict_ms"], 1.0),
            Target("after-backbone / backbone", after, 0.5),
            Target("fit s: SOMAD / PaDiM", s["fit_s"] / pd["fit_s"], 3.0),
            Target("fit s: SOMAD / PatchCore", s["fit_s"] / pc["fit_s"], 0.5),
            Target(
                "fit RSS: SOMAD / (PaDiM + SOMAD arrays)",
                s["fit_rss_gb"] / (pd["fit_rss_gb"] + s["model_mb"] / 1024),
                1.0,
            ),
        ]
        if ref:
            targets += [Target(f"{m}: fast - exact, points", 100 * (s[m] - ref[m]), -0.5, True) for m in METRIC_COLUMNS]
        source = f"interleaved latency run, {latency[cat]['n_images']} images" if lat else "the cells above"
        out[cat] = {"targets": targets, "predict": {"somad": ts, "padim": tpd, "patchcore": tpc}, "source": source}
    return out


def target_table(rows: list[dict], latency: dict | None = None) -> str:
    """:func:`performance_targets` as markdown: one table per category (empty without all three methods)."""
    out = []
    for cat, found in performance_targets(rows, latency).items():
        ts, tpd, tpc = (found["predict"][m] for m in ("somad", "padim", "patchcore"))
        out += [
            f"#### Targets: {cat}",
            "",
            f"Predict figures from the {found['source']}: SOMAD {ts['predict_ms']:.1f} "
            f"(backbone {ts['backbone_ms']:.1f} + after {_fmt(ts.get('post_ms'), 1)}), PaDiM {tpd['predict_ms']:.1f}, "
            f"PatchCore {tpc['predict_ms']:.1f} ms/img.",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for g in found["targets"]:
            rule = f"{'>=' if g.higher_is_better else '<='} {g.limit:g}"
            value = f"{g.value:+.2f}" if g.higher_is_better and g.value is not None else _fmt(g.value, 2)
            out.append(f"| {g.name} {rule} | {value} | {'yes' if g.met else 'no'} |")
        out.append("")
    return ("### Performance targets (same run)\n\n" + "\n".join(out)) if out else ""


# ----------------------------------------------------------------------------------------- CLI
def _int_list(text: str, *words: str) -> list:
    """Comma-separated integers, or any of ``words`` (e.g. ``auto``)."""
    try:
        return [v if v in words else int(v) for v in text.split(",") if v]
    except ValueError:
        allowed = "".join(f" or {w!r}" for w in words)
        raise SomadError(f"expected comma-separated integers{allowed}, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(_cell_main(sys.argv[1:]))
