"""Decoding an uploaded image (bytes) by the same rules as image files (``somad.io.images``).

The EXIF orientation is applied, and every Pillow mode is converted to 8-bit RGB by
:func:`somad.io.images.to_rgb` (alpha dropped, 16-bit scaled by its detected bit depth, float in [0, 1] or
[0, 255]). Before any pixel is decoded, the size in the header is checked against the service's pixel limit.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from somad.errors import ImageLoadError
from somad.io.images import to_rgb

#: What Pillow (and the codecs it wraps) raise for bad or unsupported data.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    MemoryError,
    struct.error,
    zlib.error,
)
#: Formats accepted: those of ``somad.io.images.IMAGE_EXTENSIONS``.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


class PixelLimitError(ImageLoadError):
    """The image has more pixels than the service accepts."""


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an RGB PIL image, or raise :class:`ImageLoadError` (one line naming ``name``).

    :class:`PixelLimitError` when the header's width x height exceeds ``max_pixels`` (checked before decoding).
    """
    where = Path(name)
    if not data:
        raise ImageLoadError(f"{name}: empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below decides
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise PixelLimitError(
                        f"{name}: image of {width}x{height} pixels exceeds the service's limit of "
                        f"{max_pixels / 1e6:g} megapixels; send a smaller image"
                    )
                img.load()
                if img.size != (width, height):
                    raise ImageLoadError(
                        f"{name}: decoded size {img.size[0]}x{img.size[1]} differs from the header's "
                        f"{width}x{height} (WxH), probably a mishandled orientation tag; re-save it without one"
                    )
                try:
                    upright = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - corrupt EXIF must not make the image unusable (as for files)
                    upright = None
                image = img.copy() if upright is None else upright
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise PixelLimitError(f"{name}: image too large, refused as a possible decompression bomb") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not a readable image (PNG, JPEG, TIFF, BMP or WebP)") from exc
    except _DECODE_ERRORS as exc:
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        problem = "truncated or corrupt image" if "truncated" in text.lower() else "cannot decode image"
        raise ImageLoadError(f"{name}: {problem} ({type(exc).__name__}: {text})") from exc
    return to_rgb(image, where)


__all__ = ["FORMATS", "PixelLimitError", "decode_image"]
