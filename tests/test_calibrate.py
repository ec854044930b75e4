"""calibrate and update take good images the model never trained on, and refuse poison: training images are
refused by their fingerprints (a category folder means its validation/good, never its train/good), images far
above the threshold are refused unless accepted, and images of another kind are warned about."""

import logging
import shutil

import numpy as np
import pytest
from _tiny import texture, tiny
from PIL import Image

from somad import SOMAD, load
from somad.cli import main
from somad.errors import SomadError
from somad.io.model_files import load_model, save_model
from somad.verdicts import OUTLIER_LEVEL, far_above

TINY = tiny(local_aggregation=1, cv="holdout")  # a hold-out: images the fit never trained on


def _texture(seed: int, size=(72, 88)) -> np.ndarray:
    return texture(seed, size)


def _off(seed: int, size=(72, 88)) -> np.ndarray:
    """Nothing like the training images: random colour blocks, with noise (textured: the input gate passes it)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(20, 236, (size[0] // 8 + 1, size[1] // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(blocks[: size[0], : size[1]] + rng.normal(0, 10, (*size, 3)), 0, 255).astype(np.uint8)


def _save(folder, arrays, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays, start):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """An MVTec-style category: 12 good training images, 6 more good images the fit never sees, a test folder."""
    root = tmp_path_factory.mktemp("calibrate") / "part"
    _save(root / "train" / "good", [_texture(i) for i in range(12)])
    _save(root / "test" / "good", [_texture(100 + i) for i in range(3)])
    _save(root / "test" / "odd", [_off(200 + i) for i in range(3)])
    _save(root.parent / "new_good", [_texture(300 + i) for i in range(6)])
    return root


@pytest.fixture(scope="module")
def model_path(category, tmp_path_factory):
    return SOMAD(val_fraction=0.25, **TINY).fit(category).save(tmp_path_factory.mktemp("m") / "m.safetensors")


def test_calibrate_refuses_a_category_without_validation_good_and_its_train_good(model_path, category):
    model = load(model_path)
    before = (model.image_threshold_, model.pixel_threshold_)
    with pytest.raises(SomadError, match="without validation/good") as info:
        model.calibrate(category)  # never silently its train/good
    assert "\n" not in str(info.value) and "never saw" in str(info.value)
    with pytest.raises(SomadError) as info:
        model.calibrate(category / "train" / "good")
    message = str(info.value)
    assert "\n" not in message and message.startswith("9 of 12 images")  # 3 of the 12 were held out, not trained
    assert "biased low" in message and "validation/good" in message and ".png" in message
    assert (model.image_threshold_, model.pixel_threshold_) == before
    # a trained image under another name in another folder is still recognised (its bytes, not its name)
    train = sorted((category / "train" / "good").glob("*.png"))
    mixed = category.parent / "mixed"
    shutil.copytree(category.parent / "new_good", mixed)
    trained = next(p for p in train if p.name not in {it.name for it in model.held_out_split(category)[1]})
    shutil.copy(trained, mixed / "renamed.png")
    with pytest.raises(SomadError, match=r"^1 of 7 images .*\(e\.g\. renamed\.png\)"):
        model.calibrate(mixed)


def test_calibrate_takes_held_out_and_new_good_images(model_path, category, tmp_path):
    model = load(model_path)
    _, held = model.held_out_split(category)
    folder = tmp_path / "held"
    folder.mkdir()
    for it in held:  # the fit's own held-out images: not trained on, so accepted, and the fit's thresholds again
        shutil.copy(it.path, folder / it.path.name)
    fitted = (model.image_threshold_, model.pixel_threshold_)
    model.calibrate(folder)
    assert (model.image_threshold_, model.pixel_threshold_) == fitted
    model.calibrate(category.parent / "new_good")
    assert model.threshold_info_["n_images"] == 6 and model.threshold_info_["source"] == "calibrate"


def test_a_category_with_validation_good_calibrates_on_it(model_path, category, tmp_path):
    root = tmp_path / "part3d"
    shutil.copytree(category, root)
    shutil.copytree(category.parent / "new_good", root / "validation" / "good")
    model = load(model_path)
    model.calibrate(root)
    direct = load(model_path).calibrate(root / "validation" / "good")
    assert (model.image_threshold_, model.threshold_info_["n_images"]) == (direct.image_threshold_, 6)


def test_cli_calibrate_on_category_train_good_and_good_folder(model_path, category, tmp_path, capsys):
    out = tmp_path / "m2.safetensors"
    for given in (category, category / "train" / "good"):
        assert main(["-q", "calibrate", str(model_path), str(given), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "never saw" in err
        assert not out.exists()
    assert main(["-q", "calibrate", str(model_path), str(category.parent / "new_good"), "-o", str(out)]) == 0
    assert load(out).threshold_info_["n_images"] == 6 and "of the scores of 6 good images" in capsys.readouterr().out


def test_in_memory_training_images_are_refused_too():
    train = np.stack([_texture(i) for i in range(8)])
    model = SOMAD(val_fraction=0.25, **TINY).fit(train)
    held = {int(it.name.split("_")[1]) for it in model.held_out_split(train)[1]}
    trained = [i for i in range(8) if i not in held]
    with pytest.raises(SomadError, match=f"^{len(trained)} of 8 images"):
        model.calibrate(train)
    model.calibrate(np.stack([_texture(50 + i) for i in range(4)]), accept_outliers=True)  # 2 held-out scores:
    assert model.threshold_info_["n_images"] == 4  # too few to tell good from far above (not what this test is about)


def test_a_model_without_fingerprints_warns_instead(model_path, category, tmp_path, caplog):
    config, arrays = load_model(model_path)
    del config["state"]["train_image_digests"]  # as somad 0.7.1 wrote it
    old = load(save_model(tmp_path / "old.safetensors", config, arrays))
    assert old.train_image_digests_ is None
    with caplog.at_level(logging.WARNING, logger="somad"):
        old.calibrate(category / "train" / "good", accept_outliers=True)
    warned = [r.getMessage() for r in caplog.records if "fingerprints" in r.getMessage()]
    assert len(warned) == 1 and "somad 0.7.1" in warned[0]


def test_the_outlier_rule_refuses_an_off_image_and_not_good_ones(model_path, category, tmp_path, caplog):
    model = load(model_path)
    good = category.parent / "new_good"
    odd = sorted((category / "test" / "odd").glob("*.png"))
    offered = tmp_path / "offered"
    shutil.copytree(good, offered)
    shutil.copy(odd[0], offered / "odd.png")
    (odd_prediction,) = model.predict_iter([odd[0]])
    assert odd_prediction.valid  # passed by the input gate: scored, and far above the threshold
    assert far_above([odd_prediction.score], model.image_threshold_, model.threshold_info_).tolist() == [True]
    assert not far_above(model.predict_maps(good)[0], model.image_threshold_, model.threshold_info_).any()
    before = model.image_threshold_
    with pytest.raises(SomadError) as info:
        model.calibrate(offered)
    message = str(info.value)
    assert "\n" not in message and message.startswith("calibrate: 1 of 7 images offered as good")
    assert "odd.png" in message and "--accept-outliers" in message and f"over {OUTLIER_LEVEL:g}" in message
    assert model.image_threshold_ == before
    with caplog.at_level(logging.WARNING, logger="somad"):
        model.calibrate(offered, accept_outliers=True)  # accepted when told: listed in a warning
    assert model.threshold_info_["n_images"] == 7
    assert any("odd.png" in r.getMessage() and "accepted" in r.getMessage() for r in caplog.records)
    out = tmp_path / "m2.safetensors"
    assert main(["-q", "calibrate", str(model_path), str(offered), "-o", str(out)]) == 2
    assert main(["-q", "calibrate", str(model_path), str(offered), "-o", str(out), "--accept-outliers"]) == 0


def test_images_of_another_kind_are_warned_about(model_path, category, tmp_path, caplog):
    model = load(model_path)
    assert model.input_profile_["chroma"] > 3 and model.input_profile_["median_size"] == [72, 88]
    grey = _save(
        tmp_path / "grey",
        [np.repeat(_texture(300 + i).mean(-1, keepdims=True), 3, -1).astype(np.uint8) for i in range(4)],
    )
    small = _save(tmp_path / "small", [_texture(400 + i, size=(24, 30)) for i in range(4)])
    for folder, words in ((grey, "grey-scale, the model's training images colour"), (small, "far from the training")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="somad"):
            model.calibrate(folder, accept_outliers=True)
        warned = [r.getMessage() for r in caplog.records if words in r.getMessage()]
        assert len(warned) == 1 and "4 of 4 images" in warned[0] and "\n" not in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="somad"):
        model.calibrate(category.parent / "new_good")
    assert not [r for r in caplog.records if "images are" in r.getMessage()]
