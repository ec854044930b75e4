"""The one resize of every model input: Pillow's antialiased ``BILINEAR`` filter, in a fixed order of its passes.

Torch-free and below every layer that makes model inputs (``somad.features``, the runtime's ``somad.io.
export_format``); the exported graph's copy of it is ``somad.export.resize_graph``.
"""

from __future__ import annotations

from PIL import Image


def resize_bilinear(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` ``(width, height)`` by Pillow's antialiased ``BILINEAR`` filter, the
    horizontal pass first, then the vertical one on its 8-bit result, on every Pillow version.

    Every model input somad makes goes through here. One ``Image.resize`` call does both passes in an order Pillow
    chooses: up to Pillow 12 always horizontal first; from Pillow 13 (python-pillow/Pillow#9549) vertical first
    for some frames whose height shrinks more than their width, and the 8-bit rounding between the passes makes
    the two orders differ by one grey level in many pixels (measured with Pillow 13.0 on 1500 random input and
    output shapes: the orders differ on 1497, and one call took the vertical-first order on 463 of them, among
    them magnetic_tile-like tall frames). Two one-axis calls fix the order, so a model's inputs, and its figures,
    do not depend on the Pillow installed, and the exported graph (``somad.export.resize_graph``) reproduces them
    bit for bit."""
    width, height = size
    if image.width != width:
        image = image.resize((width, image.height), Image.BILINEAR)
    if image.height != height:
        image = image.resize((width, height), Image.BILINEAR)
    return image


#: Tiles: the longer side of the resized frame is at most this many times the shorter one.
MAX_ASPECT = 8


def frame_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """The ``(height, width)`` a tiled model resizes an original ``height x width`` image to: its aspect ratio kept,
    the shorter side ``image_size``, each side rounded to a multiple of 16 (Python's ``round``: halves to even),
    at least ``image_size`` and at most :data:`MAX_ASPECT` times it (``features.extractor.Geometry``). The exported
    graph computes the same rule from an image's size (``somad.export.onnx.tile_nodes``), and the runtime checks
    with it that a frame is one its export serves."""
    scale = image_size / min(height, width)
    side = lambda n: max(image_size, min(MAX_ASPECT * image_size, int(round(n * scale / 16)) * 16))  # noqa: E731
    return side(height), side(width)
