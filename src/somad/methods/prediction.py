"""What a detector's ``predict_iter`` yields for one image (:class:`Prediction`); what the thresholds, the outputs
and the service read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from somad.io.inputs import ImageItem
from somad.verdicts import OK


@dataclass
class Prediction:
    """Result for one image.

    Attributes
    ----------
    item : ImageItem
    score : float
    map : tensor (S, S), anomaly map at the model input resolution
    original_size : (height, width)
    image : the decoded RGB input (for overlays)
    """

    item: ImageItem
    score: float
    map: torch.Tensor
    original_size: tuple[int, int]
    image: Image.Image | None = None
    status: str = OK  # or "invalid_input: <reason>" (somad.verdicts.check_frame)

    @property
    def valid(self) -> bool:
        return self.status == OK


__all__ = ["Prediction"]
