"""Decoding image files into RGB PIL images, robustly and consistently.

This module has one responsibility: turning a file on disk into an 8-bit RGB
:class:`PIL.Image.Image` (or, for masks, a boolean array), or failing with a one-line
:class:`~somad.errors.ImageLoadError` that names the file and says what to do. Images already in memory (a PIL
image, :func:`to_rgb`; a numpy camera frame, :func:`array_to_rgb`) are converted by the same rules.

The EXIF orientation tag is applied as :func:`PIL.ImageOps.exif_transpose` would, to the converted image (Pillow's
TIFF reader applies the TIFF orientation tag itself while loading). A TIFF whose decoded
size disagrees with its header (a Pillow mishandling of some oriented, uncompressed TIFFs)
is refused with :class:`~somad.errors.ImageLoadError` rather than returned garbled.

Conversion rules (every mode Pillow returns; anything else is refused with a one-line error):

* ``RGB`` is returned as is.
* ``1`` (bilevel), ``L`` (8-bit grey) are replicated into three equal channels;
  bilevel pixels become 0 or 255.
* Alpha is **dropped**, not composited: ``LA``, ``RGBA``, ``RGBa``, ``PA`` keep the stored
  colour values and ignore transparency (anomaly detection should look at what the
  camera saw, not at how a viewer would blend it onto some background).
* ``P`` (palette, with or without transparency) is expanded through its palette, so the
  palette colours are preserved exactly; transparency is dropped as above.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted by Pillow's built-in conversion.
* Integer grey images (modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I`` and signed or 32-bit TIFF samples,
  whatever container Pillow returns them in) are scaled by one rule, never by the per-image minimum and
  maximum (so that a dark image stays dark): the bit depth is detected from the image's largest value, as the
  smallest of 8, 10, 12, 14, 16, 20, 24 and 32 bits that holds it, and the values are scaled by that depth's
  white level (``2**bits - 1``). A 12-bit camera image stored in a 16-bit PNG (largest value at most 4095)
  therefore keeps its real brightness instead of decoding nearly black; an image whose largest value is 16384 or
  more is scaled by 65535. (A true 16-bit image that is dark everywhere is brightened by this rule; PNG's
  optional ``sBIT`` chunk is not read.) Pillow hides two storage types behind its modes, so the TIFF tags are
  read for them: unsigned 32-bit samples (Pillow's mode ``I`` is signed: values from ``2**31`` would turn
  negative) and signed 8-bit samples (Pillow's mode ``L``: -1 would read as 255).
* **Negative integer values are refused** (:class:`~somad.errors.ImageLoadError` naming the minimum): a signed
  image (a signed 16-bit TIFF, an ``int16`` array, which Pillow returns as mode ``I``) has no black level somad
  could know, and clipping or shifting would change the image silently. Signed images whose values are all
  non-negative decode by the rule above.
* ``F`` (32-bit float, e.g. float TIFF): NaN becomes 0; if the largest finite value is
  ``<= 1`` the data is assumed to be in ``[0, 1]`` (clipped there and multiplied by 255),
  otherwise it is assumed to be in ``[0, 255]`` and clipped to that range. (64-bit float TIFFs are not read by
  Pillow: they fail as unreadable images.)

**Huge images.** An image of more than :data:`MAX_DECODED_PIXELS` (4096 x 4096) pixels is reduced while it is
decoded, by the smallest integer factor that brings it within (a box filter; JPEG decodes at 1/2, 1/4 or 1/8
directly by DCT scaling): memory is bounded by the largest model input, not by the file's pixel count. The
conversion runs a band of rows at a time, so no full-size copy in another mode or in float is held. A PNG or
TIFF is still decoded whole first (``width * height * channels`` bytes, freed before the result is used).
:func:`image_size` and :func:`load_mask` apply the same reduction, so a mask keeps its image's size, and every
output (maps, heatmaps, masks, regions) of such an image is at the reduced size.

Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never modified here, so truncated
files fail to load (unless some other code has switched that flag on).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from somad.errors import DataError, ImageLoadError, PixelLimitError

__all__ = [
    "to_rgb",
    "array_to_rgb",
    "ARRAY_RULE",
    "IMAGE_EXTENSIONS",
    "load_image",
    "image_size",
    "list_images",
    "load_mask",
    "MAX_DECODED_PIXELS",
    "decoding_factor",
    "UnlistableFolderError",
]

logger = logging.getLogger(__name__)

#: File name extensions (lower case) recognised as images by :func:`list_images`.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_SKIP_HINT = "remove it or use --on-error skip"
MASK_HINT = "replace the mask file (--on-error skip does not skip masks)"

# Exceptions Pillow (and the codecs it wraps) raise for bad or unsupported files.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
    MemoryError,
)

# Orientations (EXIF tag 0x0112) that swap width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _one_line(text: object) -> str:
    """Collapse ``text`` into a single line."""
    return " ".join(str(text).split())


def _fail(path: Path, problem: str, hint: str = _SKIP_HINT) -> ImageLoadError:
    """Build an :class:`ImageLoadError` with a one-line ``"{path}: problem; hint"`` message."""
    message = f"{path}: {problem}; {hint}" if hint else f"{path}: {problem}"
    return ImageLoadError(_one_line(message))


def _check_file(path: Path) -> None:
    """Raise :class:`ImageLoadError` if ``path`` is not a non-empty regular file."""
    if not path.exists():
        raise _fail(path, "file not found", "check the path")
    if not path.is_file():
        raise _fail(path, "not a regular file (is it a directory?)", "pass an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})", "check its permissions") from exc
    if size == 0:
        raise _fail(path, "empty file (0 bytes)")


def _describe(exc: BaseException) -> str:
    """Turn a decoding exception into a short problem description."""
    if isinstance(exc, Image.DecompressionBombError):
        return (
            f"image too large, refused as a possible decompression bomb ({exc}); "
            "resize it or raise PIL.Image.MAX_IMAGE_PIXELS"
        )
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (cannot identify image file)"
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    text = _one_line(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated or corrupt image ({text})"
    if isinstance(exc, PermissionError):
        return f"cannot read file ({exc.strerror or text})"
    return f"cannot decode image ({type(exc).__name__}: {text})"


def _open(path: Path, *, load: bool = True, hint: str = _SKIP_HINT, reduce: bool = False) -> Image.Image | _HeaderOnly:
    """Open ``path`` with Pillow; decode it into RGB and apply its EXIF orientation when ``load``.

    Any decoding failure (a ``MemoryError`` included) is turned into :class:`ImageLoadError`. With ``load``
    the returned image is in mode ``"RGB"`` and owns its pixel data; with ``reduce`` an image of more than
    :data:`MAX_DECODED_PIXELS` pixels is reduced while it is decoded (see :func:`decoding_factor`). Without
    ``load`` only the header facts needed by :func:`image_size` are returned.
    """
    _check_file(path)
    with _decoding(path, hint), open(path, "rb") as fh:
        return _decode(fh, path, load=load, reduce=reduce)


def decode_bytes(data: bytes, name: str, *, max_pixels: int | None = None, formats=None) -> Image.Image:
    """Decode an image held in memory (an upload) by the same rules as a file: :func:`load_image`'s orientation,
    mode and bit-depth rules and its reduction of huge images, so the same bytes give the same RGB image.

    ``max_pixels``: refuse (:class:`PixelLimitError`) an image whose header says more pixels, before any pixel
    is decoded. ``formats``: the Pillow formats accepted (default: any). Errors are one line naming ``name``.
    """
    path = Path(name)
    if not data:
        raise ImageLoadError(f"{name}: empty image (0 bytes)")
    with _decoding(path, ""):
        if max_pixels is not None:
            with Image.open(io.BytesIO(data), formats=formats) as img:
                width, height = img.size
            if width * height > max_pixels:
                raise PixelLimitError(
                    f"{name}: image of {width}x{height} pixels exceeds the limit of {max_pixels / 1e6:g} megapixels; "
                    "send a smaller image"
                )
        return _decode(io.BytesIO(data), path, load=True, reduce=True, formats=formats)


@contextmanager
def _decoding(path: Path, hint: str):
    """Turn every decoding failure (a ``MemoryError`` included) into a one-line :class:`ImageLoadError`."""
    try:
        yield
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _fail(path, _describe(exc), "") from exc
    except _DECODE_ERRORS as exc:
        raise _fail(path, _describe(exc), hint) from exc


def _decode(fh, path: Path, *, load: bool, reduce: bool, formats=None) -> Image.Image | _HeaderOnly:
    """:func:`_open`'s work on an open binary stream ``fh`` (``path`` names it in messages)."""
    # Pillow's DecompressionBombWarning (over 89 MP) is replaced by this module's own warning of the reduction;
    # its DecompressionBombError (over twice that) still refuses the file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fh, formats=formats)
        if not load:
            return _HeaderOnly(img, path, reduce)
        full_size = img.size
        factor = decoding_factor(*img.size) if reduce else 1
        scale = _jpeg_scale(factor) if img.format == "JPEG" else 1
        if scale > 1:
            # DCT scaling decodes at 1/2, 1/4 or 1/8 of the size directly, never holding the full frame; the
            # rest of the factor is a box filter, so the result has the size of any other format's.
            img.draft(img.mode, (-(-img.width // scale), -(-img.height // scale)))
            if img.size != (-(-full_size[0] // scale), -(-full_size[1] // scale)):
                raise _fail(path, "JPEG reduced decoding gave an unexpected size", "re-save it as PNG")
            factor //= scale
        header_size = img.size
        storage = _storage(img)
        img.load()
        if img.size != header_size:
            # Pillow applies TIFF orientation itself while loading and reports the
            # upright size up front; some Pillow versions garble uncompressed TIFFs
            # with a transposing orientation. Refuse rather than return wrong pixels.
            raise _fail(
                path,
                f"decoded size {img.size[0]}x{img.size[1]} differs from the header's "
                f"{header_size[0]}x{header_size[1]} (WxH), probably a mishandled orientation tag",
                "re-save it without an orientation tag, or remove it or use --on-error skip",
            )
        orientation = _loaded_orientation(img, path)  # Pillow's TIFF reader has applied its own already
        rgb = _convert(img, path, factor=factor, storage=storage)
        del img  # the full-size decode is released before the orientation is applied
        if factor * scale > 1:
            logger.warning(
                "%s: %dx%d pixels (WxH), decoded at 1/%d of its size (%dx%d): more than %d pixels",
                path,
                full_size[0],
                full_size[1],
                factor * scale,
                rgb.width,
                rgb.height,
                MAX_DECODED_PIXELS,
            )
        return _orient(rgb, orientation)


class _HeaderOnly:
    """The upright size of an image, read from its header without decoding the pixels."""

    def __init__(self, img: Image.Image, path: Path, reduce: bool) -> None:
        width, height = img.size
        factor = decoding_factor(width, height) if reduce else 1
        width, height = -(-width // factor), -(-height // factor)
        # Pillow's TIFF reader already reports the upright size (it applies the
        # orientation tag itself when loading), so only other formats are swapped here.
        if img.format != "TIFF" and _header_orientation(img, path) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        self.size = (width, height)


def _header_orientation(img: Image.Image, path: Path) -> int:
    """Return the EXIF orientation of an opened, not yet decoded, image (1 if none).

    For PNG only an ``eXIf`` chunk before the pixel data is considered, so that the
    pixels need not be decoded (Pillow and most writers put it there). Corrupt EXIF data
    is ignored with a logged warning.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not make the image unusable
        logger.warning("%s: ignoring unreadable EXIF data (%s)", path, _one_line(exc))
        return 1


#: EXIF orientation -> the transposition that makes the image upright (as ``PIL.ImageOps.exif_transpose``).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _loaded_orientation(img: Image.Image, path: Path) -> int:
    """The EXIF orientation of a decoded image (1 if none); corrupt EXIF data is ignored with a warning."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not make the image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _one_line(exc))
        return 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENT.get(orientation)
    return img if method is None else img.transpose(method)


# ------------------------------------------------------------------------------------------- decoding
#: An image of more pixels than this is reduced while it is decoded (:func:`decoding_factor`): 4096 x 4096, the
#: largest model input (``image_size``), so that memory is bounded by what a model can use, not by the file.
MAX_DECODED_PIXELS = 4096 * 4096

#: Images are converted a band of rows at a time, each band about this many pixels.
_BAND_PIXELS = 1 << 22

#: Sample depths an integer image is taken to hold (see the module docstring): cameras write 10, 12 or 14 bits in
#: a 16-bit container; 20, 24 and 32 bits are for 32-bit containers.
BIT_DEPTHS = (8, 10, 12, 14, 16, 20, 24, 32)


def decoding_factor(width: int, height: int) -> int:
    """The integer factor an image is reduced by on decoding: the smallest that brings its pixel count within
    :data:`MAX_DECODED_PIXELS` (1 for every image within it)."""
    factor = 1
    while -(-width // factor) * -(-height // factor) > MAX_DECODED_PIXELS:
        factor += 1
    return factor


def _jpeg_scale(factor: int) -> int:
    """The largest DCT scale (1, 2, 4 or 8) that divides ``factor``: JPEG decodes at that scale directly."""
    return next(s for s in (8, 4, 2, 1) if factor % s == 0)


def _storage(img: Image.Image) -> str | None:
    """What the file's samples are when Pillow's mode hides it (read before decoding): ``"uint32"`` for unsigned
    32-bit TIFF samples (Pillow returns them as signed mode ``I``: values from 2**31 would turn negative),
    ``"int8"`` for signed 8-bit TIFF samples (returned as mode ``L``: -1 would read as 255); else None."""
    if img.format != "TIFF" or not img.tile:
        return None
    tags = getattr(img, "tag_v2", {})
    sample_format = tags.get(339, 1)  # SampleFormat: 1 unsigned (the default), 2 signed, 3 float
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if img.mode == "I" and img.tile[0].args[0] in ("I;32N", "I;32", "I;32L", "I;32B", "I;32BN"):
        return "uint32"
    if img.mode == "L" and sample_format == 2:
        return "int8"
    return None


def _samples(img: Image.Image, storage: str | None) -> np.ndarray:
    """The pixel values of a one-channel numeric image (modes ``I*``, ``F``, or ``L`` with ``storage``), as stored."""
    arr = np.asarray(img)
    if storage == "uint32" and arr.dtype == np.int32:
        return arr.view(np.uint32)
    if storage == "int8" and arr.dtype == np.uint8:
        return arr.view(np.int8)
    return arr


def _bands(img: Image.Image, rows: int):
    """``(top, band)`` for bands of ``rows`` rows covering ``img`` (the image itself when it is one band)."""
    if rows >= img.height:
        yield 0, img
        return
    for top in range(0, img.height, rows):
        yield top, img.crop((0, top, img.width, min(img.height, top + rows)))


def _band_rows(img: Image.Image, factor: int = 1) -> int:
    rows = max(1, _BAND_PIXELS // max(1, img.width))
    return max(factor, rows - rows % factor)


class _GreyRule:
    """How a numeric one-channel image becomes 8-bit grey: the scale is set by the whole image's values."""

    def __init__(self, img: Image.Image, path: Path, storage: str | None) -> None:
        self.storage = storage
        self.float = img.mode == "F"

        def samples():  # one band at a time: no full-size copy is held
            for _, band in _bands(img, _band_rows(img)):
                arr = _samples(band, storage)
                if arr.ndim != 2:
                    raise _fail(
                        path, f"unsupported image mode {img.mode} (shape {arr.shape})", "convert it to an 8-bit RGB PNG"
                    )
                yield arr

        self.white = _white_level(samples(), self.float, path)

    def grey(self, band: Image.Image) -> np.ndarray:
        """The 8-bit grey levels of one band."""
        return _scaled(_samples(band, self.storage), self.float, self.white)


def _white_level(samples, is_float: bool, path) -> float:
    """The value that decodes to 255 (the module's rules): for float samples 1.0 when the largest finite value is
    at most 1, else 255.0; for integer samples ``2**bits - 1`` of the smallest of :data:`BIT_DEPTHS` that holds the
    largest value. Negative integer samples are refused (:class:`ImageLoadError`)."""
    lo, hi, top_finite = None, None, None
    for arr in samples:
        if arr.size == 0:
            continue
        if is_float:
            finite = arr[np.isfinite(arr)]
            if finite.size:
                t = float(finite.max())
                top_finite = t if top_finite is None else max(top_finite, t)
        else:
            b_lo, b_hi = int(arr.min()), int(arr.max())
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
    if is_float:
        return 1.0 if top_finite is None or top_finite <= 1.0 else 255.0
    if lo is not None and lo < 0:
        raise _fail(
            path,
            f"signed image with negative values (minimum {lo}); somad reads integer samples as unsigned grey "
            "levels and will not guess where black is",
            "save it as unsigned 8 or 16-bit (e.g. add an offset), or as float in [0, 1]",
        )
    top = hi or 0
    if top >= 2 ** BIT_DEPTHS[-1]:
        raise _fail(
            path, f"integer samples up to {top} exceed {BIT_DEPTHS[-1]} bits", "scale them to 16 bits or float [0, 1]"
        )
    bits = next(b for b in BIT_DEPTHS if top < 2**b)
    return float(2**bits - 1)


def _scaled(arr: np.ndarray, is_float: bool, white: float) -> np.ndarray:
    """Samples divided by their :func:`_white_level`, as ``uint8`` (float NaN decodes as 0)."""
    if is_float:
        data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        return _to_uint8(data / white)
    return _to_uint8(arr.astype(np.float64) / white)


def _is_numeric(mode: str, storage: str | None) -> bool:
    return mode.startswith("I") or mode == "F" or storage is not None


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` to ``uint8`` with rounding."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _band_to_rgb(band: Image.Image, path, rule: _GreyRule | None) -> Image.Image:
    """One band (or a whole small image) of any supported mode, converted to ``"RGB"`` by the module's rules."""
    mode = band.mode
    if rule is not None:
        grey = rule.grey(band)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    if mode == "RGB":
        return band
    if mode in ("1", "L"):
        return band.convert("L").convert("RGB")
    if mode in ("LA", "La"):
        return band.getchannel(0).convert("RGB")
    if mode in ("P", "PA"):
        # Going through RGBA expands the palette (and any transparency) exactly.
        return band.convert("RGBA").convert("RGB")
    if mode in ("RGBA", "RGBa", "RGBX"):
        return band.convert("RGB")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return band.convert("RGB")
    raise _fail(path, f"unsupported image mode {mode}", "convert it to an 8-bit RGB PNG")


def _convert(img: Image.Image, path, *, factor: int = 1, storage: str | None = None) -> Image.Image:
    """``img`` in mode ``"RGB"``, reduced ``factor`` times (a box filter); converted a band of rows at a time, so
    that no full-size copy in another mode (or in float) is ever held next to the decoded image."""
    try:
        rule = _GreyRule(img, path, storage) if _is_numeric(img.mode, storage) else None
        rows = _band_rows(img, factor)
        if factor == 1 and rows >= img.height:
            return _band_to_rgb(img, path, rule)
        out = Image.new("RGB", (-(-img.width // factor), -(-img.height // factor)))
        for top, band in _bands(img, rows):
            rgb = _band_to_rgb(band, path, rule)
            out.paste(rgb.reduce(factor) if factor > 1 else rgb, (0, top // factor))
        return out
    except ImageLoadError:
        raise
    except MemoryError as exc:
        raise _fail(path, "not enough memory to decode the image", _SKIP_HINT) from exc
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise _fail(
            path, f"unsupported image mode {img.mode} ({_one_line(exc)})", "convert it to an 8-bit RGB PNG"
        ) from exc


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert a decoded image of any supported mode into mode ``"RGB"`` (the module's rules; never reduced)."""
    return _convert(img, path)


#: What :func:`array_to_rgb` accepts, in words (for error messages).
ARRAY_RULE = (
    "an image array is (H, W) or (H, W, C), C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA; alpha dropped), of "
    "uint8, bool, another non-negative integer type (scaled by its bit depth, as 16-bit files) or float ([0, 1] or "
    "[0, 255])"
)


def array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """One image held in a numpy array (a camera frame) -> mode ``"RGB"`` by the rules of files (never reduced).

    ``(H, W)`` and ``(H, W, 1)`` are grey, ``(H, W, 2)`` grey with alpha, ``(H, W, 3)`` colour and ``(H, W, 4)``
    colour with alpha; alpha is dropped, as from files. ``uint8`` is used as is; ``bool`` as a bilevel file (0 or
    255); other integer types by the integer rule (scaled by the bit depth detected from the largest value, over
    all channels: a 12-bit frame in ``uint16`` keeps its brightness; negative values refused); float types by the
    float rule (NaN is 0; ``[0, 1]`` if the largest finite value is at most 1, else ``[0, 255]``, clipped).
    Anything else: :class:`ImageLoadError` naming ``name`` (a shape or dtype outside :data:`ARRAY_RULE`, an empty
    frame).
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] in (1, 2, 3, 4):
        a = a[:, :, 0] if a.shape[2] < 3 else a[:, :, :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or 0 in a.shape or a.dtype.kind not in "biuf":
        raise ImageLoadError(_one_line(f"{name}: {a.dtype} array of shape {np.shape(array)}; {ARRAY_RULE}"))
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        is_float = a.dtype.kind == "f"
        a = _scaled(a, is_float, _white_level([a], is_float, name))
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")  # uint8 (H, W): mode L; (H, W, 3): RGB


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image.

    The EXIF orientation is applied, and every Pillow mode is converted as described in
    the module docstring (alpha dropped, integer samples scaled by their detected bit depth, float assumed in
    ``[0, 1]`` or ``[0, 255]``). An image of more than :data:`MAX_DECODED_PIXELS` pixels is reduced while it is
    decoded, by the smallest integer factor that brings it within (logged as a warning).

    Parameters
    ----------
    path : str or os.PathLike
        The image file.

    Returns
    -------
    PIL.Image.Image
        A fully loaded image in mode ``"RGB"``, detached from the file.

    Raises
    ------
    ImageLoadError
        If the file is missing, is a directory, is empty, is not an image, is truncated
        or corrupt, has an unsupported mode, or exceeds Pillow's decompression-bomb limit.
        The message is a single line naming the file and what to do about it.
    """
    return _open(Path(path), load=True, reduce=True)


def image_size(path: str | os.PathLike[str], *, hint: str = _SKIP_HINT) -> tuple[int, int]:
    """Return the ``(height, width)`` of an image as :func:`load_image` would return it.

    Only the header is read, so this is cheap; the reduction of huge images and the EXIF orientation are
    honoured, so
    rotated images report their displayed size. (For PNG, an ``eXIf`` chunk stored after
    the pixel data, which is rare, is not seen.) A file whose header is fine but whose
    pixel data is corrupt is not detected here; :func:`load_image` detects it.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.

    Returns
    -------
    tuple of int
        ``(height, width)`` in pixels.

    Raises
    ------
    ImageLoadError
        If the file cannot be opened as an image.
    """
    path = Path(path)
    width, height = _open(path, load=False, hint=hint, reduce=True).size
    return int(height), int(width)


class UnlistableFolderError(DataError):
    """A folder (or one of its sub-folders) could not be listed: it exists, but its contents are unknown."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(folder: Path, recursive: bool) -> list[Path]:
    """Return image files under ``folder`` (no error if there are none)."""
    found: list[Path] = []
    if recursive:

        def unlistable(exc: OSError) -> None:
            raise exc  # os.walk would otherwise skip a folder it cannot list, silently

        for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            base = Path(dirpath)
            for name in filenames:
                if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                    candidate = base / name
                    if candidate.is_file():
                        found.append(candidate)
    else:
        for candidate in folder.iterdir():
            name = candidate.name
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS) and candidate.is_file():
                found.append(candidate)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def list_images(folder: str | os.PathLike[str], *, recursive: bool = True) -> list[Path]:
    """List the image files in a folder.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder to search.
    recursive : bool, default True
        Also search sub-folders (hidden sub-folders are skipped).

    Returns
    -------
    list of pathlib.Path
        Regular files whose extension (case-insensitive) is in :data:`IMAGE_EXTENSIONS`,
        excluding hidden files (names starting with ``"."``), sorted by their path
        relative to ``folder``.

    Raises
    ------
    DataError
        If ``folder`` does not exist, is not a directory, or contains no images;
        :class:`UnlistableFolderError` (a ``DataError``) if it or a sub-folder cannot be listed.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder of images")
    try:
        found = _scan(folder, recursive)
    except OSError as exc:
        where = exc.filename or folder
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise UnlistableFolderError(
            _one_line(f"cannot list {where}: {reason}; give read and execute permission on it or choose another folder")
        ) from exc
    if not found:
        where = "in it or its sub-folders" if recursive else "in it"
        raise DataError(f"{folder}: no images found {where} (looked for {', '.join(IMAGE_EXTENSIONS)}); check the path")
    return found


def load_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as a boolean array (``True`` = defect).

    Any mode is accepted: the mask is decoded by the rules of :func:`load_image` (the same reduction of huge
    images, so a mask keeps its image's size) and a pixel is a defect when any of its 8-bit colour channels
    exceeds 127: half the range for 8-bit data, half the detected bit depth's range for integer data, ``> 0.5``
    for float data in ``[0, 1]``; a red-on-black mask works; palette masks are expanded through their palette;
    alpha is ignored. The EXIF orientation is applied.

    Parameters
    ----------
    path : str or os.PathLike
        The mask file.
    shape : tuple of int, optional
        Expected ``(height, width)``, normally that of the image the mask belongs to.

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``(height, width)``.

    Raises
    ------
    ImageLoadError
        If the file cannot be decoded.
    DataError
        If ``shape`` is given and the mask has a different size.
    """
    path = Path(path)
    rgb = _open(path, load=True, hint=MASK_HINT, reduce=True)  # reduced as its image is: the same size
    mask = np.asarray(rgb).max(axis=2) > 127
    mask = np.ascontiguousarray(mask, dtype=bool)
    if shape is not None:
        expected = (int(shape[0]), int(shape[1]))
        if mask.shape != expected:
            raise DataError(
                f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is "
                f"{expected[0]}x{expected[1]}; masks must have the same size as their image"
            )
    return mask
