"""Normal references (issue 28): for a predicted region, a training patch that shows what normal looks like there.

A method whose learned rows are training patches, or prototypes each represented by one, keeps for each row the
training image it came from and the patch centre in that image's pixels: SOMAD a SOM node's representative
(``node_references_``), PatchCore a memory-bank row (``bank_references_``). PaDiM keeps none: its Gaussians are
per image position, fitted on every training image alike, so no one training patch stands for a row.

:class:`NormalReferences` is mixed into such a method, before ``base.BaseDetector``. During a local, untiled fit
(:meth:`NormalReferences._fit_items`) it records the training image of each model input (:class:`FitLog`), and
:meth:`NormalReferences._patch_references` turns patch rows (image-major, row-major, as fit stacks them) into the
``(M, 3)`` int32 array ``image, x, y`` (-1: no reference) kept in the model file, with ``reference_images_`` (the
names, relative to ``reference_root_`` where all came from one folder). At predict,
:meth:`NormalReferences.region_references` extracts the peak patches (one backbone pass) and asks the method for
the nearest row (``_nearest_references``). References never touch scoring. Tiled and distributed fits keep none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch

from somad.io.schema import INTEGER_DTYPES, Array, Kind, ListOf, Nullable

#: The state rows a method with references adds to its ``_state_fields`` (``methods.persistence``).
REFERENCE_STATE_FIELDS = {
    "reference_images": Nullable(ListOf(Kind(str, "a string"))),  # absent before references were kept
    "reference_root": Nullable(Kind(str, "a string")),
}
#: The rule of a method's references array: ``(M, 3)`` integers (image, x, y), absent in older files.
REFERENCES_ARRAY = Nullable(Array(INTEGER_DTYPES, 2))


@dataclass
class FitLog:
    """What a local fit records of its model inputs for the references: the training item of each model input in
    fit's order, and each item's decoded ``(height, width)`` (by ``id``)."""

    inputs: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)


class NormalReferences:
    """The references of a method's learned rows; see the module docstring. A method sets ``reference_images_``
    and ``reference_root_`` through :meth:`_patch_references` (fit) or :meth:`_loaded_references` (load) and
    answers :meth:`_kept_references` and :meth:`_nearest_references`."""

    #: What a local fit records of its model inputs (:class:`FitLog`); None otherwise.
    _fit_log = None

    # ------------------------------------------------------------------ fit
    def _fit_items(self, train) -> None:
        """The base fit, recording each model input's training image when the fit is untiled."""
        self._fit_log = FitLog() if self.tile_size is None else None
        try:
            super()._fit_items(train)
        finally:
            self._fit_log = None

    def _decoded(self, items, on_error, skipped):
        for entry in super()._decoded(items, on_error, skipped):
            if self._fit_log is not None:  # the decoded size of each training image, for its patches' centres
                self._fit_log.sizes[id(entry[0])] = (entry[2].height, entry[2].width)
            yield entry

    def _checked_features(self, batch, items=()):
        feats = super()._checked_features(batch, items)
        if self._fit_log is not None:  # the training image of each model input, in fit's order
            self._fit_log.inputs.extend(items)
        return feats

    def _patch_references(self, rows: torch.Tensor, n_patches: int, height: int, width: int) -> torch.Tensor | None:
        """The references ``(M, 3)`` int32 of training patch ``rows`` ``(M,)`` (-1: none) of a fit's ``n_patches``
        rows, ``height x width`` per model input: the index of the training image in ``reference_images_`` and the
        patch centre ``x, y`` in that image's pixels. Row ``r`` is model input ``r // (h*w)``, grid position
        ``divmod(r % (h*w), w)``; with ``augment``, a flipped copy's patch (the copies of an image follow it, in the
        order of ``_copies()``) refers to the mirrored place it shows in its image. ``None`` (and no names) when this
        fit recorded no inputs (tiled, distributed) or they do not account for the rows."""
        self.reference_images_, self.reference_root_ = None, None
        log = self._fit_log
        hw = height * width
        if log is None or len(log.inputs) * hw != n_patches:
            return None
        items = list({id(it): it for it in log.inputs}.values())  # the training images that gave patches, in order
        index = {id(it): i for i, it in enumerate(items)}
        image_of = np.array([index[id(it)] for it in log.inputs], dtype=np.int64)  # per model input
        sizes = np.array([log.sizes[id(it)] for it in log.inputs], dtype=np.float64).reshape(-1, 2)
        rows = rows.cpu().numpy().astype(np.int64)
        kept = rows >= 0
        inputs, cell = np.divmod(rows[kept], hw)
        i, j = np.divmod(cell, width)
        copies = self._copies()  # augment: each image's inputs are followed by their flipped copies, in this order
        if len(copies) > 1:
            first = {}
            for t, it in enumerate(log.inputs):
                first.setdefault(id(it), t)
            copy = np.array([t - first[id(it)] for t, it in enumerate(log.inputs)], dtype=np.int64)[inputs]
            flips = [copies[c % len(copies)] for c in copy]  # a flipped copy's patch: the mirrored place it shows
            i = np.where([-2 in f for f in flips], height - 1 - i, i)
            j = np.where([-1 in f for f in flips], width - 1 - j, j)
        x, y = self._patch_centre(i, j, (sizes[inputs, 0], sizes[inputs, 1]))
        refs = np.full((len(rows), 3), -1, dtype=np.int32)
        refs[kept] = np.stack([image_of[inputs], np.round(x), np.round(y)], axis=1)  # round half to even, as round()
        self.reference_images_, self.reference_root_ = reference_names(items)
        return torch.from_numpy(refs)

    def _patch_centre(self, i, j, size) -> tuple:
        """The centre ``(x, y)`` of patch ``(i, j)`` of an untiled model's grid in the pixels of an original image of
        ``size`` ``(height, width)``: back through the crop and the resize (``features.extractor.Geometry``).
        Numbers, or numpy arrays of them (elementwise)."""
        g, stride = self.extractor_.geometry, self.extractor_.stride
        (h, w), (rh, rw) = size, g.resized
        return (
            (g.crop_offset + (j + 0.5) * stride) * w / rw,
            (g.crop_offset + (i + 0.5) * stride) * h / rh,
        )

    def _patch_at(self, x: float, y: float, size: tuple[int, int]) -> tuple[int, int]:
        """The grid position ``(i, j)`` of the patch that covers pixel ``(x, y)`` of an original image of ``size``
        (the inverse of :meth:`_patch_centre`; pixels outside the crop go to the nearest patch)."""
        g, stride, (gh, gw) = self.extractor_.geometry, self.extractor_.stride, self.extractor_.grid_shape
        (h, w), (rh, rw) = size, g.resized
        at = lambda v, side, r, n: min(n - 1, max(0, int(((v + 0.5) * r / side - g.crop_offset) // stride)))  # noqa: E731
        return at(y, h, rh, gh), at(x, w, rw, gw)

    # ------------------------------------------------------------------ predict
    def _kept_references(self) -> torch.Tensor | None:
        """The method's references ``(M, 3)``, one per learned row, or ``None`` where it keeps none."""
        raise NotImplementedError

    def _nearest_references(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For patch features ``x`` ``(P, D)`` float32: the learned row whose reference stands for each (one that
        has a reference) and the patch's distance to it, as the method measures nearness: ``(P,)``, ``(P,)``."""
        raise NotImplementedError

    @torch.no_grad()
    def region_references(self, prediction, peaks) -> list[tuple[str, int, int, float]] | None:
        """The normal reference of each predicted region: for each peak pixel ``(x, y)`` of ``peaks`` (in the
        prediction's original pixels), the learned row nearest to the patch there (:meth:`_nearest_references`)
        and its training patch: ``(training image name, x, y, distance)``, the name relative to the training
        folder, ``x, y`` its patch centre in that image's pixels, ``distance`` the peak patch's to that row. One
        backbone pass over the prediction's image; scores are not touched. ``None`` when the model keeps no
        references (a file from before, a tiled or distributed fit)."""
        refs = self._kept_references()
        if refs is None or prediction.image is None:
            return None
        if not peaks:
            return []
        inputs, _ = self.extractor_.tiles(prediction.image)
        feats = self._checked_features(inputs)[0]  # (D, h, w)
        cells = [self._patch_at(x, y, prediction.original_size) for x, y in peaks]
        rows, distances = self._nearest_references(torch.stack([feats[:, i, j] for i, j in cells]).float())
        out = []
        for d, row in zip(distances.tolist(), rows.tolist()):
            image, rx, ry = refs[row].tolist()
            out.append((self.reference_images_[image], rx, ry, float(d)))
        return out

    def reference_path(self, name: str) -> Path | None:
        """Where training image ``name`` (a :meth:`region_references` name) was read at fit; ``None`` when it was
        not a file under one folder (images held in memory)."""
        root = getattr(self, "reference_root_", None)
        if root is not None:
            return Path(root) / name
        return Path(name) if Path(name).is_absolute() else None  # files of several folders: absolute names

    # ------------------------------------------------------------------ persistence
    def _reference_state(self) -> dict:
        """The state rows of :data:`REFERENCE_STATE_FIELDS`, for ``_state_info``."""
        return {
            "reference_images": getattr(self, "reference_images_", None),
            "reference_root": getattr(self, "reference_root_", None),
        }

    def _loaded_references(self, refs: torch.Tensor | None, state: dict, rows: int, name: str) -> torch.Tensor | None:
        """The references array ``name`` of a model file, checked against its ``rows`` learned rows and the names
        in ``state`` (``ValueError`` naming it otherwise), as int32; sets ``reference_images_``, ``reference_root_``.
        ``None`` for a file without one."""
        names = state.get("reference_images")
        if refs is not None:
            if names is None or tuple(refs.shape) != (rows, 3) or refs.is_floating_point():
                raise ValueError(f"{name} must be ({rows}, 3) integers with reference_images in the state")
            if bool((refs[:, 0] >= len(names)).any()) or bool((refs[:, 0] < -1).any()):
                raise ValueError(f"{name} name training images outside reference_images ({len(names)})")
            refs = refs.to(torch.int32)
        self.reference_images_, self.reference_root_ = names, state.get("reference_root")
        return refs


def reference_names(items) -> tuple[list[str], str | None]:
    """The training images' names and the folder they are relative to: each item's own name (relative to the
    training folder) when all are files under one folder, their absolute paths when files of several folders
    (root ``None``), or just their names when some were held in memory (root ``None``: not readable later)."""
    roots = set()
    for it in items:
        if it.path is None:
            return [it.name for it in items], None
        path = Path(it.path).absolute()
        depth = len(PurePath(it.name).parts)
        roots.add(
            path.parents[depth - 1]
            if 0 < depth <= len(path.parents) and path.as_posix().endswith(PurePath(it.name).as_posix())
            else None
        )
    if len(roots) == 1 and None not in roots:
        return [it.name for it in items], str(roots.pop())
    return [str(Path(it.path).absolute()) for it in items], None


__all__ = ["REFERENCES_ARRAY", "REFERENCE_STATE_FIELDS", "FitLog", "NormalReferences", "reference_names"]
