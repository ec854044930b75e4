"""The HTTP service: a FastAPI app scoring images with one model, loaded once per worker process.

Endpoints (README "Service" has the details)::

    POST /v1/predict        one image: raw bytes (image/png, image/jpeg, image/tiff, image/bmp, image/webp,
                            application/octet-stream) or multipart/form-data with the field ``file``
                            ?heatmap=png  ?mask=png  ?regions=1  ?explain=1
    POST /v1/predict/batch  several images: multipart/form-data, fields ``files``; one result per image, in order
    GET  /v1/model          what the model file says about itself (somad.service.model_info) + the service limits
    GET  /health            liveness and queue depth
    GET  /ready             readiness: which model (its hashes) this worker has loaded
    GET  /docs              this API as one self-contained page, with a form to try an image (somad.service.docs)

Every refused request is a 4xx (503 when overloaded) with ``{"detail": "<one-line reason>"}``. Bodies are
counted while they are read (413 as soon as one exceeds ``max_body_bytes``) under a per-chunk ``read_timeout``
and a whole-body ``body_timeout`` (408; ``somad.service.guard``, which also closes connections whose request head
never completes and checks the optional API key); image sizes are checked from the header before decoding. A
client that hangs up mid-upload is one log line (status 499), not an error. Decoding runs on a thread pool, in
parallel; inference runs on one thread per worker (``somad.service.inference``), behind a queue of at most
``max_queue`` waiting requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from somad._version import __version__
from somad.errors import ImageLoadError, SomadError
from somad.io.outputs import (
    explanation_image,
    explanation_title,
    heatmap_overlay,
    mask_image,
    normal_references,
    peak_pixel,
    reference_image,
)
from somad.runtime import OnnxDetector
from somad.service.decoding import PixelLimitError, decode_image
from somad.service.guard import BODY_TIMEOUT, READ_TIMEOUT, ApiKey, BodyTimeout, body_chunks
from somad.service.inference import InferenceWorker, Overloaded
from somad.service.model_info import describe
from somad.service.schemas import (
    BATCH_BODY,
    ERRORS,
    HEATMAP_FORMATS,
    IMAGE_BODY,
    RAW_TYPES,
    BatchAnswer,
    Health,
    PredictAnswer,
    Ready,
)
from somad.verdicts import normalized_or_none, regions

logger = logging.getLogger("somad.service")

MULTIPART = "multipart/form-data"
MB = 1024 * 1024
DEFAULTS = {
    "max_body_bytes": 20 * MB,
    "max_queue": 32,
    "max_pixels": 40_000_000,
    "max_batch_files": 64,
    "read_timeout": READ_TIMEOUT,
    "body_timeout": BODY_TIMEOUT,
}
#: Requests a worker receives, decodes or scores at once beyond its queue (``max_queue``); more get 503.
ACTIVE_MARGIN = 16
#: Environment variable through which ``somad serve --workers N`` passes the settings to each worker process.
CONFIG_ENV = "SOMAD_SERVE_CONFIG"


class _BodyTooLarge(Exception):
    pass


def _extras(
    heatmap: Literal[HEATMAP_FORMATS] | None = Query(
        None, description="add the heatmap overlay as base64 PNG, JPEG (smallest, fastest) or WebP: heatmap_<format>"
    ),
    mask: Literal["png"] | None = Query(None, description="add the base64 PNG predicted mask"),
    regions: bool = Query(False, description="add the predicted defect regions"),
    explain: bool = Query(
        False,
        description="add the regions, each with explanation_png: the region (red outline) beside its normal "
        "reference (yellow), base64 PNG; for models that keep references (SOMAD, PatchCore)",
    ),
) -> dict:
    """The optional parts of a prediction, from the query string of both predict endpoints."""
    return {"heatmap": heatmap, "mask": mask == "png", "regions": regions or explain, "explain": explain}


def create_app(
    model_path: str | os.PathLike,
    *,
    max_body_bytes: int = DEFAULTS["max_body_bytes"],
    max_queue: int = DEFAULTS["max_queue"],
    max_pixels: int = DEFAULTS["max_pixels"],
    max_batch_files: int = DEFAULTS["max_batch_files"],
    read_timeout: float = DEFAULTS["read_timeout"],
    body_timeout: float = DEFAULTS["body_timeout"],
    device: str | None = None,
    model=None,
    verify_key=None,
    api_key=None,
    backend: str | None = None,
    threads: int | None = None,
) -> FastAPI:
    """The service's app for the model file ``model_path``, or an export folder (``somad export``, scored by
    ``somad.runtime.OnnxDetector``, without torch); the model is loaded when the app starts (lifespan), unless an
    already loaded ``model`` (of that path) is given.

    Parameters
    ----------
    max_body_bytes : a request body larger than this is refused with 413, as soon as that many bytes arrived
    max_queue : requests that may wait for the inference thread; one more gets 503
    max_pixels : an image whose header says more pixels than this is refused with 413, before decoding
    max_batch_files : images one ``/v1/predict/batch`` request may hold (more: 413)
    read_timeout : seconds the next chunk of a request body may take (more: 408, and the slot is free again)
    body_timeout : seconds a whole request body may take (more: 408)
    device : ``"cpu"``, ``"cuda"`` or ``"auto"``; default: as saved in the model
    verify_key : bytes, or the path of a key file: refuse a model file not signed with it (``somad.io.integrity``);
        a given ``model`` is taken as verified by its caller
    api_key : bytes, or the path of a key file (``somad.service.guard.read_api_key``): every request but
        ``GET /health`` must carry it (401 otherwise)
    backend, threads : an export folder's runtime (``somad.runtime.BACKENDS``; default onnxruntime) and its threads
    """
    for name, value in (("max_body_bytes", max_body_bytes), ("max_queue", max_queue), ("max_pixels", max_pixels)):
        if int(value) < 1:
            raise SomadError(f"{name}={value} is invalid; it must be at least 1")
    for name, value in (("read_timeout", read_timeout), ("body_timeout", body_timeout)):
        if not 0 < float(value) < float("inf"):
            raise SomadError(f"{name}={value} is invalid; it must be a positive number of seconds")
    if api_key is not None and not isinstance(api_key, bytes):
        from somad.service.guard import read_api_key

        api_key = read_api_key(api_key)
    path = Path(model_path)
    limits = {
        "max_body_bytes": int(max_body_bytes),
        "max_queue": int(max_queue),
        "max_pixels": int(max_pixels),
        "max_batch_files": int(max_batch_files),
        "read_timeout": float(read_timeout),
        "body_timeout": float(body_timeout),
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        t0 = time.perf_counter()
        loaded = model
        if loaded is None:
            loaded = await run_in_threadpool(_load, path, device, verify_key, backend, threads)
        if isinstance(loaded, OnnxDetector):  # an export: its description, verified when loaded
            info = loaded.describe()
        else:
            info = await run_in_threadpool(describe, path, verify=False)
        info["path"] = path.name  # file names only: the server's folders are nobody's business
        if info.get("weights", "none") not in ("default", "none"):  # a local state-dict file
            info["weights"] = info["params"]["weights"] = Path(str(info["weights"])).name
        if verify_key is not None:
            info["signature"] = "verified"
        worker = InferenceWorker(loaded, max_queue=limits["max_queue"], max_batch=loaded.batch_size).start()
        app.state.model, app.state.info, app.state.worker = loaded, info, worker
        logger.info(
            "serving %s (%s, %s) on %s; loaded in %.1f s",
            path,
            info["method"],
            info["backbone"],
            loaded.device_,
            time.perf_counter() - t0,
        )
        try:
            yield
        finally:
            await run_in_threadpool(worker.close, 30.0)

    # FastAPI's own /docs loads Swagger UI from a CDN: blank offline. somad.service.docs serves its own page.
    app = FastAPI(title="somad", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.limits = limits
    app.state.active = 0
    app.add_middleware(Admission)
    if api_key is not None:  # outside Admission: a request without the key takes no slot and sends no body
        app.add_middleware(ApiKey, key=api_key)
    app.add_middleware(RequestLog)  # added last: the outermost, so that it logs the 503s of Admission too
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)

    app.include_router(router)
    return app


#: The endpoints; each reads the model, its worker and the limits from ``request.app.state``.
router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    from somad.service.docs import render

    return HTMLResponse(render(request.app.openapi()))


@router.get("/ready", response_model=Ready, responses={503: ERRORS[503]})
async def ready(request: Request) -> dict:
    """Whether this worker is ready to score, and which model it has loaded (the hashes `somad info` shows)."""
    info = request.app.state.info
    return {
        "ready": True,
        "model": info["path"],
        "method": info["method"],
        "content_sha256": info.get("content_sha256"),
        "file_sha256": info["file_sha256"],
        "signature": info.get("signature"),
    }


@router.get("/health", response_model=Health)
async def health(request: Request) -> dict:
    """Liveness: the worker answers, and how many requests wait for inference."""
    worker = request.app.state.worker
    return {"status": "ok", "queue": worker.waiting, "max_queue": worker.max_queue}


@router.get("/v1/model")
async def model_info(request: Request) -> dict:
    state = request.app.state
    m = state.model
    return {
        **state.info,
        "image_threshold": m.image_threshold_,
        "pixel_threshold": m.pixel_threshold_,
        "threshold_info": m.threshold_info_,
        "device": str(m.device_),
        "service": {"somad_version": __version__, **state.limits},
    }


@router.post(
    "/v1/predict",
    response_model=PredictAnswer,
    response_model_exclude_unset=True,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
)
async def predict(
    request: Request,
    options: Annotated[dict, Depends(_extras)],
) -> dict:
    t0 = time.perf_counter()
    worker = request.app.state.worker
    name, data = await _one_upload(request)
    if not data:
        raise HTTPException(400, f"{name}: empty body; send the image's bytes")
    t1 = time.perf_counter()
    try:
        max_pixels = request.app.state.limits["max_pixels"]
        image = await run_in_threadpool(worker.cpu_bound, decode_image, data, name, max_pixels)
    except PixelLimitError as exc:
        raise HTTPException(413, str(exc)) from None
    except ImageLoadError as exc:
        raise HTTPException(400, str(exc)) from None
    del data
    t2 = time.perf_counter()
    job = _submit(worker, [image])
    try:
        (pred,) = await asyncio.wrap_future(job.future)
    except SomadError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None
    result = await run_in_threadpool(_result, request.app.state.model, pred, options)
    result["timings_ms"] = {
        "decode": round(1000 * (t2 - t1), 3),
        "queue": round(job.queue_ms, 3),
        "inference": round(job.inference_ms, 3),
        "total": round(1000 * (time.perf_counter() - t0), 3),
    }
    return result


@router.post(
    "/v1/predict/batch",
    response_model=BatchAnswer,
    response_model_exclude_unset=True,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
)
async def predict_batch(
    request: Request,
    options: Annotated[dict, Depends(_extras)],
) -> dict:
    t0 = time.perf_counter()
    worker = request.app.state.worker
    kind = _content_type(request)
    if kind != MULTIPART:
        raise HTTPException(415, _unsupported(kind, batch=True))
    limits = request.app.state.limits
    form = await _read_form(request, max_files=limits["max_batch_files"])
    try:
        uploads = [v for k, v in form.multi_items() if k == "files" and isinstance(v, UploadFile)]
        if not uploads:
            raise HTTPException(400, "multipart request has no file fields 'files'; send each image as 'files'")
        names = [u.filename or f"files[{i}]" for i, u in enumerate(uploads)]
        blobs = [await u.read() for u in uploads]
    finally:
        await form.close()
    t1 = time.perf_counter()
    decoded = await asyncio.gather(
        *(
            run_in_threadpool(worker.cpu_bound, _decode_or_error, b, n, limits["max_pixels"])
            for b, n in zip(blobs, names)
        )
    )
    del blobs
    t2 = time.perf_counter()
    images = [d for d in decoded if not isinstance(d, dict)]
    preds, job = [], None
    if images:
        job = _submit(worker, images)
        try:
            preds = await asyncio.wrap_future(job.future)
        except SomadError as exc:
            raise HTTPException(422, str(exc)) from None
    it = iter(preds)
    results = []
    for i, (name, d) in enumerate(zip(names, decoded)):
        entry = (
            d if isinstance(d, dict) else await run_in_threadpool(_result, request.app.state.model, next(it), options)
        )
        results.append({"index": i, "filename": name, **entry})
    return {
        "results": results,
        "n_images": len(results),
        "n_failed": sum(1 for r in results if "error" in r),
        "timings_ms": {
            "decode": round(1000 * (t2 - t1), 3),
            "queue": round(job.queue_ms, 3) if job else 0.0,
            "inference": round(job.inference_ms, 3) if job else 0.0,
            "total": round(1000 * (time.perf_counter() - t0), 3),
        },
    }


async def _one_upload(request: Request) -> tuple[str, bytes]:
    """The image of a ``/v1/predict`` request and its name: the raw body, or the multipart field ``file``."""
    kind = _content_type(request)
    if kind in RAW_TYPES:
        return "request body", await _read_body(request)
    if kind != MULTIPART:
        raise HTTPException(415, _unsupported(kind, batch=False))
    form = await _read_form(request, max_files=1)
    try:
        uploads = [v for k, v in form.multi_items() if k == "file"]
        if not uploads or not isinstance(uploads[0], UploadFile):
            raise HTTPException(400, "multipart request has no file field 'file'; send the image as 'file'")
        return uploads[0].filename or "file", await uploads[0].read()
    finally:
        await form.close()


def _load(path: Path, device: str | None, verify_key, backend: str | None, threads: int | None):
    """The model file at ``path`` (``somad.load``), or the export folder (``somad.runtime.OnnxDetector``: no torch)."""
    if path.is_dir():
        return OnnxDetector(path, backend=backend or "onnxruntime", threads=threads, verify_key=verify_key)
    from somad.methods import load

    return load(path, device=device, verify_key=verify_key)


def app_from_env() -> FastAPI:
    """The app of ``somad serve --workers N``: each worker process builds it from :data:`CONFIG_ENV`."""
    config = json.loads(os.environ[CONFIG_ENV])
    level = config.pop("log_level", None)
    if level is not None:  # a spawned worker starts with no logging set up: the same as the command's
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    threads = config.pop("torch_threads", None)
    if Path(config["model_path"]).is_dir():  # an export: the runtime's threads
        return create_app(config.pop("model_path"), threads=threads, **config)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return create_app(config.pop("model_path"), **config)


# ----------------------------------------------------------------------------------------- helpers
def _submit(worker: InferenceWorker, images):
    try:
        return worker.submit(images)
    except Overloaded as exc:
        raise HTTPException(503, f"overloaded: {exc}; retry later") from None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _unsupported(kind: str, *, batch: bool) -> str:
    got = f"content type {kind!r}" if kind else "no content type"
    if batch:
        return f"{got} is not accepted; send multipart/form-data with one 'files' field per image"
    return f"{got} is not accepted; send the image bytes as one of {', '.join(RAW_TYPES)}, or {MULTIPART} ('file')"


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body over the limit of {limit / MB:g} MB (--max-body-mb); send a smaller image")


async def _limited_stream(request: Request, limit: int):
    size = 0
    limits = request.app.state.limits
    async for chunk in body_chunks(request.stream(), limits["read_timeout"], limits["body_timeout"]):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        yield chunk


def _timed_out(exc: BodyTimeout) -> HTTPException:
    flag = "--read-timeout" if exc.what.startswith("no part") else "--body-timeout"
    return HTTPException(408, f"{exc} ({flag}); send the whole image at once", headers={"Connection": "close"})


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it exceeds the limit (declared or counted while it arrives)."""
    limit = request.app.state.limits["max_body_bytes"]
    _check_declared_length(request, limit)
    chunks = []
    try:
        async for chunk in _limited_stream(request, limit):
            chunks.append(chunk)
    except _BodyTooLarge:
        raise _too_large(limit) from None
    except BodyTimeout as exc:
        raise _timed_out(exc) from None
    return b"".join(chunks)


async def _read_form(request: Request, *, max_files: int):
    """A multipart form read under the body limit (files over 1 MB are spooled to temporary files)."""
    limit = request.app.state.limits["max_body_bytes"]
    _check_declared_length(request, limit)
    parser = MultiPartParser(request.headers, _limited_stream(request, limit), max_files=max_files, max_fields=16)
    try:
        return await parser.parse()
    except _BodyTooLarge:
        raise _too_large(limit) from None
    except BodyTimeout as exc:
        raise _timed_out(exc) from None
    except MultiPartException as exc:
        text = " ".join(str(exc.message).split())
        if text.startswith("Too many files"):
            raise HTTPException(413, f"{text} (per request)") from None
        raise HTTPException(400, f"malformed multipart body ({text})") from None


def _decode_or_error(data: bytes, name: str, max_pixels: int):
    """The decoded image, or the per-item error of a batch: ``{"error": reason, "status_code": 4xx}``."""
    if not data:
        return {"error": f"{name}: empty file (0 bytes)", "status_code": 400}
    try:
        return decode_image(data, name, max_pixels)
    except PixelLimitError as exc:
        return {"error": str(exc), "status_code": 413}
    except ImageLoadError as exc:
        return {"error": str(exc), "status_code": 400}


#: Pillow's encoder settings per ``?heatmap=`` format: PNG's fastest compression level (the overlay is a photo: a
#: higher level costs several times the time for a few percent), JPEG and WebP at quality 85.
_ENCODERS = {
    "png": {"format": "PNG", "compress_level": 1},
    "jpg": {"format": "JPEG", "quality": 85},
    "webp": {"format": "WEBP", "quality": 85, "method": 0},
}


def _encoded(image, fmt: str = "png") -> str:
    """``image`` encoded as ``fmt`` (a key of :data:`_ENCODERS`), in base64."""
    buffer = io.BytesIO()
    image.save(buffer, **_ENCODERS[fmt])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _result(model, pred, options: dict) -> dict:
    """The JSON answer for one prediction (verdict and masks by ``somad.verdicts``, as ``somad predict``)."""
    flagged = model.verdict(pred)
    out = {
        "score": float(pred.score),
        "is_anomalous": flagged,
        "threshold": model.image_threshold_,
        "normalized_score": normalized_or_none(pred.score, model.image_threshold_, model.threshold_info_),
        "pixel_threshold": model.pixel_threshold_,
        "status": pred.status,
        "width": pred.original_size[1],
        "height": pred.original_size[0],
    }
    if not (options["heatmap"] or options["mask"] or options["regions"]):
        return out
    full = model.original_map(pred)
    if options["heatmap"]:
        lo, hi = model.display_range_ or (float(full.min()), float(full.max()))  # no threshold: per-image scale
        out[f"heatmap_{options['heatmap']}"] = _encoded(heatmap_overlay(pred.image, full, lo, hi), options["heatmap"])
    predicted = model.mask(pred, full)  # None without a threshold; non-empty exactly when flagged
    if options["mask"]:
        out["mask_png"] = None if predicted is None else _encoded(mask_image(predicted))
    if options["regions"]:
        out["regions"] = (
            None
            if predicted is None
            else _regions_with_references(model, pred, predicted, full, explain=options["explain"])
        )
    return out


def _regions_with_references(model, pred, mask, full, *, explain: bool = False) -> list[dict]:
    """The predicted regions, each with its normal reference where the model keeps them (SOMAD: the training patch
    representing the node nearest the region's peak; PatchCore: the bank patch nearest it; ``somad.io.outputs``'
    ``regions.csv`` columns), and with ``explain`` the image ``somad predict --explain`` writes for it, as base64
    PNG (its reference panel says so when the training image cannot be read)."""
    found = regions(mask, full)
    peaks = [peak_pixel(mask, full, r) for r in found]
    refs = normal_references(model, pred, peaks)
    out, read = [], {}
    for i, (region, peak, ref) in enumerate(zip(found, peaks, refs), 1):
        entry = asdict(region)
        if ref is not None:
            name, x, y, distance = ref
            entry["reference"] = {"image": name, "x": int(x), "y": int(y), "distance": float(distance)}
            if explain:
                if name not in read:
                    read[name] = reference_image(model, name)[0]
                picture = explanation_image(
                    pred, mask, region, peak, ref, read[name], explanation_title(pred, i, region)
                )
                entry["explanation_png"] = _encoded(picture)
        out.append(entry)
    return out


class Admission:
    """ASGI middleware: refuse a ``POST /v1/predict...`` with 503 before its body is read when the inference
    queue is full, or when ``max_queue + ACTIVE_MARGIN`` requests are already being received, decoded or scored
    by this worker (so that memory is bounded however many clients connect)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith("/v1/predict"):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        worker = getattr(state, "worker", None)
        busy = worker is not None and worker.full()
        if busy or state.active >= state.limits["max_queue"] + ACTIVE_MARGIN:
            why = f"{worker.waiting} requests wait for inference" if busy else f"{state.active} requests in progress"
            response = JSONResponse({"detail": f"overloaded: {why} (--max-queue); retry later"}, status_code=503)
            await response(scope, receive, send)
            return
        state.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.active -= 1


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, latency)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            logger.info(
                "%s %s%s %d %.1f ms",
                scope.get("method", "?"),
                scope.get("path", "?"),
                f"?{query}" if query else "",
                status[0],
                1000 * (time.perf_counter() - t0),
            )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """A client that closed its connection before its request was read: one log line, no answer to send."""
    logger.info("client closed the connection during %s %s", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request": what the request log records


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)


__all__ = ["CONFIG_ENV", "DEFAULTS", "create_app", "app_from_env"]
