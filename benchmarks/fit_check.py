"""Interleaved fit check: fit wall times of several methods, alternating, each fit in a fresh process.

    python benchmarks/fit_check.py CATEGORY [--methods somad,patchcore,padim] [--rounds 3] [--coreset-ratio R]

The benchmark (``somad benchmark``) fits each method once, minutes apart; on a machine whose speed drifts
(this project's 2-core VM: up to a third between minutes), a single pair of fits can put a ratio on either
side of a target. Here the methods are fitted in turn, ``--rounds`` times (rotating the order), each in a
fresh process that imports somad and times ``model.fit`` exactly as the benchmark's fit cell does (2 torch
threads, ``--crop none``). Prints one JSON object: every fit's seconds, each method's median, and the median
ratios to the first method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

FIT = """
import json, sys, time, torch
torch.set_num_threads(2)
from somad.methods import METHODS
method, category, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = METHODS[method](crop_size=None, **params)
t0 = time.perf_counter()
model.fit(category)
print(json.dumps({"fit_s": time.perf_counter() - t0}))
"""


def _fit_seconds(method: str, category: str, params: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", FIT, method, category, json.dumps(params)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SOMAD_NO_PROGRESS": "1"},
    )
    if out.returncode != 0:
        raise SystemExit(f"{method} fit failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["fit_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("category", help="MVTec category (its train/good images are fitted)")
    p.add_argument("--methods", default="somad,patchcore,padim")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--coreset-ratio", type=float, default=None, help="PatchCore's coreset ratio (default: its own)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    params = {m: {} for m in methods}
    if args.coreset_ratio is not None and "patchcore" in params:
        params["patchcore"]["coreset_ratio"] = args.coreset_ratio
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            times[m].append(round(_fit_seconds(m, args.category, params[m]), 2))
            print(f"round {r + 1}: {m} {times[m][-1]} s", file=sys.stderr)
    medians = {m: statistics.median(t) for m, t in times.items()}
    first = methods[0]
    ratios = {f"{first}/{m}": round(medians[first] / medians[m], 3) for m in methods[1:]}
    print(
        json.dumps({"category": args.category, "fit_s": times, "median_s": medians, "median_ratios": ratios}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
