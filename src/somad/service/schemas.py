"""The service's request and response schemas (pydantic), so that ``/openapi.json`` and the ``/docs`` page describe
every field, and FastAPI checks each answer against them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Content types of a raw image body.
RAW_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "image/webp", "application/octet-stream")
#: Formats of ``?heatmap=``: the overlay's encoding; the answer's field is ``heatmap_<format>``.
HEATMAP_FORMATS = ("png", "jpg", "webp")

#: The request body of ``POST /v1/predict``, for the OpenAPI description (the endpoint reads the raw body itself).
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image: its raw bytes (the format is read from the bytes), or a multipart form with the "
        "field `file`",
        "content": {
            **{
                kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in (
                    "image/png",
                    "image/jpeg",
                    "image/tiff",
                    "image/bmp",
                    "image/webp",
                    "application/octet-stream",
                )
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
#: The request body of ``POST /v1/predict/batch``.
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "several images: a multipart form with one field `files` per image (at most 64)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["files"],
                }
            }
        },
    }
}


class Timings(BaseModel):
    decode: float = Field(description="ms decoding the image(s)")
    queue: float = Field(description="ms waiting for the inference thread")
    inference: float = Field(description="ms scoring (the backbone batch this request was part of)")
    total: float = Field(description="ms from the request's arrival to its answer")


class Reference(BaseModel):
    """What normal looks like where a region is: the training patch representing the SOM node nearest the region's
    peak (SOMAD), or the memory-bank patch nearest it (PatchCore)."""

    image: str = Field(description="the training image, relative to the folder the model was fitted on")
    x: int = Field(description="the reference patch's centre in that image's pixels")
    y: int
    distance: float = Field(
        description="the region's peak patch's feature-space distance to that node (SOMAD) or bank patch (PatchCore)"
    )


class Region(BaseModel):
    """One 8-connected region of the predicted mask, in the pixels of the image sent."""

    area: int = Field(description="pixels")
    x0: int
    y0: int
    x1: int = Field(description="exclusive")
    y1: int = Field(description="exclusive")
    peak: float = Field(description="the highest anomaly score in the region")
    mean: float = Field(description="the mean anomaly score in the region")
    reference: Reference | None = Field(
        None, description="its normal reference, where the model keeps them (SOMAD, PatchCore)"
    )
    explanation_png: str | None = Field(
        None,
        description="?explain=1: the region (red outline) beside its normal reference (yellow), base64 PNG, as "
        "`somad predict --explain` writes it",
    )


class Prediction(BaseModel):
    """What the model says of one image."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(description="image anomaly score; higher is more anomalous (the library's value)")
    is_anomalous: bool | None = Field(
        description="score > threshold, or a frame refused by the input gate; null when the model has no threshold"
    )
    threshold: float | None = Field(description="the model's image threshold")
    normalized_score: float | None = Field(
        description="the score on a [0, 1] scale with the threshold at exactly 0.5 (README, Verdicts)"
    )
    pixel_threshold: float | None = Field(description="the anomaly-map threshold of the mask")
    status: str = Field(description="`ok`, or `invalid_input: <reason>` for a frame the input gate refused")
    width: int = Field(description="of the image sent")
    height: int = Field(description="of the image sent")
    heatmap_png: str | None = Field(None, description="?heatmap=png: base64 PNG of the jet overlay")
    heatmap_jpg: str | None = Field(None, description="?heatmap=jpg: base64 JPEG of the jet overlay (smaller, faster)")
    heatmap_webp: str | None = Field(None, description="?heatmap=webp: base64 WebP of the jet overlay")
    mask_png: str | None = Field(None, description="?mask=png: base64 PNG, 255 on predicted defect pixels")
    regions: list[Region] | None = Field(None, description="?regions=1: the predicted defect regions, largest first")


class PredictAnswer(Prediction):
    timings_ms: Timings


class BatchItem(Prediction):
    """One image of a batch: a prediction, or the reason it could not be scored."""

    index: int
    filename: str
    score: float | None = None  # type: ignore[assignment]
    is_anomalous: bool | None = None
    threshold: float | None = None
    normalized_score: float | None = None
    pixel_threshold: float | None = None
    status: str | None = None  # type: ignore[assignment]
    width: int | None = None  # type: ignore[assignment]
    height: int | None = None  # type: ignore[assignment]
    error: str | None = Field(None, description="why this image was not scored (the others are)")
    status_code: int | None = Field(None, description="the HTTP status this image alone would have had")


class BatchAnswer(BaseModel):
    results: list[BatchItem]
    n_images: int
    n_failed: int
    timings_ms: Timings


class Health(BaseModel):
    status: Literal["ok"]
    queue: int = Field(description="requests waiting for inference")
    max_queue: int


class Ready(BaseModel):
    """The model this worker has loaded, ready to score."""

    ready: bool
    model: str = Field(description="the model file's name")
    method: str
    content_sha256: str | None = Field(description="the hash of the model's content, as `somad info` shows it")
    file_sha256: str = Field(description="the SHA-256 of the model file")
    signature: str | None = Field(description="`verified` when --verify-key checked it")


class Problem(BaseModel):
    detail: str = Field(description="one line: what was wrong and what to do")


#: The error answers every endpoint may give, for the OpenAPI description.
ERRORS = {
    code: {"model": Problem, "description": text}
    for code, text in (
        (400, "an input that cannot be used"),
        (401, "no or a wrong API key (--api-key-file)"),
        (408, "the body did not arrive in time"),
        (413, "a body or an image over the limits"),
        (415, "an unsupported content type"),
        (422, "a bad query parameter"),
        (503, "overloaded; retry later"),
    )
}
