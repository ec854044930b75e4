"""Tests for somad.io.synthetic: layout, determinism, exact masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from somad.errors import DataError
from somad.io.datasets import is_mvtec_category, mvtec_test_samples, resolve_train_dir, validate_masks
from somad.io.images import load_image, load_mask
from somad.io.synthetic import DEFECT_TYPES, make_synthetic_category, render_part


def _files(category):
    return sorted(p.relative_to(category).as_posix() for p in category.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def default_category(tmp_path_factory):
    """The category written with the default arguments (the one ``somad demo`` uses)."""
    return make_synthetic_category(tmp_path_factory.mktemp("synthetic"))


def test_default_layout(default_category):
    cat = default_category
    assert cat.name == "synthetic_part"
    files = _files(cat)
    expected = (
        [f"train/good/{i:03d}.png" for i in range(40)]
        + [f"test/good/{i:03d}.png" for i in range(10)]
        + [f"test/scratch/{i:03d}.png" for i in range(10)]
        + [f"test/spot/{i:03d}.png" for i in range(10)]
        + [f"ground_truth/scratch/{i:03d}_mask.png" for i in range(10)]
        + [f"ground_truth/spot/{i:03d}_mask.png" for i in range(10)]
    )
    assert files == sorted(expected)
    assert is_mvtec_category(cat)
    assert resolve_train_dir(cat) == cat / "train" / "good"


def test_default_category_is_a_valid_mvtec_dataset(default_category, caplog):
    samples = mvtec_test_samples(default_category)
    assert len(samples) == 30
    assert sum(s.label for s in samples) == 20
    assert all((s.mask_path is not None) == (s.label == 1) for s in samples)
    assert "no ground-truth mask" not in caplog.text and "no matching test image" not in caplog.text
    validate_masks(samples)


def test_default_files_are_rgb_and_binary_masks(default_category):
    cat = default_category
    with Image.open(cat / "train" / "good" / "000.png") as img:
        assert (img.mode, img.size) == ("RGB", (256, 256))
    for kind in DEFECT_TYPES:
        for i in (0, 9):
            with Image.open(cat / "ground_truth" / kind / f"{i:03d}_mask.png") as m:
                assert m.mode == "L"
                values = set(np.unique(np.asarray(m)).tolist())
            assert values == {0, 255}
            mask = load_mask(cat / "ground_truth" / kind / f"{i:03d}_mask.png", shape=(256, 256))
            assert 0 < mask.mean() < 0.05  # a small, non-empty defect


def test_good_images_differ_but_look_alike(default_category):
    a = np.asarray(load_image(default_category / "train" / "good" / "000.png")).astype(float)
    b = np.asarray(load_image(default_category / "train" / "good" / "001.png")).astype(float)
    assert not np.array_equal(a, b)
    assert abs(a.mean() - b.mean()) < 15  # same kind of part
    assert a.std() > 10  # textured, not flat


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kwargs = dict(n_train=2, n_test_good=1, n_test_defect=2, size=64)
    a = make_synthetic_category(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic_category(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic_category(tmp_path / "c", seed=4, **kwargs)
    files = _files(a)
    assert files == _files(b) == _files(c)
    assert len(files) == 2 + 1 + 2 + 2
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train/good/000.png").read_bytes() != (c / "train/good/000.png").read_bytes()
    assert (a / "ground_truth/spot/000_mask.png").read_bytes() != (c / "ground_truth/spot/000_mask.png").read_bytes()


def test_odd_defect_count_split(tmp_path):
    cat = make_synthetic_category(tmp_path, name="odd", n_train=1, n_test_good=0, n_test_defect=3, size=48)
    assert len(list((cat / "test" / "scratch").glob("*.png"))) == 2
    assert len(list((cat / "test" / "spot").glob("*.png"))) == 1
    assert not list((cat / "test" / "good").glob("*.png"))


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("seed", [0, 1, (7, 1, 2, 5)])
def test_defect_changes_exactly_the_mask(defect, seed):
    clean, empty = render_part(seed, size=96)
    broken, mask = render_part(seed, size=96, defect=defect)
    assert clean.dtype == np.uint8 and clean.shape == (96, 96, 3)
    assert mask.dtype == bool and mask.shape == (96, 96)
    assert not empty.any()
    assert mask.any()
    changed = (clean != broken).any(axis=2)
    np.testing.assert_array_equal(changed, mask)
    # Visible but moderate contrast.
    delta = np.abs(clean.astype(int) - broken.astype(int)).max(axis=2)[mask]
    assert delta.min() >= 10
    assert 15 <= delta.mean() <= 60


def test_render_is_deterministic():
    a = render_part(11, size=64, defect="scratch")
    b = render_part(11, size=64, defect="scratch")
    c = render_part(12, size=64, defect="scratch")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError):
        render_part(0, size=8)
    with pytest.raises(ValueError):
        render_part(0, defect="dent")


def test_existing_category_not_clobbered_unless_overwrite(tmp_path):
    kwargs = dict(n_train=3, n_test_good=1, n_test_defect=2, size=48)
    cat = make_synthetic_category(tmp_path, **kwargs)
    with pytest.raises(DataError) as info:
        make_synthetic_category(tmp_path, **kwargs)
    assert str(cat) in str(info.value) and "\n" not in str(info.value)
    make_synthetic_category(tmp_path, overwrite=True, n_train=1, n_test_good=1, n_test_defect=2, size=48)
    assert [p.name for p in sorted((cat / "train" / "good").iterdir())] == ["000.png"]


def test_bad_counts(tmp_path):
    with pytest.raises(ValueError):
        make_synthetic_category(tmp_path, n_train=0)
    with pytest.raises(ValueError):
        make_synthetic_category(tmp_path, n_test_defect=-1)
