"""Tests for somad.io.images: mode conversion, EXIF, failure messages, listing, masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from somad.errors import DataError, ImageLoadError, SomadError
from somad.io.images import IMAGE_EXTENSIONS, image_size, list_images, load_image, load_mask


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
    from somad.io.images import to_rgb

    arr = np.array([[0, 65535, 32896]], dtype=">u2")
    img = Image.frombytes("I;16B", (3, 1), arr.tobytes())
    out = np.asarray(to_rgb(img, "mem"))
    np.testing.assert_array_equal(out[0, :, 2], [0, 255, 128])


def test_32bit_int_holding_16bit_values(tmp_path):
    arr = np.array([[0, 65535, 257]], dtype=np.int32)
    path = _save(Image.fromarray(arr), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [0, 255, 1])


def test_32bit_int_full_range(tmp_path):
    arr = np.array([[-5, 2**31 - 1, 2**30]], dtype=np.int32)
    out = _rgb(_save(Image.fromarray(arr), tmp_path / "i32b.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 128])


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
