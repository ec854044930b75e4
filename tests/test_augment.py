"""``augment="flips"``: fit also learns each training image's horizontal, vertical and 180-degree flips; what is
learned changes, what sets the thresholds and how the map is sized do not."""

import numpy as np
import pytest
from _tiny import tiny, tiny_common

from somad import SOMAD, PatchCore
from somad.errors import SomadError


def ramp(seed: int, mirrored: bool = False) -> np.ndarray:
    """A left-to-right colour ramp with noise: its mirror image has every edge the other way round."""
    h, w = 80, 100
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([40 + 1.8 * x, 60 + 0.5 * y, 200 - 1.5 * x], -1)
    image = np.clip(image + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    return image[:, ::-1].copy() if mirrored else image


TRAIN = [ramp(i) for i in range(8)]
GOOD = [ramp(i) for i in range(20, 26)]
MIRRORED = [ramp(i, True) for i in range(30, 36)]


@pytest.mark.parametrize(
    "cls, params",
    [(SOMAD, tiny(val_fraction=0.0, som_size=6)), (PatchCore, tiny_common(val_fraction=0.0))],
    ids=["somad", "patchcore"],
)
def test_flips_make_the_mirrored_part_normal(cls, params):
    plain = cls(**params).fit(TRAIN)
    flipped = cls(**params, augment="flips").fit(TRAIN)
    good, mirrored = (plain.predict_maps(x)[0] for x in (GOOD, MIRRORED))
    assert mirrored.min() > 4 * good.max()  # unseen: every edge runs the other way
    good, mirrored = (flipped.predict_maps(x)[0] for x in (GOOD, MIRRORED))
    assert mirrored.max() < 2 * good.max()  # learned from the flipped copies


def test_flips_quadruple_the_patches_not_the_map_nor_the_threshold_images():
    plain = SOMAD(**tiny(cv=4, som_size="auto", aspect="square")).fit(TRAIN)  # 16x16 patches per image
    flipped = SOMAD(**tiny(cv=4, som_size="auto", aspect="square", augment="flips")).fit(TRAIN)
    assert flipped.n_patches_ == 4 * plain.n_patches_ == 4 * 8 * 16 * 16
    assert flipped.som_.size == plain.som_.size == 6  # from the distinct patches: 2048 // 50, not 8192 // 50
    # cross-fitted thresholds: each of the 8 images scored once, as it is, by a model fitted without it
    assert flipped.threshold_info_["n_images"] == plain.threshold_info_["n_images"] == 8
    assert flipped.get_params()["augment"] == "flips"


def test_an_unknown_augmentation_is_refused_in_one_line():
    with pytest.raises(SomadError) as info:
        SOMAD(**tiny(augment="rotations")).fit(TRAIN)
    assert "augment='rotations' is invalid" in str(info.value) and "flips" in str(info.value)
    assert "\n" not in str(info.value)
