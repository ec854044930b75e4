"""Thresholds from few good images: cross-fitting below the cut-off (``cv``), the final model on all images, the
false-alarm rate's interval (against a simulation), the warning of fits on few images, and the record in the file."""

import logging

import numpy as np
import pytest
import torch
from _tiny import tiny
from PIL import Image
from scipy import stats

from somad import SOMAD, load
from somad.cli import build_parser
from somad.errors import SomadError
from somad.methods import thresholds
from somad.verdicts import false_alarm_rate, image_threshold

TINY = tiny()


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pattern = rng.integers(60, 200, size=(1, 64, 64, 3))
    return np.clip(pattern + rng.integers(-30, 30, size=(n, 64, 64, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def few():
    return _images(7)


@pytest.fixture(scope="module")
def crossfit(few):
    return SOMAD(**TINY).fit(few)


@pytest.mark.parametrize(
    "n, q",
    [(11, 0.9), (21, 0.95), (3, 0.5)],  # (n - 1) * q whole: the threshold is an order statistic, the rate exact
)
@pytest.mark.parametrize("draw", ["normal", "exponential"])
def test_false_alarm_rate_of_an_order_statistic_matches_a_simulation(n, q, draw):
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((40000, n)) if draw == "normal" else rng.exponential(size=(40000, n))
    t = np.quantile(scores, q, axis=1)  # image_threshold of each draw of n good scores
    rate = stats.norm.sf(t) if draw == "normal" else np.exp(-t)  # P(a new good score > t)
    mean, low, high = false_alarm_rate(n, q)
    assert mean == pytest.approx(rate.mean(), abs=0.005)
    assert low == pytest.approx(np.quantile(rate, 0.05), abs=0.006)
    assert high == pytest.approx(np.quantile(rate, 0.95), abs=0.01)
    assert float(np.mean((rate >= low) & (rate <= high))) == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("n, tolerance", [(5, 0.05), (10, 0.025), (20, 0.01)])
def test_between_order_statistics_the_rate_errs_on_the_high_side(n, tolerance):
    rng = np.random.default_rng(2)
    for draw in ("uniform", "normal", "exponential"):
        draws = {"uniform": rng.random, "normal": rng.standard_normal, "exponential": rng.standard_exponential}
        s = draws[draw]((40000, n))
        t = np.quantile(s, 0.9, axis=1)
        rate = {"uniform": 1 - t, "normal": stats.norm.sf(t), "exponential": np.exp(-t)}[draw]
        mean, low, high = false_alarm_rate(n, 0.9)
        assert -0.003 <= mean - rate.mean() <= tolerance, draw  # 0.003: a few standard errors of the simulation
        assert -0.005 <= high - np.quantile(rate, 0.95) <= tolerance, draw
        assert low <= np.quantile(rate, 0.05) + 0.005, draw
    # many images: the rate tends to 1 - quantile and the interval narrows
    mean, low, high = false_alarm_rate(2000, 0.9)
    assert mean == pytest.approx(0.1, abs=1e-3) and high - low < 0.03
    with pytest.raises(ValueError, match="at least one good score"):
        false_alarm_rate(0, 0.9)


def test_cv_rule_cross_fits_below_the_cut_off_only():
    auto = SOMAD(**TINY)
    below = thresholds.CROSS_FIT_BELOW - 1
    assert (
        auto.cross_fit_folds(below) == thresholds.CROSS_FIT_FOLDS
        and auto.cross_fit_folds(thresholds.CROSS_FIT_BELOW) == 0
    )
    assert auto.cross_fit_folds(3) == 3 and auto.cross_fit_folds(1) == 0  # one fold per image; none from 1 image
    assert SOMAD(**TINY, cv="holdout").cross_fit_folds(5) == 0
    assert SOMAD(**TINY, cv=3).cross_fit_folds(500) == 3  # an explicit K: at any size
    assert SOMAD(**TINY, cv=3, val_fraction=0.0).cross_fit_folds(5) == 0  # val_fraction=0: no thresholds at all
    for bad, fragment in ((1, "cv=1 is invalid"), ("kfold", "cv='kfold' is invalid"), (2.5, "cv=2.5 is invalid")):
        with pytest.raises(SomadError, match=fragment) as info:
            SOMAD(**TINY, cv=bad).fit(_images(3))
        assert "\n" not in str(info.value)
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    flag = next(a for a in fit._actions if a.dest == "cv")
    assert [flag.type(v) for v in ("auto", "holdout", "4")] == ["auto", "holdout", 4]


def test_the_final_model_is_fitted_on_all_images_and_the_thresholds_rest_on_all_of_them(crossfit, few):
    n = len(few)
    assert crossfit.threshold_info_["rule"] == "cross_fit" and crossfit.threshold_info_["folds"] == 5
    assert crossfit.n_train_images_ == crossfit.n_val_images_ == crossfit.threshold_info_["n_images"] == n
    alone = SOMAD(**{**TINY, "val_fraction": 0.0}).fit(few)  # the same images, no thresholds: the same model
    assert torch.equal(alone.som_.weights_, crossfit.som_.weights_)
    assert torch.equal(alone.gaussians_.means, crossfit.gaussians_.means)
    assert alone.train_set_sha256_ == crossfit.train_set_sha256_
    # each image scored by a model fitted on the other folds (the seeded split), never by one that saw it
    order = np.random.default_rng(TINY.get("seed", 0)).permutation(n)
    out_of_fold, in_sample = np.empty(n), alone.predict_maps(few)[0]
    for k in range(5):
        held = np.sort(order[k::5])
        fold = SOMAD(**{**TINY, "val_fraction": 0.0}).fit(np.delete(few, held, axis=0))
        out_of_fold[held] = fold.predict_maps(few[held])[0]
    assert crossfit.image_threshold_ == pytest.approx(image_threshold(out_of_fold, 0.9), rel=1e-6)
    assert crossfit.image_threshold_ != pytest.approx(image_threshold(in_sample, 0.9), rel=1e-3)
    mean, low, high = false_alarm_rate(n, 0.9)
    assert crossfit.threshold_info_["expected_false_alarm_rate"] == pytest.approx(mean)
    assert crossfit.threshold_info_["false_alarm_rate_interval"] == pytest.approx([low, high])


def test_at_the_cut_off_a_share_is_held_out_instead(few, monkeypatch):
    monkeypatch.setattr(thresholds, "CROSS_FIT_BELOW", len(few))
    model = SOMAD(**{**TINY, "val_fraction": 0.3}).fit(few)
    assert model.threshold_info_["rule"] == "holdout" and model.threshold_info_["folds"] is None
    assert (model.n_train_images_, model.n_val_images_) == (5, 2)
    explicit = SOMAD(**{**TINY, "val_fraction": 0.3, "cv": 2}).fit(few)  # an explicit K cross-fits at any size
    assert explicit.threshold_info_["rule"] == "cross_fit" and explicit.n_val_images_ == len(few)


def test_a_validation_folder_stays_the_held_out_set(tmp_path):
    imgs = _images(9, seed=3)
    for name, part in (("train/good", imgs[:6]), ("validation/good", imgs[6:])):
        (tmp_path / name).mkdir(parents=True)
        for i, a in enumerate(part):
            Image.fromarray(a).save(tmp_path / name / f"{i:03d}.png")
    model = SOMAD(**TINY).fit(tmp_path)
    assert model.threshold_info_["rule"] == "validation_folder" and model.threshold_info_["folds"] is None
    assert (model.n_train_images_, model.n_val_images_) == (6, 3)


def test_few_images_warn_once_in_one_line_and_the_record_survives_save_and_load(few, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="somad"):
        model = SOMAD(**TINY).fit(few)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    few_lines = [w for w in warnings if "only 7 good images" in w]
    assert len(few_lines) == 1 and "\n" not in few_lines[0]  # the fold fits do not repeat it
    low, high = model.threshold_info_["false_alarm_rate_interval"]
    assert f"interval {100 * low:.0f}-{100 * high:.0f}%" in few_lines[0]
    rule = [r.getMessage() for r in caplog.records if r.getMessage().startswith("thresholds from")]
    assert (
        len(rule) == 1 and "5-fold cross-fitting" in rule[0] and f"fewer than {thresholds.CROSS_FIT_BELOW}" in rule[0]
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="somad"):
        SOMAD(**TINY, val_fraction=0.0).fit(few)
    assert any("only 7 good images" in r.getMessage() for r in caplog.records)  # also without thresholds
    again = load(model.save(tmp_path / "m.safetensors"))
    assert again.threshold_info_ == model.threshold_info_ and again.threshold_info_["rule"] == "cross_fit"
    assert again.n_val_images_ == len(few)


def test_no_warning_from_enough_images(monkeypatch, caplog):
    monkeypatch.setattr(thresholds, "FEW_IMAGES", 4)
    with caplog.at_level(logging.WARNING, logger="somad"):
        SOMAD(**TINY, val_fraction=0.0).fit(_images(4))
    assert not [r for r in caplog.records if "good images: expect" in r.getMessage()]
