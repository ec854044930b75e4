"""Parity and latency of an exported model (``somad export``) against the native path, on a category's test images.

    python benchmarks/export_check.py MODEL CATEGORY_DIR [--export-dir DIR] [--threads 2] [--latency-images 20]

Every test image of the category (``test/*/``) goes through the native path as shipped (the model's own
``search``, by default the IVF index: what the exported graph computes), the native path with
``search="exact"``, and ``somad.runtime.OnnxDetector``. Reported: the largest relative score difference, the
largest absolute map difference (and relative to the largest map value) and the verdicts that flip, for the
graph against the shipped path (the headline: ``onnx_vs_shipped``) and against the exact one, and for the
shipped path against the exact one (the IVF approximation alone).

Latency: per image at batch size 1 on ``--threads`` threads (decode, resize, score; the maps at the model
input), the native paths, the exported graph and (for an IVF model) the exhaustive graph
(``export_model(search="exact")``) interleaved image by image; then the backbone alone (the preprocessed input
to the feature grid): torch against onnxruntime (the feature part of the graph, exported on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Interleaved timing in one process: threads that spin while idle (OpenMP's, onnxruntime's) would take the CPU
# from the other runtime. Set before torch starts its OpenMP threads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _compare(found, ref) -> dict:
    s1, m1, v1 = found
    s0, m0, v0 = ref
    flips = [i for i, (a, b) in enumerate(zip(v1, v0)) if a != b]
    return {
        "max_rel_score_diff": float(np.max(np.abs(s1 - s0) / np.maximum(np.abs(s0), 1e-12))),
        "max_abs_map_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(m1, m0))),
        "max_map_value": float(max(np.max(np.abs(b)) for b in m0)),
        "verdict_flips": len(flips),
        "flipped": flips,
    }


def _native(model, paths):
    scores, maps, verdicts = [], [], []
    for p in model.predict_iter(paths):
        scores.append(p.score)
        maps.append(p.map.numpy())
        verdicts.append(model.verdict(p))
    return np.asarray(scores, np.float64), maps, verdicts


def _onnx(detector, paths, batch_size):
    found = detector.predict(paths, batch_size=batch_size)
    return (
        np.asarray([d.score for d in found], np.float64),
        [d.anomaly_map for d in found],
        [d.is_anomalous for d in found],
    )


def _median_ms(values) -> float:
    return 1000.0 * statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("category", help="MVTec category whose test images are scored")
    p.add_argument("--export-dir", default=None, help="an existing export of MODEL (default: export to a temp dir)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="images decoded at a time in the parity pass")
    p.add_argument("--latency-images", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    from somad import load
    from somad.export.onnx import OPSET, _trace, export_model
    from somad.io.datasets import mvtec_test_samples
    from somad.io.images import load_image
    from somad.runtime import OnnxDetector

    torch.set_num_threads(args.threads)
    shipped = load(args.model, device="cpu")
    exact = load(args.model, device="cpu", search="exact") if shipped.method == "somad" else shipped
    tmp = tempfile.TemporaryDirectory(prefix="somad-export-check-")
    out = Path(args.export_dir) if args.export_dir else Path(tmp.name) / "onnx"
    t0 = time.perf_counter()
    if not out.exists():
        export_model(args.model, out)
    export_s = time.perf_counter() - t0
    detector = OnnxDetector(out, threads=args.threads, spinning=False)
    exhaustive = None
    if getattr(shipped, "search", "exact") != "exact":
        export_model(args.model, Path(tmp.name) / "onnx_exact", search="exact", check=False)
        exhaustive = OnnxDetector(Path(tmp.name) / "onnx_exact", threads=args.threads, spinning=False)
    paths = [s.path for s in mvtec_test_samples(args.category)]
    print(f"{args.model}: {shipped.method}, search {getattr(shipped, 'search', '-')}; {len(paths)} test images")

    # ---------------------------------------------------------------- parity
    t0 = time.perf_counter()
    ref_shipped = _native(shipped, paths)
    ref_exact = _native(exact, paths) if exact is not shipped else ref_shipped
    t1 = time.perf_counter()
    graph = _onnx(detector, paths, args.batch_size)
    t2 = time.perf_counter()
    results = {
        "model": args.model,
        "category": args.category,
        "method": shipped.method,
        "search": getattr(shipped, "search", None),
        "n_images": len(paths),
        "threshold": shipped.image_threshold_,
        "export_seconds": round(export_s, 1),
        "onnx_vs_shipped": _compare(graph, ref_shipped),
        "onnx_vs_exact": _compare(graph, ref_exact),
        "shipped_vs_exact": _compare(ref_shipped, ref_exact),
        "n_flagged": {"onnx": int(sum(graph[2])), "exact": int(sum(ref_exact[2])), "shipped": int(sum(ref_shipped[2]))},
        "parity_pass_seconds": {"native (both)": round(t1 - t0, 1), "onnx": round(t2 - t1, 1)},
    }
    for name in ("onnx_vs_shipped", "onnx_vs_exact", "shipped_vs_exact"):
        r = results[name]
        print(
            f"{name:17s} max rel score diff {r['max_rel_score_diff']:.2e}  max abs map diff "
            f"{r['max_abs_map_diff']:.2e} (largest map value {r['max_map_value']:.1f})  verdict flips "
            f"{r['verdict_flips']}"
            + (f" {[Path(paths[i]).relative_to(args.category) for i in r['flipped']]}" if r["flipped"] else "")
        )
    print(f"flagged: {results['n_flagged']}")

    # ---------------------------------------------------------------- latency, interleaved, batch 1
    step = max(1, len(paths) // args.latency_images)
    subset = paths[::step][: args.latency_images]
    runners = {"native (shipped)": lambda q: list(shipped.predict_iter([q]))}
    if exact is not shipped:
        runners["native (exact)"] = lambda q: list(exact.predict_iter([q]))
    runners["onnxruntime"] = lambda q: detector.predict([q])
    if exhaustive is not None:
        runners["onnxruntime (exhaustive graph)"] = lambda q: exhaustive.predict([q])
    times = {name: [] for name in runners}
    for run in runners.values():
        run(subset[0])  # warm-up
    for q in subset:
        for name, run in runners.items():
            t = time.perf_counter()
            run(q)
            times[name].append(time.perf_counter() - t)
    results["latency_ms"] = {name: round(_median_ms(v), 1) for name, v in times.items()}

    # ---------------------------------------------------------------- backbone alone
    import onnxruntime as ort

    ex = exact.extractor_
    feature_path = Path(tmp.name) / "features.onnx"
    size = ex.geometry.input_size
    _trace(exact.feature_graph(), feature_path, torch.zeros(1, size, size, 3, dtype=torch.uint8), ["features"], OPSET)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(feature_path), options, providers=["CPUExecutionProvider"])
    pixels = detector.preprocess(load_image(subset[0]))[None]
    batch = torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0)).permute(0, 3, 1, 2).contiguous()
    back = {"torch": [], "onnxruntime": []}
    with torch.inference_mode():  # as predict runs it: no autograd bookkeeping
        ex(batch)
    session.run(None, {"image": pixels})
    for _ in range(max(10, args.latency_images)):
        t = time.perf_counter()
        with torch.inference_mode():
            ex(batch)
        back["torch"].append(time.perf_counter() - t)
        t = time.perf_counter()
        session.run(None, {"image": pixels})
        back["onnxruntime"].append(time.perf_counter() - t)
    results["backbone_ms"] = {name: round(_median_ms(v), 1) for name, v in back.items()}
    results["onnxruntime_backbone_faster"] = results["backbone_ms"]["onnxruntime"] < results["backbone_ms"]["torch"]
    print(
        f"latency per image, batch 1, {args.threads} threads, median of {len(subset)} (interleaved): "
        + ", ".join(f"{k} {v} ms" for k, v in results["latency_ms"].items())
    )
    print(
        "backbone alone: "
        + ", ".join(f"{k} {v} ms" for k, v in results["backbone_ms"].items())
        + f" (onnxruntime faster: {results['onnxruntime_backbone_faster']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
