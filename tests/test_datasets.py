"""Tests for somad.io.datasets: train-dir resolution, MVTec and folder layouts, mask checks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from somad.errors import DataError
from somad.io.datasets import (
    Sample,
    folder_test_samples,
    is_mvtec_category,
    mvtec_test_samples,
    resolve_train_dir,
    validate_masks,
)


def _img(path: Path, size=(8, 6), mode="RGB") -> Path:
    """Write a small image; ``size`` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 0 if mode in ("L", "1") else (10, 20, 30)).save(path)
    return path


def _mask(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[1:3, 1:3] = 255
    Image.fromarray(arr).save(path)
    return path


def _category(root: Path) -> Path:
    cat = root / "bottle"
    for i in range(2):
        _img(cat / "train" / "good" / f"{i:03d}.png")
    _img(cat / "test" / "good" / "000.png")
    _img(cat / "test" / "good" / "001.png")
    for stem in ("000", "001"):
        _img(cat / "test" / "crack" / f"{stem}.png")
        _mask(cat / "ground_truth" / "crack" / f"{stem}_mask.png")
    _img(cat / "test" / "broken" / "000.png")
    _mask(cat / "ground_truth" / "broken" / "000_mask.png")
    return cat


# ---------------------------------------------------------------- Sample


def test_sample_is_frozen():
    s = Sample(Path("a.png"), 0, "good", None, Path("test/good/a.png"))
    with pytest.raises(AttributeError):
        s.label = 1  # type: ignore[misc]
    assert s == Sample(Path("a.png"), 0, "good", None, Path("test/good/a.png"))


# ---------------------------------------------------------------- resolve_train_dir


def test_resolve_train_dir_mvtec(tmp_path):
    cat = _category(tmp_path)
    assert resolve_train_dir(cat) == cat / "train" / "good"
    assert resolve_train_dir(str(cat)) == cat / "train" / "good"
    assert is_mvtec_category(cat)


def test_resolve_train_dir_plain_folder(tmp_path):
    _img(tmp_path / "good" / "a.jpg")
    assert resolve_train_dir(tmp_path / "good") == tmp_path / "good"
    assert not is_mvtec_category(tmp_path / "good")


@pytest.mark.parametrize("setup", ["missing", "file", "empty", "mvtec_without_train"])
def test_resolve_train_dir_errors(tmp_path, setup):
    target = tmp_path / "data"
    if setup == "file":
        target.write_bytes(b"not a folder")
    elif setup == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("x")
    elif setup == "mvtec_without_train":
        _img(target / "test" / "good" / "a.png")
    with pytest.raises(DataError) as info:
        resolve_train_dir(target)
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message
    assert "train/good" in message


def test_is_mvtec_category_false_for_missing(tmp_path):
    assert not is_mvtec_category(tmp_path / "nope")


# ---------------------------------------------------------------- mvtec_test_samples


def test_mvtec_test_samples(tmp_path):
    cat = _category(tmp_path)
    samples = mvtec_test_samples(cat)
    rel = [s.relpath.as_posix() for s in samples]
    assert rel == sorted(rel)
    assert rel == [
        "test/broken/000.png",
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/good/001.png",
    ]
    by_rel = {s.relpath.as_posix(): s for s in samples}
    good = by_rel["test/good/000.png"]
    assert (good.label, good.defect_type, good.mask_path) == (0, "good", None)
    crack = by_rel["test/crack/001.png"]
    assert (crack.label, crack.defect_type) == (1, "crack")
    assert crack.mask_path == cat / "ground_truth" / "crack" / "001_mask.png"
    assert crack.path == cat / "test" / "crack" / "001.png"
    validate_masks(samples)  # all sizes match


def test_mvtec_is_deterministic(tmp_path):
    cat = _category(tmp_path)
    assert mvtec_test_samples(cat) == mvtec_test_samples(cat)


def test_mvtec_missing_and_extra_masks(tmp_path, caplog):
    cat = _category(tmp_path)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    _mask(cat / "ground_truth" / "crack" / "999_mask.png")  # no image for it
    _mask(cat / "ground_truth" / "scratch" / "000_mask.png")  # no such test type
    with caplog.at_level(logging.WARNING, logger="somad.io.datasets"):
        samples = mvtec_test_samples(cat)
    crack = {s.relpath.name: s for s in samples if s.defect_type == "crack"}
    assert crack["001.png"].mask_path is None
    assert crack["000.png"].mask_path is not None
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 of 3 defective test image(s) have no ground-truth mask" in text
    assert "2 mask(s) in ground_truth/ have no matching test image" in text
    assert "999_mask.png" in text


def test_mvtec_no_ground_truth_folder(tmp_path, caplog):
    cat = tmp_path / "cat"
    _img(cat / "test" / "good" / "a.png")
    _img(cat / "test" / "hole" / "b.png")
    with caplog.at_level(logging.WARNING, logger="somad.io.datasets"):
        samples = mvtec_test_samples(cat)
    assert [s.label for s in samples] == [0, 1]
    assert all(s.mask_path is None for s in samples)
    assert "1 of 1 defective" in caplog.text


def test_mvtec_errors(tmp_path):
    with pytest.raises(DataError) as info:
        mvtec_test_samples(tmp_path / "nothing")
    assert "no test folder" in str(info.value) and "nothing" in str(info.value)
    cat = tmp_path / "empty_cat"
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError):
        mvtec_test_samples(cat)


def test_mvtec_skips_hidden_and_empty_type_dirs(tmp_path, caplog):
    cat = _category(tmp_path)
    _img(cat / "test" / ".ipynb_checkpoints" / "x.png")
    (cat / "test" / "empty_type").mkdir()
    with caplog.at_level(logging.WARNING, logger="somad.io.datasets"):
        samples = mvtec_test_samples(cat)
    assert {s.defect_type for s in samples} == {"good", "crack", "broken"}
    assert "empty_type" in caplog.text


# ---------------------------------------------------------------- folder_test_samples


def test_folder_layout(tmp_path):
    good = tmp_path / "ok"
    _img(good / "g2.png")
    _img(good / "g1.png")
    scratch = tmp_path / "scratch"
    _img(scratch / "s1.png")
    _img(scratch / "s2.jpg")
    masks = tmp_path / "masks"
    _mask(masks / "s1_mask.png")
    _mask(masks / "s2.png")  # plain stem also accepted

    samples = folder_test_samples(good, [scratch], masks)
    assert [s.relpath.as_posix() for s in samples] == ["ok/g1.png", "ok/g2.png", "scratch/s1.png", "scratch/s2.jpg"]
    assert [s.label for s in samples] == [0, 0, 1, 1]
    assert [s.defect_type for s in samples] == ["good", "good", "scratch", "scratch"]
    assert samples[0].mask_path is None
    assert samples[2].mask_path == masks / "s1_mask.png"
    assert samples[3].mask_path == masks / "s2.png"
    validate_masks(samples)


def test_folder_layout_prefers_suffix_and_type_subfolder(tmp_path):
    dent = tmp_path / "dent"
    _img(dent / "a.png")
    masks = tmp_path / "masks"
    _mask(masks / "a.png")
    _mask(masks / "a_mask.png")
    assert folder_test_samples(defect_dirs=[dent], mask_dir=masks)[0].mask_path == masks / "a_mask.png"
    _mask(masks / "dent" / "a_mask.png")
    assert folder_test_samples(defect_dirs=[dent], mask_dir=masks)[0].mask_path == masks / "dent" / "a_mask.png"
    _img(dent / "b.png")
    custom = folder_test_samples(defect_dirs=dent, mask_dir=tmp_path / "masks" / "dent", mask_suffix="_gt")
    assert custom[0].mask_path is None  # "_gt" suffix absent, plain stem absent there
    assert [s.relpath.as_posix() for s in custom] == ["dent/a.png", "dent/b.png"]


def test_folder_layout_unique_relpaths(tmp_path):
    a = tmp_path / "x" / "crack"
    b = tmp_path / "y" / "crack"
    _img(a / "001.png")
    _img(b / "001.png")
    samples = folder_test_samples(defect_dirs=[a, b])
    rel = [s.relpath.as_posix() for s in samples]
    assert rel == ["crack/001.png", "crack_2/001.png"]
    assert len(set(rel)) == len(rel)
    assert {s.defect_type for s in samples} == {"crack"}


def test_folder_layout_missing_masks_warn(tmp_path, caplog):
    dent = tmp_path / "dent"
    _img(dent / "a.png")
    _img(dent / "b.png")
    masks = tmp_path / "masks"
    _mask(masks / "a_mask.png")
    with caplog.at_level(logging.WARNING, logger="somad.io.datasets"):
        samples = folder_test_samples(defect_dirs=[dent], mask_dir=masks)
    assert samples[1].mask_path is None
    assert "1 of 2 defective image(s) have no mask" in caplog.text


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataError):
        folder_test_samples()
    with pytest.raises(DataError) as info:
        folder_test_samples(tmp_path / "nope")
    assert "nope" in str(info.value)
    good = tmp_path / "good"
    _img(good / "a.png")
    with pytest.raises(DataError) as info:
        folder_test_samples(good, [good])
    assert "listed twice" in str(info.value)
    with pytest.raises(DataError) as info:
        folder_test_samples(good, mask_dir=tmp_path / "no_masks")
    assert "no_masks" in str(info.value)


# ---------------------------------------------------------------- validate_masks


def test_validate_masks_size_mismatch(tmp_path):
    image = _img(tmp_path / "img.png", size=(8, 6))
    mask = _mask(tmp_path / "img_mask.png", size=(6, 8))
    sample = Sample(image, 1, "crack", mask, Path("crack/img.png"))
    with pytest.raises(DataError) as info:
        validate_masks([sample])
    message = str(info.value)
    assert "\n" not in message
    assert "img_mask.png" in message and "img.png" in message
    assert "8x6" in message and "6x8" in message


def test_validate_masks_missing_mask_file(tmp_path):
    image = _img(tmp_path / "img.png")
    sample = Sample(image, 1, "crack", tmp_path / "gone_mask.png", Path("crack/img.png"))
    with pytest.raises(DataError) as info:
        validate_masks([sample])
    assert "gone_mask.png" in str(info.value)


def test_validate_masks_skips_samples_without_mask(tmp_path):
    good = Sample(tmp_path / "not_even_read.png", 0, "good", None, Path("good/x.png"))
    validate_masks([good])


def test_mvtec_mask_size_mismatch_detected(tmp_path):
    cat = _category(tmp_path)
    _mask(cat / "ground_truth" / "crack" / "000_mask.png", size=(4, 4))
    with pytest.raises(DataError) as info:
        validate_masks(mvtec_test_samples(cat))
    assert "000_mask.png" in str(info.value) and "4x4" in str(info.value) and "6x8" in str(info.value)
