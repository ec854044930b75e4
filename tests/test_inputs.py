"""What users pass as images (``somad.io.inputs.as_items``): lists of numpy camera frames of every common shape and
type, mixed with paths and PIL images, decode as the same images as files; anything else is refused in one line
naming the entry."""

import numpy as np
import pytest
from _tiny import tiny
from PIL import Image

from somad import SOMAD
from somad.errors import SomadError
from somad.io.images import load_image
from somad.io.inputs import as_items

TINY = tiny(val_fraction=0.25)


def _texture(seed: int, size=(72, 88)) -> np.ndarray:
    h, w = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([110 + 60 * np.sin(x / 6.0), 120 + 50 * np.cos(y / 5.0), 90 + 0.6 * (x + y)], -1)
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return SOMAD(**TINY).fit([_texture(i) for i in range(8)])  # a list of camera frames trains too


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same test image as colour, grey and 12-bit-in-16-bit PNG files, and the arrays they hold."""
    root = tmp_path_factory.mktemp("frames")
    rgb = _texture(50)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    twelve = np.round(grey.astype(np.float64) * 4095 / 255).astype(np.uint16)  # a 12-bit camera in uint16
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(grey).save(root / "grey.png")
    Image.fromarray(twelve).save(root / "twelve.png")
    return root, rgb, grey, twelve


def test_a_list_of_camera_frames_scores_as_the_same_images_in_files(model, files):
    root, rgb, grey, twelve = files
    by_file = dict(
        zip(["rgb", "grey", "twelve"], model.predict_maps([root / f"{n}.png" for n in ("rgb", "grey", "twelve")])[0])
    )
    frames = {
        "HxWx3 uint8": (rgb, "rgb"),
        "HxWx4 uint8 (alpha dropped)": (np.dstack([rgb, np.full(grey.shape, 7, np.uint8)]), "rgb"),
        "HxW uint8": (grey, "grey"),
        "HxWx1 uint8": (grey[..., None], "grey"),
        "HxWx2 uint8 (grey, alpha dropped)": (np.dstack([grey, np.zeros_like(grey)]), "grey"),
        "HxW uint16, 12 bits": (twelve, "twelve"),
        "HxWx3 float in [0, 1]": (rgb.astype(np.float32) / 255, "rgb"),
        "HxWx3 float64 in [0, 255]": (rgb.astype(np.float64), "rgb"),
    }
    mixed = [root / "grey.png", Image.open(root / "rgb.png"), *(a for a, _ in frames.values())]
    scores = model.predict_maps(mixed)[0]
    expected = [by_file["grey"], by_file["rgb"], *(by_file[f] for _, f in frames.values())]
    for name, got, want in zip(["path", "PIL", *frames], scores, expected):
        assert got == pytest.approx(want, rel=1e-5), name
    assert len(model.predict(list(a for a, _ in frames.values()))) == len(frames)  # labels for a list too


def test_frames_decode_by_the_file_rules(files):
    root, rgb, grey, twelve = files
    items = as_items([twelve, grey, rgb.astype(np.float32) / 255, twelve.astype(bool)])
    assert [it.name for it in items] == ["array_00000", "array_00001", "array_00002", "array_00003"]
    np.testing.assert_array_equal(np.asarray(items[0].load()), np.asarray(load_image(root / "twelve.png")))
    np.testing.assert_array_equal(np.asarray(items[1].load()), np.asarray(load_image(root / "grey.png")))
    np.testing.assert_array_equal(np.asarray(items[2].load()), rgb)
    assert set(np.unique(np.asarray(items[3].load()))) <= {0, 255}  # bool: a bilevel image, 0 or 255


def test_one_array_argument_is_one_frame_or_a_batch(files):
    _, rgb, grey, _ = files
    assert len(as_items(rgb)) == len(as_items(grey)) == len(as_items(np.dstack([rgb, grey]))) == 1  # RGBA: one
    assert len(as_items(np.dstack([grey, grey]))) == 1  # grey and alpha: one
    assert len(as_items(np.stack([rgb] * 3))) == 3 and len(as_items(np.stack([grey] * 5))) == 5
    assert len(as_items(np.stack([grey.astype(np.uint16)] * 2))) == 2


@pytest.mark.parametrize(
    "entry, words",
    [
        (np.zeros((8, 8, 5)), ["images[1]", "float64", "(8, 8, 5)"]),
        (np.zeros((8, 8), np.complex64), ["images[1]", "complex64", "(8, 8)"]),
        (np.zeros((0, 8), np.uint8), ["images[1]", "uint8", "(0, 8)"]),
        (-np.ones((8, 8), np.int16), ["images[1]", "negative"]),
        (3, ["images[1]", "int", "is not an image"]),
        (b"\x89PNG", ["images[1]", "bytes", "is not an image"]),
    ],
)
def test_anything_else_is_refused_in_one_line_naming_the_entry(entry, words, files):
    with pytest.raises(SomadError) as error:
        as_items([files[1], entry])
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert "numpy image array" in message or "an image array is" in message or "unsigned" in message  # the fix


def test_a_malformed_array_argument_is_refused_in_one_line():
    with pytest.raises(SomadError, match=r"images: uint8 array of shape \(2, 3, 8, 8, 3\)"):
        as_items(np.zeros((2, 3, 8, 8, 3), np.uint8))
    with pytest.raises(SomadError, match=r"images: int is not an image input"):
        as_items(5)
