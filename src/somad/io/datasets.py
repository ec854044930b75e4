"""Dataset layouts: which files are training images, test images and ground-truth masks.

Two layouts are understood:

* **MVTec AD category** ::

      <category>/train/good/*.png
      <category>/test/good/*.png
      <category>/test/<defect type>/*.png
      <category>/ground_truth/<defect type>/<stem>_mask.png

* **Plain folders**: a folder of good images, any number of folders of defective images
  (one per defect type, named after it) and optionally a folder of masks matched to the
  defective images by file stem (``<stem>_mask.<ext>`` or ``<stem>.<ext>``).

This module only decides which files play which role; decoding lives in
:mod:`somad.io.images`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from somad.errors import DataError
from somad.io.images import IMAGE_EXTENSIONS, MASK_HINT, UnlistableFolderError, image_size, list_images

__all__ = [
    "Sample",
    "resolve_train_dir",
    "is_mvtec_category",
    "mvtec_test_samples",
    "folder_test_samples",
    "validate_masks",
]

logger = logging.getLogger(__name__)

GOOD = "good"
_MAX_LISTED = 3


@dataclass(frozen=True)
class Sample:
    """One test image and what is known about it.

    Attributes
    ----------
    path : pathlib.Path
        The image file.
    label : int
        0 for a good image, 1 for a defective one.
    defect_type : str
        ``"good"`` for good images, otherwise the defect type (folder name).
    mask_path : pathlib.Path or None
        Ground-truth mask of the defect, if one is available (always ``None`` for good
        images).
    relpath : pathlib.Path
        Relative path used to name outputs for this image, e.g.
        ``Path("test/crack/012.png")``; unique within one list of samples.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None
    relpath: Path


def _examples(paths: Iterable[Path]) -> str:
    """Format a few example paths for a log message."""
    items = [str(p) for p in paths]
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (", ..." if len(items) > _MAX_LISTED else "")


def _visible_subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-directories of ``folder``, sorted by name."""
    try:
        entries = list(folder.iterdir())
    except PermissionError:
        raise UnlistableFolderError(
            f"cannot list {folder}: permission denied; give read and execute permission on it or choose another folder"
        ) from None
    return sorted((p for p in entries if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def is_mvtec_category(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` looks like an MVTec AD category folder.

    Parameters
    ----------
    path : str or os.PathLike
        Folder to inspect.

    Returns
    -------
    bool
        True if ``path`` contains both a ``train/good`` and a ``test`` folder.
    """
    path = Path(path)
    return (path / "train" / GOOD).is_dir() and (path / "test").is_dir()


def resolve_train_dir(path: str | os.PathLike[str]) -> Path:
    """Find the folder of good training images.

    Parameters
    ----------
    path : str or os.PathLike
        Either an MVTec category (``path/train/good`` is used) or a folder of good images
        (searched recursively).

    Returns
    -------
    pathlib.Path
        The folder holding the training images.

    Raises
    ------
    DataError
        If neither layout is found. A folder that has a ``train``, ``test`` or
        ``ground_truth`` sub-folder but no ``train/good`` is rejected too, rather than
        training on its test images.
    """
    path = Path(path)
    expected = "expected a folder of good images or an MVTec category with train/good"
    train_good = path / "train" / GOOD
    if train_good.is_dir():
        return train_good
    if not path.is_dir():
        what = "folder does not exist" if not path.exists() else "not a folder"
        raise DataError(f"{path}: {what}; {expected}")
    if any((path / name).is_dir() for name in ("train", "test", "ground_truth")):
        raise DataError(f"{path}: looks like an MVTec category but has no train/good folder; {expected}")
    try:
        list_images(path, recursive=True)
    except UnlistableFolderError:
        raise
    except DataError as exc:
        raise DataError(f"{path}: no images found; {expected}") from exc
    return path


def _find_mask(image: Path, folders: Iterable[Path], suffix: str, *, allow_plain: bool) -> Path | None:
    """Find the mask of ``image`` in the first of ``folders`` that has one.

    ``<stem><suffix><ext>`` is preferred over ``<stem><ext>`` (the latter only when
    ``allow_plain``); ``.png`` is preferred among extensions, and extensions match
    case-insensitively.
    """
    stems = [image.stem + suffix] + ([image.stem] if allow_plain and suffix else [])
    exts = [".png"] + [e for e in IMAGE_EXTENSIONS if e != ".png"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for stem in stems:
            for ext in exts:
                for candidate in (folder / (stem + ext), folder / (stem + ext.upper())):
                    if candidate.is_file():
                        return candidate
    return None


def mvtec_test_samples(category_dir: str | os.PathLike[str]) -> list[Sample]:
    """List the test images of an MVTec AD category with labels and masks.

    Every image in ``test/<type>/`` becomes a :class:`Sample`. Type ``good`` gets label 0
    and no mask; every other type gets label 1 and the mask
    ``ground_truth/<type>/<stem>_mask.png`` if it exists (other image extensions are
    accepted too). Missing masks and masks without a matching image are reported as
    logged warnings, not errors.

    Parameters
    ----------
    category_dir : str or os.PathLike
        The category folder (containing ``test/`` and usually ``ground_truth/``).

    Returns
    -------
    list of Sample
        Sorted by ``relpath``, which is relative to ``category_dir``
        (e.g. ``test/crack/000.png``).

    Raises
    ------
    DataError
        If there is no ``test`` folder or it holds no images.
    """
    category_dir = Path(category_dir)
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"{category_dir}: no test folder; expected an MVTec category with test/<defect type>/ folders")
    gt_dir = category_dir / "ground_truth"

    type_dirs = _visible_subdirs(test_dir)
    stray = [p for p in test_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if stray:
        logger.warning(
            "%s: ignoring %d image(s) directly in test/ (not in a defect-type folder): %s",
            category_dir,
            len(stray),
            _examples(stray),
        )

    samples: list[Sample] = []
    missing: list[Path] = []
    used_masks: set[Path] = set()
    n_defective = 0
    for type_dir in type_dirs:
        defect_type = type_dir.name
        try:
            images = list_images(type_dir, recursive=True)
        except UnlistableFolderError:
            raise
        except DataError:
            logger.warning("%s: test folder has no images; skipping it", type_dir)
            continue
        is_good = defect_type == GOOD
        for image in images:
            mask = None
            if not is_good:
                n_defective += 1
                # Nested images keep their sub-folder below ground_truth/<type>/ too.
                sub = image.parent.relative_to(type_dir)
                mask = _find_mask(image, [gt_dir / defect_type / sub], "_mask", allow_plain=False)
                if mask is None:
                    missing.append(image)
                else:
                    used_masks.add(mask.resolve())
            samples.append(
                Sample(
                    path=image,
                    label=0 if is_good else 1,
                    defect_type=defect_type,
                    mask_path=mask,
                    relpath=image.relative_to(category_dir),
                )
            )
    if not samples:
        raise DataError(f"{test_dir}: no test images found; expected images in test/<defect type>/ folders")

    if missing:
        logger.warning(
            "%s: %d of %d defective test image(s) have no ground-truth mask "
            "(expected ground_truth/<type>/<stem>_mask.png), e.g. %s; "
            "pixel-level metrics will leave them out",
            category_dir,
            len(missing),
            n_defective,
            _examples(missing),
        )
    if gt_dir.is_dir():
        extra = [m for m in _all_images(gt_dir) if m.resolve() not in used_masks]
        if extra:
            logger.warning(
                "%s: %d mask(s) in ground_truth/ have no matching test image: %s",
                category_dir,
                len(extra),
                _examples(extra),
            )
    samples.sort(key=lambda s: s.relpath.parts)
    return samples


def _all_images(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursive), or an empty list if there are none."""
    try:
        return list_images(folder, recursive=True)
    except DataError:
        return []


def _as_dir_list(dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None) -> list[Path]:
    """Accept a single folder or an iterable of folders."""
    if dirs is None:
        return []
    if isinstance(dirs, (str, os.PathLike)):
        return [Path(dirs)]
    return [Path(d) for d in dirs]


def folder_test_samples(
    good_dir: str | os.PathLike[str] | None = None,
    defect_dirs: Iterable[str | os.PathLike[str]] = (),
    mask_dir: str | os.PathLike[str] | None = None,
    *,
    mask_suffix: str = "_mask",
) -> list[Sample]:
    """List test images laid out as plain folders.

    Parameters
    ----------
    good_dir : str or os.PathLike, optional
        Folder of good test images (label 0, type ``"good"``).
    defect_dirs : iterable of str or os.PathLike, default ()
        Folders of defective images (label 1); each folder's name is its defect type.
        A single path is accepted too.
    mask_dir : str or os.PathLike, optional
        Folder of masks for the defective images. For an image ``<stem>.<ext>`` in
        defect folder ``<type>``, the mask is ``<stem><mask_suffix>.<ext>`` or, failing
        that, ``<stem>.<ext>`` (any image extension, ``.png`` preferred), looked up first
        in ``mask_dir/<type>/`` and then in ``mask_dir`` itself.
    mask_suffix : str, default "_mask"
        Suffix of mask file stems.

    Returns
    -------
    list of Sample
        Good images first, then each defect folder in the order given; within a folder,
        sorted. ``relpath`` is ``<folder name>/<path inside the folder>``; when two folders
        share a name the later ones get ``_2``, ``_3``, ... appended, so relpaths are unique.

    Raises
    ------
    DataError
        If no folder is given, a folder is missing or has no images, ``mask_dir`` is not a
        folder, or the same image file is listed twice.
    """
    good = Path(good_dir) if good_dir is not None else None
    defects = _as_dir_list(defect_dirs)
    if good is None and not defects:
        raise DataError("no test folders given; pass a folder of good images and/or folders of defective images")
    masks_root = Path(mask_dir) if mask_dir is not None else None
    if masks_root is not None and not masks_root.is_dir():
        raise DataError(f"{masks_root}: mask folder does not exist or is not a folder; check the path")

    groups: list[tuple[Path, bool]] = ([(good, True)] if good is not None else []) + [(d, False) for d in defects]
    used_names: set[str] = set()
    seen_files: dict[Path, Path] = {}
    samples: list[Sample] = []
    missing: list[Path] = []
    n_defective = 0
    for folder, is_good in groups:
        images = list_images(folder, recursive=True)
        base = folder.name or folder.resolve().name or "images"
        name, k = base, 1
        while name in used_names:
            k += 1
            name = f"{base}_{k}"
        used_names.add(name)
        defect_type = GOOD if is_good else base
        for image in images:
            key = image.resolve()
            if key in seen_files:
                raise DataError(f"{image}: listed twice (also as {seen_files[key]}); pass each test folder once")
            seen_files[key] = image
            mask = None
            if not is_good:
                n_defective += 1
                if masks_root is not None:
                    mask = _find_mask(image, [masks_root / base, masks_root], mask_suffix, allow_plain=True)
                    if mask is None:
                        missing.append(image)
            samples.append(
                Sample(
                    path=image,
                    label=0 if is_good else 1,
                    defect_type=defect_type,
                    mask_path=mask,
                    relpath=Path(name) / image.relative_to(folder),
                )
            )
    if missing:
        logger.warning(
            "%s: %d of %d defective image(s) have no mask (looked for <stem>%s.<ext> and <stem>.<ext>), "
            "e.g. %s; pixel-level metrics will leave them out",
            masks_root,
            len(missing),
            n_defective,
            mask_suffix,
            _examples(missing),
        )
    return samples


def validate_masks(samples: Iterable[Sample]) -> None:
    """Check that every mask exists and has the size of its image.

    Only headers are read (see :func:`somad.io.images.image_size`).

    Parameters
    ----------
    samples : iterable of Sample
        Samples to check; those without a mask are skipped.

    Raises
    ------
    DataError
        If a mask file is missing or its size differs from its image's size; the message
        names the mask, the image and both sizes.
    ImageLoadError
        If an image or mask header cannot be read.
    """
    for sample in samples:
        if sample.mask_path is None:
            continue
        mask = Path(sample.mask_path)
        if not mask.is_file():
            raise DataError(f"{mask}: mask file of {sample.path} does not exist; restore it or remove the mask folder")
        image_hw = image_size(sample.path)
        mask_hw = image_size(mask, hint=MASK_HINT)
        if image_hw != mask_hw:
            raise DataError(
                f"{mask}: mask is {mask_hw[0]}x{mask_hw[1]} (HxW) but image {sample.path} is "
                f"{image_hw[0]}x{image_hw[1]}; masks must have the same size as their image"
            )
