"""The input gate learns the product from its training images (``somad.verdicts.FrameGate``): binary
(black-and-white) parts are not refused as saturated, a blank frame still is, fit says loudly what it leaves out,
and the learned limits travel with the model file and the ONNX export."""

import logging

import numpy as np
import pytest
from _tiny import texture, tiny
from PIL import Image

from somad import SOMAD, load
from somad.errors import ModelFileError, SomadError
from somad.io.images import load_image
from somad.io.model_files import load_model, save_model
from somad.verdicts import FLAT_FRACTION, OK, SATURATED_FRACTION, FrameGate, check_frame, frame_stats

TINY = tiny(val_fraction=0.25)


def _binary(seed: int, size=(96, 112)) -> np.ndarray:
    """A binary frame, (H, W) uint8 of 0 and 255: black discs on white, as a scanned board or a thresholded X-ray."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.full((h, w), 255, np.uint8)
    for _ in range(rng.integers(4, 9)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 14)
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0
    return frame


def _save(folder, frames):
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def binary_product(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary") / "board"
    _save(root / "train" / "good", [_binary(i) for i in range(20)])
    _save(root / "test" / "good", [_binary(100 + i) for i in range(8)])
    return root


@pytest.fixture(scope="module")
def binary_model(binary_product):
    return SOMAD(**TINY).fit(binary_product)


def test_the_fixed_rule_refuses_every_binary_frame():
    """Why the gate must learn: by the fixed limits every frame of this product is 'saturated'."""
    statuses = [check_frame(Image.fromarray(_binary(i)).convert("RGB")) for i in range(10)]
    assert all("saturated frame" in s for s in statuses), statuses


def test_a_binary_product_keeps_every_training_image_and_its_good_frames_pass(binary_product, caplog):
    with caplog.at_level(logging.WARNING, logger="somad"):
        model = SOMAD(**TINY).fit(binary_product)
    gate = model.gate_
    assert model.skipped_ == [] and model.n_train_images_ == gate.n_images  # every training image kept
    assert not [r for r in caplog.records if "input gate" in r.getMessage()]
    # the images that set the threshold (held out, or all of them cross-fitted) passed the gate too
    assert model.image_threshold_ is not None and model.n_val_images_ in (20 - model.n_train_images_, 20)
    assert gate.saturated_fraction > 1.0  # the product is all black and white
    good = list(model.predict_iter(binary_product / "test" / "good"))
    assert [p.status for p in good] == [OK] * 8
    white, black = np.full((96, 112), 255, np.uint8), np.zeros((96, 112), np.uint8)
    blank = [p.status for p in model.predict_iter([white, black])]
    assert blank == ["invalid_input: blank frame (white)", "invalid_input: blank frame (black)"]
    assert all(model.verdict(p) for p in model.predict_iter([white]))  # refused frames are flagged


def test_natural_images_keep_the_fixed_limits():
    gate = FrameGate.learn([frame_stats(Image.fromarray(texture(i))) for i in range(12)])
    assert gate.n_images == 12
    assert (gate.saturated_fraction, gate.flat_fraction) == (SATURATED_FRACTION, FLAT_FRACTION)
    fixture = texture(5).copy()
    fixture[:, 20:] = 128  # an empty fixture: still refused
    assert "mostly blank frame" in check_frame(Image.fromarray(fixture), gate)


def test_a_few_odd_training_frames_do_not_open_the_gate():
    """The limits come from a high quantile, not the maximum: one covered-lens frame among many does not move them."""
    stats = [frame_stats(Image.fromarray(texture(i))) for i in range(150)]
    covered = texture(999).copy()
    covered[:, 10:] = 40
    gate = FrameGate.learn([*stats, frame_stats(Image.fromarray(covered))])
    assert gate.flat_fraction == FLAT_FRACTION and check_frame(Image.fromarray(covered), gate) != OK


def test_fit_warns_with_the_count_and_the_reason(tmp_path, caplog):
    folder = tmp_path / "train"
    _save(folder, [texture(i) for i in range(13)])
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(folder / "blank.png")  # 1 of 14: under 10%
    with caplog.at_level(logging.WARNING, logger="somad"):
        model = SOMAD(**tiny(val_fraction=0.0)).fit(folder)
    assert model.skipped_ == ["blank.png: invalid_input: blank frame (black)"] and model.n_train_images_ == 13
    warned = [r.getMessage() for r in caplog.records if "input gate" in r.getMessage()]
    assert len(warned) == 1 and "1 of 14 training images left out" in warned[0] and "1 blank frame" in warned[0]
    assert "blank.png" in warned[0]


def test_fit_refuses_a_training_set_the_gate_would_thin_out(tmp_path):
    folder = tmp_path / "train"
    _save(folder, [texture(i) for i in range(12)])
    for i in range(3):  # 3 of 15 (20%): more than 10%
        Image.fromarray(np.full((80, 100, 3), 255, np.uint8)).save(folder / f"white{i}.png")
    with pytest.raises(SomadError) as error:
        SOMAD(**tiny(val_fraction=0.0)).fit(folder)
    message = str(error.value)
    assert "\n" not in message and "refuses 3 of 15 training images, more than 10%" in message
    assert "3 blank frame" in message and "remove the refused ones" in message


def test_the_learned_gate_travels_with_the_model_file(binary_model, tmp_path):
    path = binary_model.save(tmp_path / "board.safetensors")
    again = load(path)
    assert again.gate_ == binary_model.gate_
    frame = Image.fromarray(_binary(7)).convert("RGB")
    assert check_frame(frame, again.gate_) == OK
    # a file without a learned gate (somad 0.7.1) loads with the fixed rule
    config, arrays = load_model(path)
    del config["state"]["input_gate"]
    old = load(save_model(tmp_path / "old.safetensors", config, arrays))
    assert old.gate_ is None and "saturated" in next(iter(old.predict_iter([np.asarray(frame)]))).status
    config["state"]["input_gate"] = {"saturated_fraction": "high"}
    with pytest.raises(ModelFileError, match="input_gate"):
        load(save_model(tmp_path / "bad.safetensors", config, arrays))


def test_gate_tables_read_back_and_bad_ones_are_refused():
    gate = FrameGate.learn([frame_stats(Image.fromarray(_binary(i))) for i in range(6)])
    assert FrameGate.from_dict(gate.as_dict()) == gate and FrameGate.from_dict(None) is None
    assert FrameGate.from_dict(FrameGate().as_dict()) == FrameGate()
    for bad in (
        {**gate.as_dict(), "saturated_fraction": 0.5},  # stricter than the fixed rule
        {"saturated_fraction": 1.0},
        {**gate.as_dict(), "flat_fraction": -1},
        {**gate.as_dict(), "n_images": 1.5},
    ):
        with pytest.raises(ValueError):
            FrameGate.from_dict(bad)


def test_binary_files_decode_to_frames_the_gate_passes(binary_product, binary_model):
    path = sorted((binary_product / "test" / "good").glob("*.png"))[0]
    assert check_frame(load_image(path), binary_model.gate_) == OK and check_frame(load_image(path)) != OK


def test_the_export_carries_the_learned_gate_and_the_runtime_applies_it(binary_model, binary_product, tmp_path):
    """somad_export.json holds the learned limits; the torch-free runtime gates with them, and takes the same inputs
    as the native path (a list of numpy frames included)."""
    import json

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from somad.export.onnx import META_FILE, export_model
    from somad.runtime import OnnxDetector

    out = export_model(binary_model.save(tmp_path / "board.safetensors"), tmp_path / "onnx")
    assert json.loads((out / META_FILE).read_text())["input_gate"] == binary_model.gate_.as_dict()
    detector = OnnxDetector(out, threads=1)
    files = sorted((binary_product / "test" / "good").glob("*.png"))
    found = detector.predict(files)
    assert [d.status for d in found] == [OK] * len(files)
    frames = [np.asarray(Image.open(f)) for f in files[:3]]  # (H, W) uint8 camera frames
    frames.append(np.asarray(Image.open(files[3])).astype(np.float32) / 255)  # and a float one
    np.testing.assert_array_equal(detector.predict_maps(frames)[0], [d.score for d in found[:4]])
    blank = detector.predict([np.full((96, 112), 255, np.uint8)])[0]
    assert blank.status == "invalid_input: blank frame (white)" and blank.is_anomalous
    with pytest.raises(SomadError, match=r"images\[1\]: float64 array of shape \(8, 8, 5\)"):
        detector.predict([frames[0], np.zeros((8, 8, 5))])


def _grey_frame(values: np.ndarray) -> np.ndarray:
    """(256, 256) grey levels as an RGB frame: equal channels, so its grey level is the value itself."""
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def test_the_graph_gates_a_whole_image_as_check_frame_does(tmp_path):
    """Fed a whole image, the exported graph applies the learned gate itself (``"resized"`` statistics, in the same
    integers as ``frame_stats``): frames one block or one pixel each side of the limits are decided alike, and a
    refused frame is flagged with its whole mask. Fed an image it has resized itself, the runtime feeds the gate's
    result (its status says why)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnxruntime as ort

    from somad.export.onnx import MODEL_FILE, export_model
    from somad.io.export_format import INPUT_NAME, OUTPUT_NAMES
    from somad.runtime import OnnxDetector

    model = SOMAD(**TINY).fit([texture(i, (80, 100)) for i in range(8)])
    gate = model.gate_
    assert gate.statistics == "resized" and gate.flat_fraction == FLAT_FRACTION
    assert gate.saturated_fraction == SATURATED_FRACTION
    out = export_model(model, tmp_path / "onnx")
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(128, 20, (256, 256)), 3, 252)
    frames = {"textured": _grey_frame(noise), "blank": _grey_frame(np.full((256, 256), 90))}
    limit = int(np.floor(FLAT_FRACTION * 1024))  # blocks without texture allowed
    for k in (limit, limit + 1):  # the first k 8x8 blocks constant, the rest textured
        values = noise.copy()
        for b in range(k):
            y, x = divmod(b, 32)
            values[8 * y : 8 * y + 8, 8 * x : 8 * x + 8] = 128
        frames[f"{k} flat blocks"] = _grey_frame(values)
    limit = int(np.floor(SATURATED_FRACTION * 256 * 256))  # pixels at the ends allowed
    for k in (limit, limit + 1):  # k pixels black or white at random places, so every block keeps its texture
        values = noise.copy().ravel()
        at = rng.permutation(values.size)[:k]
        values[at] = np.where(rng.random(k) < 0.5, 0, 255)
        frames[f"{k} clipped pixels"] = _grey_frame(values.reshape(256, 256))
    statuses = {}
    for name, frame in frames.items():
        status = check_frame(Image.fromarray(frame), gate)
        statuses[name] = status.split(": ")[1].split(" (")[0] if status != OK else OK
        flagged, mask = session.run([OUTPUT_NAMES[2], OUTPUT_NAMES[4]], {INPUT_NAME: frame[None]})
        native = next(model.predict_iter([frame]))
        assert bool(flagged[0]) == model.verdict(native), name
        if status != OK:
            assert flagged[0] and mask.all(), name
    assert statuses == {
        "textured": OK,
        "blank": "blank frame",
        "614 flat blocks": OK,
        "615 flat blocks": "mostly blank frame",
        "58982 clipped pixels": OK,
        "58983 clipped pixels": "saturated frame",
    }
    # The runtime resizes first (feeding the original size): the graph then takes its gate's result.
    found = OnnxDetector(out, threads=1).predict([frames["615 flat blocks"], frames["614 flat blocks"]])
    assert found[0].status.startswith("invalid_input: mostly blank") and found[0].is_anomalous
    assert found[1].status == OK
