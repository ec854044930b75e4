"""Scale check: SOMAD at the paper's full feature setting fits and predicts within a memory budget.

    python benchmarks/scale_check.py [--out DIR] [--n-train 800] [--dims 550] [--budget-gb 8]

Writes a synthetic training set (``--n-train`` good images at ``--size`` pixels, plus a few test images),
then runs ``somad fit`` and ``somad predict`` as separate processes with Wide-ResNet50-2 (random weights:
memory does not depend on them), ``--dims`` channels, a 56x56 SOM and k=4, and prints each phase's wall
time and peak RSS (from ``wait4``) against the budget, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str]) -> dict:
    """Run ``cmd`` to completion; wall seconds and the child's own peak RSS in GiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    return {"s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--dims",
        default="550",
        help="channels kept ('none': the default, all channels up to 550; 1792: all of Wide-ResNet50-2's)",
    )
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--som-size", type=int, default=56)
    p.add_argument("--budget-gb", type=float, default=8.0)
    p.add_argument("--extra", default="", help="extra `somad fit` options, e.g. '--search exact'")
    args = p.parse_args(argv)

    from somad.io.synthetic import make_synthetic_category

    root = Path(args.out or tempfile.mkdtemp(prefix="somad-scale-"))
    t0 = time.perf_counter()
    cat = make_synthetic_category(
        root / "data", n_train=args.n_train, n_test_good=5, n_test_defect=5, size=args.size, overwrite=True
    )
    make_s = time.perf_counter() - t0
    somad = [sys.executable, "-c", "import sys; from somad.cli import main; sys.exit(main())", "-q"]
    model = root / "model.safetensors"
    common = [
        "--backbone",
        args.backbone,
        "--weights",
        "none",
        "--dims",
        args.dims,
        "--image-size",
        str(args.size),
        "--crop",
        "none",
        "--som-size",
        str(args.som_size),
        "--k",
        "4",
        "--device",
        "cpu",
    ]
    fit = _run(somad + ["fit", str(cat), "-o", str(model), "--overwrite"] + common + args.extra.split())
    pred = _run(
        somad + ["predict", str(model), str(cat / "test"), "-o", str(root / "pred"), "--overwrite", "--device", "cpu"]
    )
    result = {
        "setting": {
            "backbone": args.backbone,
            "weights": "none",
            "dims": args.dims,
            "som_size": args.som_size,
            "k": 4,
            "n_train": args.n_train,
            "size": args.size,
            "extra": args.extra,
        },
        "make_data_s": round(make_s, 1),
        "fit": fit,
        "predict_10_images": pred,
        "model_mb": round(model.stat().st_size / 1e6, 1),
        "budget_gb": args.budget_gb,
        "fit_within_budget": fit["peak_rss_gb"] <= args.budget_gb,
        "predict_within_budget": pred["peak_rss_gb"] <= args.budget_gb,
    }
    print(json.dumps(result, indent=1))
    return 0 if result["fit_within_budget"] and result["predict_within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
