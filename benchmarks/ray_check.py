"""Ray batch scoring against local predict: throughput with 1 and 2 workers, and Ray's overhead per image.

    python benchmarks/ray_check.py MODEL IMAGES [--workers 1,2] [--limit 60] [--repeat 1]

Writes every output (scores.csv, heatmaps, masks) of ``somad predict`` into temporary folders, locally and on a
local Ray (``ray.init(num_cpus=max(workers))``), through the same code path (``write_predictions``), and prints
one JSON object: per run the wall seconds, images per second, the time to the first result (actor start-up:
each actor loads the model) and the steady-state ms per image after it; Ray's overhead per image is the
steady-state ms/img of 1 Ray worker minus the larger of local scoring alone and the driver's writing alone
(the two run in parallel with Ray: a worker scores while the driver writes). Also checks that the scores agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


class _Replay:
    """A model whose ``predict_iter`` replays stored predictions: times the driver's writing alone."""

    def __init__(self, model, predictions):
        self._model, self._predictions = model, predictions

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict_iter(self, *args, **kwargs):
        yield from self._predictions


class _Timed:
    """Wraps a model's ``predict_iter`` to record when each prediction arrives."""

    def __init__(self, model):
        self._model, self.times = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def predict_iter(self, *args, **kwargs):
        for p in self._model.predict_iter(*args, **kwargs):
            self.times.append(time.perf_counter())
            yield p


def _run(scorer, items, out: Path) -> dict:
    from somad.io.outputs import write_predictions

    timed = _Timed(scorer)
    out.mkdir()
    t0 = time.perf_counter()
    rows, _ = write_predictions(timed, items, out, save_maps=False, on_error="skip")
    wall = time.perf_counter() - t0
    first = timed.times[0] - t0
    steady = (timed.times[-1] - timed.times[0]) / max(1, len(timed.times) - 1)
    return {
        "images": len(rows),
        "wall_s": round(wall, 2),
        "img_per_s": round(len(rows) / wall, 2),
        "first_result_s": round(first, 2),
        "steady_ms_per_img": round(1000 * steady, 1),
        "scores": [float(r[1]) for r in rows],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("images", help="folder of images (an MVTec category's test/ works)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run (comma-separated)")
    p.add_argument("--limit", type=int, default=60, help="at most this many images")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    os.environ.setdefault("SOMAD_NO_PROGRESS", "1")
    import numpy as np
    import ray

    from somad.distributed.ray import RayScoredModel
    from somad.io.outputs import write_predictions
    from somad.methods import load
    from somad.methods.base import as_items

    model = load(args.model, device="cpu")
    model.batch_size = args.batch_size
    items = as_items(args.images)[: args.limit]
    counts = [int(w) for w in args.workers.split(",")]
    result = {"images": len(items), "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model.predict_maps(items[:2])  # warm-up
        t0 = time.perf_counter()
        predictions = list(model.predict_iter(items))
        result["local_score_ms_per_img"] = round(1000 * (time.perf_counter() - t0) / len(items), 1)
        t0 = time.perf_counter()
        (Path(tmp) / "replay").mkdir()
        write_predictions(_Replay(model, predictions), items, Path(tmp) / "replay", save_maps=False, on_error="skip")
        result["driver_write_ms_per_img"] = round(1000 * (time.perf_counter() - t0) / len(items), 1)
        del predictions
        local = _run(model, items, Path(tmp) / "local")
        result["runs"]["local"] = local
        t0 = time.perf_counter()
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
        result["ray_init_s"] = round(time.perf_counter() - t0, 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for w in counts:
            scorer = RayScoredModel(model, args.model, workers=w, device="cpu")
            run = _run(scorer, items, Path(tmp) / f"ray{w}")
            run["max_rel_score_diff"] = float(
                np.max(np.abs(np.subtract(run["scores"], local["scores"])) / np.abs(local["scores"]))
            )
            result["runs"][f"ray_{w}_workers"] = run
        ray.shutdown()
    for run in result["runs"].values():
        run.pop("scores")
    if "ray_1_workers" in result["runs"]:
        bound = max(result["local_score_ms_per_img"], result["driver_write_ms_per_img"])
        result["ray_overhead_ms_per_img"] = round(result["runs"]["ray_1_workers"]["steady_ms_per_img"] - bound, 1)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
