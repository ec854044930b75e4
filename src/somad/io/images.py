"""Decoding image files into RGB PIL images, robustly and consistently.

This module has one responsibility: turning a file on disk into an 8-bit RGB
:class:`PIL.Image.Image` (or, for masks, a boolean array), or failing with a one-line
:class:`~somad.errors.ImageLoadError` that names the file and says what to do.

The EXIF orientation tag is applied with :func:`PIL.ImageOps.exif_transpose` (Pillow's
TIFF reader applies the TIFF orientation tag itself while loading). A TIFF whose decoded
size disagrees with its header (a Pillow mishandling of some oriented, uncompressed TIFFs)
is refused with :class:`~somad.errors.ImageLoadError` rather than returned garbled.

Conversion rules (applied after the orientation):

* ``RGB`` is returned as is.
* ``1`` (bilevel), ``L`` (8-bit grey) are replicated into three equal channels;
  bilevel pixels become 0 or 255.
* Alpha is **dropped**, not composited: ``LA``, ``RGBA``, ``RGBa``, ``PA`` keep the stored
  colour values and ignore transparency (anomaly detection should look at what the
  camera saw, not at how a viewer would blend it onto some background).
* ``P`` (palette, with or without transparency) is expanded through its palette, so the
  palette colours are preserved exactly; transparency is dropped as above.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted by Pillow's built-in conversion.
* Integer grey images are scaled by the range of their *storage type*, never by the
  per-image minimum and maximum (so that a dark image stays dark):

  - ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (unsigned 16-bit): the bit depth is detected from the
    image's largest value, as the smallest of 8, 10, 12, 14 and 16 bits that holds it, and the values are
    scaled by that depth's white level (``2**bits - 1``). A 12-bit camera image stored in a 16-bit PNG (largest
    value at most 4095) therefore keeps its real brightness instead of decoding nearly black; an image whose
    largest value is 16384 or more is scaled by 65535. (A true 16-bit image that is dark everywhere is
    brightened by this rule; PNG's optional ``sBIT`` chunk is not read.)
  - ``I;16S`` (signed 16-bit): negative values clip to 0, then ``v / 32767 * 255``.
  - ``I`` (signed 32-bit): if every value lies in ``[0, 65535]`` the image is treated as
    16-bit data (this is how many writers store 16-bit grey in a 32-bit container);
    otherwise negative values clip to 0 and the result is ``v / (2**31 - 1) * 255``. 16-bit data in this
    container gets the same bit-depth detection.
* ``F`` (32-bit float, e.g. float TIFF): NaN becomes 0; if the largest finite value is
  ``<= 1`` the data is assumed to be in ``[0, 1]`` (clipped there and multiplied by 255),
  otherwise it is assumed to be in ``[0, 255]`` and clipped to that range.

Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never modified here, so truncated
files fail to load (unless some other code has switched that flag on).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from somad.errors import DataError, ImageLoadError

__all__ = [
    "to_rgb",
    "IMAGE_EXTENSIONS",
    "load_image",
    "image_size",
    "list_images",
    "load_mask",
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


def _open(path: Path, *, load: bool = True, hint: str = _SKIP_HINT) -> Image.Image | _HeaderOnly:
    """Open ``path`` with Pillow; decode it and apply its EXIF orientation when ``load``.

    Any decoding failure is turned into :class:`ImageLoadError`. With ``load`` true the
    returned image owns its pixel data (the file is closed); otherwise only the header
    facts needed by :func:`image_size` are returned.
    """
    _check_file(path)
    try:
        with Image.open(path) as img:
            if not load:
                return _HeaderOnly(img, path)
            header_size = img.size
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
            return _transpose(img, path)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _fail(path, _describe(exc), "") from exc
    except _DECODE_ERRORS as exc:
        raise _fail(path, _describe(exc), hint) from exc


class _HeaderOnly:
    """The upright size of an image, read from its header without decoding the pixels."""

    def __init__(self, img: Image.Image, path: Path) -> None:
        width, height = img.size
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


def _transpose(img: Image.Image, path: Path) -> Image.Image:
    """Return a copy of the decoded ``img`` with its EXIF orientation applied.

    Uses :func:`PIL.ImageOps.exif_transpose`. Corrupt EXIF data is ignored with a logged
    warning (the pixels are still usable).
    """
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not make the image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _one_line(exc))
        return img.copy()
    return img.copy() if out is None else out


def _unit_gray(img: Image.Image, path: Path) -> np.ndarray:
    """Return a single-channel high-bit-depth or float image as float64 values in ``[0, 1]``.

    See the module docstring for the scaling rules.
    """
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise _fail(path, f"unsupported image mode {img.mode} (shape {arr.shape})", "convert it to an 8-bit RGB PNG")
    kind = arr.dtype.kind
    if kind == "f":
        data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)
        finite = data[np.isfinite(data)]
        top = float(finite.max()) if finite.size else 0.0
        if top <= 1.0:
            return np.clip(data, 0.0, 1.0)
        return np.clip(data, 0.0, 255.0) / 255.0
    if kind == "u" and arr.dtype.itemsize == 2:
        return arr.astype(np.float64) / _full_scale(arr)
    if kind == "u":
        return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    if kind == "i":
        data = arr.astype(np.float64)
        if arr.dtype.itemsize >= 4 and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)):
            return data / _full_scale(arr)
        return np.clip(data, 0.0, None) / float(np.iinfo(arr.dtype).max)
    if kind == "b":
        return arr.astype(np.float64)
    raise _fail(path, f"unsupported image mode {img.mode}", "convert it to an 8-bit RGB PNG")


#: Sample depths a 16-bit container is taken to hold (see the module docstring): cameras write 10, 12 or 14 bits.
BIT_DEPTHS = (8, 10, 12, 14, 16)


def _full_scale(arr: np.ndarray) -> float:
    """White level of 16-bit data: ``2**b - 1`` for the smallest of :data:`BIT_DEPTHS` that holds its maximum."""
    top = int(arr.max()) if arr.size else 0
    bits = next(b for b in BIT_DEPTHS if top < 2**b)
    return float(2**bits - 1)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` to ``uint8`` with rounding."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert a decoded image of any supported mode into mode ``"RGB"``."""
    mode = img.mode
    if mode == "RGB":
        return img
    try:
        if mode in ("1", "L"):
            return img.convert("L").convert("RGB")
        if mode in ("LA", "La"):
            return img.getchannel(0).convert("RGB")
        if mode in ("P", "PA"):
            # Going through RGBA expands the palette (and any transparency) exactly.
            return img.convert("RGBA").convert("RGB")
        if mode in ("RGBA", "RGBa", "RGBX"):
            return img.convert("RGB")
        if mode.startswith("I") or mode == "F":
            gray = _to_uint8(_unit_gray(img, path))
            return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
        return img.convert("RGB")
    except ImageLoadError:
        raise
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise _fail(
            path, f"unsupported image mode {mode} ({_one_line(exc)})", "convert it to an 8-bit RGB PNG"
        ) from exc


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image.

    The EXIF orientation is applied, and every Pillow mode is converted as described in
    the module docstring (alpha dropped, 16-bit scaled by its detected bit depth, float assumed in ``[0, 1]``
    or ``[0, 255]``).

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
    path = Path(path)
    img = _open(path, load=True)
    return to_rgb(img, path)


def image_size(path: str | os.PathLike[str], *, hint: str = _SKIP_HINT) -> tuple[int, int]:
    """Return the ``(height, width)`` of an image as :func:`load_image` would return it.

    Only the header is read, so this is cheap; the EXIF orientation is honoured, so
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
    width, height = _open(path, load=False, hint=hint).size
    return int(height), int(width)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(folder: Path, recursive: bool) -> list[Path]:
    """Return image files under ``folder`` (no error if there are none)."""
    found: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
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
        If ``folder`` does not exist, is not a directory, or contains no images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder of images")
    try:
        found = _scan(folder, recursive)
    except OSError as exc:
        raise DataError(
            _one_line(f"{folder}: cannot list folder ({exc.strerror or exc}); check its permissions")
        ) from exc
    if not found:
        where = "in it or its sub-folders" if recursive else "in it"
        raise DataError(f"{folder}: no images found {where} (looked for {', '.join(IMAGE_EXTENSIONS)}); check the path")
    return found


def load_mask(path: str | os.PathLike[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as a boolean array (``True`` = defect).

    Any mode is accepted. A pixel is a defect when its value exceeds half of the value
    range of the storage type: ``> 127`` for 8-bit data, ``> 32767`` for 16-bit data,
    ``> 0.5`` for float data in ``[0, 1]``. Colour masks count a pixel as a defect when any
    colour channel exceeds half the range (so a red-on-black mask works); palette masks are
    expanded through their palette first; alpha is ignored. The EXIF orientation is applied,
    as in :func:`load_image`.

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
    img = _open(path, load=True, hint=MASK_HINT)
    mode = img.mode
    try:
        if mode == "1":
            mask = np.asarray(img, dtype=bool)
        elif mode.startswith("I") or mode == "F":
            mask = _unit_gray(img, path) > 0.5
        elif mode == "L":
            mask = np.asarray(img) > 127
        else:
            rgb = np.asarray(to_rgb(img, path))
            mask = rgb.max(axis=2) > 127
    except ImageLoadError:
        raise
    except (ValueError, OSError, TypeError) as exc:
        raise _fail(path, f"unsupported mask mode {mode} ({_one_line(exc)})", "save it as an 8-bit grey PNG") from exc
    mask = np.ascontiguousarray(mask, dtype=bool)
    if shape is not None:
        expected = (int(shape[0]), int(shape[1]))
        if mask.shape != expected:
            raise DataError(
                f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is "
                f"{expected[0]}x{expected[1]}; masks must have the same size as their image"
            )
    return mask
