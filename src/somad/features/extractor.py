"""Image -> patch features: resize, center-crop, backbone, multi-scale concatenation, channel subset.

One responsibility: turn RGB images into a ``(B, D, h, w)`` tensor of patch features on the stride-4 grid
(by default) of the model input, and say where that input came from in the original image (:class:`Geometry`).

Pipeline (as in the SOMAD / PaDiM papers)
-----------------------------------------
1. Resize to ``image_size x image_size`` (bilinear, antialiased) and center-crop ``crop_size``
   (``crop_size=None``: no crop, every pixel is scored).
2. Normalise as the backbone expects and run it to get the stride-4/8/16 stage outputs.
3. Keep the selected channels of each stage, upsample stages 8 and 16 (bilinear) to the stride-4 grid and
   concatenate: ``D = sum(channels)`` (176 for EfficientNet-Lite0, 1792 for Wide-ResNet50-2) or ``dims``.

The channel subset is a seeded random draw (the authors' code keeps 550 of 1792). ``dims=None`` keeps all
channels when there are at most 550 and draws 550 otherwise. The indices are part of the saved model.

Two options serve other methods (the defaults give the pipeline above):

* ``stages``: which of the stride-4/8/16 stages to use; the output grid is that of the finest chosen stage
  and channel indices count over the chosen stages only (PatchCore: stages 1 and 2, 152 channels for
  EfficientNet-Lite0, on the stride-8 grid).
* ``local_aggregation``: each stage is averaged over a ``k x k`` neighbourhood (stride 1) before upsampling
  (PatchCore's locally aware patch features: ``k = 3``); ``1`` = none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from somad.errors import SomadError
from somad.features.backbones import backbone_spec, build_backbone
from somad.resize import frame_size, resize_bilinear

logger = logging.getLogger(__name__)

#: Channel count the authors' code keeps for Wide-ResNet50-2; ``dims=None`` caps at this.
DEFAULT_MAX_DIMS = 550


@dataclass(frozen=True)
class Geometry:
    """Where the model input sits in the original image.

    Without tiles, every image is resized to :attr:`resized` ``(height, width)``: ``image_size`` square (the
    aspect ratio not kept), of which the central ``crop_size`` square is kept, or ``frame``, a model's learned
    frame (``BaseDetector.aspect``: the training images' aspect ratio kept, the shorter side ``image_size``);
    :attr:`input_shape` is the model input's and a map covers it. With tiles (``tile_size``), each original is
    resized with its own aspect ratio kept (:meth:`frame_size`) and covered by overlapping square tiles of side
    ``tile_size``, each a model input (:meth:`layout`); a map covers the whole resized frame.
    """

    image_size: int
    crop_size: int | None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    frame: tuple[int, int] | None = None

    @property
    def resized(self) -> tuple[int, int]:
        """Without tiles: the ``(height, width)`` every image is resized to."""
        return tuple(self.frame) if self.frame is not None else (self.image_size, self.image_size)

    @property
    def input_shape(self) -> tuple[int, int]:
        """The model input's ``(height, width)``: a tile, the crop, or the resized image."""
        if self.tile_size is not None:
            return self.tile_size, self.tile_size
        return (self.crop_size, self.crop_size) if self.crop_size is not None else self.resized

    @property
    def input_size(self) -> int:
        """The model input's height (its side when it is square: always, but for a kept aspect ratio)."""
        return self.input_shape[0]

    @property
    def crop_offset(self) -> int:
        """The crop's margin in the resized image (a crop is a centred square of a square resize)."""
        return 0 if self.tile_size is not None else (self.resized[0] - self.input_size) // 2

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """Tiles: the ``(height, width)`` the original is resized to (aspect kept, at most ``somad.resize.MAX_ASPECT``;
        ``somad.resize.frame_size``)."""
        return frame_size(height, width, self.image_size)

    def layout(self, height: int, width: int) -> TileLayout:
        """Where each model input lies in the resized frame of an original ``height x width`` image."""
        if self.tile_size is None:
            return TileLayout(self.input_shape, ((0, 0),))
        fh, fw = self.frame_size(height, width)
        step = self.tile_size * (1.0 - self.tile_overlap)

        def starts(n: int) -> list[int]:
            count = 1 if n <= self.tile_size else int(np.ceil((n - self.tile_size) / step)) + 1
            return sorted({int(round(v / 16)) * 16 for v in np.linspace(0, n - self.tile_size, count)})

        return TileLayout((fh, fw), tuple((y, x) for y in starts(fh) for x in starts(fw)))


@dataclass(frozen=True)
class TileLayout:
    """The model inputs of one image: the ``(height, width)`` its map covers and each input's top-left corner."""

    size: tuple[int, int]
    offsets: tuple[tuple[int, int], ...]


CPU_GROUP = 4  # images per backbone pass on CPU (see FeatureExtractor.__call__)

#: Environment variable: set to 1 for features that do not depend on the number of threads (see :func:`deterministic`).
DETERMINISTIC_ENV = "SOMAD_DETERMINISTIC"


def deterministic() -> bool:
    """Whether the backbone runs with thread-count-invariant arithmetic (``SOMAD_DETERMINISTIC=1``).

    oneDNN, torch's fast CPU convolution library, splits its sums differently with 1 thread than with 2 or more,
    so the features of one image differ by up to ~2e-5 between thread counts (measured on EfficientNet-Lite0;
    docs/benchmarks.md "somad 0.8.0"). The default configuration does not notice; the paper's eps 0.01 does, because
    nodes with fewer members than dimensions have a null space whose orientation depends on every member. With this
    set, the convolutions use ATen's own kernels, whose sums do not depend on the thread count (the rest of the
    pipeline already does not): every figure is then the same at any thread count on one machine, at about 7x the
    backbone's time on CPU. On CUDA it also asks cuDNN for deterministic algorithms.
    """
    return os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def select_channels(total: int, dims: int | None, seed: int) -> np.ndarray:
    """Seeded random channel subset, sorted (the order does not matter for the Gaussian statistics).

    Returns ``arange(total)`` when ``dims`` is ``None`` and ``total <= 550``.
    """
    if dims is None:
        dims = min(total, DEFAULT_MAX_DIMS)
    if not 1 <= dims <= total:
        raise SomadError(f"dims={dims} is out of range; the backbone has {total} channels, choose 1..{total}")
    if dims == total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=dims, replace=False)).astype(np.int64)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SomadError(f"unknown device {device!r}; choose one of: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SomadError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


class FeatureExtractor:
    """Multi-scale patch features of a pretrained backbone.

    Parameters
    ----------
    backbone : str
        A name from :data:`somad.features.backbones.BACKBONES`.
    weights : str
        ``"default"`` (ImageNet), a state-dict path, or ``"none"`` (random; tests only).
    image_size, crop_size : int, int or None
        Resize side and center-crop side (``None``: no crop).
    channel_indices : array of int, optional
        Indices into the concatenated channels of the chosen stages to keep (see :func:`select_channels`).
        ``None`` keeps all.
    device : torch.device, default CPU
    seed : int
        Seed of the random initialisation (``weights="none"`` only).
    stages : sequence of int, default (0, 1, 2)
        Backbone stages to use (0 = stride 4, 1 = stride 8, 2 = stride 16), distinct; the output grid is
        that of the finest chosen stage.
    local_aggregation : int, default 1
        Odd kernel size of the neighbourhood mean applied to each stage (:func:`local_mean`); 1 = none.
    """

    def __init__(
        self,
        backbone: str,
        *,
        weights: str = "default",
        image_size: int = 256,
        crop_size: int | None = 224,
        channel_indices: np.ndarray | None = None,
        device: torch.device | None = None,
        seed: int = 0,
        stages: Sequence[int] = (0, 1, 2),
        local_aggregation: int = 1,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        frame: tuple[int, int] | None = None,
    ):
        self.spec = backbone_spec(backbone)
        if crop_size is not None and crop_size > image_size:
            raise SomadError(f"crop_size={crop_size} is larger than image_size={image_size}; use a crop <= the resize")
        if image_size < 32:
            raise SomadError(f"image_size={image_size} is too small; use at least 32 pixels")
        if tile_size is not None:
            if crop_size is not None:
                raise SomadError("tiles cover the whole frame: use --crop none with --tile")
            if not (32 <= tile_size <= image_size and tile_size % 16 == 0) or image_size % 16:
                raise SomadError(
                    f"tile_size={tile_size} must be a multiple of 16 between 32 and image_size "
                    f"({image_size}, itself a multiple of 16)"
                )
            if not 0.0 <= tile_overlap < 1.0:
                raise SomadError(f"tile_overlap={tile_overlap} must be in [0, 1)")
        self.stages = check_stages(stages, len(self.spec.channels))
        local_aggregation = int(local_aggregation)
        if local_aggregation < 1 or local_aggregation % 2 == 0:
            raise SomadError(f"local_aggregation={local_aggregation} must be an odd kernel size >= 1 (1 = none)")
        self.local_aggregation = local_aggregation
        if frame is not None and (crop_size is not None or tile_size is not None or min(frame) != image_size):
            raise SomadError(f"frame={tuple(frame)} needs no crop, no tiles and a shorter side of image_size")
        self.geometry = Geometry(
            image_size, crop_size, tile_size, tile_overlap, None if frame is None else tuple(frame)
        )
        device = torch.device("cpu") if device is None else device
        self.device = device
        stage_channels = tuple(self.spec.channels[s] for s in self.stages)
        total = sum(stage_channels)
        self.channel_indices = np.arange(total) if channel_indices is None else np.asarray(channel_indices, np.int64)
        self.model = build_backbone(backbone, weights, seed=seed).to(device)
        self._mean = torch.tensor(self.spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=device).view(1, 3, 1, 1)
        # Per stage: which of its channels are kept (selecting before upsampling saves work).
        bounds = np.cumsum((0,) + stage_channels)
        self._stage_channels = [
            torch.as_tensor(
                self.channel_indices[(self.channel_indices >= lo) & (self.channel_indices < hi)] - lo, device=device
            )
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]

    @property
    def dims(self) -> int:
        return int(len(self.channel_indices))

    @property
    def stride(self) -> int:
        """Stride of the output grid in input pixels: that of the finest chosen stage (4, 8 or 16)."""
        return 4 * 2 ** self.stages[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """The output patch grid ``(h, w)`` of one model input (stride-4 grid by default)."""
        return tuple(-(-n // self.stride) for n in self.geometry.input_shape)

    # ------------------------------------------------------------------ preprocessing
    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, TileLayout]:
        """RGB PIL image -> model inputs ``(K, 3, S, S)`` in [0, 1] and their layout (``K = 1`` without tiles)."""
        g = self.geometry
        layout = g.layout(image.height, image.width)
        if g.tile_size is None:
            return self.preprocess(image)[None], layout
        fh, fw = layout.size
        self._warn_if_small(image, min(fh, fw))
        frame = np.asarray(resize_bilinear(image, (fw, fh)), dtype=np.float32) / 255.0
        t = g.tile_size
        stack = np.stack([frame[y : y + t, x : x + t] for y, x in layout.offsets]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(stack)), layout

    def _warn_if_small(self, image: Image.Image, side: int) -> None:
        if min(image.size) < side:
            # Warn once per extractor: a dataset of small images would otherwise flood the log.
            log = logger.debug if getattr(self, "_warned_small", False) else logger.warning
            log(
                "image of size %dx%d is smaller than the model input %d; it is upscaled (further such images "
                "are logged at debug level)",
                image.size[0],
                image.size[1],
                side,
            )
            self._warned_small = True

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float tensor ``(3, H, W)`` in [0, 1], resized and cropped (not yet normalised)."""
        g = self.geometry
        self._warn_if_small(image, min(g.input_shape))
        height, width = g.resized
        array = np.asarray(resize_bilinear(image, (width, height)), dtype=np.float32) / 255.0
        (o, (h, w)) = g.crop_offset, g.input_shape
        array = array[o : o + h, o : o + w]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch ``(B, 3, S, S)`` in [0, 1] -> features ``(B, D, h, w)`` float32 on ``device``.

        The result is channels-last in memory (``torch.channels_last``): ``feats.permute(0, 2, 3, 1)``, the
        patch vectors, is contiguous, as the scorers read it. Upsampling channels-last stages is also several
        times faster on CPU than upsampling channels-first ones.

        On CPU the images go through in groups of :data:`CPU_GROUP`: per image, larger batches are slower there
        (their activations no longer fit in cache; EfficientNet-Lite0 at 256 px: about 24 ms per image in
        groups of 4, 45 ms in batches of 16).
        """
        if self.device.type == "cpu" and batch.shape[0] > CPU_GROUP:
            return torch.cat([self(group) for group in batch.split(CPU_GROUP)])
        x = (batch.to(self.device, torch.float32) - self._mean) / self._std
        # No TF32 in the GPU convolutions: full float32 keeps GPU features within float tolerance of the CPU's.
        exact = deterministic()
        with (
            torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled, allow_tf32=False, deterministic=exact, benchmark=False
            ),
            _without_onednn(exact),
        ):
            outputs = self.model(x)
        return self.combine(outputs)

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The backbone's stage outputs -> features ``(B, D, h, w)``: each chosen stage's kept channels, its
        neighbourhood mean, bilinear upsampling to the finest chosen stage's grid, concatenated (channels-last).
        The native path (``__call__``) and the exported graph (:class:`FeatureGraph`) both run this."""
        stages = [outputs[s] for s in self.stages]
        size = stages[0].shape[-2:]
        parts = []
        for stage, keep in zip(stages, self._stage_channels):
            if len(keep) == 0:
                continue
            stage = stage.index_select(1, keep) if len(keep) < stage.shape[1] else stage
            if self.local_aggregation > 1:
                stage = local_mean(stage, self.local_aggregation)
            stage = stage.contiguous(memory_format=torch.channels_last)  # interpolate and cat keep the format
            if stage.shape[-2:] != size:
                stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
            parts.append(stage)
        return torch.cat(parts, dim=1)


class FeatureGraph(torch.nn.Module):
    """The feature stage as one traceable module, for the exported graph (``somad.export``): uint8 ``(N, S, S, 3)``
    pixels (the preprocessed input: :meth:`FeatureExtractor.preprocess` before its ``/ 255``) -> features
    ``(N, D, h, w)``: ``x / 255``, the backbone's normalisation, the backbone, :meth:`FeatureExtractor.combine`."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.backbone = extractor.model
        self.register_buffer("mean", extractor._mean.cpu())
        self.register_buffer("std", extractor._std.cpu())
        self.extractor = extractor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.extractor.combine(self.backbone((x - self.mean) / self.std))


@contextlib.contextmanager
def _without_onednn(active: bool):
    """Run the block with torch's oneDNN CPU kernels switched off (``active``), then restore the setting."""
    before = torch.backends.mkldnn.enabled
    if active:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def check_stages(stages: Sequence[int], n_stages: int = 3) -> tuple[int, ...]:
    """Validate a choice of backbone stages (0 = stride 4, 1 = stride 8, 2 = stride 16): sorted, distinct."""
    chosen = tuple(sorted({int(s) for s in stages}))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_stages or len(chosen) != len(tuple(stages)):
        raise SomadError(f"stages={tuple(stages)} is invalid; choose distinct stages among 0..{n_stages - 1}")
    return chosen


def local_mean(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over the ``kernel x kernel`` neighbourhood of every position of ``(B, C, h, w)`` (stride 1, same size).

    At the borders the mean runs over the neighbours inside the map only (zero padding is not counted), so
    border patches are not shrunk towards zero.
    """
    if kernel == 1:
        return x
    return F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def to_original_resolution(
    maps: torch.Tensor, geometry: Geometry, sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """Map anomaly maps from the model input back onto each original image.

    The crop is put back where it came from in the resized image; pixels outside the crop (never seen by
    the model) take the value of the nearest scored pixel (edge replication). The result is then resized
    (bilinear) to the original ``(height, width)``. Maps of tiled models cover the whole resized frame: they
    are only resized.

    Parameters
    ----------
    maps : tensor (N, S, S)
        Maps at the model input resolution.
    sizes : sequence of (height, width)
    """
    out = []
    pad = geometry.crop_offset
    far = 0 if geometry.tile_size is not None else geometry.resized[0] - geometry.input_size - pad
    for m, (h, w) in zip(maps, sizes):
        m = m[None, None].float()
        if pad or far:
            m = F.pad(m, (pad, far, pad, far), mode="replicate")
        m = F.interpolate(m, size=(int(h), int(w)), mode="bilinear", align_corners=False)
        out.append(m[0, 0].cpu().numpy().astype(np.float32))
    return out


def upsample_blur(maps: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Bilinear upsampling of ``(N, h, w)`` maps to ``(N, size, size)`` (or ``(N, *size)``), then :func:`gaussian_blur`.

    Both steps are linear and separable, so each side is one precomputed ``(size, h)`` matrix ``R`` and the
    result is ``R_h @ maps @ R_w^T``: about ``size * h * (h + size)`` multiply-adds per map, instead of the
    blur's ``2 * size^2 * (8 sigma + 1)`` after ``F.interpolate``. Equal to the two steps up to float rounding.
    """
    height, width = (size, size) if isinstance(size, int) else size
    rows = resize_blur_matrix(int(height), maps.shape[-2], float(sigma), maps.device)
    cols = resize_blur_matrix(int(width), maps.shape[-1], float(sigma), maps.device)
    return rows @ maps.float() @ cols.T


@functools.lru_cache(maxsize=64)  # tiled frames of many aspect ratios use many sizes
def resize_blur_matrix(size: int, n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``(size, n)``: one axis of ``gaussian_blur(F.interpolate(x, size, bilinear, align_corners=False))`` (cached:
    do not modify it in place)."""
    eye = torch.eye(n, dtype=torch.float64)
    up = F.interpolate(eye[None], size=size, mode="linear", align_corners=False)[0].T  # bilinear = linear per axis
    if sigma > 0:
        kernel = _gaussian_kernel(sigma, size - 1, torch.float64, torch.device("cpu"))  # as gaussian_blur, (size, size)
        radius = kernel.numel() // 2
        taps = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None, :]  # (size, 2r + 1)
        taps = torch.where(taps < 0, -taps - 1, taps)  # scipy's 'reflect': d c b a | a b c d (r < size: one fold)
        taps = torch.where(taps >= size, 2 * size - 1 - taps, taps)
        blur = torch.zeros(size, size, dtype=torch.float64)
        blur.scatter_add_(1, taps, kernel.expand(size, -1).contiguous())
        up = blur @ up
    return up.float().to(device)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` maps, truncated at 4 sigma, reflect padding (as scipy's default)."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    kernel = _gaussian_kernel(sigma, min(h, w) - 1, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    # scipy's 'reflect' repeats the edge pixel (d c b a | a b c d); torch's 'reflect' does not, so pad by flipping.
    x = _symmetric_pad(maps[:, None], radius)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0]


def _gaussian_kernel(sigma: float, max_radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``(2r + 1,)``, truncated at 4 sigma, or at ``max_radius`` if smaller."""
    radius = min(int(4.0 * sigma + 0.5), max_radius)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    x = torch.cat([x[..., :r, :].flip(-2), x, x[..., x.shape[-2] - r :, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :r].flip(-1), x, x[..., x.shape[-1] - r :].flip(-1)], dim=-1)
