"""SOMAD end to end: initialisation, persistence, determinism, geometry and a real synthetic-defect check."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny
from PIL import Image

from somad import SOMAD, load
from somad.errors import NotFittedError, SomadError
from somad.evaluation.metrics import image_auroc, pixel_auroc
from somad.features.extractor import FeatureExtractor, Geometry, gaussian_blur, select_channels, to_original_resolution

TINY = tiny(crop_size=None, val_fraction=0.0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(1, 64, 64, 3))
    return np.clip(base + rng.integers(-20, 20, size=(8, 64, 64, 3)), 0, 255).astype(np.uint8)


def _features(model, imgs):
    batch = torch.stack([model.extractor_.preprocess(Image.fromarray(a)) for a in imgs])
    return model.extractor_(batch)


def test_som_initialisation_equals_position_means(images):
    """With zero training epochs the SOM is its initialisation: node (r, c) = mean feature at patch (r, c)."""
    model = SOMAD(**{**TINY, "som_size": 16, "rough_epochs": 0, "fine_epochs": 0}).fit(images)
    feats = _features(model, images)  # (N, D, 16, 16): 64 px / stride 4
    expected = feats.double().mean(0).permute(1, 2, 0).reshape(256, -1).float()
    assert torch.allclose(model.som_.weights_, expected, atol=1e-5)


def test_predict_shapes_and_sign(images):
    model = SOMAD(**TINY).fit(images[:6])
    scores, maps = model.predict_maps(images)
    assert scores.shape == (8,) and maps.shape == (8, 64, 64)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    assert np.allclose(scores, maps.reshape(8, -1).max(1))  # image score = map maximum
    bright = images[:1].copy()
    bright[0, 20:40, 20:40] = 255  # a patch far outside the training distribution scores higher
    assert model.predict_maps(bright)[0][0] > scores[:6].max()


def test_save_load_gives_identical_scores(images, tmp_path):
    model = SOMAD(**{**TINY, "dims": 50}).fit(images[:6])
    path = model.save(tmp_path / "m.safetensors")
    again = load(path)
    assert np.array_equal(again.channel_indices_, model.channel_indices_)
    assert again.get_params() == model.get_params()
    a, ma = model.predict_maps(images)
    b, mb = again.predict_maps(images)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)


def test_seeded_fit_is_bit_identical(images):
    a = SOMAD(**{**TINY, "seed": 7, "dims": 40}).fit(images[:6]).predict_maps(images)[0]
    b = SOMAD(**{**TINY, "seed": 7, "dims": 40}).fit(images[:6]).predict_maps(images)[0]
    assert np.array_equal(a, b)


def test_channel_subset_is_seeded_and_a_slice_of_all_features(images):
    idx = select_channels(176, 50, seed=3)
    assert np.array_equal(idx, select_channels(176, 50, seed=3)) and len(set(idx)) == 50
    assert not np.array_equal(idx, select_channels(176, 50, seed=4))
    assert np.array_equal(select_channels(1792, None, seed=0), select_channels(1792, 550, seed=0))
    with pytest.raises(SomadError, match="choose 1..176"):
        select_channels(176, 177, seed=0)
    full = FeatureExtractor("efficientnet_lite0", weights="none", image_size=64, crop_size=None)
    part = FeatureExtractor("efficientnet_lite0", weights="none", image_size=64, crop_size=None, channel_indices=idx)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(part(x), full(x)[:, torch.as_tensor(idx)], atol=1e-6)


def test_not_fitted_and_parameter_errors(images):
    with pytest.raises(NotFittedError):
        SOMAD().predict_maps(images)
    with pytest.raises(SomadError, match="k=17"):
        SOMAD(**{**TINY, "k": 17}).fit(images)
    with pytest.raises(SomadError, match="eps"):
        SOMAD(**{**TINY, "eps": -1}).fit(images)


def test_search_and_feature_dtype_choices_are_validated(images):
    with pytest.raises(SomadError, match="search='approx' is invalid: choose one of: ivf, exact"):
        SOMAD(**{**TINY, "search": "approx"}).fit(images)
    with pytest.raises(SomadError, match="feature_dtype='int8' is invalid: choose one of: float16, float32"):
        SOMAD(**{**TINY, "feature_dtype": "int8"}).fit(images)
    with pytest.raises(SomadError, match="factor_dtype='bf16' is invalid"):
        SOMAD(**{**TINY, "factor_dtype": "bf16"}).fit(images)


def test_float16_factors_halve_the_file_and_keep_the_scores(images, tmp_path):
    a = SOMAD(**{**TINY, "dims": 60, "factor_dtype": "float32"}).fit(images)
    b = SOMAD(**{**TINY, "dims": 60}).fit(images)  # float16 is the default
    pa, pb = a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    assert pb.stat().st_size < 0.6 * pa.stat().st_size
    loaded = load(pb)
    assert loaded.factor_dtype == "float16" and loaded.gaussians_.packed.dtype == torch.float16
    np.testing.assert_allclose(loaded.predict_maps(images)[0], a.predict_maps(images)[0], rtol=5e-3)


def test_fast_search_scores_like_exact_search_on_a_large_map(images):
    """A 32x32 map (1024 nodes) uses the coarse-to-fine search in training and scoring; scoring the same
    model exhaustively gives nearly the same maps, and the saved model keeps its search choice."""
    model = SOMAD(**{**TINY, "som_size": 32, "k": 4}).fit(images)
    assert model.search == "ivf" and model.gaussians_.counts.sum() == model.n_patches_
    fast_scores, fast_maps = model.predict_maps(images)
    model.search = "exact"
    exact_scores, exact_maps = model.predict_maps(images)
    assert np.corrcoef(fast_maps.ravel(), exact_maps.ravel())[0, 1] > 0.99
    assert np.mean(np.isclose(fast_maps, exact_maps, rtol=1e-3)) > 0.9
    np.testing.assert_allclose(fast_scores, exact_scores, rtol=0.05)


def test_float16_feature_store_matches_float32(images):
    a = SOMAD(**{**TINY, "search": "exact", "feature_dtype": "float32"}).fit(images)
    b = SOMAD(**{**TINY, "search": "exact", "feature_dtype": "float16"}).fit(images)
    sa, ma = a.predict_maps(images)
    sb, mb = b.predict_maps(images)
    np.testing.assert_allclose(sb, sa, rtol=2e-2)
    assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.999


def test_float16_overflow_is_a_clear_error():
    from somad.errors import NumericalError

    model = SOMAD(**TINY)
    with pytest.raises(NumericalError, match="feature_dtype='float32'"):
        model._fit_features(iter([torch.full((2, 3, 4, 4), 1e6)]), 2)


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 40, 33, dtype=torch.float64)
    expected = np.stack([gaussian_filter(a.numpy(), 4.0) for a in x])
    assert np.allclose(gaussian_blur(x, 4.0).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize(
    "grid, size, sigma",
    [((56, 56), 224, 4.0), ((28, 40), 256, 4.0), ((5, 5), 9, 4.0), ((14, 14), 64, 0.0), ((7, 7), 7, 2.0)],
)
def test_upsample_blur_equals_interpolate_then_blur(grid, size, sigma):
    """The precomputed matrices give what scoring did step by step: bilinear upsampling, then the blur (also
    where the blur radius is cut at the map size, without a blur, and without upsampling)."""
    from somad.features.extractor import upsample_blur

    p = torch.rand(3, *grid, dtype=torch.float32) * 10
    ref = gaussian_blur(F.interpolate(p[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0], sigma)
    got = upsample_blur(p, size, sigma)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_original_resolution_puts_the_crop_back():
    g = Geometry(image_size=8, crop_size=4)  # crop = rows/cols 2..5 of the resized 8x8 image
    m = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
    out = to_original_resolution(m, g, [(8, 8)])[0]
    assert np.array_equal(out[2:6, 2:6], m[0].numpy())  # the crop, in place
    assert np.array_equal(out[0, :], out[2, :]) and np.array_equal(out[:, 7], out[:, 5])  # edges replicated
    big = to_original_resolution(m, g, [(16, 24)])[0]
    assert big.shape == (16, 24)


@pytest.mark.slow
def test_synthetic_defects_are_found_with_real_weights(tmp_path):
    """EfficientNet-Lite0 ImageNet features + a small SOM find painted scratches and spots."""
    from somad.io.datasets import mvtec_test_samples
    from somad.io.images import load_mask
    from somad.io.synthetic import make_synthetic_category

    cat = make_synthetic_category(tmp_path, n_train=16, n_test_good=8, n_test_defect=12, size=128, seed=1)
    model = SOMAD(
        image_size=128, crop_size=None, som_size=16, k=4, rough_epochs=10, fine_epochs=8, val_fraction=0.0, device="cpu"
    ).fit(cat)
    samples = mvtec_test_samples(cat)
    scores, maps = model.predict_maps([s.path for s in samples], resolution="original")
    labels = np.array([s.label for s in samples])
    masks = [load_mask(s.mask_path) if s.mask_path else np.zeros(m.shape, bool) for s, m in zip(samples, maps)]
    assert image_auroc(labels, scores) >= 0.9
    assert pixel_auroc(masks, maps) >= 0.9


def test_a_model_file_from_before_the_search_option_keeps_the_exact_search(images, tmp_path):
    """Files written by somad 0.1.0 have no `search` parameter: they load with the exhaustive search they
    were fitted with, so their scores do not change."""
    from somad.io.model_files import load_model, save_model

    path = SOMAD(**{**TINY, "search": "exact", "feature_dtype": "float32"}).fit(images).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    for name in ("search", "feature_dtype"):
        del config["params"][name]
    save_model(tmp_path / "old.safetensors", config, arrays)
    old = load(tmp_path / "old.safetensors")
    assert (old.search, old.feature_dtype) == ("exact", "float32")
    np.testing.assert_array_equal(old.predict_maps(images)[0], load(path).predict_maps(images)[0])


def test_a_model_file_of_format_version_1_loads_with_the_same_scores(images, tmp_path, monkeypatch):
    """Format version 1 (somad <= 0.4) packed each whitener triangle row by row under another name; such
    files are repacked in strips on load."""
    from somad.io import model_files as model_io

    path = SOMAD(**TINY).fit(images).save(tmp_path / "m.safetensors")
    config, arrays = model_io.load_model(path)
    g = load(path).gaussians_
    rows, cols = torch.tril_indices(g.means.shape[1], g.means.shape[1])
    arrays["node_whiteners_tril"] = g.whiteners[:, rows, cols]
    del arrays["node_whitener_strips"]
    monkeypatch.setattr(model_io, "FORMAT_VERSION", 1)
    model_io.save_model(tmp_path / "v1.safetensors", config, arrays)
    monkeypatch.undo()
    assert model_io.load_model(tmp_path / "v1.safetensors")  # readable as written
    old = load(tmp_path / "v1.safetensors")
    assert torch.equal(old.gaussians_.packed, g.packed)
    np.testing.assert_array_equal(old.predict_maps(images)[0], load(path).predict_maps(images)[0])


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_patch_scores_are_the_min_mahalanobis_over_the_k_nearest_nodes(images, shrinkage):
    """An oracle from first principles: assign every training patch to its nearest prototype, build each node's
    Gaussian (member mean, cov + eps I, shrunk toward the pooled covariance), then score each test patch by the
    minimum Mahalanobis distance over its k Euclidean-nearest prototypes. Euclidean scoring would fail it."""
    params = {
        **TINY,
        "som_size": 3,
        "k": 3,
        "search": "exact",
        "factor_dtype": "float32",
        "feature_dtype": "float32",
        "eps": 0.05,
        "shrinkage": shrinkage,
    }
    model = SOMAD(**params).fit(images[:6])
    train = _features(model, images[:6]).permute(0, 2, 3, 1).reshape(-1, model.extractor_.dims).double()
    protos = model.som_.weights_.double()
    nearest = torch.cdist(train, protos).argmin(1)
    d = train.shape[1]
    groups = [train[nearest == i] for i in range(len(protos))]
    scatter = [(g - g.mean(0)).T @ (g - g.mean(0)) for g in groups if len(g) >= 2]
    pooled = sum(scatter) / sum(len(g) - 1 for g in groups if len(g) >= 2)
    eye = torch.eye(d, dtype=torch.float64)
    covs, means = [], []
    for i, g in enumerate(groups):
        if len(g) >= 2:
            cov = (1 - shrinkage) * torch.cov(g.T) + shrinkage * pooled + params["eps"] * eye
        else:
            cov = pooled + params["eps"] * eye
        covs.append(torch.linalg.inv(cov))
        means.append(g.mean(0) if len(g) else protos[i])
    test = _features(model, images[6:]).double()
    b, _, h, w = test.shape
    x = test.permute(0, 2, 3, 1).reshape(-1, d)
    live = [i for i, g in enumerate(groups) if len(g)]  # empty nodes are never searched
    order = torch.cdist(x, protos[live]).argsort(1)[:, : params["k"]]
    expected = torch.stack(
        [
            min(
                torch.sqrt((x[n] - means[live[j]]) @ covs[live[j]] @ (x[n] - means[live[j]])) for j in order[n].tolist()
            )
            for n in range(x.shape[0])
        ]
    ).view(b, h, w)
    patch, _ = model._patch_scores(_features(model, images[6:]))
    torch.testing.assert_close(patch.double(), expected, rtol=2e-3, atol=2e-3)
    nodes = model.nearest_nodes(x.float())  # the public scoring steps give the same sets and distances
    assert [sorted(r) for r in nodes.tolist()] == [sorted(live[j] for j in r) for r in order.tolist()]
    torch.testing.assert_close(model.node_distances(x.float(), nodes).min(1).values.view(b, h, w), patch)
    euclidean = torch.cdist(x, torch.stack(means)[live]).min(1).values.view(b, h, w)
    assert not torch.allclose(patch.double(), euclidean, rtol=0.05)


def test_a_0_5_model_file_loads_as_it_was_fitted(images, tmp_path):
    """0.5 files have no local_aggregation or shrinkage and call the IVF search "fast": the migrations in
    model_io (one table) load them with no aggregation, no shrinkage and the IVF search, scores unchanged."""
    from somad.io.model_files import MIGRATIONS, load_model, save_model

    params = {**TINY, "local_aggregation": 1, "shrinkage": 0.0, "search": "ivf"}
    path = SOMAD(**params).fit(images).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    for name in ("local_aggregation", "shrinkage"):
        del config["params"][name]
    config["params"]["search"] = "fast"
    save_model(tmp_path / "old.safetensors", config, arrays)
    old = load(tmp_path / "old.safetensors")
    assert (old.local_aggregation, old.shrinkage, old.search) == (1, 0.0, "ivf")
    np.testing.assert_array_equal(old.predict_maps(images)[0], load(path).predict_maps(images)[0])
    assert all(isinstance(what, str) and callable(step) for what, step in MIGRATIONS)


def test_a_0_6_model_file_loads_with_the_same_scores(images, tmp_path):
    """0.6 files have no scatter_dtype, no training-set hash and no median good score: they load as fitted,
    cannot be updated or give normalised scores (each a one-line error saying what to run), and score the same."""
    from somad.io.model_files import load_model, save_model

    path = SOMAD(**{**TINY, "val_fraction": 0.25}).fit(images).save(tmp_path / "m.safetensors")
    config, arrays = load_model(path)
    del config["params"]["scatter_dtype"], config["state"]["train_set_sha256"]
    del config["state"]["threshold_info"]["good_score_median"], config["state"]["threshold_info"]["good_scores"]
    del config["state"]["train_image_digests"], config["state"]["input_profile"]
    old = load(save_model(tmp_path / "old.safetensors", config, arrays))
    assert old.scatter_dtype is None and old.train_set_sha256_ is None
    np.testing.assert_array_equal(old.predict_maps(images)[0], load(path).predict_maps(images)[0])
    assert old.image_threshold_ == load(path).image_threshold_
    for call, fix in (
        (lambda: old.normalized_scores([1.0]), "somad calibrate"),
        (lambda: old.update(images), "--updatable"),
    ):
        with pytest.raises(SomadError, match=fix) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "n_patches, k, side",
    [
        (5 * 4096, 4, 20),  # 5 images at the default geometry (64 x 64 patches each)
        (10 * 4096, 4, 28),
        (20 * 4096, 4, 40),
        (38 * 4096, 4, 55),
        (39 * 4096, 4, 56),  # 50 * 56 * 56 = 156800 patches: the paper's side from here on
        (686 * 4096, 4, 56),
        (10, 4, 4),  # never below 4 ...
        (10, 30, 6),  # ... nor below k nodes
    ],
)
def test_auto_som_side_gives_each_node_fifty_patches_up_to_the_papers_56(n_patches, k, side):
    assert SOMAD(k=k).som_side(n_patches) == side
    assert SOMAD(k=k, som_size=12).som_side(n_patches) == 12  # a side named is kept


def test_auto_som_size_fits_a_small_map_on_few_patches_and_survives_save(images, tmp_path, caplog):
    """8 frames of 64 px give 8 * 16 * 16 = 2048 patches: a 6x6 map (56 patches per node), said in the log; the file
    keeps the fitted side and ``som_size`` stays "auto" (a clone refits by the rule)."""
    with caplog.at_level("INFO", logger="somad.methods.somad"):
        model = SOMAD(**{**TINY, "som_size": "auto"}).fit(images)
    assert model.som_.size == 6 and model.som_.weights_.shape[0] == 36 and model.gaussians_.means.shape[0] == 36
    assert "SOM 6x6, not 56x56 (som_size=auto): 2048 training patches" in caplog.text
    model.save(tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    assert back.get_params()["som_size"] == "auto" and back.som_.size == 6
    from somad.cli.info import text
    from somad.service.model_info import describe

    assert "som_size=auto (6x6)" in text(describe(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(back.predict_maps(images[:2])[0], model.predict_maps(images[:2])[0])
    smaller = SOMAD(**{**TINY, "som_size": "auto"}).fit(images[:2])  # 512 patches: 10 per node would need 3x3
    assert smaller.som_.size == 4
