"""Tiling: large or elongated images scored as overlapping tiles of their aspect-kept frame, stitched into one map."""

import numpy as np
import pytest
from _tiny import tiny
from PIL import Image

from somad import SOMAD
from somad.errors import SomadError
from somad.features.extractor import Geometry

TINY = tiny(rough_epochs=1, local_aggregation=3, val_fraction=0.0)


@pytest.mark.parametrize("size", [(96, 200), (500, 1240), (64, 64), (632, 105), (1600, 800)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_the_frame_with_at_least_the_overlap(size, overlap):
    g = Geometry(image_size=64, crop_size=None, tile_size=48, tile_overlap=overlap)
    layout = g.layout(*size)
    fh, fw = layout.size
    assert min(fh, fw) == 64 and fh % 16 == 0 and fw % 16 == 0
    assert abs(fw / fh - size[1] / size[0]) < 0.15 * size[1] / size[0] or max(fh, fw) == 8 * 64  # aspect kept
    covered = np.zeros((fh, fw), int)
    for y, x in layout.offsets:
        assert y % 16 == 0 and x % 16 == 0 and y + 48 <= fh and x + 48 <= fw
        covered[y : y + 48, x : x + 48] += 1
    assert covered.min() >= 1  # every pixel of the frame is scored
    for axis in (0, 1):
        starts = sorted({o[axis] for o in layout.offsets})
        gaps = np.diff(starts)
        assert (gaps <= 48 * (1 - overlap) + 16).all()  # spread evenly; rounded to the 16-pixel grid


def test_one_tile_over_a_square_frame_equals_the_untiled_model():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.clip(rng.normal(128, 25, (64, 64, 3)), 0, 255).astype(np.uint8)) for _ in range(5)]
    plain = SOMAD(**TINY).fit(images)
    tiled = SOMAD(**TINY, tile_size=64).fit(images)
    a, ma = plain.predict_maps(images)
    b, mb = tiled.predict_maps(images)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(mb, ma, rtol=1e-4, atol=1e-4)


def test_elongated_images_keep_their_aspect_and_a_defect_at_the_far_end_is_found():
    rng = np.random.default_rng(1)

    def strip():
        y, x = np.mgrid[0:60, 0:300]
        base = np.stack([120 + 40 * np.sin(x / 3.0), 100 + 30 * np.cos(y / 4.0), 110 + 0 * x], -1)
        return np.clip(base + rng.normal(0, 6, (60, 300, 3)), 0, 255).astype(np.uint8)

    train = [Image.fromarray(strip()) for _ in range(6)]
    model = SOMAD(**TINY, tile_size=64).fit(train)
    layout = model.extractor_.geometry.layout(60, 300)
    assert layout.size == (64, 320) and len(layout.offsets) > 4  # not squashed to 64 x 64
    bad = strip()
    bad[20:40, 270:290] = (255, 0, 255)  # near the right end of the strip
    scores, maps = model.predict_maps([Image.fromarray(strip()), Image.fromarray(bad)], resolution="original")
    assert scores[1] > scores[0]
    assert maps[1].shape == (60, 300)
    assert np.unravel_index(np.argmax(maps[1]), maps[1].shape)[1] > 240  # the peak is where the defect is


def test_tiles_need_the_whole_frame_and_a_tile_on_the_grid():
    with pytest.raises(SomadError, match="needs crop_size=None"):
        SOMAD(**{**TINY, "crop_size": 48}, tile_size=48).fit(np.zeros((2, 64, 64, 3), np.uint8) + 100)
    with pytest.raises(SomadError, match="multiple of 16"):
        SOMAD(**TINY, tile_size=40).fit(np.zeros((2, 64, 64, 3), np.uint8) + 100)
