"""A small synthetic inspection data set in MVTec AD layout (for ``somad demo`` and tests).

Each image shows a round machined part with a brushed-metal texture (a sum of nearly
horizontal sinusoids plus noise smoothed along the brushing direction) on a darker
background. Every image gets its own random phases, noise, part position and brightness,
so no two good images are identical. Defective images carry one of two defect types:

* ``scratch``: a thin curved line, darker or brighter than the surface;
* ``spot``: an irregular blob with a shifted colour.

The defect changes exactly the pixels of its mask (every masked pixel differs from the
defect-free image, every other pixel is unchanged), so the masks are exact ground truth.
Contrast is moderate: defects are visible but comparable to the texture's own variation.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from somad.errors import DataError

__all__ = ["DEFECT_TYPES", "render_part", "make_synthetic_category"]

logger = logging.getLogger(__name__)

#: Defect types produced by :func:`make_synthetic_category`, in this order.
DEFECT_TYPES = ("scratch", "spot")

_SPLIT_CODES = {"train": 0, "test": 1}
_KIND_CODES = {None: 0, "scratch": 1, "spot": 2}
# Grey levels of the defect-free image stay in this range, so that defect offsets never
# clip at 0 or 255 (which would leave masked pixels unchanged).
_SAFE_LOW, _SAFE_HIGH = 60.0, 195.0
_TINT = np.array([1.0, 0.975, 0.94])


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Render a defect-free part as float RGB in ``[_SAFE_LOW, _SAFE_HIGH]``."""
    f32 = np.float32
    coords = (np.arange(size, dtype=f32) + f32(0.5)) / f32(size)
    ys, xs = coords[:, None], coords[None, :]

    # Brushed texture: nearly horizontal ridges with random phase, plus streaky noise.
    # sin(a*x + b*y + p) is evaluated separably as an outer sum of 1-D products (fast).
    tex = np.zeros((size, size), dtype=f32)
    for freq, amp in ((9.0, 5.0), (23.0, 3.5), (57.0, 2.5)):
        theta = np.deg2rad(90.0 + rng.uniform(-4.0, 4.0))  # ridges run along x
        phase = rng.uniform(0.0, 2.0 * np.pi)
        ax = (2.0 * np.pi * freq * np.cos(theta) * xs).astype(f32)
        by = (2.0 * np.pi * freq * np.sin(theta) * ys + phase).astype(f32)
        tex += f32(amp) * (np.sin(ax) * np.cos(by) + np.cos(ax) * np.sin(by))
    streaks = gaussian_filter(rng.standard_normal((size, size), dtype=f32), sigma=(0.7, size / 24.0), mode="wrap")
    tex += f32(8.0) * streaks / f32(streaks.std() + 1e-12)
    fine = gaussian_filter(rng.standard_normal((size, size), dtype=f32), sigma=0.8)
    tex += f32(2.5) * fine / f32(fine.std() + 1e-12)

    # Round part with a bevelled rim on a dark, flatter background.
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03, size=2)
    radius = rng.uniform(0.40, 0.43)
    dy, dx = ys - f32(cy), xs - f32(cx)
    r = np.sqrt(dy * dy + dx * dx)
    inside = f32(1.0) / (f32(1.0) + np.exp((r - f32(radius)) * f32(size / 1.2)))  # soft edge, ~1 px
    rim = np.exp(-np.square((r - f32(radius - 0.02)) * f32(size / 3.0)))  # bevel just inside the edge
    shading = f32(12.0) * dx - f32(8.0) * dy  # gentle directional lighting
    part = f32(128.0) + tex + shading + f32(22.0) * rim
    background = f32(75.0) + f32(0.3) * tex

    gray = background + inside * (part - background)
    gray *= f32(rng.uniform(0.96, 1.04))  # brightness jitter
    tint = (_TINT + rng.uniform(-0.015, 0.015, size=3)).astype(f32)  # slight per-image colour cast
    rgb = gray[:, :, None] * tint
    return np.clip(rgb, _SAFE_LOW, _SAFE_HIGH)


def _scratch(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A thin curved line: its mask and per-pixel RGB offset."""
    start = 0.5 * size + rng.uniform(-0.22, 0.22, size=2) * size
    angle = rng.uniform(0.0, 2.0 * np.pi)
    length = rng.uniform(0.15, 0.35) * size
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    end = start + length * direction
    control = 0.5 * (start + end) + rng.uniform(-0.3, 0.3) * length * normal
    t = np.linspace(0.0, 1.0, max(8, int(length)))[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end  # quadratic Bezier
    width = int(rng.integers(2, 4))

    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0

    sign = rng.choice([-1.0, 1.0])
    strength = rng.uniform(32.0, 50.0)
    # Strength fades slightly along the scratch (never below 70 %), so it is not a flat stroke.
    grid = np.arange(size, dtype=np.float32)
    along = ((grid[None, :] - start[0]) * direction[0] + (grid[:, None] - start[1]) * direction[1]) / length
    fade = 0.7 + 0.3 * np.clip(1.0 - np.abs(along - 0.5) * 2.0, 0.0, 1.0)
    offset = np.repeat((sign * strength * fade)[:, :, None], 3, axis=2)
    return mask, offset


def _spot(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob: its mask and per-pixel RGB offset (a colour shift)."""
    cy, cx = 0.5 * size + rng.uniform(-0.25, 0.25, size=2) * size
    r0 = rng.uniform(0.03, 0.07) * size
    grid = np.arange(size, dtype=np.float32)
    dy, dx = grid[:, None] - np.float32(cy), grid[None, :] - np.float32(cx)
    theta = np.arctan2(dy, dx)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.04, 0.12) * np.sin(k * theta + rng.uniform(0.0, 2.0 * np.pi))
    rel = np.hypot(dy, dx) / (r0 * wobble)
    mask = rel < 1.0
    mask[int(np.clip(round(cy), 0, size - 1)), int(np.clip(round(cx), 0, size - 1))] = True  # never empty

    # Rust-like (warm, dark) or stain-like (bright, cold) colour shift; the dominant
    # channel always moves by at least 0.6 * 30 grey levels inside the mask.
    if rng.random() < 0.5:
        colour = np.array([-0.25, -0.7, -1.0])
    else:
        colour = np.array([0.8, 0.9, 1.0])
    strength = rng.uniform(30.0, 45.0)
    profile = 0.6 + 0.4 * np.clip(1.0 - rel**2, 0.0, 1.0)
    offset = strength * profile[:, :, None] * colour
    return mask, offset


def render_part(
    seed: int | Sequence[int],
    *,
    size: int = 256,
    defect: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic part image, optionally with a defect.

    The defect-free surface depends only on ``seed`` and ``size``, so
    ``render_part(s, defect="spot")`` is ``render_part(s)`` plus a defect, changed exactly
    on the returned mask.

    Parameters
    ----------
    seed : int or sequence of int
        Seed (non-negative) for :class:`numpy.random.SeedSequence`.
    size : int, default 256
        Height and width in pixels (at least 32).
    defect : {None, "scratch", "spot"}
        Defect to add.

    Returns
    -------
    image : numpy.ndarray
        ``uint8`` array of shape ``(size, size, 3)``.
    mask : numpy.ndarray
        Boolean array of shape ``(size, size)``; all False when ``defect`` is None.

    Raises
    ------
    ValueError
        If ``size`` is too small or ``defect`` is unknown.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_TYPES} or None")
    surface_seq, defect_seq = np.random.SeedSequence(seed).spawn(2)
    rgb = _surface(np.random.default_rng(surface_seq), size)
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        rng = np.random.default_rng(defect_seq)
        mask, offset = (_scratch if defect == "scratch" else _spot)(rng, size)
        rgb = np.where(mask[:, :, None], rgb + offset, rgb)
    return np.rint(np.clip(rgb, 0.0, 255.0)).astype(np.uint8), mask


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def make_synthetic_category(
    root: str | os.PathLike[str],
    *,
    name: str = "synthetic_part",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MVTec-style category to ``root/name``.

    Layout::

        root/name/train/good/000.png ...
        root/name/test/good/000.png ...
        root/name/test/scratch/000.png ...
        root/name/test/spot/000.png ...
        root/name/ground_truth/scratch/000_mask.png ...
        root/name/ground_truth/spot/000_mask.png ...

    Images are 8-bit RGB PNGs, masks 8-bit grey PNGs with values 0 and 255. The defective
    test images are split between the defect types, scratches getting the odd one.

    Parameters
    ----------
    root : str or os.PathLike
        Parent folder (created if needed).
    name : str, default "synthetic_part"
        Category folder name.
    n_train, n_test_good, n_test_defect : int
        Number of training (good) images, good test images and defective test images.
    size : int, default 256
        Image height and width.
    seed : int, default 0
        Seed; the same arguments always produce byte-identical files.
    overwrite : bool, default False
        If the category folder already has content, replace the generated sub-folders'
        PNG files instead of raising.

    Returns
    -------
    pathlib.Path
        The category folder ``root/name``.

    Raises
    ------
    ValueError
        For negative counts, ``n_train == 0``, a negative seed or ``size < 32``.
    DataError
        If the category folder exists, is not empty and ``overwrite`` is false.
    """
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be >= 1 and n_test_good, n_test_defect >= 0")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")

    category = Path(root) / name
    if category.exists() and not category.is_dir():
        raise DataError(f"{category}: exists and is not a folder; choose another root or name")
    if category.is_dir() and any(category.iterdir()):
        if not overwrite:
            raise DataError(f"{category}: already exists and is not empty; remove it or choose another root or name")

    n_scratch = (n_test_defect + 1) // 2
    plan: list[tuple[str, str | None, int]] = [("train", None, n_train), ("test", None, n_test_good)]
    plan += [("test", "scratch", n_scratch), ("test", "spot", n_test_defect - n_scratch)]

    dirs = {
        ("train", None): category / "train" / "good",
        ("test", None): category / "test" / "good",
        ("test", "scratch"): category / "test" / "scratch",
        ("test", "spot"): category / "test" / "spot",
    }
    gt_dirs = {kind: category / "ground_truth" / kind for kind in DEFECT_TYPES}
    for folder in [*dirs.values(), *gt_dirs.values()]:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in folder.glob("*.png"):
                old.unlink()

    for split, kind, count in plan:
        out_dir = dirs[(split, kind)]
        for index in range(count):
            image, mask = render_part((seed, _SPLIT_CODES[split], _KIND_CODES[kind], index), size=size, defect=kind)
            stem = f"{index:03d}"
            _save_png(image, out_dir / f"{stem}.png")
            if kind is not None:
                _save_png(mask.astype(np.uint8) * 255, gt_dirs[kind] / f"{stem}_mask.png")
    logger.info(
        "wrote synthetic category %s (%d train, %d good test, %d defective test images)",
        category,
        n_train,
        n_test_good,
        n_test_defect,
    )
    return category
