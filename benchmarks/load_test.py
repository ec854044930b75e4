"""Load test of `somad serve`: throughput and latency at 1, 4 and 16 concurrent clients, against in-process scoring.

    python benchmarks/load_test.py MODEL IMAGES_DIR [--requests 200] [--time-limit 120] [--concurrency 1,4,16]
        [--queries ",?heatmap=jpg"]

Starts `somad serve MODEL` on a free loopback port (one worker), sends the images of IMAGES_DIR (searched
recursively, cycled) as raw bytes to POST /v1/predict from N client threads (one keep-alive connection each),
``--requests`` requests per concurrency level or until ``--time-limit`` seconds, whichever comes first, after a
short warm-up; each of ``--queries`` (query strings, e.g. the bare request and ``?heatmap=jpg``) at each level.
MODEL is a model file or an export folder (served without torch by the runtime). Before starting the server and
after stopping it, it scores the same images in process with
``model.predict_maps`` (batches of the model's batch size; decoding included, as the service decodes too; the
mean of the two is the reference), and times ``somad predict`` on one image (a fresh process: imports, model
load, one image, result files). Prints a markdown table.

The clients run on the same machine as the server and take CPU from it: on a small machine the figures are a
lower bound of the service's throughput.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
CONTENT_TYPES.update({".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int, log) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "somad.cli", "-q", "serve", model, "--port", str(port), "--max-queue", "64"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SOMAD_NO_PROGRESS": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not start within 180 s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(
    url: str, bodies: list[tuple[bytes, str]], clients: int, requests: int, time_limit: float, query: str = ""
) -> dict:
    """``requests`` POSTs from ``clients`` threads (fewer if ``time_limit`` runs out): throughput and latencies."""
    import httpx

    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(timeout=60) as session:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= requests:
                        return
                    next_index[0] += 1
                body, kind = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                r = session.post(f"{url}/v1/predict{query}", content=body, headers={"Content-Type": kind})
                elapsed = time.perf_counter() - t0
                with lock:
                    (latencies.append(elapsed) if r.status_code == 200 else errors.append(f"{r.status_code} {r.text}"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "query": query,
        "done": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * _percentile(latencies, 0.95) if latencies else float("nan"),
        "p99_ms": 1000 * _percentile(latencies, 0.99) if latencies else float("nan"),
    }


def in_process(model_path: str, paths: list[Path], n: int) -> float:
    """Images per second of ``model.predict_maps`` over ``n`` of the images (cycled), after a warm-up."""
    if Path(model_path).is_dir():  # an export folder: the torch-free runtime
        from somad.runtime import OnnxDetector

        model = OnnxDetector(model_path)
    else:
        from somad.methods import load

        model = load(model_path)
    model.predict_maps(paths)  # warm-up over every image: the model's pages are touched once, as in a warm server
    chosen = [paths[i % len(paths)] for i in range(n)]
    t0 = time.perf_counter()
    model.predict_maps(chosen)
    return n / (time.perf_counter() - t0)


def cli_one_image(model_path: str, image: Path, repeats: int = 3) -> float:
    """Median wall seconds of ``somad predict MODEL IMAGE -o OUT`` (a fresh process each time)."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "somad.cli", "-q", "predict", model_path, str(image), "-o", f"{tmp}/out"],
                check=True,
                capture_output=True,
                env={**os.environ, "SOMAD_NO_PROGRESS": "1"},
            )
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    from somad.io.images import list_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("images_dir")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (default 200)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per concurrency level (default 120)")
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default 1,4,16)")
    p.add_argument("--warmup", type=int, default=5, help="requests before measuring (at least one per image)")
    p.add_argument("--queries", default="", help="comma-separated query strings, e.g. ',?heatmap=jpg' (default: bare)")
    args = p.parse_args(argv)
    paths = list_images(args.images_dir)
    if not paths:
        sys.exit(f"{args.images_dir}: no images")
    bodies = [(path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")) for path in paths]
    n_batch = max(args.requests, 1)
    before = in_process(args.model, paths, n_batch)  # measured before and after the service: a busy machine drifts
    print(f"in process (before): {before:.2f} img/s", file=sys.stderr)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.NamedTemporaryFile("w", prefix="somad-serve-", suffix=".log", delete=False) as log:
        t0 = time.perf_counter()
        server = _start_server(args.model, port, log)
        print(f"server up in {time.perf_counter() - t0:.1f} s (log: {log.name}); {len(paths)} images", file=sys.stderr)
        try:
            run_clients(url, bodies, 4, max(args.warmup, len(bodies)), args.time_limit)  # every image once
            for query in args.queries.split(","):
                for clients in [int(c) for c in args.concurrency.split(",")]:
                    row = run_clients(url, bodies, clients, args.requests, args.time_limit, query)
                    if row["errors"]:
                        print(f"{len(row['errors'])} failed requests, first: {row['errors'][0]}", file=sys.stderr)
                    rows.append(row)
                    print(f"{clients} clients {query}: {row['throughput']:.2f} img/s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=60)
    after = in_process(args.model, paths, n_batch)
    batch = (before + after) / 2
    cli = cli_one_image(args.model, paths[0])
    print(
        "| clients | query | requests done | errors | throughput (img/s) | vs in-process | p50 (ms) | p95 (ms) "
        "| p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['query'] or '(none)'} | {r['done']} | {len(r['errors'])} | {r['throughput']:.2f} | "
            f"{100 * r['throughput'] / batch:.0f}% | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    both = f"{batch:.2f} ({before:.2f} / {after:.2f})"
    print(f"| in-process `predict_maps` (before / after) | | {n_batch} | | {both} | 100% | | | |")
    single = next((r["p50_ms"] for r in rows if r["clients"] == 1 and not r["query"]), float("nan"))
    print(f"\nsingle request p50 {single:.1f} ms; `somad predict` on one image (fresh process): {1000 * cli:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
