"""somad export (ONNX) and the torch-free runtime: parity with the native path, the CLI, the refusals."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _tiny import stripes as textured
from PIL import Image

from somad import SOMAD, PaDiM, PatchCore, load
from somad.cli import main
from somad.errors import SomadError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from somad.export.onnx import META_FILE, MODEL_FILE, ExportError, export_model  # noqa: E402
from somad.io.export_format import INPUT_NAMES, OUTPUT_NAMES  # noqa: E402
from somad.runtime import OnnxDetector  # noqa: E402

TINY = dict(weights="none", image_size=64, device="cpu", val_fraction=0.25, seed=3)
SOMAD_TINY = dict(som_size=5, k=3, rough_epochs=2, fine_epochs=1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny SOMAD model file, its ONNX export (through the CLI), and test images incl. a blank frame."""
    root = tmp_path_factory.mktemp("export")
    model_path = SOMAD(**TINY, **SOMAD_TINY).fit(textured(8, 0)).save(root / "m.safetensors")
    out = root / "onnx"
    assert main(["export", str(model_path), "-o", str(out)]) == 0
    files = []
    images = [*textured(3, 1), *textured(3, 2, defect=True), *textured(1, 4, 96, 64)]  # last: another size
    images.append(np.zeros((70, 90, 3), np.uint8))  # blank: refused by the input gate
    for i, a in enumerate(images):
        files.append(root / f"img{i}.png")
        Image.fromarray(a).save(files[-1])
    return model_path, out, files


def native_results(model, files):
    return [(p.score, p.map.numpy(), p.status, model.verdict(p)) for p in model.predict_iter(files)]


def test_export_writes_graph_and_description(fitted):
    model_path, out, _ = fitted
    assert sorted(p.name for p in out.iterdir()) == sorted([META_FILE, MODEL_FILE])
    meta = json.loads((out / META_FILE).read_text())
    native = load(model_path)
    assert meta["method"] == "somad"
    assert meta["image_threshold"] == native.image_threshold_ and meta["pixel_threshold"] == native.pixel_threshold_
    assert meta["geometry"]["input_size"] == 64 and meta["geometry"]["crop_size"] is None
    assert meta["normalisation"]["mean"] == list(native.extractor_.spec.mean)
    assert len(meta["source_model"]["sha256"]) == 64 and meta["parity_check"]["max_rel_score_diff"] <= 1e-3
    graph = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    (inp,) = graph.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", [1, "image_height", "image_width", 3])
    assert [o.name for o in graph.get_outputs()] == list(OUTPUT_NAMES)
    assert [i.name for i in graph.get_overridable_initializers()] == list(INPUT_NAMES[1:])  # inputs with defaults
    check = meta["parity_check"]
    assert check["verdicts"] == 6 and check["mask_pixels"] > 0 and meta["export_version"] == 5


def test_onnx_matches_native_exact_path(fitted):
    model_path, out, files = fitted
    native = load(model_path, search="exact")
    ref = native_results(native, files)
    scores = np.array([r[0] for r in ref])
    # A threshold between two middle scores of the valid images, so that both verdicts occur and none is a tie.
    valid = np.sort(scores[:-1])
    threshold = float((valid[3] + valid[4]) / 2)
    native.image_threshold_ = threshold
    detector = OnnxDetector(out, threshold=threshold, threads=1)
    found = detector.predict(files)
    assert [d.name for d in found] == [f.name for f in files]
    for (score, m, status, _), d in zip(ref, found):
        assert abs(d.score - score) <= 1e-3 * abs(score)
        assert d.anomaly_map.shape == m.shape == (64, 64)
        assert np.max(np.abs(d.anomaly_map - m)) <= 1e-3 * max(1.0, float(np.abs(m).max()))
        assert d.status == status
    verdicts = [native.verdict(p) for p in native.predict_iter(files)]
    assert [d.is_anomalous for d in found] == verdicts
    # the normalised score: the runtime computes the native number from the JSON's thresholds (one function)
    assert [d.normalized_score for d in found] == native.normalized_scores([d.score for d in found]).tolist()
    assert all((d.normalized_score > 0.5) == (d.score > threshold) for d in found)
    assert True in verdicts[:-1] and False in verdicts[:-1]
    blank = found[-1]
    assert blank.status.startswith("invalid_input") and blank.is_anomalous and blank.mask.all()
    assert all((d.mask is not None and d.mask.any()) == d.is_anomalous for d in found)


def test_batches_pil_and_arrays_give_the_same_scores(fitted):
    _, out, files = fitted
    detector = OnnxDetector(out, threads=1)
    one = detector.predict_maps(files[:4])[0]
    batched = detector.predict_maps(files[:4], batch_size=3)[0]
    pil = detector.predict_maps([Image.open(f) for f in files[:4]])[0]
    arrays = detector.predict_maps(np.stack([np.asarray(Image.open(f)) for f in files[:4]]))[0]
    np.testing.assert_allclose(batched, one, rtol=1e-5)
    np.testing.assert_array_equal(pil, one)
    np.testing.assert_array_equal(arrays, one)
    # The bare graph on the decoded frames resizes them itself: the same scores to the bit as the runtime's
    # Pillow-resized input (the graph's resize is the native one: tests/test_export_resize.py).
    frames = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:4]])
    assert frames.shape[1:3] != (64, 64)
    np.testing.assert_array_equal(detector.run(frames)[0], one)
    with pytest.raises(SomadError, match="uint8"):
        detector.run(np.zeros((1, 32, 32), np.uint8))


def test_runtime_runs_without_torch(fitted):
    _, out, files = fitted
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from somad.runtime import OnnxDetector
        found = OnnxDetector({str(out)!r}, threads=1).predict([{str(files[0])!r}, {str(files[-1])!r}])
        print(repr(found[0].score), found[1].status)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm", "scipy", "sklearn")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    score_line, modules_line = result.stdout.strip().splitlines()
    score, status = score_line.split(" ", 1)
    assert float(score) == OnnxDetector(out, threads=1).predict(files[0])[0].score
    assert status.startswith("invalid_input") and modules_line == "[]"


@pytest.mark.parametrize("cls", [PaDiM, PatchCore])
def test_baselines_export_with_parity(tmp_path, cls):
    model = cls(**TINY).fit(textured(6, 0))
    out = export_model(model, tmp_path / "onnx")
    images = np.concatenate([textured(2, 1), textured(2, 2, defect=True)])
    scores, maps = model.predict_maps(images)
    found_scores, found_maps = OnnxDetector(out, threads=1).predict_maps(images)
    np.testing.assert_allclose(found_scores, scores, rtol=1e-3)
    assert np.max(np.abs(found_maps - maps)) <= 1e-3 * max(1.0, float(np.abs(maps).max()))
    assert json.loads((out / META_FILE).read_text())["method"] == cls.method


@pytest.mark.parametrize(
    "cls, extra", [(SOMAD, SOMAD_TINY), (PatchCore, {"num_neighbors": 3})], ids=["somad", "patchcore"]
)
def test_a_tiled_model_exports_for_its_frame(tmp_path, capsys, cls, extra):
    """A tiled model's graph serves its training images' frame: it resizes, cuts the tiles, stitches their patch
    scores and decides as the native path does (PatchCore: the largest tile score), and refuses an image whose
    frame is another (the runtime says why, and how to export for it)."""
    path = cls(**TINY, **extra, tile_size=48).fit(textured(8, 0, 80, 150)).save(tmp_path / "tiled.safetensors")
    assert main(["export", str(path), "-o", str(tmp_path / "out")]) == 0
    assert "whose frame is 128x64, such as 150x80 (the graph resizes it and cuts 8 tiles" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    g = meta["geometry"]
    assert (g["original_size"], g["frame_size"], len(g["tile_offsets"])) == ([80, 150], [64, 128], 8)
    assert meta["parity_check"]["verdicts"] == 6 and meta["export_version"] == 5
    model = load(path)
    images = [*textured(2, 5, 80, 150), *textured(1, 6, 80, 150, defect=True), *textured(1, 7, 40, 75)]
    other = textured(1, 8, 80, 80)[0]  # its frame is 64x64
    found = OnnxDetector(tmp_path / "out", threads=1).predict([*images, other])
    native = list(model.predict_iter(images))
    for d, p in zip(found, native):
        assert d.status == "ok" and d.anomaly_map.shape == tuple(p.map.shape) == (64, 128)
        assert abs(d.score - p.score) <= 1e-4 * abs(p.score) and d.is_anomalous == model.verdict(p)
        assert np.abs(d.anomaly_map - p.map.numpy()).max() <= 1e-3 * max(1.0, float(p.map.abs().max()))
        full = model.original_map(p)
        assert np.abs(d.original_map - full).max() <= 1e-3 * max(1.0, float(np.abs(full).max()))
    assert True in [d.is_anomalous for d in found[:4]] and False in [d.is_anomalous for d in found[:4]]
    refused = found[-1]
    assert refused.is_anomalous and refused.mask.all() and refused.status.startswith("invalid_input: a 80x80 image")
    assert "--original-size 80x80" in refused.status
    # The bare graph refuses it too (its own frame check), with the gate's input left at its default.
    assert main(["export", str(path), "-o", str(tmp_path / "sq"), "--original-size", "80x80"]) == 0
    d = OnnxDetector(tmp_path / "sq", threads=1).predict(other)[0]
    assert d.status == "ok" and d.anomaly_map.shape == (64, 64)


def test_a_tiled_export_needs_a_size_it_can_serve(tmp_path, capsys):
    path = SOMAD(**TINY, **SOMAD_TINY, tile_size=48).fit(textured(4, 0)).save(tmp_path / "tiled.safetensors")
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["export", str(path), "-o", str(tmp_path / "out"), "--original-size", "80"])
    assert "'80' is not HEIGHTxWIDTH" in capsys.readouterr().err
    with pytest.raises(ExportError, match="original size 0x90 is out of range"):
        export_model(path, tmp_path / "out", original_size=(0, 90))
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_output_without_overwrite(fitted, tmp_path, capsys):
    model_path, _, _ = fitted
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(model_path), "-o", str(out), "--no-check"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", str(model_path), "-o", str(out), "--overwrite", "--no-check"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([META_FILE, MODEL_FILE])
    assert json.loads((out / META_FILE).read_text())["parity_check"] is None


def test_not_an_export_folder(tmp_path):
    with pytest.raises(SomadError, match="not a somad export folder"):
        OnnxDetector(tmp_path)


@pytest.fixture(scope="module")
def ivf_model():
    """A tiny SOMAD model whose SOM (32 x 32 = 1024 nodes, ``IVF_MIN_NODES``) is searched by its IVF index."""
    model = SOMAD(**TINY, som_size=32, k=3, rough_epochs=2, fine_epochs=1).fit(textured(8, 0))
    return model


def test_ivf_model_exports_its_own_search(ivf_model, tmp_path):
    from somad.som.node_search import IVFSearch

    index = ivf_model._node_search()
    assert ivf_model.search == "ivf" and isinstance(index, IVFSearch) and index.nprobe < index.nlist
    out = export_model(ivf_model, tmp_path / "onnx")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["scoring"]["search"] == "ivf" and meta["scoring"]["nprobe"] == index.nprobe
    assert meta["scoring"]["nlist"] == index.nlist and meta["parity_check"]["native_search"] == "ivf"
    noise = np.random.default_rng(5).integers(0, 256, (2, 80, 72, 3), np.uint8)
    images = np.concatenate([textured(3, 1), textured(3, 2, defect=True), noise])
    scores, maps = ivf_model.predict_maps(images)
    found_scores, found_maps = OnnxDetector(out, threads=1).predict_maps(images)
    np.testing.assert_allclose(found_scores, scores, rtol=1e-3)
    assert np.max(np.abs(found_maps - maps)) <= 1e-3 * max(1.0, float(np.abs(maps).max()))
    threshold = float(np.median(scores))
    assert ((found_scores > threshold) == (scores > threshold)).all()
    path = ivf_model.save(tmp_path / "ivf.safetensors")
    assert main(["export", str(path), "-o", str(tmp_path / "exact"), "--search", "exact", "--no-check"]) == 0
    assert json.loads((tmp_path / "exact" / META_FILE).read_text())["scoring"]["search"] == "exact"
    assert ivf_model.search == "ivf"  # the export worked on a copy


def test_ivf_graph_selects_the_native_ivf_nodes():
    """The graph's IVF nodes pick the k nodes of ``IVFSearch`` itself, misses included (an index probing 2 of
    64 lists of random nodes misses many true neighbours), not the exact ones."""
    from onnx import TensorProto, helper, numpy_helper

    from somad.som.node_search import IVFSearch, nearest_nodes
    from somad.som.onnx_graph import ivf_nodes

    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(1024, 64, generator=gen)
    exclude = torch.zeros(1024, dtype=torch.bool)
    exclude[::7] = True  # empty nodes: never returned
    keep = ~exclude
    index = IVFSearch(weights, 32, nprobe=2, exclude=exclude, coarse_dims=16)
    x = torch.randn(500, 64, generator=gen)
    k = 3
    _, native = index.search(x, k)
    _, exact = nearest_nodes(x, weights, k, exclude=exclude)
    assert (native != exact).any(1).float().mean() > 0.2  # the index does miss neighbours here

    const = lambda name, a: numpy_helper.from_array(np.array(a, order="C"), name)  # noqa: E731
    nodes, inits = ivf_nodes(index, "x", "k", "idx", index.ids, const, unit=4)  # units of 4: runs span several
    graph = helper.make_graph(
        nodes,
        "ivf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["q", 64])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["q", k])],
        [*inits, const("k", np.array([k], np.int64))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (idx,) = session.run(None, {"x": x.numpy()})
    found = torch.nonzero(keep).flatten()[torch.from_numpy(idx)]  # kept-node positions -> node ids
    assert (found.sort(1).values == native.sort(1).values).all(1).float().mean() >= 0.998


# ---------------------------------------------------------------------------------------------- the graph decides
def _frames(tmp_path):
    """Files of several sizes (one smaller than the model input, one elongated) and a blank frame."""
    arrays = [*textured(2, 11), *textured(2, 12, defect=True), *textured(1, 13, 50, 130), *textured(1, 14, 140, 90)]
    arrays.append(np.full((70, 90, 3), 128, np.uint8))  # refused by the input gate
    files = []
    for i, a in enumerate(arrays):
        files.append(tmp_path / f"frame{i}.png")
        Image.fromarray(a).save(files[-1])
    return files


@pytest.mark.parametrize(
    "cls, extra",
    [(SOMAD, SOMAD_TINY), (PaDiM, {}), (PatchCore, {"num_neighbors": 3})],
    ids=["somad", "padim", "patchcore"],
)
def test_the_graph_decides_as_the_native_path_on_the_original_image(tmp_path, cls, extra):
    """A cropped model (the map's margins are edge-replicated on the way back): the runtime reports the graph's
    verdicts, maps on the original image and masks, and they are the native path's (``model.verdict``,
    ``model.original_map``, ``model.mask``), masks up to pixels at the threshold."""
    model = cls(**{**TINY, "crop_size": 48}, **extra).fit(textured(8, 0))
    files = _frames(tmp_path)
    native = list(model.predict_iter(files))
    scores = np.sort([p.score for p in native if p.valid])
    model.image_threshold_ = float((scores[2] + scores[3]) / 2)  # both verdicts occur, no tie
    out = export_model(model, tmp_path / "onnx")  # the export's own check compares verdicts and masks too
    found = OnnxDetector(out, threads=1).predict(files)
    flagged = [model.verdict(p) for p in native]
    assert [d.is_anomalous for d in found] == flagged and True in flagged[:-1] and False in flagged[:-1]
    for d, p in zip(found, native):
        full = model.original_map(p)
        assert d.original_map.shape == d.mask.shape == full.shape == p.original_size
        tol = 1e-3 * max(1.0, float(np.abs(full).max()))
        assert np.max(np.abs(d.original_map - full)) <= tol
        ref = model.mask(p, full)
        near = (np.abs(full - np.float32(model.pixel_threshold_)) <= tol) | (full >= full.max() - tol)
        assert not ((d.mask != ref) & ~near).any() and (d.mask != ref).mean() < 0.01
    assert found[-1].status.startswith("invalid_input") and found[-1].mask.all() and found[-1].is_anomalous


def test_thresholds_decide_at_their_last_bit_as_the_native_rule(fitted):
    """The graph's thresholds are float32: the image threshold rounded down, so that a score lies above it exactly
    when ``verdicts.is_anomalous`` says so; the pixel threshold as NumPy compares it. Each is checked one float64
    step below a score or map value, where rounding to the nearest float32 would decide the other way."""
    from somad.verdicts import is_anomalous, predicted_mask

    _, out, files = fitted
    d = OnnxDetector(out, threads=1).predict(files[3])[0]  # a defect: flagged with the exported thresholds
    for t in (d.score, float(np.nextafter(d.score, -np.inf)), float(np.nextafter(d.score, np.inf))):
        found = OnnxDetector(out, threads=1, threshold=t).predict(files[3])[0]
        assert found.score == d.score and found.is_anomalous == is_anomalous(d.score, t)
    value = float(np.median(d.original_map))
    for t in (value, float(np.nextafter(value, -np.inf))):
        found = OnnxDetector(out, threads=1, threshold=0.0, pixel_threshold=t).predict(files[3])[0]
        np.testing.assert_array_equal(found.mask, predicted_mask(found.original_map, True, t))
        assert 0 < found.mask.sum() < found.mask.size


def test_an_export_of_an_older_version_is_refused_with_the_fix(fitted, tmp_path):
    import shutil

    from somad.errors import ModelFileError
    from somad.io.export_format import content_sha256

    folder = shutil.copytree(fitted[1], tmp_path / "old")
    meta = json.loads((folder / META_FILE).read_text())
    meta["export_version"] = 2  # its runtime decided in Python; this graph's contract is another
    meta["content_sha256"] = content_sha256(meta)
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError) as info:
        OnnxDetector(folder)
    text = str(info.value)
    assert "\n" not in text and str(folder / META_FILE) in text and "export version 2" in text
    assert "re-run `somad export`" in text


class MeanDistance(torch.nn.Module):
    """The scoring of :class:`FourthMethod`: each patch's distance to the mean training patch."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean).square().sum(1).sqrt()


def _fourth_method():
    from somad.methods.base import BaseDetector

    class FourthMethod(BaseDetector):
        """A method written in this file alone: its scoring module is what predict runs and the export traces."""

        method = "mean_distance"

        def _fit_features(self, batches, n_images):
            total, n = 0.0, 0
            for feats in batches:
                total = total + feats.double().sum((0, 2, 3))
                n += feats.shape[0] * feats.shape[2] * feats.shape[3]
            self.mean_ = (total / n).float()

        def _patch_scores(self, feats):
            return self.export_scoring()(feats), None

        def export_scoring(self):
            return MeanDistance(self.mean_)

        def _state_to(self, device):
            self.mean_ = self.mean_.to(device)

    return FourthMethod


def test_a_fourth_method_exports_from_its_own_file(tmp_path):
    """The exporter asks the detector (``export_scoring``, ``cpu_copy``...): a method it has never heard of exports,
    runs in the runtime and matches its native path."""
    model = _fourth_method()(**TINY).fit(textured(6, 0))
    out = export_model(model, tmp_path / "onnx")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "mean_distance" and meta["parity_check"]["max_rel_score_diff"] <= 1e-3
    images = np.concatenate([textured(2, 1), textured(2, 2, defect=True)])
    scores, maps = model.predict_maps(images)
    found_scores, found_maps = OnnxDetector(out, threads=1).predict_maps(images)
    np.testing.assert_allclose(found_scores, scores, rtol=1e-3)
    assert np.max(np.abs(found_maps - maps)) <= 1e-3 * max(1.0, float(np.abs(maps).max()))


def test_a_model_without_thresholds_exports_and_decides_nothing(tmp_path):
    """No threshold: the graph gets NaN (nothing lies above it), and the runtime reports no verdict and no mask, as
    ``model.verdict`` and ``model.mask`` do; the scores and maps are still the native ones."""
    model = SOMAD(**{**TINY, "val_fraction": 0.0}, **SOMAD_TINY).fit(textured(6, 0))
    assert model.image_threshold_ is None
    out = export_model(model, tmp_path / "onnx")
    images = [*textured(2, 1), np.zeros((70, 90, 3), np.uint8)]
    found = OnnxDetector(out, threads=1).predict(images)
    native = list(model.predict_iter(images))
    assert [(d.is_anomalous, d.mask) for d in found] == [(model.verdict(p), model.mask(p, p.map)) for p in native]
    assert [d.is_anomalous for d in found] == [None] * 3 and found[-1].status.startswith("invalid_input")
    for d, p in zip(found, native):
        assert abs(d.score - p.score) <= 1e-3 * abs(p.score) and d.original_map.shape == p.original_size


def test_threshold_feeds_decide_as_the_native_rule_at_float32s_edges():
    """The graph's float32 thresholds decide as the float64 rule does, at the edges of float32's range too
    (a threshold beyond it becomes +-inf without a warning)."""
    import warnings

    from somad.io.export_format import threshold_feeds

    big = np.finfo(np.float32).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning
        feeds = threshold_feeds(1e300, -1e300)
    image, pixel = float(feeds[INPUT_NAMES[3]]), float(feeds[INPUT_NAMES[4]])
    assert image == float(big)  # inf rounded down: no float32 score lies above it, as none lies above 1e300
    assert pixel == -np.inf  # every pixel lies above it, as every one lies above -1e300
    for t in (0.1, 1 / 3, 18.621504211425783):  # rounded down: a float32 score above it iff above the float64 t
        f = np.float32(feeds_t := float(threshold_feeds(t, None)[INPUT_NAMES[3]]))
        assert float(f) <= t < float(np.nextafter(f, np.float32(np.inf))), feeds_t  # compared in float64
    assert np.isnan(threshold_feeds(None, None)[INPUT_NAMES[4]])
