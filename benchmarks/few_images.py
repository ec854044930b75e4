"""Accuracy and verdicts from few good images: fits on seeded subsets of ``train/good``, evaluated on ``test/``.

    python benchmarks/few_images.py CATEGORY_DIR [...] [--n 5,10,20,50,all] [--seeds 0,1,2]
        [--methods somad,patchcore,padim] [--param som_size=28 ...] [--out few.jsonl] [--plot curve.png]

For each category, method, size ``n`` and seed: a fit on ``n`` images drawn from ``train/good`` without
replacement (``numpy.random.default_rng(seed)``; the category's ``validation/good`` folder is not used, as a
user with ``n`` good images would not have one), then ``somad.evaluation.protocol.evaluate_model`` on the
category's test images. ``all`` fits on the category itself (``train/good``, and ``validation/good`` where it
has one), once. One JSON line per run is appended to ``--out`` (a finished run is not repeated: the script
resumes); the table printed at the end gives the mean and the spread (min-max) over the seeds of image AUROC,
AU-PRO, the share of good test images flagged at the saved threshold ("false alarms"), the share of defective
ones flagged, and the threshold's rule and expected false-alarm rate (``threshold_info_``). ``--param`` sets a
parameter of every method that has it (``key=value``; numbers and ``none`` are parsed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("SOMAD_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _value(text: str):
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_one(category: Path, method: str, n: int | None, seed: int, params: dict) -> dict:
    """Fit ``method`` on ``n`` seeded images of ``category``'s ``train/good`` (``None``: the category) and
    evaluate it on the test images."""
    from somad.evaluation.protocol import evaluate_model, load_test_samples
    from somad.io.images import list_images
    from somad.methods import METHODS

    cls = METHODS[method]
    own = {k: v for k, v in params.items() if k in cls._get_param_names()}
    good = list_images(category / "train" / "good")
    if n is None or n >= len(good):
        images, n = category, len(good)
    else:
        pick = np.sort(np.random.default_rng(seed).choice(len(good), n, replace=False))
        images = [str(good[i]) for i in pick]
    t0 = time.perf_counter()
    model = cls(**own).fit(images)
    fit_s = time.perf_counter() - t0
    result = evaluate_model(model, load_test_samples(category))
    flagged = {0: [], 1: []}
    for r in result["records"]:
        flagged[int(r["label"])].append(bool(r["is_anomalous"]))
    info = model.threshold_info_ or {}
    return {
        "n_train": model.n_train_images_,
        "fit_s": round(fit_s, 1),
        "image_auroc": result["overall"]["image_auroc"],
        "au_pro": result["overall"].get("au_pro"),
        "false_alarms": float(np.mean(flagged[0])) if model.image_threshold_ is not None else None,
        "defects_flagged": float(np.mean(flagged[1])) if model.image_threshold_ is not None else None,
        "threshold_rule": info.get("rule"),
        "threshold_images": info.get("n_images"),
        "expected_false_alarm_rate": info.get("expected_false_alarm_rate"),
        "false_alarm_rate_interval": info.get("false_alarm_rate_interval"),
    }


def table(rows: list[dict]) -> str:
    """Markdown: one line per (category, method, n), mean [min-max] over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["method"], r["n"]), []).append(r)

    def cell(runs, key, pct=False):
        v = [r[key] for r in runs if r.get(key) is not None]
        if not v:
            return "-"
        f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.3f}")
        return f(np.mean(v)) + (f" [{f(min(v))}-{f(max(v))}]" if len(v) > 1 else "")

    lines = [
        "| category | method | n | seeds | image AUROC | AU-PRO | false alarms | defects flagged | threshold "
        "| expected false alarms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(groups, key=lambda k: (k[0], k[1], float("inf") if k[2] == "all" else int(k[2])))
    for key in order:
        runs = groups[key]
        rule = ", ".join(sorted({f"{r.get('threshold_rule')} ({r.get('threshold_images')})" for r in runs}))
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {len(runs)} | {cell(runs, 'image_auroc')} | {cell(runs, 'au_pro')} "
            f"| {cell(runs, 'false_alarms', True)} | {cell(runs, 'defects_flagged', True)} | {rule} "
            f"| {cell(runs, 'expected_false_alarm_rate', True)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Image AUROC and AU-PRO against the number of good images, one line per (category, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple, dict] = {}
    for r in rows:
        series.setdefault((r["category"], r["method"]), {}).setdefault(r["n_train"], []).append(r)
    for (cat, method), by_n in sorted(series.items()):
        ns = sorted(by_n)
        for ax, key in zip(axes, ("image_auroc", "au_pro")):
            means = [np.mean([r[key] for r in by_n[n] if r.get(key) is not None] or [np.nan]) for n in ns]
            ax.plot(ns, means, marker="o", label=f"{cat} {method}")
    sizes = sorted({r["n_train"] for r in rows})
    for ax, title in zip(axes, ("image AUROC", "AU-PRO (FPR 0.3)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("good training images")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("categories", nargs="+", type=Path)
    p.add_argument("--n", default="5,10,20,50,all", help="training-set sizes; 'all' = the category itself")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="somad,patchcore,padim")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("few_images.jsonl"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = dict((kv.split("=", 1)[0], _value(kv.split("=", 1)[1])) for kv in args.param)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    seen = {(r["category"], r["method"], r["n"], r["seed"], json.dumps(r["params"], sort_keys=True)) for r in done}
    for category in args.categories:
        for method in args.methods.split(","):
            for n in args.n.split(","):
                for seed in [0] if n == "all" else [int(s) for s in args.seeds.split(",")]:
                    key = (category.name, method, n, seed, json.dumps(params, sort_keys=True))
                    if key in seen:
                        continue
                    row = run_one(category, method, None if n == "all" else int(n), seed, params)
                    row = {"category": category.name, "method": method, "n": n, "seed": seed, "params": params, **row}
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
                    seen.add(key)
                    print(json.dumps(row), flush=True)
    wanted = {c.name for c in args.categories}
    rows = [r for r in done if r["category"] in wanted and r["params"] == params]
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
