"""Tests for somad.io.images: mode conversion, EXIF, failure messages, listing, masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from somad.errors import DataError, ImageLoadError, SomadError
from somad.io.images import (
    IMAGE_EXTENSIONS,
    array_to_rgb,
    decode_bytes,
    image_size,
    list_images,
    load_image,
    load_mask,
    to_rgb,
)


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _rgb(path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------- mode conversions


def test_rgb_png_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _rgb(_save(Image.fromarray(arr), tmp_path / "a.png"))
    np.testing.assert_array_equal(out, arr)


def test_accepts_str_path(tmp_path):
    path = _save(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "a.png")
    assert load_image(str(path)).size == (3, 2)


def test_grey_l(tmp_path):
    arr = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    out = _rgb(_save(Image.fromarray(arr, "L"), tmp_path / "g.png"))
    assert out.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], arr)


def test_bilevel(tmp_path):
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    out = _rgb(_save(img, tmp_path / "b.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])
    assert (out == out[:, :, :1]).all()


def test_la_drops_alpha(tmp_path):
    img = Image.fromarray(np.array([[[100, 0], [50, 255]]], dtype=np.uint8), "LA")
    out = _rgb(_save(img, tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0, :, 1], [100, 50])


def test_rgba_drops_alpha(tmp_path):
    arr = np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], dtype=np.uint8)
    out = _rgb(_save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out, arr[:, :, :3])


def test_palette_colours_preserved(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    out = _rgb(_save(img, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    path = _save(img, tmp_path / "pt.png", transparency=1)
    assert Image.open(path).info.get("transparency") is not None
    out = _rgb(path)
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50]])


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (1, 1), (0, 0, 0, 0))  # white
    out = _rgb(_save(img, tmp_path / "c.tif"))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_scaled_by_dtype_range(tmp_path, ext):
    arr = np.array([[0, 65535, 257, 25700]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / f"i16{ext}")
    assert Image.open(path).mode.startswith("I;16")
    out = _rgb(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 1, 100])


def test_16bit_dark_image_not_stretched(tmp_path):
    arr = np.array([[1000, 20000]], dtype=np.uint16)  # dark 16-bit image: no min-max normalisation
    out = _rgb(_save(Image.fromarray(arr), tmp_path / "dark.png"))
    np.testing.assert_array_equal(out[0, :, 0], [4, 78])  # round(1000/257), round(20000/257)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_camera_bit_depth_in_16bit_png_keeps_its_brightness(tmp_path, bits):
    white = 2**bits - 1
    arr = np.array([[0, white, white // 2 + 1]], dtype=np.uint16)
    out = _rgb(_save(Image.fromarray(arr), tmp_path / f"cam{bits}.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 128])  # not 0, 16, 8 as a 16-bit scale would give


def test_16bit_big_endian_mode():
    arr = np.array([[0, 65535, 32896]], dtype=">u2")
    img = Image.frombytes("I;16B", (3, 1), arr.tobytes())
    out = np.asarray(to_rgb(img, "mem"))
    np.testing.assert_array_equal(out[0, :, 2], [0, 255, 128])


def test_32bit_int_holding_16bit_values(tmp_path):
    arr = np.array([[0, 65535, 257]], dtype=np.int32)
    path = _save(Image.fromarray(arr), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [0, 255, 1])


def test_32bit_int_above_16_bits_scaled_by_its_detected_depth(tmp_path):
    arr = np.array([[0, 2**20 - 1, 2**19]], dtype=np.int32)  # 20-bit data in a 32-bit container
    np.testing.assert_array_equal(_rgb(_save(Image.fromarray(arr), tmp_path / "i32b.tif"))[0, :, 0], [0, 255, 128])
    arr = np.array([[0, 2**31 - 1, 2**30]], dtype=np.int32)
    np.testing.assert_array_equal(_rgb(_save(Image.fromarray(arr), tmp_path / "i32c.tif"))[0, :, 0], [0, 127, 64])


def test_float_unit_range(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32)
    out = _rgb(_save(Image.fromarray(arr), tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 0])


def test_float_byte_range_clipped(tmp_path):
    arr = np.array([[0.0, 100.0, 300.0, np.nan]], dtype=np.float32)
    out = _rgb(_save(Image.fromarray(arr), tmp_path / "f255.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 0])


def test_jpeg_loads(tmp_path):
    path = _save(Image.new("RGB", (8, 8), (120, 60, 30)), tmp_path / "x.JPG", quality=95)
    out = _rgb(path)
    assert np.abs(out.astype(int) - [120, 60, 30]).max() <= 3


# ---------------------------------------------------------------- EXIF orientation


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("ext,options", [(".png", {}), (".jpg", {}), (".tif", {"compression": "tiff_lzw"})])
def test_exif_orientation_6_rotates(tmp_path, ext, options):
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    path = _save(Image.fromarray(arr), tmp_path / f"o6{ext}", exif=_exif(6), **options)
    out = _rgb(path)
    assert out.shape == (40, 20, 3)
    # Orientation 6: rotate 90 degrees clockwise for display -> left half becomes top half.
    expected = np.rot90(arr, k=-1)
    assert np.abs(out[:, :, 0].astype(int) - expected).mean() < 5
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 50
    assert image_size(path) == (40, 20)


def test_exif_orientation_exact_png(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    path = _save(Image.fromarray(arr), tmp_path / "o.png", exif=_exif(6))
    np.testing.assert_array_equal(_rgb(path)[:, :, 0], np.rot90(arr, k=-1))


@pytest.mark.parametrize("orientation", [3, 8])
def test_exif_other_orientations(tmp_path, orientation):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    path = _save(Image.fromarray(arr), tmp_path / "o.png", exif=_exif(orientation))
    expected = np.rot90(arr, k=2 if orientation == 3 else 1)
    np.testing.assert_array_equal(_rgb(path)[:, :, 0], expected)
    assert image_size(path) == expected.shape


def test_uncompressed_oriented_tiff_correct_or_refused(tmp_path):
    # Some Pillow versions garble uncompressed TIFFs with a transposing orientation tag;
    # load_image must then refuse the file instead of returning wrong pixels.
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    path = _save(Image.fromarray(arr), tmp_path / "raw.tif", tiffinfo={274: 6})
    try:
        out = _rgb(path)
    except ImageLoadError as exc:
        assert "raw.tif" in str(exc) and "\n" not in str(exc)
    else:
        np.testing.assert_array_equal(out[:, :, 0], np.rot90(arr, k=-1))
    assert image_size(path) == (3, 2)


def test_image_size_plain(tmp_path):
    path = _save(Image.new("RGB", (30, 10)), tmp_path / "s.png")
    assert image_size(path) == (10, 30)


# ---------------------------------------------------------------- failures


def _assert_one_line(exc_info, name: str):
    message = str(exc_info.value)
    assert "\n" not in message and "\r" not in message
    assert name in message
    assert isinstance(exc_info.value, SomadError)
    return message


def _noise_png(path, size=64):
    arr = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "nope.png")
    assert "not found" in _assert_one_line(info, "nope.png")


def test_directory_named_like_image(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "dir.png")
    _assert_one_line(info, "dir.png")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "empty.png")
    assert "empty" in _assert_one_line(info, "empty.png")


def test_non_image_bytes(tmp_path):
    (tmp_path / "text.jpg").write_text("hello\nworld\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "text.jpg")
    message = _assert_one_line(info, "text.jpg")
    assert "cannot identify image file" in message and "--on-error skip" in message


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path, fmt, ext):
    full = tmp_path / f"full{ext}"
    arr = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(arr).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageLoadError) as info:
        load_image(cut)
    _assert_one_line(info, f"cut{ext}")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_pixel_data(tmp_path):
    path = _noise_png(tmp_path / "corrupt.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 20
    data[start : start + 200] = bytes(200)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    _assert_one_line(info, "corrupt.png")


def test_unsupported_format(tmp_path):
    # An SVG is not a raster format Pillow can decode.
    path = tmp_path / "drawing.png"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>')
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    _assert_one_line(info, "drawing.png")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = _assert_one_line(info, "bomb.png")
    assert "decompression bomb" in message
    with pytest.raises(ImageLoadError):
        image_size(path)


def test_image_size_failures(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x00" * 50)
    with pytest.raises(ImageLoadError) as info:
        image_size(tmp_path / "bad.png")
    _assert_one_line(info, "bad.png")
    with pytest.raises(ImageLoadError):
        image_size(tmp_path / "missing.png")


def test_corrupt_exif_is_ignored(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 2), (9, 9, 9)).save(buf, format="PNG", exif=b"Exif\x00\x00garbage-not-tiff")
    path = tmp_path / "badexif.png"
    path.write_bytes(buf.getvalue())
    out = _rgb(path)
    assert out.shape == (2, 4, 3)


# ---------------------------------------------------------------- list_images


def test_list_images_sorted_filtered(tmp_path):
    for name in ["b.png", "a.JPG", "c.txt", ".hidden.png", "d.TIFF", "e.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.bmp").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "q.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory, not a file

    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "d.TIFF", "e.webp", "sub/z.bmp"]
    flat = [p.name for p in list_images(tmp_path, recursive=False)]
    assert flat == ["a.JPG", "b.png", "d.TIFF", "e.webp"]


def test_list_images_extensions_constant():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def test_list_images_errors(tmp_path):
    with pytest.raises(DataError) as info:
        list_images(tmp_path / "missing")
    _assert_one_line(info, "missing")
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(DataError) as info:
        list_images(file)
    _assert_one_line(info, "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        list_images(empty)
    assert "no images" in _assert_one_line(info, "empty")
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "sub" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError):
        list_images(nested, recursive=False)


# ---------------------------------------------------------------- load_mask


def test_load_mask_8bit_threshold(tmp_path):
    arr = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    mask = load_mask(_save(Image.fromarray(arr), tmp_path / "m.png"))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask[0], [False, False, True, True])


def test_load_mask_modes(tmp_path):
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((0, 0), 1)
    np.testing.assert_array_equal(load_mask(_save(bilevel, tmp_path / "b.png"))[0], [True, False])

    m16 = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_mask(_save(Image.fromarray(m16), tmp_path / "m16.png"))[0], [0, 0, 1, 1])

    red = np.zeros((1, 2, 3), dtype=np.uint8)
    red[0, 1] = (255, 0, 0)
    np.testing.assert_array_equal(load_mask(_save(Image.fromarray(red), tmp_path / "red.png"))[0], [False, True])

    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 0)  # alpha ignored
    np.testing.assert_array_equal(load_mask(_save(Image.fromarray(rgba), tmp_path / "a.png"))[0], [True, False])

    flt = np.array([[0.2, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(load_mask(_save(Image.fromarray(flt), tmp_path / "f.tif"))[0], [False, True])


def test_load_mask_shape_mismatch(tmp_path):
    path = _save(Image.new("L", (4, 3)), tmp_path / "mask.png")
    assert load_mask(path, shape=(3, 4)).shape == (3, 4)
    with pytest.raises(DataError) as info:
        load_mask(path, shape=(4, 3))
    message = _assert_one_line(info, "mask.png")
    assert "3x4" in message and "4x3" in message


def test_load_mask_bad_file(tmp_path):
    (tmp_path / "m.png").write_bytes(b"nope")
    with pytest.raises(ImageLoadError) as info:
        load_mask(tmp_path / "m.png")
    _assert_one_line(info, "m.png")


# ---------------------------------------------------------------- every mode Pillow returns (issue 16, class 6)


@pytest.fixture()
def tifffile():
    """Writes the TIFF sample formats Pillow cannot write (signed 16/8-bit, unsigned 32-bit, float64)."""
    return pytest.importorskip("tifffile")


def test_signed_16bit_tiff_is_refused_when_negative_not_read_as_black(tmp_path, tifffile):
    """0.5.0: Pillow returns a signed 16-bit TIFF as mode I (not I;16S): negative values made it scale by 2**31 - 1,
    so the image decoded black and scored as a black frame. Now negative values are refused in one line."""
    path = tmp_path / "s16.tif"
    tifffile.imwrite(path, np.array([[-1000, 0, 1000, 32767]], dtype=np.int16))
    assert Image.open(path).mode == "I"
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert "negative values (minimum -1000)" in _assert_one_line(info, "s16.tif")
    with pytest.raises(ImageLoadError, match="negative"):  # the same rule for the PIL image and the array
        to_rgb(Image.fromarray(np.array([[-1000, 0, 1000, 32767]], dtype=np.int16)), "mem")


def test_signed_16bit_tiff_without_negatives_decodes_like_the_unsigned_png(tmp_path, tifffile):
    values = np.array([[0, 100, 4000, 4095]], dtype=np.int16)  # a 12-bit camera image in a signed container
    tifffile.imwrite(tmp_path / "s16.tif", values)
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "u16.png")
    out = _rgb(tmp_path / "s16.tif")
    np.testing.assert_array_equal(out, _rgb(tmp_path / "u16.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 6, 249, 255])  # scaled by 4095, not 2**31 - 1 (black)


def test_uint32_tiff_decodes_by_its_values_not_as_garbage(tmp_path, tifffile):
    """0.5.0: Pillow returns unsigned 32-bit samples as signed mode I: values from 2**31 turned negative and the
    image decoded as garbage (negative = black, the rest scaled by 2**31 - 1). The TIFF tags say unsigned."""
    path = tmp_path / "u32.tif"
    tifffile.imwrite(path, np.array([[0, 2**31 + 5, 2**32 - 1, 2**30]], dtype=np.uint32))
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [0, 128, 255, 64])
    small = tmp_path / "u32s.tif"
    tifffile.imwrite(small, np.array([[0, 700, 4095, 100]], dtype=np.uint32))  # 12-bit data, 32-bit container
    Image.fromarray(np.array([[0, 700, 4095, 100]], dtype=np.uint16)).save(tmp_path / "u16.png")
    np.testing.assert_array_equal(_rgb(small), _rgb(tmp_path / "u16.png"))


def test_signed_8bit_tiff_is_not_read_as_bright(tmp_path, tifffile):
    """Pillow returns signed 8-bit TIFF samples as mode L: -5 would read as 251."""
    tifffile.imwrite(tmp_path / "i8.tif", np.array([[0, -5, 100, 127]], dtype=np.int8))
    with pytest.raises(ImageLoadError, match="negative values"):
        load_image(tmp_path / "i8.tif")
    tifffile.imwrite(tmp_path / "i8ok.tif", np.array([[0, 5, 100, 127]], dtype=np.int8))
    np.testing.assert_array_equal(_rgb(tmp_path / "i8ok.tif")[0, :, 0], [0, 5, 100, 127])


def test_a_sample_format_pillow_cannot_read_is_refused_in_one_line(tmp_path, tifffile):
    tifffile.imwrite(tmp_path / "f64.tif", np.array([[0.0, 0.5]], dtype=np.float64))
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "f64.tif")
    _assert_one_line(info, "f64.tif")


#: Every mode Pillow can return, with the formats that can store it (None: in memory only) and whether
#: ``Image.fromarray(np.asarray(img))`` gives it back (the numpy array input).
MODES = {
    "1": ((".png", ".tif"), True),
    "L": ((".png", ".tif"), True),
    "LA": ((".png", ".tif"), True),
    "La": ((), False),
    "P": ((".png", ".tif"), False),
    "PA": ((".tif",), False),
    "RGB": ((".png", ".tif"), True),
    "RGBA": ((".png", ".tif"), True),
    "RGBa": ((), False),
    "RGBX": ((".tif",), False),
    "CMYK": ((".tif",), False),
    "YCbCr": ((".tif",), False),
    "LAB": ((".tif",), False),
    "HSV": ((), False),
    "I": ((".tif",), True),
    "I;16": ((".png", ".tif"), True),
    "I;16B": ((".tif",), True),
    "I;16L": ((".tif",), True),
    "I;16N": ((), True),
    "F": ((".tif",), True),
}


def test_the_mode_table_covers_every_mode_pillow_has():
    assert set(MODES) == set(Image.MODES)


def _random_image(mode: str, data) -> Image.Image:
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if mode == "F":
        top = data.draw(st.sampled_from([1.0, 255.0]))
        arr = rng.uniform(-0.1 * top, 1.1 * top, (h, w)).astype(np.float32)
        return Image.fromarray(arr)
    if mode == "I":
        top = 2 ** data.draw(st.sampled_from([8, 10, 12, 16, 20, 31])) - 1
        return Image.fromarray(rng.integers(0, top, (h, w), endpoint=True).astype(np.int32))
    if mode.startswith("I;16"):
        top = 2 ** data.draw(st.sampled_from([8, 12, 16])) - 1
        arr = rng.integers(0, top, (h, w), endpoint=True).astype(np.uint16)
        return Image.frombytes(mode, (w, h), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    img = Image.new(mode, (w, h))
    raw = rng.integers(0, 256, len(img.tobytes()), dtype=np.uint8).tobytes()
    img.frombytes(raw)
    if mode in ("P", "PA"):
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return img


@pytest.mark.parametrize("mode", sorted(MODES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mode_decodes_the_same_from_a_file_a_pil_image_and_an_array(tmp_path, mode, data):
    """Property: an image of each mode decodes to one RGB image whether it comes as a file (PNG and TIFF where
    the format stores the mode), as the file's bytes in memory (an upload), as a PIL image, or as its numpy
    array; the values follow the module's rules."""
    img = _random_image(mode, data)
    expected = np.asarray(to_rgb(img, "mem"))
    assert expected.dtype == np.uint8 and expected.shape == (img.height, img.width, 3)
    formats, from_array = MODES[mode]
    for ext in formats:
        path = tmp_path / f"x{ext}"
        img.save(path)
        np.testing.assert_array_equal(_rgb(path), expected, err_msg=f"{mode} via {ext}")
        uploaded = decode_bytes(path.read_bytes(), f"upload{ext}")  # the service's path: the same bytes in memory
        np.testing.assert_array_equal(np.asarray(uploaded), expected, err_msg=f"{mode} via {ext} bytes")
    if from_array:
        again = Image.fromarray(np.asarray(img))
        np.testing.assert_array_equal(np.asarray(to_rgb(again, "mem")), expected, err_msg=f"{mode} via numpy")
        frame = array_to_rgb(np.asarray(img), "frame")  # the array itself, as a camera frame passed to predict
        np.testing.assert_array_equal(np.asarray(frame), expected, err_msg=f"{mode} as a numpy frame")
    # the rules themselves, where they are arithmetic
    if mode in ("L", "1"):
        np.testing.assert_array_equal(expected[..., 0], np.asarray(img.convert("L")))
    if mode.startswith("I") or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode == "F":
            values = np.nan_to_num(values)
            white = 1.0 if values.max() <= 1 else 255.0
        else:
            white = float(2 ** next(b for b in (8, 10, 12, 14, 16, 20, 24, 32) if values.max() < 2**b) - 1)
        np.testing.assert_array_equal(expected[..., 0], np.rint(np.clip(values / white, 0, 1) * 255))
