"""SOMAD.update / `somad update`: good images merged into the node statistics with the SOM held fixed.

The oracle: fit(A) then update(B) must give the node statistics that fit's own code path
(``fit_node_gaussians``) gives on the patches of A + B assigned with the SOM of fit(A).
"""

import hashlib
import logging

import numpy as np
import pytest
import torch
from _tiny import tiny
from PIL import Image

from somad import SOMAD, load
from somad.cli import main
from somad.errors import ModelFileError, SomadError
from somad.io.inputs import as_items, training_set_hash
from somad.methods import METHODS
from somad.som.node_search import make_search
from somad.som.node_stats import NodeMoments, fit_node_gaussians, gaussians_from_moments
from somad.verdicts import far_above

TINY = tiny(val_fraction=0.0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(1, 64, 64, 3))
    return np.clip(base + rng.integers(-30, 30, size=(12, 64, 64, 3)), 0, 255).astype(np.uint8)


def _patch_rows(model, imgs):
    batch = torch.stack([model.extractor_.preprocess(Image.fromarray(a)) for a in imgs])
    feats = model.extractor_(batch)
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).to(getattr(torch, model.feature_dtype))


def _oracle(model, imgs):
    """fit's node statistics on ``imgs`` with the model's SOM held fixed (fit's own function, fit's assignment)."""
    x = _patch_rows(model, imgs)
    _, assignment = make_search(model.som_.weights_, model.som_.size, model.search)(x, 1)
    return fit_node_gaussians(
        x,
        assignment[:, 0],
        model.som_.weights_,
        float(model.eps),
        dtype=getattr(torch, model.factor_dtype),
        shrinkage=float(model.shrinkage),
    )


def test_chan_merge_equals_the_statistics_of_the_union():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(3.0, 2.0, size=(900, 7)))
    a = torch.from_numpy(rng.integers(0, 6, size=900))
    a[a == 5] = 4  # node 5 stays empty; node 0 gets members only from the second half below
    a[:450][a[:450] == 0] = 1
    whole = NodeMoments.of(x, a, 6)
    merged = NodeMoments.of(x[:450], a[:450], 6).merge(NodeMoments.of(x[450:], a[450:], 6))
    assert torch.equal(merged.counts, whole.counts) and int(whole.counts[5]) == 0
    assert torch.allclose(merged.means[:5], whole.means[:5], rtol=1e-12, atol=1e-12)
    assert torch.allclose(merged.scatter, whole.scatter, rtol=1e-10, atol=1e-9)
    inplace = NodeMoments.of(x[:450], a[:450], 6)
    first = inplace.merge(NodeMoments.zeros(6, 7))  # a float64 copy: the original is not touched
    assert first is not inplace and first.merge(NodeMoments.of(x[450:], a[450:], 6), inplace=True) is first
    assert torch.equal(first.counts, whole.counts) and torch.allclose(first.scatter, whole.scatter, rtol=1e-10)
    assert int(inplace.counts.sum()) == int((a[:450] >= 0).sum())
    node = x[a == 2]
    centred = node - node.mean(0)
    assert torch.allclose(merged.dense(torch.tensor([2]))[0], centred.T @ centred, rtol=1e-10)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_gaussians_from_moments_equal_fit_node_gaussians(shrinkage):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(400, 6)).astype(np.float32))
    a = torch.from_numpy(rng.integers(0, 9, size=400))
    a[a == 8] = 0  # node 8 empty
    a[0], a[1:][a[1:] == 7] = 7, 6  # node 7: one member
    prototypes = torch.randn(9, 6)
    ref = fit_node_gaussians(x, a, prototypes, 0.5, shrinkage=shrinkage)
    got = gaussians_from_moments(NodeMoments.of(x, a, 9), prototypes, 0.5, shrinkage=shrinkage)
    assert torch.equal(got.counts, ref.counts) and int(ref.counts[8]) == 0 and int(ref.counts[7]) == 1
    assert torch.allclose(got.means, ref.means, atol=1e-6)
    assert torch.allclose(got.whiteners, ref.whiteners, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shrinkage", [0.0, 0.4])
def test_fit_then_update_equals_fit_stats_on_the_union(images, tmp_path, shrinkage):
    a, b, test = images[:6], images[6:10], images[10:]
    params = {**TINY, "scatter_dtype": "float64", "factor_dtype": "float32", "shrinkage": shrinkage}
    model = SOMAD(**params).fit(a)
    path = model.save(tmp_path / "a.safetensors")
    loaded = load(path)
    loaded.update(b)
    oracle = _oracle(loaded, np.concatenate([a, b]))
    g = loaded.gaussians_
    assert torch.equal(g.counts, oracle.counts) and int(g.counts.sum()) == 10 * 16 * 16
    assert torch.allclose(g.means, oracle.means, atol=1e-5)
    assert torch.allclose(g.whiteners, oracle.whiteners, rtol=1e-4, atol=1e-5)
    assert loaded.n_train_images_ == 10 and loaded.n_patches_ == 10 * 256
    scores = loaded.predict_maps(test)[0]
    reference = SOMAD(**params).fit(a)  # the same SOM (same seed), then fit's statistics on A + B
    reference.gaussians_ = oracle
    assert np.allclose(scores, reference.predict_maps(test)[0], rtol=1e-4)
    assert not np.allclose(scores, model.predict_maps(test)[0], rtol=1e-3)  # the update changed the scores
    again = load(loaded.save(tmp_path / "ab.safetensors"))  # saved and reloaded: the same scores, updatable
    assert np.array_equal(again.predict_maps(test)[0], scores)
    assert again.updates_ == [{"n_images": 4, "n_patches": 1024, "images_sha256": training_set_hash(as_items(b))}]
    # the training-set hash names the history: the fit's images, then the update's
    chained = hashlib.sha256(f"{model.train_set_sha256_}+{again.updates_[0]['images_sha256']}".encode()).hexdigest()
    assert again.train_set_sha256_ == chained != model.train_set_sha256_
    assert again.check_updatable() is not None


def test_float32_scatter_and_float16_factors_stay_close_to_the_oracle(images, tmp_path):
    """The defaults of an updatable model: scatter stored in float32, whiteners in float16."""
    model = SOMAD(**TINY, scatter_dtype="float32").fit(images[:6])
    loaded = load(model.save(tmp_path / "m.safetensors"))
    assert loaded.gaussians_.moments.scatter.dtype == torch.float32
    loaded.update(images[6:10])
    oracle = _oracle(loaded, images[:10])
    assert torch.equal(loaded.gaussians_.counts, oracle.counts)
    w, o = loaded.gaussians_.whiteners.float(), oracle.whiteners.float()
    assert float((w - o).abs().max()) <= 2e-3 * float(o.abs().max())
    ref = SOMAD(**TINY).fit(images[:6])
    ref.gaussians_ = oracle
    assert np.allclose(loaded.predict_maps(images[10:])[0], ref.predict_maps(images[10:])[0], rtol=2e-3)


def test_a_model_without_scatter_loads_but_refuses_update(images, tmp_path):
    model = SOMAD(**TINY).fit(images[:4])
    path = model.save(tmp_path / "plain.safetensors")
    loaded = load(path)  # files without the scatter load and score as before
    assert loaded.gaussians_.moments is None and np.isfinite(loaded.predict_maps(images[:1])[0]).all()
    with pytest.raises(SomadError, match="refit with `somad fit --updatable`") as info:
        loaded.update(images[4:6])
    assert "\n" not in str(info.value)


def test_a_file_whose_config_and_scatter_disagree_is_refused(images, tmp_path):
    from somad.io.model_files import load_model, save_model

    path = SOMAD(**TINY, scatter_dtype="float32").fit(images[:4]).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    arrays["node_scatter_tril"] = arrays["node_scatter_tril"][:, :-1].contiguous()  # wrong shape
    save_model(tmp_path / "bad.safetensors", config, arrays)
    with pytest.raises(ModelFileError, match="node_scatter_tril"):
        load(tmp_path / "bad.safetensors")
    del arrays["node_scatter_tril"]  # config says updatable, array missing
    save_model(tmp_path / "bad2.safetensors", config, arrays)
    with pytest.raises(ModelFileError, match="re-run `somad fit`"):
        load(tmp_path / "bad2.safetensors")


def _write_folder(folder, imgs):
    folder.mkdir(parents=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def test_cli_update_and_its_refusals(images, tmp_path, capsys):
    a = _write_folder(tmp_path / "a", images[:6])
    b = _write_folder(tmp_path / "b", images[6:10])
    held = _write_folder(tmp_path / "held", images[10:])
    flags = ["--weights", "none", "--image-size", "64", "--som-size", "4", "--k", "2", "--rough-epochs", "2"]
    flags += ["--fine-epochs", "1", "--val-fraction", "0.3", "--device", "cpu"]
    assert main(["-q", "fit", str(a), "-o", str(tmp_path / "m.safetensors"), "--updatable", *flags]) == 0
    model = load(tmp_path / "m.safetensors")
    assert model.scatter_dtype == "float32" and model.image_threshold_ is not None
    assert main(["-q", "update", str(tmp_path / "m.safetensors"), str(b), "-o", str(tmp_path / "m2.safetensors")]) == 0
    updated = load(tmp_path / "m2.safetensors")
    assert updated.image_threshold_ == model.image_threshold_  # kept without --calibrate
    model.update(str(b))
    assert np.array_equal(updated.predict_maps(images[10:])[0], model.predict_maps(images[10:])[0])
    out3 = tmp_path / "m3.safetensors"
    assert (
        main(["-q", "update", str(tmp_path / "m.safetensors"), str(b), "-o", str(out3), "--calibrate", str(held)]) == 0
    )
    model.calibrate(str(held))
    assert load(out3).image_threshold_ == pytest.approx(model.image_threshold_)
    capsys.readouterr()

    assert main(["-q", "fit", str(a), "-o", str(tmp_path / "plain.safetensors"), *flags]) == 0
    assert (
        main(["-q", "update", str(tmp_path / "plain.safetensors"), str(b), "-o", str(tmp_path / "x.safetensors")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "plain.safetensors" in err and "--updatable" in err and "\n" not in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "somad"])
def test_cli_update_refuses_the_baselines(images, tmp_path, capsys, method):
    model = METHODS[method](weights="none", image_size=64, val_fraction=0.0, device="cpu").fit(images[:4])
    path = model.save(tmp_path / f"{method}.safetensors")
    b = _write_folder(tmp_path / "b", images[4:6])
    assert main(["-q", "update", str(path), str(b), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is a {method} model" in err and "SOMAD models only" in err and "\n" not in err


def test_update_keeps_the_extractor_and_refuses_features_of_another_size(images):
    model = SOMAD(**TINY, scatter_dtype="float32").fit(images[:4])
    other = SOMAD(**{**TINY, "dims": 20}, scatter_dtype="float32").fit(images[:4])
    x = _patch_rows(other, images[4:5])  # 20-d features of another extractor
    with pytest.raises(ValueError, match="cannot merge"):
        model.check_updatable().merge(NodeMoments.of(x, torch.zeros(len(x), dtype=torch.long), 16))


def test_update_then_calibrate_on_the_merged_images_is_refused(images, tmp_path, capsys):
    """The merged images join the training images' fingerprints: calibrating on them is refused, by the API after
    the update and by `somad update --calibrate` before any feature is extracted; other good images pass."""
    a = _write_folder(tmp_path / "a", images[:8])
    b = _write_folder(tmp_path / "b", images[8:10])
    held = _write_folder(tmp_path / "held", images[10:])
    model = SOMAD(**{**TINY, "val_fraction": 0.25, "cv": "holdout"}, scatter_dtype="float32").fit(a)
    path = model.save(tmp_path / "m.safetensors")
    assert len(model.train_image_digests_) == 6
    model.update(b, accept_outliers=True)
    assert len(model.train_image_digests_) == 8
    with pytest.raises(SomadError, match=r"^2 of 2 images to calibrate on were trained on .*biased low"):
        model.calibrate(b)
    again = load(model.save(tmp_path / "m2.safetensors"))  # the fingerprints are saved
    with pytest.raises(SomadError, match="were trained on"):
        again.calibrate(b)
    out = tmp_path / "m3.safetensors"
    assert main(["-q", "update", str(path), str(b), "-o", str(out), "--calibrate", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 2 of 2 images to calibrate on were trained on") and "\n" not in err
    assert not out.exists()
    args = ["-q", "update", str(path), str(b), "-o", str(out), "--calibrate", str(held), "--accept-outliers"]
    assert main(args) == 0 and load(out).threshold_info_["n_images"] == 2


def test_update_refuses_an_image_far_above_the_threshold(images, tmp_path, caplog):
    model = SOMAD(**{**TINY, "val_fraction": 0.25, "cv": "holdout"}, scatter_dtype="float32").fit(images[:8])
    rng = np.random.default_rng(5)
    off = np.clip(
        rng.integers(0, 256, (1, 8, 8, 3)).repeat(8, 1).repeat(8, 2) + rng.normal(0, 10, (1, 64, 64, 3)), 0, 255
    )
    offered = np.concatenate([images[8:10], off.astype(np.uint8)])
    scores = model.predict_maps(offered)[0]
    assert far_above(scores, model.image_threshold_, model.threshold_info_).tolist() == [False, False, True]
    counts = model.gaussians_.counts.clone()
    with pytest.raises(SomadError, match=r"^update: 1 of 3 images offered as good .*array_00002.*--accept-outliers"):
        model.update(offered)
    assert torch.equal(model.gaussians_.counts, counts) and model.n_train_images_ == 6  # nothing merged
    model.update(offered[:2])  # the good ones alone pass
    assert model.n_train_images_ == 8
    with caplog.at_level(logging.WARNING, logger="somad"):
        model.update(offered[2:], accept_outliers=True)
    assert model.n_train_images_ == 9 and any("accepted" in r.getMessage() for r in caplog.records)
