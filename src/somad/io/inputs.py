"""What every entry point accepts as images, normalised to one list of :class:`ImageItem`.

One responsibility: turn what a user passes (a folder, an MVTec category, paths, PIL images, numpy camera frames,
or a sequence mixing them) into named items that decode one at a time by the rules of ``somad.io.images``. The
native detectors (``somad.methods.base``) and the torch-free ONNX runtime (``somad.runtime``) both take their
inputs through :func:`as_items`, so they accept and refuse the same things. This module imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from somad.errors import SomadError
from somad.io.datasets import resolve_train_dir
from somad.io.images import ARRAY_RULE, array_to_rgb, list_images, load_image, to_rgb

#: What :func:`as_items` accepts, in words (for error messages).
ACCEPTED = (
    "a folder, an image path, a PIL image, a numpy image array, or a list or tuple of these "
    "(an array (N, H, W) or (N, H, W, C) is N images)"
)


@dataclass
class ImageItem:
    """One input image: a name for outputs, and how to get its pixels (a file, or an image held in memory)."""

    name: str
    path: Path | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        return self.image if self.image is not None else load_image(self.path)


def as_items(images, *, train: bool = False) -> list[ImageItem]:
    """Normalise the accepted image inputs to a list of :class:`ImageItem`.

    Accepts a folder (an MVTec category when ``train``: its ``train/good``), an image path, a PIL image, a numpy
    image array, or a list or tuple mixing these and ImageItems. A numpy array is one image ``(H, W)`` or
    ``(H, W, C)``, C from 1 to 4 (a camera frame; see ``images.array_to_rgb``); an array argument
    of another 3-d shape ``(N, H, W)`` or a 4-d one ``(N, H, W, C)`` is a batch of N such images.
    Arrays and PIL images are decoded now by the rules of files (``images.array_to_rgb``, ``images.to_rgb``:
    16-bit and float frames, alpha dropped); files when they are read. Anything else is refused with one line
    naming the entry (its index, type, shape and dtype) and what is accepted.
    """
    if isinstance(images, np.ndarray):
        return [_array_item(a, f"images[{i}]", f"array_{i:05d}") for i, a in enumerate(_frames(images))]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not isinstance(images, Iterable) or isinstance(images, (bytes, dict)):
        raise SomadError(f"images: {type(images).__name__} is not an image input; pass {ACCEPTED}")
    items: list[ImageItem] = []
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        if isinstance(entry, ImageItem):
            items.append(entry)
        elif isinstance(entry, Image.Image):
            name = f"image_{len(items):05d}"
            items.append(ImageItem(name, image=to_rgb(entry, name)))
        elif isinstance(entry, np.ndarray):
            items.append(_array_item(entry, where, f"array_{len(items):05d}"))
        elif isinstance(entry, (str, os.PathLike)):
            path = Path(entry)
            if path.is_dir() or (train and not path.exists()):  # a missing training folder: a DataError naming it
                folder = resolve_train_dir(path) if train else path
                items.extend(ImageItem(str(p.relative_to(folder)), path=p) for p in list_images(folder))
            else:
                items.append(ImageItem(path.name, path=path))
        else:
            dtype, shape = getattr(entry, "dtype", None), getattr(entry, "shape", None)
            what = type(entry).__name__ + (f" {dtype}" if dtype is not None else "")
            what += f" of shape {tuple(shape)}" if shape is not None else ""
            raise SomadError(f"{where}: {what} is not an image; pass {ACCEPTED}")
    if not items:
        raise SomadError("no images given; pass a folder of images or a list of image files")
    return items


def _frames(array: np.ndarray) -> list[np.ndarray]:
    """A numpy argument as its images: one frame ``(H, W)`` or ``(H, W, C)`` with C from 1 to 4, else a batch
    ``(N, H, W)`` or ``(N, H, W, C)`` (so ``(H, W, 4)`` is one RGBA frame, not H images 4 pixels wide)."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= 4):
        return [array]
    if array.ndim in (3, 4):
        return list(array)
    raise SomadError(
        f"images: {array.dtype} array of shape {array.shape} is neither one image (H, W[, C]) nor a batch "
        f"(N, H, W[, C]); {ARRAY_RULE}"
    )


def _array_item(array: np.ndarray, where: str, name: str) -> ImageItem:
    return ImageItem(name, image=array_to_rgb(array, where))  # a one-line ImageLoadError naming ``where``


__all__ = ["ACCEPTED", "ImageItem", "as_items"]
