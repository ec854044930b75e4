"""Tiled prediction: how many model inputs a tiled fit reads, and the tiles' patch scores stitched into one map.

With ``tile_size`` (``features.Geometry.layout``), an image is resized with its aspect ratio kept and covered by
overlapping square tiles, each a model input. :func:`stitch_maps` places each tile's patch scores in its frame's
patch grid, averages them where tiles overlap, and upsamples and blurs the stitched grid to the frame, as
``features.upsample_blur`` does an untiled map (``BaseDetector._anomaly_maps``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from somad.errors import ImageLoadError
from somad.features.extractor import Geometry, TileLayout, upsample_blur
from somad.io.images import image_size
from somad.io.inputs import ImageItem


def count_inputs(geometry: Geometry, items: Sequence[ImageItem]) -> int:
    """How many model inputs ``items`` make: one per image, or each image's tiles (read from the headers)."""
    if geometry.tile_size is None:
        return len(items)
    total = 0
    for it in items:
        try:
            h, w = (it.image.height, it.image.width) if it.image is not None else image_size(it.path)
        except ImageLoadError:
            continue  # counted when it is decoded (and skipped, or raised, there)
        total += len(geometry.layout(h, w).offsets)
    return total


def stitch_maps(
    patch: torch.Tensor,
    layouts: Sequence[TileLayout],
    stride: int,
    blur_sigma: float,
    tile_scores: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The tiles' patch scores ``patch`` ``(K, th, tw)``, the tiles of the images ``layouts`` in order, as one map
    ``(H, W)`` per image (its resized frame) and the image scores ``(N,)``: the map maximum, or the largest of its
    tiles' own image scores ``tile_scores`` ``(K,)`` (PatchCore)."""
    maps, scores, first = [], [], 0
    for layout in layouts:
        grids = patch[first : first + len(layout.offsets)]
        (th, tw), (fh, fw) = grids.shape[-2:], layout.size
        total = grids.new_zeros(fh // stride, fw // stride)
        count = grids.new_zeros(fh // stride, fw // stride)
        for (y, x), grid in zip(layout.offsets, grids):
            total[y // stride : y // stride + th, x // stride : x // stride + tw] += grid
            count[y // stride : y // stride + th, x // stride : x // stride + tw] += 1
        m = upsample_blur((total / count)[None], layout.size, blur_sigma)[0]
        maps.append(m)
        scores.append(m.max() if tile_scores is None else tile_scores[first : first + len(layout.offsets)].max())
        first += len(layout.offsets)
    return maps, torch.stack(scores)


__all__ = ["count_inputs", "stitch_maps"]
