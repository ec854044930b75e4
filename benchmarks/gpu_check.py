"""GPU check: SOMAD fits and predicts with --device cuda and gives the CPU's scores within float tolerance.

    python benchmarks/gpu_check.py [--out DIR] [--n-train 100]

Generates a synthetic inspection set (no data needed), fits SOMAD at the paper's settings (56x56, k=4,
EfficientNet-Lite0) on CUDA and on the CPU, and prints fit seconds, predict ms/image (batch 1, median, and
batched throughput), peak GPU memory, image AUROC and the CPU/GPU score difference. Run it on a machine with
a GPU; without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _run(device: str, category: Path, samples, seed: int = 0) -> dict:
    from somad import SOMAD
    from somad.evaluation.metrics import image_auroc
    from somad.io.images import load_image

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = SOMAD(som_size=56, k=4, device=device, seed=seed).fit(category)
    if device == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    images = [load_image(s.path) for s in samples]
    latencies = []
    with torch.no_grad():
        for i, image in enumerate(images):
            t = time.perf_counter()
            model.predict_maps([image])
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    scores, _ = model.predict_maps(images)
    if device == "cuda":
        torch.cuda.synchronize()
    batched_ms = 1000 * (time.perf_counter() - t) / len(images)
    labels = np.array([s.label for s in samples])
    out = {
        "device": device,
        "fit_s": fit_s,
        "predict_ms_batch1": 1000 * statistics.median(latencies),
        "predict_ms_batched": batched_ms,
        "image_auroc": image_auroc(labels, scores),
        "scores": scores.tolist(),
    }
    if device == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write gpu_check.json here")
    ap.add_argument("--n-train", type=int, default=100)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU available", file=sys.stderr)
        return 2
    from somad.io.datasets import mvtec_test_samples
    from somad.io.synthetic import make_synthetic_category

    with tempfile.TemporaryDirectory() as tmp:
        category = make_synthetic_category(tmp, n_train=args.n_train, n_test_good=20, n_test_defect=20, size=256)
        samples = mvtec_test_samples(category)
        gpu = _run("cuda", category, samples)
        cpu = _run("cpu", category, samples)
        # Predict parity: the same (CPU-fitted) model scored on both devices.
        from somad import SOMAD, load

        model_path = Path(tmp) / "cpu.safetensors"
        SOMAD(som_size=56, k=4, device="cpu").fit(category).save(model_path)
        paths = [s.path for s in samples]
        on_cpu = load(model_path, device="cpu").predict_maps(paths)[0]
        on_gpu = load(model_path, device="cuda").predict_maps(paths)[0]
    a, b = np.array(gpu.pop("scores")), np.array(cpu.pop("scores"))
    result = {
        "gpu": gpu,
        "cpu": cpu,
        "torch": torch.__version__,
        "gpu_name": torch.cuda.get_device_name(0),
        "same_model_max_rel_score_diff": float((np.abs(on_gpu - on_cpu) / np.abs(on_cpu).clip(1e-12)).max()),
        "separate_fits_max_rel_score_diff": float((np.abs(a - b) / np.abs(b).clip(1e-12)).max()),
        "separate_fits_score_rank_correlation": float(
            np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
        ),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
