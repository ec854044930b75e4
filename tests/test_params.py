"""Parameters declared once: scikit-learn's protocol from the signatures, one table for rules, flags and help."""

import inspect

import numpy as np
import pytest

from somad import SOMAD, load
from somad.cli import build_parser
from somad.errors import SomadError
from somad.io.model_files import load_model, save_model
from somad.methods import METHODS

TINY = dict(
    weights="none", image_size=64, som_size=4, k=2, rough_epochs=1, fine_epochs=1, device="cpu", val_fraction=0.0
)


@pytest.mark.parametrize("name", list(METHODS))
def test_sklearn_clone_get_params_and_set_params(name):
    from sklearn.base import clone

    cls = METHODS[name]
    model = cls(seed=7, blur_sigma=2.5)
    copy = clone(model)
    assert type(copy) is cls and copy is not model
    assert copy.get_params(deep=True) == model.get_params(deep=False)
    signature = set()
    for klass in cls.__mro__[:-1]:
        if "__init__" in klass.__dict__:
            signature |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "common")}
    assert set(model.get_params()) == signature  # every keyword of the signatures, nothing else
    assert model.set_params(seed=3) is model and model.seed == 3
    with pytest.raises(SomadError, match="'nope' is not a parameter"):
        model.set_params(nope=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_parameter_has_one_rule_and_the_flags_carry_the_signature_defaults(name):
    cls = METHODS[name]
    table, defaults = cls._table(), cls._defaults()
    assert set(table) == set(cls._get_param_names())  # one row per parameter
    parser = build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    flags = {a.dest: a for a in fit._actions}
    for param, row in table.items():
        if not row.cli:
            continue
        action = flags[param]
        if all(param not in m._get_param_names() or m._defaults()[param] == defaults[param] for m in METHODS.values()):
            assert action.default == defaults[param], param
        assert row.check(defaults[param]) is None, param  # the defaults pass their own rules


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"k": 0}, "k=0 is invalid"),
        ({"eps": float("nan")}, "eps=nan is invalid: it must be a finite number"),
        ({"blur_sigma": float("inf")}, "blur_sigma=inf is invalid"),
        ({"seed": 1.5}, "seed=1.5 is invalid: it must be an integer"),
        ({"seed": -1}, "seed=-1 is invalid"),
        ({"dims": "50"}, "dims='50' is invalid: it must be an integer, not str"),
        ({"image_size": "256"}, "image_size='256' is invalid"),
        ({"image_size": 60000}, "image_size=60000 is invalid: it must be <= 4096"),
        ({"som_size": 4000}, "som_size=4000 is invalid: choose one of: auto; or it must be <= 256"),
        ({"som_samples": 0}, "som_samples=0 is invalid"),
        ({"crop_size": 0}, "crop_size=0 is invalid"),
        ({"search": "approx"}, "search='approx' is invalid: choose one of"),
    ],
)
def test_bad_values_fail_before_any_work_with_one_line(bad, fragment):
    with pytest.raises(SomadError) as info:
        SOMAD(**{**TINY, **bad}).fit(np.zeros((1, 8, 8, 3), np.uint8))  # would fail later if it got that far
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("k", 0, "k=0 is invalid"),
        ("blur_sigma", float("inf"), "blur_sigma=inf is invalid"),
        ("crop_size", -5, "crop_size=-5 is invalid"),
        ("image_size", 30000, "image_size=30000 is invalid"),
    ],
)
def test_a_loaded_config_follows_the_same_rules(tmp_path, field, value, fragment):
    rng = np.random.default_rng(0)
    images = rng.integers(40, 220, (4, 64, 64, 3), dtype=np.uint8)
    path = SOMAD(**TINY).fit(images).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    config["params"][field] = value
    bad = save_model(tmp_path / "bad.safetensors", config, arrays)  # a valid hash over a bad value
    with pytest.raises(SomadError) as info:
        load(bad)
    assert fragment in str(info.value) and str(bad) in str(info.value) and "\n" not in str(info.value)


def test_scikit_learn_names_keep_their_meaning():
    """score_samples: the lower, the more abnormal; decision_function: negative = anomalous; predict: -1
    anomalous, +1 normal, the sign of decision_function except for frames the input gate refuses (scikit-learn's
    outlier detectors); one (H, W, 3) array is one image."""
    rng = np.random.default_rng(1)
    images = rng.integers(60, 200, (6, 64, 64, 3), dtype=np.uint8)
    model = SOMAD(**{**TINY, "val_fraction": 0.34}).fit(images)
    bright = images[0].copy()
    bright[20:40, 20:40] = 255
    pair = np.stack([images[1], bright])
    scores, _ = model.predict_maps(pair)
    np.testing.assert_array_equal(model.score_samples(pair), -scores)
    decision = model.decision_function(pair)
    np.testing.assert_allclose(decision, model.image_threshold_ - scores, rtol=1e-6)
    assert decision[1] < 0 and model.score_samples(bright)[0] < model.score_samples(images[1])[0]
    labels = model.predict(pair)
    assert labels.dtype.kind == "i" and labels.tolist() == np.where(decision < 0, -1, 1).tolist()
    assert model.predict(images[1]).shape == (1,)  # one (H, W, 3) array is one image
    blank = np.zeros((64, 64, 3), np.uint8)  # refused by the input gate: anomalous whatever its score
    assert model.predict(blank).tolist() == [-1]
    model.image_threshold_ = None
    with pytest.raises(SomadError, match="no threshold"):
        model.predict(pair)
