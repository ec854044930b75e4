"""What every entry point accepts as images, normalised to one list of :class:`ImageItem`.

One responsibility: turn what a user passes (a folder, an MVTec category, paths, PIL images, numpy camera frames,
or a sequence mixing them) into named items that decode one at a time by the rules of ``somad.io.images``. The
native detectors (``somad.methods.base``) and the torch-free ONNX runtime (``somad.runtime``) both take their
inputs through :func:`as_items` and decode them through :func:`decoded`, so they accept and refuse the same
things. Besides: which good images an MVTec category's folder means to ``fit``'s thresholds and to ``calibrate``
(:func:`validation_items`, :func:`calibration_items`), the training folder's names checked for defects
(:func:`warn_defect_folders`), and each image's fingerprint (:func:`training_fingerprints`). This module imports
no torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from somad.errors import ImageLoadError, SomadError
from somad.io.datasets import resolve_train_dir
from somad.io.images import ARRAY_RULE, array_to_rgb, list_images, load_image, to_rgb

logger = logging.getLogger(__name__)

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


def decoded(
    items: Iterable[ImageItem], on_error: str = "fail", skipped: list[str] | None = None
) -> Iterator[tuple[ImageItem, Image.Image]]:
    """Each item with its decoded RGB image, one at a time (never all held at full size); an unreadable one raises
    its :class:`ImageLoadError` (``on_error="fail"``) or is logged, appended to ``skipped`` and left out
    (``"skip"``)."""
    for item in items:
        try:
            image = item.load()
        except ImageLoadError as exc:
            if on_error == "fail":
                raise
            logger.warning("skipped %s", exc)
            if skipped is not None:
                skipped.append(str(exc))
            continue
        yield item, image


# ---------------------------------------------------------------------- held-out good images of a category
def validation_items(images) -> list[ImageItem]:
    """The good images of an MVTec category's ``validation/good`` folder (MVTec 3D-AD), else none."""
    if not isinstance(images, (str, os.PathLike)):
        return []
    folder = Path(images) / "validation" / "good"
    if not (folder.is_dir() and (Path(images) / "train" / "good").is_dir()):
        return []
    return [ImageItem(str(p.relative_to(folder)), path=p) for p in list_images(folder)]


def calibration_items(images) -> list[ImageItem]:
    """The images ``calibrate`` is given, as items: a folder that is an MVTec category means its
    ``validation/good`` (MVTec 3D-AD), never its ``train/good``, which the fit trained on; a category without one
    is refused with the fix. Anything else as ``as_items`` reads a training folder."""
    if isinstance(images, (str, os.PathLike)) and (Path(images) / "train" / "good").is_dir():
        held_out = validation_items(images)
        if not held_out:
            raise SomadError(
                f"{images}: is an MVTec category without validation/good, and its train/good holds the images the fit "
                "trained on (their scores are biased low, so a threshold set from them flags good parts); pass a "
                "folder of good parts the fit never saw"
            )
        logger.info("calibrating on %s", Path(images) / "validation" / "good")
        return held_out
    return as_items(images, train=True)


#: Folder names that suggest defective images in a training folder (matched per path component).
_DEFECT_WORDS = re.compile(
    r"(^|[^a-z])(test|defects?|defective|bad|ng|nok|anomal\w*|reject\w*|fail\w*|crack\w*|"
    r"scratch\w*|broken|damage\w*)([^a-z]|$)",
    re.IGNORECASE,
)


def warn_defect_folders(items: list[ImageItem]) -> None:
    """Warn when training images sit in sub-folders named like defects (``test/``, ``bad/``, ``crack/``...)."""
    folders = sorted({str(PurePath(it.name).parent) for it in items if it.path is not None} - {"."})
    suspicious = [f for f in folders if any(_DEFECT_WORDS.search(part) for part in PurePath(f).parts)]
    if suspicious:
        logger.warning(
            "the training folder has sub-folder(s) named like defects (%s): somad trains on good images "
            "only; move defective images out of it",
            ", ".join(suspicious[:5]),
        )


# ---------------------------------------------------------------------- fingerprints
#: Hex digits kept of each training image's SHA-256 fingerprint (64 bits: a chance match between a million
#: training images and a million others is about 1 in 30 million).
DIGEST_HEX = 16


def training_fingerprints(items: Sequence[ImageItem]) -> tuple[str, list[str]]:
    """The training set's SHA-256 (:func:`training_set_hash`) and each image's own fingerprint
    (:func:`image_digests`), in one pass over the bytes."""
    h, digests = hashlib.sha256(), []
    for item in items:
        h.update(f"{item.name}|".encode(errors="surrogateescape"))
        one = hashlib.sha256()
        for chunk in _content(item):
            h.update(chunk or b"<unreadable>")
            one = one if chunk else None  # an unreadable file has no fingerprint
            if one is not None:
                one.update(chunk)
        digests.append(None if one is None else one.hexdigest()[:DIGEST_HEX])
    return h.hexdigest(), digests


def training_set_hash(items: Sequence[ImageItem]) -> str:
    """SHA-256 over the training images in order: each one's name, then its file's bytes (or, for an in-memory
    image, its pixels). Saved in the model so that the training set can be identified later."""
    return training_fingerprints(items)[0]


def image_digests(items: Sequence[ImageItem]) -> list[str | None]:
    """Each image's fingerprint: the first :data:`DIGEST_HEX` hex digits of the SHA-256 of its file's bytes (of
    its pixels, for an image held in memory), whatever its name or folder; ``None`` for an unreadable file.
    ``fit`` and ``update`` record those of the images they train on, so that ``calibrate`` can refuse them."""
    return training_fingerprints(items)[1]


def _content(item: ImageItem) -> Iterator[bytes]:
    """The bytes an image's fingerprint covers: its file's, read 1 MB at a time, or its pixels; ``b""`` at the end
    of a file that cannot be read."""
    if item.path is None:
        yield item.image.tobytes()
        return
    try:
        with open(item.path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
    except OSError:
        yield b""


__all__ = [
    "ACCEPTED",
    "DIGEST_HEX",
    "ImageItem",
    "as_items",
    "calibration_items",
    "decoded",
    "image_digests",
    "training_fingerprints",
    "training_set_hash",
    "validation_items",
    "warn_defect_folders",
]
