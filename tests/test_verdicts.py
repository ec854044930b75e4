"""Verdicts: the decision rule, masks that agree with it at every resolution, regions, thresholds from good
images only (fit, calibrate, command-line overrides) and the input gate."""

import csv
import logging
import shutil

import numpy as np
import pytest
from _tiny import texture, tiny
from PIL import Image

from somad import SOMAD, load
from somad.cli import main
from somad.errors import SomadError
from somad.features.extractor import to_original_resolution
from somad.verdicts import (
    OK,
    check_frame,
    decide,
    estimate_thresholds,
    good_score_summary,
    normalized_or_none,
    normalized_score,
    pool_pixels,
    predicted_mask,
    regions,
    scale_resolution,
)

TINY = tiny(local_aggregation=1, cv="holdout")  # the hold-out these tests examine (cross-fitting: test_cross_fit)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """An MVTec-style category: 12 good training images, good and defective test images."""
    root = tmp_path_factory.mktemp("verdicts") / "part"
    for i in range(12):
        path = root / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(i)).save(path)
    for i in range(4):
        good = root / "test" / "good" / f"{i:03d}.png"
        good.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(100 + i)).save(good)
        bad = texture(200 + i)
        bad[20 + 5 * i : 40 + 5 * i, 30:55] = (255, 20, 200)  # a painted defect
        path = root / "test" / "paint" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(bad).save(path)
    return root


@pytest.fixture(scope="module")
def model(category):
    return SOMAD(val_fraction=0.25, **TINY).fit(category)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ rule and masks
def test_mask_is_non_empty_exactly_when_flagged_at_model_and_original_resolution(category):
    model = SOMAD(val_fraction=0.25, **TINY).fit(category)  # its own: the thresholds are changed below
    preds = list(model.predict_iter(sorted((category / "test").rglob("*.png"))))
    scores = sorted(p.score for p in preds)
    checked = 0
    # Thresholds between every pair of scores, and a hair below each score: the resized map's peak is then
    # often below the threshold while the model-resolution peak is above it.
    candidates = [(a + b) / 2 for a, b in zip(scores, scores[1:])] + [s - 1e-4 for s in scores]
    for t in candidates:
        model.image_threshold_ = t
        for p in preds:
            flagged = model.verdict(p)
            assert flagged == (p.score > t)
            full = to_original_resolution(p.map[None], model.extractor_.geometry, [p.original_size])[0]
            for amap in (p.map.numpy(), full):
                mask = model.mask(p, amap)
                assert mask.shape == amap.shape
                assert bool(mask.any()) == flagged
                if flagged:
                    assert mask.flat[int(np.argmax(amap))]  # the peak is always in the mask
                checked += 1
    assert checked > 100


def test_one_comparison_everywhere_strict_greater():
    amap = np.array([[1.0, 2.0], [3.0, 3.0]])
    assert predicted_mask(amap, False, 0.0).sum() == 0
    mask = predicted_mask(amap, True, 2.0)
    assert mask.tolist() == [[False, False], [True, True]]  # 2.0 is not above 2.0
    assert predicted_mask(amap, None, 2.0) is None
    assert decide(2.0, 2.0) is False and decide(2.0001, 2.0) is True  # the image verdict: as strict
    assert decide(0.1, 2.0, valid=False) is True  # a frame the input gate refused, however low its score
    assert decide(5.0, None) is None and decide(5.0, None, valid=False) is None  # nothing decided without a threshold


def test_regions_match_the_mask():
    rng = np.random.default_rng(0)
    amap = rng.random((50, 60))
    mask = amap > 0.8
    found = regions(mask, amap)
    assert sum(r.area for r in found) == int(mask.sum())
    assert found == sorted(found, key=lambda r: -r.area)
    for r in found:
        assert r.x0 < r.x1 <= 60 and r.y0 < r.y1 <= 50
        assert 0.8 < r.mean <= r.peak <= amap.max()


def test_predict_writes_regions_that_add_up_to_the_masks(model, category, tmp_path):
    out = tmp_path / "out"
    assert (
        main(["-q", "predict", str(model.save(tmp_path / "m.safetensors")), str(category / "test"), "-o", str(out)])
        == 0
    )
    scores = _rows(out / "scores.csv")
    assert {r["status"] for r in scores} == {OK}
    areas = {}
    for r in _rows(out / "regions.csv"):
        areas[r["path"]] = areas.get(r["path"], 0) + int(r["area"])
    for r in scores:
        mask = np.asarray(Image.open(out / "masks" / r["path"])) > 0
        assert bool(mask.any()) == (r["is_anomalous"] == "1")
        assert areas.get(r["path"], 0) == int(mask.sum())


# ------------------------------------------------------------------------------------------ thresholds
def test_thresholds_come_from_held_out_good_images_only(model, category):
    _, val = model.held_out_split(category)
    scores, maps = model.predict_maps([it.path for it in val])
    pixels = [pool_pixels(m) for m in maps]
    expected = estimate_thresholds(scores, pixels, model.threshold_quantile, model.pixel_threshold_quantile)
    assert (model.threshold_quantile, model.pixel_threshold_quantile) == (0.9, 0.999)  # the defaults
    assert (model.image_threshold_, model.pixel_threshold_) == (expected.image, expected.pixel)
    assert model.n_val_images_ == len(val) == 3
    # the pixel threshold is the 0.999-quantile of their pixels (every second row and column)
    assert expected.pixel == pytest.approx(float(np.quantile(np.stack(maps)[:, ::2, ::2], 0.999)), rel=1e-6)
    # the same fit next to a different test set (defective images added, good ones removed) changes nothing
    other = SOMAD(val_fraction=0.25, **TINY).fit(category / "train" / "good")
    assert (other.image_threshold_, other.pixel_threshold_) == (model.image_threshold_, model.pixel_threshold_)


def test_a_validation_good_folder_is_the_held_out_set_and_every_training_image_is_trained_on(category, tmp_path):
    """MVTec 3D-AD ships ``validation/good``: fit holds those images out and trains on all of ``train/good``."""
    root = tmp_path / "part3d"
    shutil.copytree(category, root)
    (root / "validation" / "good").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(texture(300 + i)).save(root / "validation" / "good" / f"{i:03d}.png")
    model = SOMAD(**TINY)
    train, held_out = model.held_out_split(root)
    assert len(train) == 12 and sorted(it.path.name for it in held_out) == [f"{i:03d}.png" for i in range(5)]
    assert all(it.path.parent == root / "validation" / "good" for it in held_out)
    model.fit(root)
    assert (model.n_train_images_, model.n_val_images_) == (12, 5)
    scores, _ = model.predict_maps(root / "validation" / "good")
    assert model.image_threshold_ == pytest.approx(float(np.quantile(scores.astype(np.float64), 0.9)), rel=1e-6)
    # without it, a seeded tenth of train/good is held out
    train, held_out = model.held_out_split(category)
    assert (len(train), len(held_out)) == (11, 1) and {it.path.parent.name for it in held_out} == {"good"}


def test_calibrate_equals_the_fit_whose_held_out_set_is_the_same_images(model, category, tmp_path):
    _, val = model.held_out_split(category)
    folder = tmp_path / "good"
    folder.mkdir()
    for it in val:
        (folder / it.path.name).write_bytes(it.path.read_bytes())
    path = model.save(tmp_path / "m.safetensors")
    again = load(path)
    again.image_threshold_ = again.pixel_threshold_ = None
    again.calibrate(folder)
    assert (again.image_threshold_, again.pixel_threshold_) == (model.image_threshold_, model.pixel_threshold_)
    assert again.threshold_info_["source"] == "calibrate" and again.threshold_info_["n_images"] == 3
    # the CLI writes a new model file with those thresholds, and reports the expected false-alarm rate
    out = tmp_path / "m2.safetensors"
    assert main(["-q", "calibrate", str(path), str(folder), "-o", str(out), "--threshold-quantile", "0.5"]) == 0
    calibrated = load(out)
    assert calibrated.image_threshold_ == pytest.approx(float(np.quantile(model.predict_maps(folder)[0], 0.5)))
    assert calibrated.threshold_info_["expected_false_alarm_rate"] == pytest.approx(0.5)
    assert load(path).image_threshold_ == model.image_threshold_  # the input model is untouched


def _scale_is_a_decision_scale(n, s, t):
    """Monotone, > 0.5 exactly when s > t, strictly increasing above t."""
    assert (np.diff(n) >= 0).all() and ((n > 0.5) == (s > t)).all()
    assert (np.diff(n[s > t]) > 0).all() and (n < 1).all()


def test_normalized_score_is_the_good_scores_cdf_below_the_threshold_and_never_saturates_above():
    rng = np.random.default_rng(0)
    good = np.sort(rng.gamma(4.0, 2.0, 57))
    t, m = float(np.quantile(good, 0.9)), float(np.median(good))
    info = {"good_scores": good_score_summary(good), "good_score_median": m}
    s = np.concatenate([np.linspace(-3.0, 3 * t, 20001), t * np.logspace(0.5, 12, 200)])
    s.sort()
    n = normalized_score(s, t, info)
    _scale_is_a_decision_scale(n, s, t)
    assert normalized_score(t, t, info) == 0.5 and normalized_score(np.nextafter(t, np.inf), t, info) > 0.5
    assert normalized_score(np.inf, t, info) == 1.0 and normalized_score(-1.0, t, info) == 0.0
    # below: 0.5 * F(s) / F(t), F the empirical CDF (order statistic i of n at i / (n + 1)), linear in between
    f = np.arange(1, good.size + 1) / (good.size + 1.0)
    f_t = np.interp(t, good, f)
    below = good < t
    np.testing.assert_allclose(normalized_score(good[below], t, info), 0.5 * f[below] / f_t, rtol=1e-12)
    a, b = good[3], good[4]
    mid = normalized_score((a + b) / 2, t, info)
    assert mid == pytest.approx(0.5 * (f[3] + f[4]) / 2 / f_t)
    assert normalized_score(good[0] / 2, t, info) == pytest.approx(0.25 * f[0] / f_t)  # from 0 at score 0
    # above: 1 - 0.5 (t - m) / (s - m): twice as far from the median as the threshold -> 0.75, ten times -> 0.95
    assert normalized_score([m + 2 * (t - m), m + 10 * (t - m)], t, info) == pytest.approx([0.75, 0.95])
    # a threshold set by hand above every good score: still strictly increasing up to it
    high = 2 * good[-1]
    n = normalized_score(s, high, info)
    _scale_is_a_decision_scale(n, s, high)
    assert (np.diff(normalized_score(np.linspace(good[-1], high, 50), high, info)) > 0).all()
    # ties among the good scores, and a threshold below the median: still a decision scale
    tied = {"good_scores": [1.0, 2.0, 2.0, 2.0, 3.0], "good_score_median": 2.0}
    for threshold in (2.0, 1.5, 2.5):
        _scale_is_a_decision_scale(normalized_score(s, threshold, tied), s, threshold)


def test_more_than_a_thousand_good_scores_are_kept_as_quantiles():
    scores = np.random.default_rng(1).normal(10.0, 1.0, 5000)
    kept = good_score_summary(scores)
    assert len(kept) == 1000 and kept == sorted(kept)
    assert kept[0] > scores.min() and kept[-1] < scores.max()
    assert np.median(kept) == pytest.approx(np.median(scores), abs=0.02)


def test_normalized_score_of_a_0_7_file_falls_back_to_its_median():
    """Files of somad 0.7 record only the median good score: 0 at score 0, 0.25 / quantile at the median, 0.5 at
    the threshold, and the same rule as above beyond it."""
    t, m = 10.0, 6.0
    info = {"source": "fit", "n_images": 9, "quantile": 0.9, "good_score_median": m}
    s = np.linspace(-2.0, 100.0, 5001)
    n = normalized_score(s, t, info)
    _scale_is_a_decision_scale(n, s, t)
    assert normalized_score([0.0, 3.0, m, 8.0, t, 14.0], t, info) == pytest.approx(
        [0.0, 0.125 / 0.9, 0.25 / 0.9, (0.25 / 0.9 + 0.5) / 2, 0.5, 0.75]
    )
    assert normalized_or_none(7.0, t, {"source": "fit"}) is None  # before 0.7: nothing to scale by
    assert normalized_or_none(7.0, None, info) is None


def test_normalized_scores_of_a_model_survive_save_load_and_reach_the_csv(model, category, tmp_path):
    _, val = model.held_out_split(category)
    held = np.sort(model.predict_maps(val)[0].astype(np.float64))
    info = model.threshold_info_
    assert info["good_scores"] == pytest.approx(held.tolist()) and info["good_score_median"] == np.median(held)
    assert scale_resolution(info) == 1 / len(held)
    scores = model.predict_maps(category / "test")[0]
    normalized = model.normalized_scores(scores)
    assert ((normalized > 0.5) == (scores > model.image_threshold_)).all()
    assert model.normalized_scores([model.image_threshold_]).tolist() == [0.5]
    path = model.save(tmp_path / "m.safetensors")
    again = load(path)
    np.testing.assert_array_equal(again.normalized_scores(scores), normalized)
    assert main(["-q", "predict", str(path), str(category / "test"), "-o", str(tmp_path / "out")]) == 0
    by_name = {p.item.name: p.score for p in model.predict_iter(category / "test")}
    for r in _rows(tmp_path / "out" / "scores.csv"):  # the CSV column, with the same > 0.5 rule as is_anomalous
        expected = float(model.normalized_scores([by_name[r["path"]]])[0])
        assert float(r["normalized_score"]) == pytest.approx(expected, abs=1e-6)
        assert (float(r["normalized_score"]) > 0.5) == (r["is_anomalous"] == "1")
    again.threshold_info_ = {"source": "fit", "n_images": 3}  # a file from before somad 0.7
    with pytest.raises(SomadError, match="somad calibrate"):
        again.normalized_scores(scores)


def test_threshold_flags_override_the_model(model, category, tmp_path, capsys):
    path = model.save(tmp_path / "m.safetensors")
    out = tmp_path / "none"
    assert main(["-q", "predict", str(path), str(category / "test"), "-o", str(out), "--threshold", "1e30"]) == 0
    assert all(r["is_anomalous"] == "0" for r in _rows(out / "scores.csv"))
    assert _rows(out / "regions.csv") == []
    out = tmp_path / "all"
    assert (
        main(
            [
                "-q",
                "predict",
                str(path),
                str(category / "test"),
                "-o",
                str(out),
                "--threshold=-1e30",
                "--pixel-threshold=-1e30",
            ]
        )
        == 0
    )
    for r in _rows(out / "scores.csv"):
        assert r["is_anomalous"] == "1"
        assert (np.asarray(Image.open(out / "masks" / r["path"])) > 0).all()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["-q", "predict", str(path), str(category / "test"), "-o", str(tmp_path / "x"), "--threshold", "nan"])
    assert exc.value.code == 2 and "not a finite number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the input gate
def _gate_cases():
    rng = np.random.default_rng(1)
    fixture = texture(5, (240, 320)).copy()
    fixture[:, 40:] = (128, 128, 128)  # the part is missing: a blank fixture over most of the frame
    return {
        "black": (np.zeros((120, 160, 3), np.uint8), "blank frame (black)"),
        "white": (np.full((120, 160, 3), 255, np.uint8), "blank frame (white)"),
        "grey": (np.full((120, 160, 3), 97, np.uint8), "blank frame (constant grey 97)"),
        # black and white areas (20 px squares): a learned gate's statistics (the frame resized to 256 square) blend
        # a frame's finest black-and-white noise when they upscale it, not its areas
        "saturated": (
            np.kron(rng.random((6, 8)) > 0.5, np.ones((20, 20)))[..., None].repeat(3, 2).astype(np.uint8) * 255,
            "saturated",
        ),
        "empty fixture": (fixture, "mostly blank frame"),
        "noise": (rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), None),
        "part": (texture(3, (240, 320)), None),
    }


@pytest.mark.parametrize("case", list(_gate_cases()))
def test_input_gate(case):
    array, reason = _gate_cases()[case]
    status = check_frame(Image.fromarray(array))
    if reason is None:
        assert status == OK
    else:
        assert status.startswith("invalid_input: ") and reason in status


def test_invalid_frames_are_flagged_never_passed_as_good(model, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, (array, _) in _gate_cases().items():
        Image.fromarray(array).save(folder / f"{name.replace(' ', '_')}.png")
    out = tmp_path / "out"
    assert main(["-q", "predict", str(model.save(tmp_path / "m.safetensors")), str(folder), "-o", str(out)]) == 0
    rows = {r["path"]: r for r in _rows(out / "scores.csv")}
    for name in ("black", "white", "grey", "saturated", "empty_fixture"):
        row = rows[f"{name}.png"]
        assert row["status"].startswith("invalid_input: ") and row["is_anomalous"] == "1", row
        assert (np.asarray(Image.open(out / "masks" / f"{name}.png")) > 0).all()  # the whole frame is suspect
    assert rows["part.png"]["status"] == OK


def test_12bit_image_in_16bit_png_scores_like_its_8bit_version(model, tmp_path):
    rgb = texture(7)
    grey8 = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    twelve = np.round(grey8.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 12-bit camera data
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    assert Image.open(tmp_path / "twelve.png").mode == "I;16"
    s8, s12 = model.predict_maps([tmp_path / "eight.png", tmp_path / "twelve.png"])[0]
    assert s12 == pytest.approx(s8, rel=0.02)
    assert check_frame(Image.open(tmp_path / "twelve.png").convert("RGB")) != OK  # read naively, near-black


# ------------------------------------------------------------------------------------------ inputs and fit
def test_one_colour_array_is_one_image(model):
    scores, maps = model.predict_maps(texture(1, (64, 64)))
    assert scores.shape == (1,) and maps.shape == (1, *model.extractor_.geometry.input_shape)


def test_pil_images_follow_the_file_decoding_rules(model, tmp_path):
    grey = np.asarray(Image.fromarray(texture(2)).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    by_path = model.predict_maps(tmp_path / "g16.png")[0]
    by_pil = model.predict_maps([Image.open(tmp_path / "g16.png")])[0]
    assert by_pil == pytest.approx(by_path)


def test_fit_warns_about_defect_named_training_folders(tmp_path, caplog):
    for sub in ("ok", "crack"):
        for i in range(3):
            path = tmp_path / "train" / sub / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(texture(i + (10 if sub == "crack" else 0))).save(path)
    with caplog.at_level(logging.WARNING, logger="somad"):
        SOMAD(val_fraction=0.0, **TINY).fit(tmp_path / "train")
    assert any("named like defects (crack)" in r.getMessage() for r in caplog.records)


def test_fit_keeps_its_skipped_images_when_it_sets_thresholds(category, tmp_path):
    """predict (run by fit for the thresholds) must not reset the record of unreadable training images."""
    train = tmp_path / "train"
    train.mkdir()
    for p in sorted((category / "train" / "good").glob("*.png")):
        (train / p.name).write_bytes(p.read_bytes())
    (train / "broken.png").write_bytes(b"not a png")
    model = SOMAD(val_fraction=0.25, on_error="skip", **TINY).fit(train)
    assert model.image_threshold_ is not None
    assert len(model.skipped_) == 1 and "broken.png" in model.skipped_[0]
