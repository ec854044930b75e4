"""Decoding an uploaded image (bytes) by the same rules as image files (``somad.io.images.decode_bytes``).

The EXIF orientation is applied, every Pillow mode is converted to 8-bit RGB by the file rules (alpha dropped,
integers scaled by their detected bit depth, signed TIFFs with negative values refused, float in [0, 1] or
[0, 255]) and huge images are reduced while decoding, exactly as for a file, so the same bytes score the same
through the service and through ``somad predict``. Before any pixel is decoded, the size in the header is
checked against the service's pixel limit.
"""

from __future__ import annotations

from PIL import Image

from somad.errors import PixelLimitError
from somad.io.images import decode_bytes

#: Formats accepted: those of ``somad.io.images.IMAGE_EXTENSIONS``.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an RGB PIL image, or raise ``ImageLoadError`` (one line naming ``name``):
    :class:`PixelLimitError` when the header's width x height exceeds ``max_pixels`` (checked before decoding)."""
    return decode_bytes(data, name, max_pixels=max_pixels, formats=FORMATS)


__all__ = ["FORMATS", "PixelLimitError", "decode_image"]
