"""`somad info`: the text and JSON descriptions of a fitted tiny model, files from before the training-set hash
was recorded, and one-line errors (exit 2) for missing, corrupt and foreign files."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from somad import SOMAD
from somad.cli import main
from somad.io.model_files import load_model, save_model

TINY = dict(weights="none", image_size=64, som_size=4, k=2, rough_epochs=1, fine_epochs=1, device="cpu", cv="holdout")


def _write_images(folder, seed, n=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    folder = _write_images(root / "good", seed=5)
    model = SOMAD(**TINY, val_fraction=0.2).fit(folder)
    path = model.save(root / "m.safetensors")
    return model, path, folder


def _info(capsys, *args):
    code = main(["info", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _field(text, name):
    lines = [line for line in text.splitlines() if line.startswith(f"{name}:")]
    assert len(lines) == 1, text
    return lines[0].split(":", 1)[1].strip()


def test_text_output_has_the_right_values(fitted, capsys):
    model, path, _ = fitted
    code, out, err = _info(capsys, path)
    assert code == 0 and err == ""
    assert _field(out, "method") == "somad"
    assert _field(out, "backbone") == "efficientnet_lite0 (weights: none)"
    assert _field(out, "input") == "resized to 64x64, whole frame (no crop, no tiles)"
    assert _field(out, "preset") == "not recorded"
    assert "som_size=4" in _field(out, "parameters") and "k=2" in _field(out, "parameters")
    assert float(_field(out, "image threshold")) == pytest.approx(model.image_threshold_, rel=1e-5)
    assert float(_field(out, "pixel threshold")) == pytest.approx(model.pixel_threshold_, rel=1e-5)
    assert _field(out, "thresholds set by").startswith("fit: 0.9-quantile of 2 good images' scores")
    assert _field(out, "training images") == "8" and _field(out, "held-out images") == "2"
    assert _field(out, "training set sha256") == model.train_set_sha256_
    assert _field(out, "format version") == "2"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert _field(out, "file sha256") == f"{digest} ({path.stat().st_size} bytes)"


def test_cross_fitted_thresholds_are_not_called_held_out(fitted, tmp_path, capsys):
    _, _, folder = fitted
    model = SOMAD(**{**TINY, "cv": 3}).fit(folder)
    path = model.save(tmp_path / "cv.safetensors")
    code, out, _ = _info(capsys, path)
    assert code == 0 and "held-out images:" not in out
    assert _field(out, "training images") == "10"
    assert _field(out, "threshold images") == "10 (every training image, out of fold)"
    assert "3-fold cross-fitting" in _field(out, "thresholds set by")


def test_json_output_has_the_right_values(fitted, capsys):
    model, path, _ = fitted
    code, out, _ = _info(capsys, path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["method"] == "somad" and info["backbone"] == "efficientnet_lite0"
    geometry = {"image_size": 64, "crop_size": None, "tile_size": None, "tile_overlap": 0.25, "input_frame": None}
    assert info["geometry"] == geometry
    assert info["params"]["som_size"] == 4
    assert info["image_threshold"] == model.image_threshold_ and info["pixel_threshold"] == model.pixel_threshold_
    assert info["threshold_info"]["source"] == "fit" and info["threshold_info"]["n_images"] == 2
    assert info["n_train_images"] == 8 and info["train_set_sha256"] == model.train_set_sha256_
    assert info["preset"] is None and info["format_version"] == 2
    assert info["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    config, _ = load_model(path)
    assert info["somad_version"] == config["somad_version"]


def test_training_set_hash_follows_the_images(fitted, tmp_path):
    model, _, folder = fitted
    assert len(model.train_set_sha256_) == 64
    changed = _write_images(tmp_path / "good", seed=5)
    noise = np.random.default_rng(99).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(changed / "03.png")  # one training image differs
    other = SOMAD(**TINY, val_fraction=0.2).fit(changed)
    assert other.n_train_images_ == model.n_train_images_
    assert other.train_set_sha256_ != model.train_set_sha256_
    same = SOMAD(**TINY, val_fraction=0.2).fit(_write_images(tmp_path / "again", seed=5))
    assert same.train_set_sha256_ == model.train_set_sha256_  # the same files: the same hash


def test_older_file_without_hash_and_a_tiled_one(fitted, tmp_path, capsys):
    _, path, _ = fitted
    config, arrays = load_model(path)
    del config["state"]["train_set_sha256"]  # as written before it was recorded
    config["params"].update(tile_size=32, tile_overlap=0.5)
    old = save_model(tmp_path / "old.safetensors", config, arrays)
    code, out, _ = _info(capsys, old)
    assert code == 0
    assert _field(out, "training set sha256") == "not recorded"
    assert _field(out, "input") == "shorter side resized to 64, 32 px tiles (overlap 0.5)"
    code, out, _ = _info(capsys, old, "--json")
    assert json.loads(out)["train_set_sha256"] is None


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not a model", "missing"])
def test_bad_file_is_one_line_exit_2(fitted, tmp_path, capsys, damage):
    _, path, _ = fitted
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    if damage == "flipped byte":
        data[-100] ^= 0xFF  # an array's bytes: the content hash no longer matches
        bad.write_bytes(bytes(data))
    elif damage == "truncated":
        bad.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "not a model":
        bad.write_bytes(b"hello, this is not a model file at all")
    code, out, err = _info(capsys, bad)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err
