"""Where SOMAD's predict time goes: per-stage medians at batch size 1, and torch.profiler's top operators.

    python benchmarks/profile_predict.py MODEL CATEGORY [--search ivf|exact] [--n-images 40]

The stages are the benchmark's own predict step split apart: decode, preprocess, backbone, node search,
Mahalanobis, upsampling and blur (one step). The first image warms up and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

STAGES = ("decode", "preprocess", "backbone", "node search", "mahalanobis", "upsample+blur")


def _timed_stages(model, path) -> list[float]:
    from somad.features.extractor import upsample_blur
    from somad.io.images import load_image

    t = [time.perf_counter()]
    image = load_image(path)
    t.append(time.perf_counter())
    batch = model.extractor_.preprocess(image)[None]
    t.append(time.perf_counter())
    feats = model.extractor_(batch)
    t.append(time.perf_counter())
    b, d, h, w = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
    nodes = model.nearest_nodes(x)
    t.append(time.perf_counter())
    dist = model.node_distances(x, nodes).min(1).values.view(b, h, w)
    t.append(time.perf_counter())
    upsample_blur(dist, model.extractor_.geometry.input_size, model.blur_sigma)
    t.append(time.perf_counter())
    return [b - a for a, b in zip(t[:-1], t[1:])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("category", help="MVTec category whose test images are scored")
    p.add_argument("--search", choices=["ivf", "exact"], default=None, help="override the model's search")
    p.add_argument("--n-images", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from somad import load
    from somad.io.datasets import mvtec_test_samples

    torch.set_num_threads(args.threads)
    model = load(args.model, search=args.search)
    if model.method != "somad":
        raise SystemExit(f"{args.model}: a {model.method} model; this profiles SOMAD models")
    samples = mvtec_test_samples(args.category)[: args.n_images + 1]
    with torch.no_grad():
        _timed_stages(model, samples[0].path)
        times = [_timed_stages(model, s.path) for s in samples[1:]]
        print(f"search={model.search}: median ms per image (batch 1) over {len(times)} images")
        for i, name in enumerate(STAGES):
            print(f"  {name:12s} {1000 * statistics.median(t[i] for t in times):7.1f}")
        print(f"  {'total':12s} {1000 * statistics.median(sum(t) for t in times):7.1f}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in samples[1:11]:
                _timed_stages(model, s.path)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
