"""The HTTP service: FastAPI app factory, endpoints, limits and the web page.

``create_app(target, gallery=None, api_key=None, limits=ServeLimits())`` serves

* anomaly scoring when ``target`` is a run folder (``ad fit``'s) or an anomaly bundle folder
  (``bundle.json``; through ``visionscale.bundle.load_bundle``),
* faces (detect, verify; identify, verify against a name, enroll with a gallery) when ``target``
  is ``"face"`` or a face bundle folder (``export face --bundle``: ONNX Runtime, no torch), or
  ``gallery`` is given,

plus ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text), ``/docs`` and ``/openapi.json``,
and the web page at ``/``. docs/serve.md describes the endpoints, limits and errors.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionscale.errors import InvalidValueError, check_finite, check_int
from visionscale.serve.batching import Batcher
from visionscale.serve.errors import ApiError, error_body, from_library_error
from visionscale.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from visionscale.serve.metrics import Metrics

__all__ = ["create_app", "ServeLimits", "UPLOAD_PATHS"]

log = logging.getLogger("visionscale.serve")

# POST endpoints that take multipart uploads: their content type and size are checked before parsing.
UPLOAD_PATHS = ("/v1/anomaly/score", "/v1/face/detect", "/v1/face/identify", "/v1/face/verify", "/v1/face/enroll")
_IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp",
                 "PPM": ".ppm"}


@dataclass(frozen=True)
class ServeLimits:
    """Limits of one server.

    Attributes:
        max_upload_bytes: Largest request body (413 above it, checked before parsing).
        max_pixels: Largest image, width x height from its header (413 above it, before decoding:
            a 50 KB PNG can claim 100,000 x 100,000 pixels).
        timeout_s: Longest wait for a model's answer, queueing included (504 after it).
        max_batch: Most concurrent requests run in one model call.
        max_wait_ms: Longest wait for more requests once one is queued and the model is idle.
        max_queue: Most requests waiting per model (503 above it).
        max_files: Most images in one enrolment.
        results_kept: Overlays/maps kept for ``GET /v1/anomaly/results/{id}/...`` (oldest dropped).
    """

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    timeout_s: float = 30.0
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_files: int = 16
    results_kept: int = 256

    def __post_init__(self) -> None:
        check_int("max_upload_bytes", self.max_upload_bytes, minimum=1)
        check_int("max_pixels", self.max_pixels, minimum=1)
        check_finite("timeout_s", self.timeout_s, minimum=0.0, min_inclusive=False)
        check_int("max_batch", self.max_batch, minimum=1)
        check_finite("max_wait_ms", self.max_wait_ms, minimum=0.0)
        check_int("max_queue", self.max_queue, minimum=1)
        check_int("max_files", self.max_files, minimum=1)
        check_int("results_kept", self.results_kept, minimum=0)


class _Results:
    """The last ``n`` overlays/maps, by result id (bounded: an LRU of PNG bytes)."""

    def __init__(self, n: int):
        self.n = n
        self._d: collections.OrderedDict[str, dict[str, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, pngs: dict[str, bytes]) -> None:
        with self._lock:
            self._d[key] = pngs
            while len(self._d) > self.n:
                self._d.popitem(last=False)

    def get(self, key: str, what: str) -> bytes | None:
        with self._lock:
            return self._d.get(key, {}).get(what)


class _State:
    """Everything one app holds: services, their worker threads and batchers, limits, metrics."""

    def __init__(self, limits: ServeLimits, api_key: str | None):
        self.limits = limits
        self.api_key = api_key
        self.metrics = Metrics()
        self.spool = Path(tempfile.mkdtemp(prefix="visionscale-serve-"))
        self.results = _Results(limits.results_kept)
        self.anomaly = None
        self.face = None
        self.executors: dict[str, ThreadPoolExecutor] = {}
        self.batchers: dict[str, Batcher] = {}
        self.ready = False
        self.not_ready_reason = "starting"
        self.started = time.time()

    def executor(self, name: str) -> ThreadPoolExecutor:
        if name not in self.executors:
            self.executors[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"visionscale-{name}")
        return self.executors[name]

    def add_batcher(self, name: str, fn, model: str) -> None:
        lim = self.limits
        b = Batcher(name, fn, self.executor(model), max_batch=lim.max_batch, max_wait_s=lim.max_wait_ms / 1000,
                    max_queue=lim.max_queue, on_batch=lambda n, name=name: self.metrics.observe_batch(name, n))
        self.batchers[name] = b
        self.metrics.queue_depth[name] = lambda b=b: b.depth

    async def run(self, name: str, item):
        b = self.batchers.get(name)
        if b is None:
            what = "anomaly scoring" if name == "anomaly" else "faces"
            raise ApiError(404, "not_served", f"this server does not serve {what}")
        return await b.submit(item, self.limits.timeout_s)

    def cleanup(self) -> None:
        if self.face is not None:
            with contextlib.suppress(Exception):
                self.executor("face").submit(self.face.close).result(timeout=10)
        for ex in self.executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.spool, ignore_errors=True)


# -- uploads -------------------------------------------------------------------------------

def _check_image_bytes(data: bytes, field: str, max_pixels: int) -> str:
    """Refuse what is not an image, or one with too many pixels, from its header (no decoding).
    Returns a file suffix for its format."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "empty_upload", f"{field} is empty (0 bytes)", field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                fmt = img.format
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"{field}: {exc}", field) from None
    except UnidentifiedImageError:
        raise ApiError(422, "not_an_image", f"{field} is not an image format Pillow recognises", field) from None
    except Exception as exc:  # noqa: BLE001 - corrupt headers fail in many ways
        raise ApiError(422, "not_an_image", f"{field}: unreadable image header ({exc})", field) from None
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large", f"{field} is {w}x{h} px ({w * h:,} pixels), more than this server's "
                                               f"limit of {max_pixels:,} pixels", field)
    return _IMAGE_SUFFIX.get(fmt or "", ".img")


def _check_part_type(upload, field: str) -> None:
    ctype = (getattr(upload, "content_type", None) or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type", f"{field} has content type {ctype!r}; send an image "
                                                      f"(image/png, image/jpeg, ...)", field)


async def _spool(state: _State, upload, field: str) -> Path:
    """Check one uploaded file and write it to the server's temporary folder."""
    if upload is None or isinstance(upload, str) or not hasattr(upload, "read"):
        raise ApiError(422, "missing_file", f"{field} must be an uploaded file (multipart/form-data)", field)
    _check_part_type(upload, field)
    data = await upload.read()
    suffix = _check_image_bytes(data, field, state.limits.max_pixels)
    path = state.spool / f"{uuid.uuid4().hex}{suffix}"
    await run_in_threadpool(path.write_bytes, data)
    return path


def _unlink(*paths) -> None:
    for p in paths:
        if p is not None:
            with contextlib.suppress(OSError):
                p.unlink()


# -- the middleware: limits and metrics ------------------------------------------------------

class _BodyTooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI: refuses a wrong content type (415) or an oversized body (413) on upload
    endpoints before anything parses it, and records every request's metrics."""

    def __init__(self, app, state: _State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}
        limit = self.state.limits.max_upload_bytes
        over = {"flag": False}

        async def send_json(code: int, body: dict):
            import json

            payload = json.dumps(body).encode()
            status["code"], status["started"] = code, True
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": payload})

        try:
            if scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                ctype = headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "multipart/form-data":
                    return await send_json(415, error_body(
                        "unsupported_media_type", f"send the image as multipart/form-data (a form with a file field), "
                                                  f"not {ctype or 'no content type'!r}"))
                try:
                    length = int(headers.get("content-length", "-1"))
                except ValueError:
                    length = -1
                if length > limit:
                    return await send_json(413, error_body(
                        "request_too_large", f"the request body is {length:,} bytes; this server takes at most "
                                             f"{limit:,}"))
            seen = 0

            async def counted():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        over["flag"] = True
                        raise _BodyTooLarge()
                return msg

            async def guarded_send(msg):
                if over["flag"]:  # whoever caught the abort answers; we answer 413 instead
                    if msg["type"] == "http.response.start" and not status["started"]:
                        await send_json(413, error_body("request_too_large",
                                                        f"the request body exceeds this server's limit of {limit:,} bytes"))
                    return
                if msg["type"] == "http.response.start":
                    status["code"], status["started"] = msg["status"], True
                await send(msg)

            try:
                await self.app(scope, counted, guarded_send)
            except _BodyTooLarge:
                if not status["started"]:
                    await send_json(413, error_body("request_too_large",
                                                    f"the request body exceeds this server's limit of {limit:,} bytes"))
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in UPLOAD_PATHS
                                                          else "unmatched")
            self.state.metrics.observe_request(endpoint, scope["method"], status["code"], time.perf_counter() - t0)


# -- the app ---------------------------------------------------------------------------------

def create_app(target: Any = None, gallery: str | os.PathLike | None = None, api_key: str | None = None,
               limits: ServeLimits | None = None, *, face_model: str = "face_embedder_dlib", faces: bool | None = None,
               device: str = "cpu", backend: str = "eager", precision: str = "fp32"):
    """The FastAPI app serving ``target``.

    Args:
        target: A run folder or anomaly bundle folder (anomaly scoring), ``"face"`` or a face
            bundle folder (faces only), an object with the
            :class:`~visionscale.serve.services.AnomalyService` interface, or None.
        gallery: A gallery ``.db`` file (created if missing): faces with identify / enroll.
        api_key: When set, write endpoints (enroll, remove) need header ``X-API-Key`` equal to it.
        limits: :class:`ServeLimits`.
        face_model: The face descriptor (default dlib's), or a face bundle folder.
        faces: Serve faces; default: when ``target == "face"`` or a gallery is given.
        device, backend, precision: Where and how the models run.

    Raises:
        RunError, InvalidFileError, GalleryError, ...: the target or gallery cannot be used
            (raised here, before the server listens).
    """
    import visionscale.serve.services as S

    limits = limits or ServeLimits()
    if api_key is not None and not api_key:
        raise InvalidValueError("api_key must not be empty (None: no key)").about("api_key")
    state = _State(limits, api_key)
    if isinstance(target, (str, os.PathLike)) and target != "face" and S.bundle_kind(target) == "face":
        face_model, target = os.fspath(target), "face"  # a face bundle serves faces, with or without a gallery
    serve_faces = faces if faces is not None else (target == "face" or gallery is not None)
    try:
        if target is not None and target != "face":
            if isinstance(target, (str, os.PathLike)):
                state.anomaly = state.executor("anomaly").submit(
                    S.load_anomaly_service, target, device, backend, precision).result()
            else:
                state.anomaly = target
            state.add_batcher("anomaly", state.anomaly.score, "anomaly")
        if serve_faces:
            state.face = state.executor("face").submit(S.FaceService, face_model, gallery, device).result()
            for op in ("detect", "identify", "verify", "enroll", "people", "remove"):
                state.add_batcher(op if op in ("detect", "identify") else f"face-{op}", getattr(state.face, op), "face")
    except BaseException:
        state.cleanup()
        raise
    if state.anomaly is None and state.face is None:
        state.cleanup()
        raise InvalidValueError("nothing to serve: give a run or bundle folder, 'face', or a gallery").about("target")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for b in state.batchers.values():
            b.start()
        warm = asyncio.get_running_loop().create_task(_warm_up(state))
        try:
            yield
        finally:
            warm.cancel()
            for b in state.batchers.values():
                await b.stop()
            state.cleanup()

    app = FastAPI(title="visionscale", version=_version(),
                  description="Anomaly scoring and face recognition over HTTP. Errors are JSON: "
                              '`{"error": {"code", "message", "field"?}}`. See docs/serve.md.',
                  lifespan=lifespan)
    app.state.vs = state
    app.add_middleware(_Guard, state=state)

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        kind = first.get("type", "")
        code = "missing_field" if kind == "missing" else "invalid_request"
        msg = f"{field or 'request'}: {first.get('msg', 'invalid')}" + (
            " (send a multipart/form-data request with this field)" if kind == "missing" else "")
        return JSONResponse(error_body(code, msg, field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}
        return JSONResponse(error_body(codes.get(exc.status_code, f"http_{exc.status_code}"), str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal", f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    async def run(name: str, item, field: str | None = None):
        try:
            return await state.run(name, item)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - the library's errors are bad input: 4xx
            err = from_library_error(exc, field)
            if err.status >= 500:
                log.error("%s failed: %r", name, exc)
            raise err from None

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise ApiError(401, "unauthorized", "this endpoint needs the server's API key in header X-API-Key"
                           if not given else "wrong API key (header X-API-Key)", "X-API-Key")

    # -- page, health, metrics ----------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("visionscale.serve").joinpath("static/index.html").read_text())

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/readyz", summary="Readiness: models loaded and warmed up")
    async def readyz():
        if not state.ready:
            return JSONResponse(error_body("not_ready", state.not_ready_reason), status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)")
    async def metrics():
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/info", summary="What this server serves, and its limits")
    async def info():
        return {"anomaly": state.anomaly.info if state.anomaly is not None else None,
                "face": state.face.info if state.face is not None else None,
                "api_key_required": state.api_key is not None, "limits": asdict(limits), "version": _version()}

    # -- anomaly ------------------------------------------------------------------------------
    @app.post("/v1/anomaly/score", summary="Score an uploaded image")
    async def anomaly_score(file: UploadFile = File(..., description="The image (PNG, JPEG, TIFF, ...)"),
                            images: str = Query("url", pattern="^(url|base64|none)$",
                                                description="Overlay and map: URLs to fetch, inline base64 PNGs, "
                                                            "or none")):
        """Score, label (``anomalous`` when score >= the run's threshold), normalized score (0.5 at
        the threshold) and defect regions (boxes in image pixels), as ``ad predict`` gives them."""
        path = await _spool(state, file, "file")
        try:
            rec = await run("anomaly", path, "file")
            body = {"id": uuid.uuid4().hex, "score": rec["score"], "normalized_score": rec["normalized_score"],
                    "label": rec["label"], "image_size": list(rec["image_size"]), "regions": rec["regions"],
                    "threshold": getattr(state.anomaly, "image_threshold", None)}
            if images != "none":
                svc = state.anomaly
                pngs = await run_in_threadpool(lambda: {
                    "overlay": S.overlay_png(path, rec["anomaly_map"], svc.pixel_threshold, svc.pixel_span),
                    "map": S.map_png(rec["anomaly_map"], svc.pixel_threshold, svc.pixel_span)})
                if images == "base64":
                    body["overlay_png_base64"] = base64.b64encode(pngs["overlay"]).decode()
                    body["map_png_base64"] = base64.b64encode(pngs["map"]).decode()
                else:
                    state.results.put(body["id"], pngs)
                    body["overlay_url"] = f"/v1/anomaly/results/{body['id']}/overlay.png"
                    body["map_url"] = f"/v1/anomaly/results/{body['id']}/map.png"
            return body
        finally:
            _unlink(path)

    @app.get("/v1/anomaly/results/{result_id}/{what}.png", summary="The overlay or map of a recent result",
             response_class=Response)
    async def anomaly_png(result_id: str, what: str):
        if what not in ("overlay", "map"):
            raise ApiError(404, "not_found", f"no {what}.png: ask for overlay.png or map.png", "what")
        data = state.results.get(result_id, what)
        if data is None:
            raise ApiError(404, "unknown_result", f"no result {result_id!r} (only the last {limits.results_kept} "
                                                  f"are kept)", "result_id")
        return Response(data, media_type="image/png")

    # -- faces --------------------------------------------------------------------------------
    @app.post("/v1/face/detect", summary="Find every face of an image")
    async def face_detect(file: UploadFile = File(...)):
        path = await _spool(state, file, "file")
        try:
            return await run("detect", path, "file")
        finally:
            _unlink(path)

    @app.post("/v1/face/identify", summary="Who is each face of an image (against the gallery)")
    async def face_identify(file: UploadFile = File(...), k: int = Query(3, ge=1, le=100)):
        path = await _spool(state, file, "file")
        try:
            return await run("identify", (path, k), "file")
        finally:
            _unlink(path)

    @app.post("/v1/face/verify", summary="Same person? Two images, or one image and a gallery name")
    async def face_verify(image_a: UploadFile = File(...), image_b: UploadFile | None = File(None),
                          name: str | None = Form(None)):
        if (image_b is None) == (name is None):
            raise ApiError(422, "invalid_request", "give exactly one of image_b (a second image) or name (a gallery "
                                                   "identity)", "image_b")
        a = await _spool(state, image_a, "image_a")
        b = None
        try:
            if image_b is not None:
                b = await _spool(state, image_b, "image_b")
            return await run("face-verify", (a, b, name))
        finally:
            _unlink(a, b)

    @app.post("/v1/face/enroll", summary="Add a person (or more images of one) to the gallery")
    async def face_enroll(request: Request, name: str = Form(...), files: list[UploadFile] = File(...),
                          if_exists: str = Form("append", pattern="^(append|fail)$")):
        """Needs header ``X-API-Key`` when the server has a key. ``if_exists=append`` adds to an
        enrolled name (concurrent enrolments of one name are serialised: both land);
        ``fail`` answers 409 when the name exists."""
        require_key(request)
        if len(files) > limits.max_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files; at most {limits.max_files} per enrolment",
                           "files")
        paths: list[Path] = []
        try:
            for i, f in enumerate(files):
                paths.append(await _spool(state, f, f"files[{i}]"))
            names = [Path(getattr(f, "filename", None) or f"image{i}").name for i, f in enumerate(files)]
            return await run("face-enroll", (name, paths, if_exists, names))
        finally:
            _unlink(*paths)

    @app.get("/v1/face/gallery", summary="The people in the gallery")
    async def face_people():
        return await run("face-people", None)

    @app.delete("/v1/face/gallery/{name}", summary="Remove a person from the gallery")
    async def face_remove(name: str, request: Request):
        require_key(request)
        return await run("face-remove", name)

    return app


async def _warm_up(state: _State) -> None:
    """One call per model on a blank image, so the first request does not pay for lazy setup."""
    import numpy as np
    from PIL import Image

    try:
        path = state.spool / "warm-up.png"
        size = (64, 64)
        info = state.anomaly.info if state.anomaly is not None else {}
        if info.get("image_size"):
            size = tuple(int(v) for v in info["image_size"])
        Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(path)
        loop = asyncio.get_running_loop()
        if state.anomaly is not None:
            got = await loop.run_in_executor(state.executor("anomaly"), state.anomaly.score, [path])
            if isinstance(got[0], Exception):
                raise got[0]
        if state.face is not None:
            got = await loop.run_in_executor(state.executor("face"), state.face.detect, [path])
            if isinstance(got[0], Exception):
                raise got[0]
        _unlink(path)
        state.ready = True
        state.not_ready_reason = ""
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported by /readyz
        log.exception("warm-up failed")
        state.not_ready_reason = f"warm-up failed: {exc}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("visionscale")
    except Exception:  # noqa: BLE001 - not installed (PYTHONPATH=src)
        return "0+unknown"
