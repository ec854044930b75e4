"""Explanations (issue 28): each SOMAD node keeps the training patch that represents it best, each PatchCore bank row
the training patch it is, and a predicted region is shown beside the reference of the row nearest to its peak patch
(``region_references``, ``regions.csv``, ``somad predict --explain``, the ``somad evaluate`` report). The training
images are two-tone (red | blue, or blue | red: position alone does not tell a patch's colour), one with a green
square; the tiny configuration with a 6x6 map."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from _tiny import tiny, tiny_common
from PIL import Image

from somad import SOMAD, PatchCore, load
from somad.cli import main
from somad.io.inputs import as_items
from somad.io.model_files import load_model, save_model
from somad.io.outputs import REFERENCE_COLUMNS

RED, BLUE, GREEN = (200, 60, 50), (40, 70, 190), (40, 210, 60)
SQUARE = (slice(15, 55), slice(5, 45))  # rows, columns of the green square of g3.png
SIZE = (80, 100)


def two_tone(seed: int) -> np.ndarray:
    h, w = SIZE
    rng = np.random.default_rng(seed)
    left, right = (RED, BLUE) if seed % 2 == 0 else (BLUE, RED)
    image = np.empty((h, w, 3))
    image[:, : w // 2], image[:, w // 2 :] = left, right
    return np.clip(image + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _training_set(root):
    """``root/train`` (g0-g7, g3 with the green square) and ``root/good`` (v8-v11, for the thresholds)."""
    train, good = root / "train", root / "good"
    train.mkdir()
    good.mkdir()
    for i in range(8):
        image = two_tone(i)
        if i == 3:
            image[SQUARE] = GREEN
        Image.fromarray(image).save(train / f"g{i}.png")
    for i in range(8, 12):
        Image.fromarray(two_tone(i)).save(good / f"v{i}.png")
    return train, good


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    train, good = _training_set(root)
    # square: the pixel arithmetic of these tests is the square resize's (test_aspect covers a kept frame)
    model = SOMAD(**tiny(val_fraction=0.0, som_size=6, aspect="square")).fit(train).calibrate(good)
    return model, train, model.save(root / "m.safetensors")


@pytest.fixture(scope="module", params=[1.0, 0.1], ids=["whole bank", "coreset"])
def patchcore(request, tmp_path_factory):
    """A tiny PatchCore on the same images: every training patch in the bank (1.0), or a tenth of them."""
    root = tmp_path_factory.mktemp("explain_pc")
    train, good = _training_set(root)
    params = tiny_common(val_fraction=0.0, coreset_ratio=request.param, aspect="square")
    model = PatchCore(**params).fit(train).calibrate(good)
    return model, train, model.save(root / "pc.safetensors")


def _pasted() -> np.ndarray:
    """g5.png (blue | red, as g3.png) with g3.png's green square pasted at its place."""
    base = two_tone(5)
    source = two_tone(3)
    source[SQUARE] = GREEN
    base[SQUARE] = source[SQUARE]
    return base


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_node_keeps_its_member_patch_nearest_its_mean(fitted):
    model, train, _ = fitted
    assert model.reference_images_ == [f"g{i}.png" for i in range(8)]
    assert model.reference_root_ == str(train.absolute())
    feats = torch.cat([model._checked_features(model.extractor_.tiles(it.load())[0]) for it in as_items(train)])
    n, d, h, w = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, d).to(torch.float16).float()  # as fit holds them
    assignment = torch.cdist(x, model.som_.weights_).argmin(1)
    refs = model.node_references_.tolist()
    assert len(refs) == 36 and any(r[0] == -1 for r in refs) == bool(model.gaussians_.empty.any())
    for node, (image, rx, ry) in enumerate(refs):
        members = torch.nonzero(assignment == node).flatten()
        if members.numel() == 0:
            assert image == -1
            continue
        row = int(members[(x[members] - model.gaussians_.means[node]).norm(dim=1).argmin()])
        i, j = divmod(row % (h * w), w)
        # the patch centre in the 100x80 original: back through the 64 px resize (no crop in the tiny setting)
        assert (image, rx, ry) == (row // (h * w), round((j + 0.5) * 4 * 100 / 64), round((i + 0.5) * 4 * 80 / 64))


def test_a_normal_patch_references_a_patch_of_its_colour(fitted):
    model, train, _ = fitted
    image = _pasted()
    pred = next(model.predict_iter([image]))
    points = [(x, y) for x in (8, 20, 35, 65, 80, 92) for y in (5, 70)]  # outside the square, off the middle line
    refs = model.region_references(pred, points)
    same = 0
    for (x, y), (name, rx, ry, distance) in zip(points, refs):
        reference = np.asarray(Image.open(train / name), dtype=float)
        colour = reference[max(0, ry - 2) : ry + 3, max(0, rx - 2) : rx + 3].reshape(-1, 3).mean(0)
        want = np.asarray(image[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(0))
        other = np.asarray(RED if np.abs(want - RED).sum() > np.abs(want - BLUE).sum() else BLUE)
        same += np.abs(colour - want).sum() < np.abs(colour - other).sum()
        assert distance > 0
    assert same >= 0.75 * len(points)  # by position alone: half (the halves of the training images are swapped)


def test_a_pasted_patch_references_its_source_image_at_its_place(fitted):
    model, _, _ = fitted
    green = [
        (node, x, y)
        for node, (image, x, y) in enumerate(model.node_references_.tolist())
        if image == 3 and SQUARE[1].start <= x < SQUARE[1].stop and SQUARE[0].start <= y < SQUARE[0].stop
    ]
    assert green, "the fit gave no node whose representative lies in g3.png's green square"
    _, x, y = green[0]
    pasted = model.region_references(next(model.predict_iter([_pasted()])), [(x, y)])[0]
    assert pasted[0] == "g3.png" and abs(pasted[1] - x) <= 7 and abs(pasted[2] - y) <= 5  # within one patch
    plain = model.region_references(next(model.predict_iter([two_tone(5)])), [(x, y)])[0]
    assert plain[0] != "g3.png" or not (abs(plain[1] - x) <= 7 and abs(plain[2] - y) <= 5)  # the paste made it


def test_predict_explain_writes_reference_columns_and_one_image_per_region(fitted, tmp_path):
    _, _, path = fitted
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_pasted()).save(inputs / "pasted.png")
    assert main(["-q", "predict", str(path), str(inputs), "-o", str(tmp_path / "out"), "--explain"]) == 0
    rows = _rows(tmp_path / "out" / "regions.csv")
    assert rows and all(r["reference_image"].startswith("g") for r in rows)
    assert all(float(r["reference_distance"]) > 0 and int(r["reference_x"]) >= 0 for r in rows)
    written = sorted(p.name for p in (tmp_path / "out" / "explanations").iterdir())
    assert written == [f"pasted_region{i}.png" for i in range(1, len(rows) + 1)]
    with Image.open(tmp_path / "out" / "explanations" / written[0]) as shown:
        assert shown.width > 2 * 256 - 1  # the region and its reference, side by side


def test_moved_training_images_are_said_once_and_the_rest_is_written(fitted, tmp_path, caplog):
    _, train, path = fitted
    moved = tmp_path / "moved"
    shutil.copytree(train, moved)
    shutil.rmtree(train)
    try:
        Image.fromarray(_pasted()).save(tmp_path / "pasted.png")
        with caplog.at_level(logging.WARNING):
            assert (
                main(["-q", "predict", str(path), str(tmp_path / "pasted.png"), "-o", str(tmp_path / "o"), "--explain"])
                == 0
            )
        said = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
        assert len(said) == 1 and str(train / "g") in said[0]
        assert (tmp_path / "o" / "scores.csv").exists() and list((tmp_path / "o" / "explanations").iterdir())
        assert _rows(tmp_path / "o" / "regions.csv")[0]["reference_image"].startswith("g")
    finally:
        shutil.copytree(moved, train)


def test_a_model_file_without_references_loads_scores_the_same_and_cannot_explain(fitted, tmp_path, caplog):
    model, _, path = fitted
    config, arrays = load_model(path)
    del arrays["node_references"], config["state"]["reference_images"], config["state"]["reference_root"]
    old = load(save_model(tmp_path / "old.safetensors", config, arrays))
    image = _pasted()
    assert old.node_references_ is None and old.region_references(next(old.predict_iter([image])), [(1, 1)]) is None
    np.testing.assert_array_equal(old.predict_maps([image])[0], load(path).predict_maps([image])[0])
    Image.fromarray(image).save(tmp_path / "pasted.png")
    for name, model_file in (("new", path), ("old", tmp_path / "old.safetensors")):
        with caplog.at_level(logging.WARNING):
            argv = ["-q", "predict", str(model_file), str(tmp_path / "pasted.png"), "-o", str(tmp_path / name)]
            assert main([*argv, "--explain"]) == 0
    assert _rows(tmp_path / "old" / "scores.csv") == _rows(tmp_path / "new" / "scores.csv")
    old_rows = _rows(tmp_path / "old" / "regions.csv")
    assert old_rows and all(r[c] == "" for r in old_rows for c in REFERENCE_COLUMNS)
    assert not (tmp_path / "old" / "explanations").exists()
    assert sum("keeps no normal references" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------ PatchCore
def test_each_bank_row_references_the_training_patch_it_holds(patchcore):
    model, train, _ = patchcore
    assert model.reference_images_ == [f"g{i}.png" for i in range(8)] and model.reference_root_ == str(train)
    refs = model.bank_references_
    assert refs.shape == (len(model.memory_bank_), 3) and bool((refs[:, 0] >= 0).all())
    feats = {
        name: model._checked_features(model.extractor_.tiles(Image.open(train / name).convert("RGB"))[0])[0]
        for name in model.reference_images_
    }
    for row, (image, x, y) in enumerate(refs.tolist()):
        i, j = model._patch_at(x, y, SIZE)  # the patch centre back to its grid cell (100x80 images)
        torch.testing.assert_close(feats[model.reference_images_[image]][:, i, j], model.memory_bank_[row])


def test_a_pasted_patch_references_its_source_image_at_its_place_patchcore(patchcore):
    model, _, _ = patchcore
    whole = len(model.memory_bank_) == model.n_patches_
    pred = next(model.predict_iter([_pasted()]))
    points = [(x, y) for x in (10, 25, 40) for y in (20, 35, 50)]  # inside the green square, pasted from g3.png
    for (x, y), (name, rx, ry, distance) in zip(points, model.region_references(pred, points)):
        # green only ever was in g3.png's square: the reference lies there (within one patch, 12.5 x 10 px)
        assert name == "g3.png" and distance >= 0
        assert SQUARE[1].start - 13 <= rx < SQUARE[1].stop + 13 and SQUARE[0].start - 10 <= ry < SQUARE[0].stop + 10
        if whole:  # every training patch is in the bank: the very patch it was pasted from
            assert (rx, ry) == tuple(round(v) for v in model._patch_centre(*model._patch_at(x, y, SIZE), SIZE))
    plain = model.region_references(next(model.predict_iter([two_tone(5)])), points)
    assert all(name != "g3.png" for name, *_ in plain)  # without the paste: no reason to point at g3.png


def test_patchcore_references_are_the_scoring_distances(patchcore):
    """The reference's distance is the peak patch's distance to its nearest bank row, which the patch map holds."""
    model, _, _ = patchcore
    image = _pasted()
    feats = model._checked_features(model.extractor_.tiles(Image.fromarray(image))[0])
    patch, _ = model._patch_scores(feats)  # (1, h, w) before the upsampling and the blur
    pred = next(model.predict_iter([image]))
    points = [(8, 5), (30, 30), (92, 70)]
    refs = model.region_references(pred, points)
    for (x, y), (*_, distance) in zip(points, refs):
        i, j = model._patch_at(x, y, SIZE)
        assert distance == pytest.approx(float(patch[0, i, j]), rel=1e-4, abs=1e-5)


def test_a_patchcore_file_without_references_loads_scores_the_same_and_cannot_explain(patchcore, tmp_path, caplog):
    model, _, path = patchcore
    config, arrays = load_model(path)
    assert arrays["bank_references"].dtype == torch.int32
    del arrays["bank_references"], config["state"]["reference_images"], config["state"]["reference_root"]
    old = load(save_model(tmp_path / "old.safetensors", config, arrays))
    new = load(path)
    image = _pasted()
    assert old.bank_references_ is None and old.region_references(next(old.predict_iter([image])), [(1, 1)]) is None
    assert torch.equal(new.bank_references_, model.bank_references_)
    assert new.reference_images_ == model.reference_images_
    np.testing.assert_array_equal(old.predict_maps([image])[0], new.predict_maps([image])[0])
    Image.fromarray(image).save(tmp_path / "pasted.png")
    with caplog.at_level(logging.WARNING):
        for name, model_file in (("new", path), ("old", tmp_path / "old.safetensors")):
            argv = ["-q", "predict", str(model_file), str(tmp_path / "pasted.png"), "-o", str(tmp_path / name)]
            assert main([*argv, "--explain"]) == 0
    assert _rows(tmp_path / "old" / "scores.csv") == _rows(tmp_path / "new" / "scores.csv")
    new_rows, old_rows = _rows(tmp_path / "new" / "regions.csv"), _rows(tmp_path / "old" / "regions.csv")
    assert new_rows and all(r["reference_image"] == "g3.png" for r in new_rows)  # the paste is what is flagged
    assert old_rows and all(r[c] == "" for r in old_rows for c in REFERENCE_COLUMNS)
    assert len(list((tmp_path / "new" / "explanations").iterdir())) == len(new_rows)
    assert not (tmp_path / "old" / "explanations").exists()
    assert sum("keeps no normal references" in r.getMessage() for r in caplog.records) == 1


def test_a_tiled_patchcore_keeps_no_references(tmp_path):
    train, _ = _training_set(tmp_path)
    model = PatchCore(**tiny_common(val_fraction=0.0, tile_size=32, image_size=48)).fit(train)
    assert model.bank_references_ is None and model.reference_images_ is None
    assert model.region_references(next(model.predict_iter([_pasted()])), [(1, 1)]) is None


# ------------------------------------------------------------------------------------------ the evaluate report
def _category(root):
    """An MVTec category: two good test images and the pasted one, with its ground truth (the green square)."""
    category = root / "category"
    for name, image in (("good/000.png", two_tone(12)), ("good/001.png", two_tone(13)), ("paste/000.png", _pasted())):
        (category / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(category / "test" / name)
    truth = np.zeros(SIZE, np.uint8)
    truth[SQUARE] = 255
    (category / "ground_truth" / "paste").mkdir(parents=True)
    Image.fromarray(truth).save(category / "ground_truth" / "paste" / "000_mask.png")
    return category


def test_the_report_shows_each_flagged_region_beside_its_normal_reference(fitted, tmp_path):
    _report_names_the_references(fitted[2], tmp_path)


def test_the_report_shows_patchcore_references(patchcore, tmp_path):
    _report_names_the_references(patchcore[2], tmp_path)


def _report_names_the_references(path, tmp_path):
    category = _category(tmp_path)
    assert main(["-q", "evaluate", str(path), str(category), "-o", str(tmp_path / "e")]) == 0
    assert main(["-q", "evaluate", str(path), str(category), "-o", str(tmp_path / "n"), "--no-report"]) == 0
    e = tmp_path / "e"
    assert _rows(e / "scores.csv") == _rows(tmp_path / "n" / "scores.csv")  # explanations never touch scores
    metrics = [json.loads((folder / "metrics.json").read_text())["overall"] for folder in (e, tmp_path / "n")]
    assert metrics[0] == metrics[1]
    assert not (tmp_path / "n" / "explanations").exists()
    regions = [r for r in _rows(e / "regions.csv") if r["path"] == "test/paste/000.png"]
    assert regions and all(r["reference_image"].startswith("g") for r in regions)
    main_region = max(regions, key=lambda r: float(r["peak_score"]))
    page = (e / "report.html").read_text(encoding="utf-8")
    ref = main_region["reference_image"], main_region["reference_x"], main_region["reference_y"]
    assert "normal reference: {} at ({}, {})".format(*ref) in page  # the main region's, as regions.csv names it
    picture = f"explanations/test/paste/000_region{main_region['region']}.png"
    assert f'href="{picture}"' in page and (e / picture).is_file()  # its thumbnail opens it
    assert f'src="report_files/{picture}"' in page and (e / "report_files" / picture).is_file()
    assert "cannot be read" not in page and "No normal references" not in page


def test_the_report_says_in_one_line_when_the_training_images_moved(fitted, tmp_path):
    _, train, path = fitted
    category = _category(tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(train, moved)
    shutil.rmtree(train)
    try:
        assert main(["-q", "evaluate", str(path), str(category), "-o", str(tmp_path / "e")]) == 0
    finally:
        shutil.copytree(moved, train)
    page = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    assert page.count("The training images cannot be read") == 1 and str(train / "g") in page
    assert "training image not readable: grey" in page and "normal reference: g" in page  # still named


@pytest.mark.parametrize("method", ["somad", "patchcore"])
def test_references_of_a_fit_with_flips_point_at_the_mirrored_place_they_show(tmp_path, method):
    """``augment="flips"``: a flipped copy's patch refers to the place in its training image that it shows (the
    mirrored grid position), so g3.png's green square is still found at its place, and every reference lies in its
    image. A normal patch's reference has its colour."""
    train, _ = _training_set(tmp_path)
    if method == "somad":
        model = SOMAD(**tiny(val_fraction=0.0, som_size=6, aspect="square", augment="flips")).fit(train)
        refs = model.node_references_
    else:
        params = tiny_common(val_fraction=0.0, coreset_ratio=1.0)
        model = PatchCore(**params, augment="flips").fit(train)
        refs = model.bank_references_
        assert len(refs) == model.n_patches_ == 4 * PatchCore(**params).fit(train).n_patches_  # every copy's patches
    kept = refs[refs[:, 0] >= 0]
    assert len(kept) > 0 and bool(((kept[:, 1:] >= 0) & (kept[:, 1:] < torch.tensor([SIZE[1], SIZE[0]]))).all())
    pred = next(model.predict_iter([_pasted()]))
    if method == "somad":  # a node whose representative lies in the green square: the paste there points at it
        green = [(x, y) for image, x, y in kept.tolist() if image == 3 and SQUARE[1].start <= x < SQUARE[1].stop]
        green = [(x, y) for x, y in green if SQUARE[0].start <= y < SQUARE[0].stop][:1]
        assert green, "no node's representative lies in g3.png's green square"
    else:  # g3.png's square mirrored left-right, pasted into g4.png (red | blue) at its mirrored place: its patches'
        # nearest are the horizontally flipped copy's, and their references the places they show in g3.png
        image = two_tone(4)
        image[SQUARE[0], SIZE[1] - SQUARE[1].stop : SIZE[1] - SQUARE[1].start] = GREEN
        pred = next(model.predict_iter([image]))
        green = [(x, y) for x in (65, 75, 85) for y in (25, 35, 45)]  # inside the mirrored square
    for name, rx, ry, _ in model.region_references(pred, green):
        assert name == "g3.png" and SQUARE[1].start - 7 <= rx < SQUARE[1].stop + 7
        assert SQUARE[0].start - 5 <= ry < SQUARE[0].stop + 5
