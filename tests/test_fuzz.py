"""Fuzzing the two file readers that take untrusted bytes.

* ``somad.io.images.load_image`` returns an RGB image or raises ``ImageLoadError``, whatever the bytes;
* ``somad.io.model_files.load_model`` (and ``somad.load``) returns a verified model or raises ``ModelFileError``.

Inputs are random bytes and valid files with flipped bytes and truncations. Each test is bounded
(``max_examples``, no per-example deadline, no example database) to keep the suite well under a minute.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from somad import SOMAD, load
from somad.errors import ImageLoadError, ModelFileError
from somad.io.images import load_image
from somad.io.model_files import load_model

# Pillow warns about the corrupt files it reads (bad TIFF tags, large images): expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str, mode: str = "RGB", size=(24, 16), **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


IMAGE_SEEDS = [
    _encoded("PNG"),
    _encoded("PNG", "P"),
    _encoded("PNG", "LA"),
    _encoded("JPEG", quality=80),
    _encoded("JPEG", "L", quality=80),
    _encoded("JPEG", quality=80, progressive=True),
    _encoded("TIFF"),
    _encoded("BMP"),
]


def mutate(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes replaced (often in the header) and maybe truncated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 127)  # anywhere, or the header
        data[draw(st.integers(0, limit))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def mutated_images(draw) -> bytes:
    return mutate(draw, IMAGE_SEEDS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def small_bomb_limit():
    """Refuse images above 2 megapixels so that a mutated size fails fast instead of allocating gigabytes."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000
    yield
    Image.MAX_IMAGE_PIXELS = previous


def _check_image(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        img = load_image(path)
    except ImageLoadError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert np.asarray(img).shape == (img.height, img.width, 3)


def test_image_seeds_are_valid(scratch):
    for i, data in enumerate(IMAGE_SEEDS):
        (scratch / f"seed{i}").write_bytes(data)
        assert load_image(scratch / f"seed{i}").mode == "RGB"


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048))
def test_load_image_random_bytes(scratch, data):
    _check_image(scratch / "random.img", data)


@FUZZ
@given(data=mutated_images())
def test_load_image_mutated_files(scratch, data):
    _check_image(scratch / "mutated.img", data)


# ---------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A small valid model file: 8 feature dimensions, a 2 x 2 SOM."""
    root = tmp_path_factory.mktemp("fuzz_model")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    model = SOMAD(
        weights="none",
        image_size=32,
        crop_size=None,
        dims=8,
        som_size=2,
        k=1,
        rough_epochs=1,
        fine_epochs=1,
        val_fraction=0.0,
        device="cpu",
    ).fit(images)
    path = model.save(root / "model.safetensors")
    return path.read_bytes()


def _check_model(path, data: bytes, *, full: bool = False) -> None:
    path.write_bytes(data)
    try:
        result = load(path, device="cpu") if full else load_model(path)
    except ModelFileError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
        return
    if full:
        assert hasattr(result, "extractor_")
    else:
        config, arrays = result
        assert isinstance(config, dict) and "channel_indices" in arrays


def test_model_seed_is_valid(scratch, model_bytes):
    _check_model(scratch / "seed.safetensors", model_bytes, full=True)
    assert load_model(scratch / "seed.safetensors")[0]["method"] == "somad"


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048))
def test_load_model_random_bytes(scratch, data):
    _check_model(scratch / "random.safetensors", data)


@FUZZ
@given(data=st.data())
def test_load_model_mutated_file(scratch, model_bytes, data):
    _check_model(scratch / "mutated.safetensors", data.draw(st.composite(lambda d: mutate(d, [model_bytes]))()))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_full_load_of_mutated_file(scratch, model_bytes, data):
    _check_model(
        scratch / "mutated_full.safetensors", data.draw(st.composite(lambda d: mutate(d, [model_bytes]))()), full=True
    )
