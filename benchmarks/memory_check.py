"""Peak memory of ``somad predict`` on a huge small file against a normal image (issue 16, class 3).

Creates, in a temporary folder, a 13000 x 13000 PNG (169 MP, mostly smooth with some texture so that the input
gate accepts it; its file is a few MB at most) and a 512 x 512 PNG of the same content, then runs
``somad predict`` on each in a fresh process and reports each process's peak RSS side by side (the goal: under
2x apart). The model is MODEL if given (e.g. one fitted on /work/shared/data/mpdd_512/metal_plate), else a tiny
model with random weights fitted here.

    python benchmarks/memory_check.py [--model MODEL] [--side 13000] [--mode RGB|L] [--source OTHER/src]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

#: Runs the somad command line and prints the process's own peak RSS (kB on Linux) on its last stderr line.
_CHILD = (
    "import resource, sys\n"
    "from somad.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def texture(side: int, mode: str) -> Image.Image:
    """A smooth pattern (two crossed waves and a few dark spots) with mild noise, upsampled to ``side``."""
    small = max(64, side // 10)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:small, 0:small].astype(np.float32) / small
    grey = 128 + 50 * np.sin(12 * x) * np.cos(9 * y) + rng.normal(0, 3, (small, small))
    for cy, cx in rng.uniform(0.1, 0.9, (6, 2)):
        grey -= 60 * np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / 0.0004))
    arr = np.clip(grey, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "L").resize((side, side), Image.BILINEAR)
    return img if mode == "L" else Image.merge("RGB", (img, img.point(lambda v: v * 0.9), img.point(lambda v: v)))


def run_predict(model: Path, image: Path, out: Path, source: Path | None = None) -> tuple[int, float, str, str]:
    """(peak RSS in kB, seconds, status column, last stderr line) of one ``somad predict`` process (importing
    somad from ``source``, a ``src`` folder of another checkout, when given)."""
    cmd = [sys.executable, "-c", _CHILD, "-q", "predict", str(model), str(image), "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(source)) if source else None
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    lines = done.stderr.strip().splitlines()
    rss = int(lines[-1].split()[1]) if lines and lines[-1].startswith("MAXRSS_KB") else -1
    other = [ln for ln in lines if not ln.startswith("MAXRSS_KB")]
    status = "-"
    if done.returncode == 0:
        with open(out / "scores.csv", newline="") as f:
            status = next(csv.DictReader(f))["status"]
    return rss, seconds, status, f"exit {done.returncode}" + (f": {other[-1]}" if other else "")


def tiny_model(folder: Path) -> Path:
    from somad import SOMAD

    good = folder / "good"
    good.mkdir()
    for i in range(6):
        texture(256 + 16 * i, "RGB").save(good / f"{i}.png")
    path = folder / "tiny.safetensors"
    SOMAD(weights="none", som_size=8, rough_epochs=2, fine_epochs=2, val_fraction=0.34, device="cpu").fit(good).save(
        path
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model file (default: fit a tiny one)")
    ap.add_argument("--side", type=int, default=13000, help="side of the huge image (default 13000: 169 MP)")
    ap.add_argument("--mode", default="RGB", choices=["RGB", "L"], help="PNG colour type of both images")
    ap.add_argument(
        "--source",
        type=Path,
        default=None,
        help="the src/ folder of another checkout to run instead (e.g. an older version, with its built kernels)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="somad-memory-") as tmp:
        tmp = Path(tmp)
        model = args.model or tiny_model(tmp)
        texture(512, args.mode).save(tmp / "normal.png")
        huge = texture(args.side, args.mode)
        huge.save(tmp / "huge.png", compress_level=9)
        del huge
        rows = []
        for name in ("normal.png", "huge.png"):
            size = (tmp / name).stat().st_size
            rss, seconds, status, note = run_predict(model, tmp / name, tmp / f"out-{name}", args.source)
            with Image.open(tmp / name) as im:
                dims = f"{im.width}x{im.height} {im.mode}"
            rows.append((name, dims, size, rss, seconds, status, note))
        print(f"model: {model}; somad from {args.source or 'this checkout'}")
        print(f"{'image':<12}{'pixels':>22}{'file KB':>10}{'peak RSS MB':>13}{'seconds':>9}  status / exit")
        for name, dims, size, rss, seconds, status, note in rows:
            print(f"{name:<12}{dims:>22}{size / 1024:>10.0f}{rss / 1024:>13.0f}{seconds:>9.1f}  {status} / {note}")
        ratio = rows[1][3] / rows[0][3] if rows[0][3] > 0 and rows[1][3] > 0 else float("nan")
        print(f"peak RSS ratio huge / normal: {ratio:.2f} (goal: under 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
