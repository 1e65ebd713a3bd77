"""`framepack serve`: an HTTP API over the engine, so frontends in any language can queue and follow generations.

The app (FastAPI under uvicorn, the optional extra `pip install "framepack-engine[serve]"`) is a thin layer over
framepack_engine.serve.jobs: it checks requests and turns the queue's jobs into JSON, Server-Sent Events and video downloads.
The JSON schema of a submission is built from framepack_engine.settings.GenerationSettings and checked by its own checks, so
the API, the command and the Python API take the same settings with the same messages.

Safe by default: it binds loopback only; any other address needs an API key, and with a key every request must carry
it. Request bodies are size-limited, requests never name a file (images come as bytes; outputs live in the state
directory under job ids) and the queue takes at most --max-queued waiting jobs.

The web page at / (static files in framepack_engine/serve/page/: HTML, CSS and plain JavaScript) is a client of this
API like any other: it is served without the key (it holds no data), asks for the key once and sends it with each API
request, under a Content-Security-Policy that allows no inline script and no other origin.
"""


import asyncio
import base64
import binascii
import contextlib
import difflib
import hmac
import io
import ipaddress
import json
import os
import re
import socket
import time
from pathlib import Path

from framepack_engine.errors import FramePackError
from framepack_engine.serve.jobs import FINISHED_STATES, INPUT_IMAGES, JOB_STATES, OUTPUT_FORMATS, Job, JobFinished, JobNotFound, \
    QueueFull
from framepack_engine.serve.jobs import CONTROL_IMAGE_PREFIX, CONTROL_MASK_PREFIX, IMAGE_OUTPUT_FORMATS, KEYFRAME_PREFIX, \
    PostprocessFiles

API_KEY_VARIABLE = "FRAMEPACK_API_KEY"
MIN_API_KEY_LENGTH = 16
DEFAULT_PORT = 8188
MAX_IMAGE_SIDE = 8192
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
MEDIA_TYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "mov": "video/quicktime", "webm": "video/webm",
               "png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
SERVER_FIELDS = {
    "image": "start image (image-to-video): base64 bytes of a PNG, JPEG or WebP, or a data: URL",
    "end_image": "end image (first-last-frame video, bidirectional model): base64 like image",
    "format": "output container: mp4 (H.264), mkv, mov or webm (VP9); png (the default), jpg or webp for one_frame",
    "keyframes": "keyframe images per section (bidirectional model): {SPEC: base64 image}, SPEC a section N, -N "
                 "from the end, or S-E (multipart: files keyframe_SPEC)",
    "control_images": "one_frame: control images, base64 like image, in order (multipart: files control_image_1, "
                      "control_image_2, ...; default: the start image)",
    "control_masks": "one_frame: a mask per control image (white keeps), base64 or null, in their order (multipart: "
                     "files control_mask_1, ...; default: each image's alpha)",
    "crf": "output quality for the encoder, 0-63 (lower is better; default 16)",
}
# Settings whose meaning a server narrows: jobs name files the server offers instead of sending paths.
SERVER_HELP = {"upscale": "one of the server's upscalers by name (/v1/info upscalers), run after interpolation; "
                          "interpolate uses the server's RIFE model (/v1/info rife_model)"}
# Beside the model's options (ModelSettings): names of the command's that choose files; never per request.
NOT_PER_REQUEST = ("out", "input_video", "preset", "rife_model")
IMAGE_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp",
                     ".tif": "image/tiff", ".gif": "image/gif"}
# Files one multipart submission may carry: the start and end images, keyframes, control images and their masks.
MAX_UPLOADS = 64
# The events stream sends at most one latent preview per this many seconds (always the latest one).
PREVIEW_INTERVAL = 0.5

# The web page: path -> (file in PAGE_FOLDER, media type). Only these paths are served without the API key.
PAGE_FOLDER = Path(__file__).with_name("page")
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page/icon.svg": ("icon.svg", "image/svg+xml"),
    "/page/dice.svg": ("dice.svg", "image/svg+xml"),
}
# Scripts and styles from the page's own files only (no inline code, no other origin); previews arrive as data:
# URLs and downloaded videos become blob: URLs; the page may be framed by no one.
PAGE_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "media-src 'self' blob:", "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one sentence naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------------------------
# Submissions: the schema and the checks
# --------------------------------------------------------------------------------------------------------------------


def _json_type(check) -> dict:
    if hasattr(check, "json_schema"):  # a list option with a text form of its own (latent_paddings, control_index)
        return check.json_schema
    flag_type = getattr(check, "flag_type", str)
    if flag_type is bool:
        return {"type": "boolean"}
    if flag_type is int:
        return {"type": "integer"}
    if flag_type is float:
        return {"type": "number"}
    if flag_type is str:
        return {"type": "string", **({"enum": list(check.choices)} if hasattr(check, "choices") else {})}
    # Section prompts: a list of texts or one text.
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def submission_schema() -> dict:
    """The JSON schema of POST /v1/jobs, built from GenerationSettings' fields (default, help) plus the images and
    the output format. Values are checked by the settings' own checks, not by the schema."""
    from framepack_engine.settings import GenerationSettings

    properties = {}
    for item in GenerationSettings.options():
        if item.name in NOT_PER_REQUEST:
            continue
        schema = _json_type(item.metadata["check"])
        if item.default is None:
            schema = {"anyOf": [schema, {"type": "null"}]}
        properties[item.name] = {**schema, "default": item.default,
                                 "description": SERVER_HELP.get(item.name, item.metadata["help"])}
    properties["image"] = {"type": "string", "description": SERVER_FIELDS["image"]}
    properties["end_image"] = {"type": "string", "description": SERVER_FIELDS["end_image"]}
    properties["format"] = {"type": "string", "enum": [*OUTPUT_FORMATS, *IMAGE_OUTPUT_FORMATS], "default": "mp4",
                            "description": SERVER_FIELDS["format"]}
    properties["keyframes"] = {"type": "object", "additionalProperties": {"type": "string"},
                               "description": SERVER_FIELDS["keyframes"]}
    for name in ("control_images", "control_masks"):
        properties[name] = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                            "description": SERVER_FIELDS[name]}
    properties["crf"] = {"type": "integer", "minimum": 0, "maximum": 63, "default": 16,
                         "description": SERVER_FIELDS["crf"]}
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "example": {"prompt": "a cat walks on the grass", "seconds": 5, "seed": 31337}}


def _check_names(given: dict) -> None:
    from framepack_engine.settings import GenerationSettings, ModelSettings

    known = [item.name for item in GenerationSettings.options() if item.name not in NOT_PER_REQUEST] + \
        list(SERVER_FIELDS)
    fixed = [item.name for item in ModelSettings.options()] + list(NOT_PER_REQUEST)
    for name in given:
        if name in known:
            continue
        if name in fixed:
            raise RequestError(422, f"{name!r} cannot be chosen per request: the server's model and files are set "
                                    "when it starts (framepack serve --help), and outputs live in its state directory.")
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RequestError(422, f"Unknown setting {name!r}{hint}: the settings are {', '.join(known)}.")


def decode_base64_image(name: str, text) -> bytes:
    if not isinstance(text, str):
        raise RequestError(422, f"{name} must be a string of base64 image bytes, got {type(text).__name__}.")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{name} is not valid base64: send the image file's bytes base64-encoded (or a "
                                "data: URL); file paths and URLs are not read.") from None


def check_image(name: str, data: bytes) -> tuple[str, bytes, tuple[int, int]]:
    """(file suffix, the bytes as sent, (height, width)) of a readable image of an accepted format and size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
            if kind in IMAGE_FORMATS and max(width, height) <= MAX_IMAGE_SIDE:
                image.load()  # a truncated or corrupt file fails here
    except Exception:  # PIL raises many types for undecodable data, including decompression-bomb errors
        raise RequestError(422, f"{name} is not a readable image: send a PNG, JPEG or WebP file.") from None
    if kind not in IMAGE_FORMATS:
        raise RequestError(422, f"{name} is a {kind} image: send a PNG, JPEG or WebP file.")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise RequestError(422, f"{name} is {width} x {height} pixels: the largest side accepted is {MAX_IMAGE_SIDE}; "
                                "scale it down (the model works near 640).")
    return IMAGE_FORMATS[kind], data, (height, width)


def check_submission(body: dict, uploads: dict[str, bytes], variant: str, default_resolution: int,
                     files: PostprocessFiles | None = None):
    """(settings dict, output dict, images {name: (suffix, bytes)}, section count) of a submission, or a
    RequestError / FramePackError naming the problem. body: the JSON settings; uploads: multipart image files;
    files: the server's interpolation and upscaling weights (jobs name them, never send paths)."""
    from framepack_engine.models.buckets import find_nearest_bucket
    from framepack_engine.media.codecs import DEFAULT_CRF, check_encoder
    from framepack_engine.resolve import check_inputs_for_variant, section_prompts
    from framepack_engine.generation.sections import section_count
    from framepack_engine.settings import GenerationSettings, integer

    _check_names(body)
    body = dict(body)
    images = {}
    for name in INPUT_IMAGES:
        if name in body and name in uploads:
            raise RequestError(422, f"{name} was sent twice (in the settings and as an upload): send it once.")
        data = uploads[name] if name in uploads else (
            decode_base64_image(name, body.pop(name)) if body.get(name) is not None else None)
        body.pop(name, None)
        if data is not None:
            images[name] = check_image(name, data)
    images.update(_many_images(body, uploads))
    output_format = body.pop("format", None)
    crf = integer(0, 63)("crf", body.pop("crf", DEFAULT_CRF))
    files = files or PostprocessFiles()
    settings = GenerationSettings.from_options(**files.settings(body))
    check_inputs_for_variant(variant, images.get("image"), images.get("end_image"), None)
    formats = IMAGE_OUTPUT_FORMATS if settings.one_frame else OUTPUT_FORMATS
    output_format = output_format or formats[0]
    if output_format not in formats:
        kind = "a one_frame job makes an image" if settings.one_frame else "a video job"
        known = output_format in OUTPUT_FORMATS + IMAGE_OUTPUT_FORMATS
        raise RequestError(422, (f"Format {output_format!r} does not fit {kind}" if known else
                                 f"Unknown format {output_format!r}") + f": choose one of {', '.join(formats)}.")
    sections = 1 if settings.one_frame else section_count(settings.seconds, settings.fps, settings.latent_window_size)
    _check_controls(settings, images, variant, sections)
    if not settings.one_frame:
        # The encoder is opened on a test frame of the video's size, as the command does before any work.
        resolution = settings.resolution or default_resolution
        height, width = images["image"][2] if "image" in images else (
            settings.height or resolution, settings.width or resolution)
        height, width = find_nearest_bucket(height, width, resolution=resolution)
        check_encoder(Path(f"video.{output_format}"), None, crf, None, width=width, height=height)
    section_prompts(settings, sections)  # every timestamped entry falls on a section, as the command checks
    images_kept = {name: (suffix, data) for name, (suffix, data, _) in images.items()}
    return files.stored(settings.as_dict()), {"format": output_format, "crf": crf}, images_kept, sections


def _named(images: dict, *prefixes: str) -> dict:
    return {name: image for name, image in images.items() if name.startswith(prefixes)}


# keyframe_3, keyframe_-1, keyframe_0-2, control_image_1, control_mask_2: safe file names, read back by the worker
_STORED_NAME = re.compile(rf"{KEYFRAME_PREFIX}(-?\d+|\d+-\d+)|({CONTROL_IMAGE_PREFIX}|{CONTROL_MASK_PREFIX})[1-9]\d*")


def _many_images(body: dict, uploads: dict[str, bytes]) -> dict:
    """The keyframes and one-frame control images and masks of a submission, from the JSON (keyframes {SPEC: base64},
    control_images / control_masks lists, null for none) or from multipart files keyframe_SPEC, control_image_N and
    control_mask_N; each checked like the start image, under the name it is stored by."""
    given = {}
    keyframes = body.pop("keyframes", None) or {}
    if not isinstance(keyframes, dict):
        raise RequestError(422, 'keyframes must be an object {SPEC: base64 image}, e.g. {"3": "iVBOR..."}.')
    for spec, text in keyframes.items():
        given[KEYFRAME_PREFIX + str(spec).strip()] = text
    for field, prefix in (("control_images", CONTROL_IMAGE_PREFIX), ("control_masks", CONTROL_MASK_PREFIX)):
        values = body.pop(field, None) or []
        if not isinstance(values, list):
            raise RequestError(422, f"{field} must be a list of base64 images (null for none), in order.")
        given.update({f"{prefix}{number}": text for number, text in enumerate(values, 1) if text is not None})
    images = {}
    for name in sorted(set(given) | set(_named(uploads, KEYFRAME_PREFIX, CONTROL_IMAGE_PREFIX, CONTROL_MASK_PREFIX))):
        if not _STORED_NAME.fullmatch(name):
            raise RequestError(422, f"{name!r} names no keyframe SPEC (N, -N or S-E) or control number (1, 2, ...).")
        if name in given and name in uploads:
            raise RequestError(422, f"{name} was sent twice (in the settings and as an upload): send it once.")
        data = uploads[name] if name in uploads else decode_base64_image(name, given[name])
        images[name] = check_image(name, data)
    return images


def _check_controls(settings, images: dict, variant: str, sections: int) -> None:
    """Keyframes, latent paddings and one-frame inputs read and checked as the command checks them
    (framepack_engine.generation.keyframes and one_frame), before the job is queued."""
    from PIL import Image

    from framepack_engine.generation.keyframes import check_latent_paddings, read_keyframes
    from framepack_engine.generation.one_frame import read_one_frame_inputs
    from framepack_engine.media.images import load_image

    def opened(name):
        return None if name not in images else Image.open(io.BytesIO(images[name][1]))

    def numbered(prefix):
        last = max([int(name[len(prefix):]) for name in _named(images, prefix)], default=0)
        return [opened(f"{prefix}{number}") for number in range(1, last + 1)]

    controls, masks = numbered(CONTROL_IMAGE_PREFIX), numbered(CONTROL_MASK_PREFIX)
    if None in controls:
        raise RequestError(422, "control images are numbered from 1 without gaps: send control_image_1, "
                                "control_image_2, ... .")
    start = load_image(opened("image"), "image") if "image" in images else None
    read_one_frame_inputs(settings, variant, start, controls, masks, end_image=images.get("end_image"))
    check_latent_paddings(settings.latent_paddings, sections, variant)
    keyframes = {name[len(KEYFRAME_PREFIX):]: opened(name) for name in _named(images, KEYFRAME_PREFIX)}
    read_keyframes(keyframes, sections, variant, settings.one_frame)


# --------------------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------------------


def job_view(job: Job, live=None) -> dict:
    """A job as JSON: state, place in the queue, progress (section i of n, step j of m, seconds, what is left),
    stats, error and links."""
    progress = {"sections": job.sections, "sections_done": job.sections_done, "frames": job.frames,
                "section": None, "step": None, "steps": job.settings.get("steps"),
                "seconds": job.stats.get("seconds", 0.0), "eta_seconds": None}
    if job.state == "running" and live is not None:
        progress.update(live.progress)
    if job.state == "done":
        progress["eta_seconds"] = 0.0
    base = f"/v1/jobs/{job.id}"
    inputs = {name: f"{base}/inputs/{name}" for name in sorted(job.inputs)}
    return {
        "id": job.id, "state": job.state, "position": job.position, "progress": progress, "stats": job.stats,
        "error": job.error, "settings": job.settings, "output": job.output, "inputs": sorted(job.inputs),
        "device": job.device, "attempts": job.attempts, "cancel_requested": job.cancel_requested,
        "submitted_at": job.submitted_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "links": {"self": base, "events": f"{base}/events", "video": f"{base}/video" if job.frames else None,
                  "inputs": inputs},
    }


def preview_jpeg(preview, max_frames: int = 8) -> str:
    """A latent preview (uint8 (T, H, W, 3)) as one small base64 JPEG: up to `max_frames` frames side by side."""
    import numpy as np
    from PIL import Image

    frames = preview.numpy() if hasattr(preview, "numpy") else np.asarray(preview)
    picks = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
    strip = np.concatenate([frames[index] for index in picks], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# --------------------------------------------------------------------------------------------------------------------
# The guard: API key and body size, before any route runs
# --------------------------------------------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware: with an API key, every request must carry it (Authorization: Bearer KEY, or X-API-Key), but
    for reading the web page's static files; no request body may exceed max_body_bytes (checked on Content-Length and
    while reading)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in PAGE_FILES
        if self.api_key is not None and not public:
            given = headers.get("x-api-key")
            authorization = headers.get("authorization", "")
            if authorization.lower().startswith("bearer "):
                given = authorization[7:].strip()
            if not given:
                return await _reply(send, 401, "This server needs an API key: send it as 'Authorization: Bearer KEY' "
                                               "or as an 'X-API-Key: KEY' header.")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await _reply(send, 401, "The API key is wrong: send the key the server was started with "
                                               f"(--api-key or {API_KEY_VARIABLE}).")
        limit = self.max_body_bytes
        too_large = f"The request body is larger than this server's limit of {limit / 2**20:g} MiB " \
                    "(--max-body-mb): send smaller images."
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _reply(send, 413, too_large)
        received = 0

        async def counted_receive():
            # A body sent without a length (chunked) is counted as it arrives; the route's reading of it then
            # raises, and the app's RequestError handler answers 413.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestError(413, too_large)
            return message

        await self.app(scope, counted_receive, send)


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------------


def create_app(queue, *, api_key: str | None = None, max_body_bytes: int = 32 * 2**20, info: dict | None = None):
    """The ASGI app over a started framepack_engine.serve.jobs.JobQueue. info: what GET /v1/info adds (model, devices, ...)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from framepack_engine import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # On shutdown (Ctrl-C, SIGTERM) running jobs stop at their next step and go back to the queue, so the next
        # start goes on with them. It must happen here: uvicorn ends the process with the signal once it returns.
        await run_in_threadpool(queue.stop)

    app = FastAPI(title="FramePack engine", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan,
                  description="Queue FramePack video generations, follow their progress, download their videos. "
                              "Settings are those of `framepack generate`; see POST /v1/jobs.")

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(FramePackError)
    async def bad_setting(request, error: FramePackError):
        status = {JobNotFound: 404, JobFinished: 409, QueueFull: 429}.get(type(error), 422)
        headers = {"Retry-After": "30"} if status == 429 else None
        return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'][1:])}: {item['msg']}"
                             for item in error.errors())
        return JSONResponse({"detail": f"Bad request parameter ({problems})."}, status_code=422)

    def view(job: Job) -> dict:
        return job_view(job, queue.live.get(job.id))

    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": submission_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "settings": {"type": "string", "description": "the JSON settings (as for application/json)"},
            "image": {"type": "string", "format": "binary", "description": SERVER_FIELDS["image"]},
            "end_image": {"type": "string", "format": "binary", "description": SERVER_FIELDS["end_image"]}},
            "patternProperties": {rf"^({KEYFRAME_PREFIX}|{CONTROL_IMAGE_PREFIX}|{CONTROL_MASK_PREFIX})": {
                "type": "string", "format": "binary", "description": "keyframe_SPEC, control_image_N, "
                "control_mask_N: " + SERVER_FIELDS["keyframes"]}}}},
    }}}

    def page_file(path: str):
        name, media_type = PAGE_FILES[path]
        data = (PAGE_FOLDER / name).read_bytes()
        if path == "/" and api_key is not None:  # so the page asks for the key before its first request
            data = data.replace(b'data-api-key="optional"', b'data-api-key="required"', 1)
        return Response(data, media_type=media_type, headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page():
        """The web page: a form built from this API's submission schema, and the queue."""
        return page_file("/")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_asset(name: str):
        if f"/page/{name}" not in PAGE_FILES:
            raise RequestError(404, f"The page has no file {name!r}.")
        return page_file(f"/page/{name}")

    @app.post("/v1/jobs", status_code=202, openapi_extra=body_doc, summary="Queue a generation")
    async def submit(request: Request):
        """Every generation setting as JSON (images base64), or multipart: a `settings` JSON field plus image
        files. Answers 202 with the job (its id and `position`: queued jobs ahead of it)."""
        body, uploads = await _read_submission(request, max_body_bytes)
        settings, output, images, sections = await run_in_threadpool(
            check_submission, body, uploads, queue.engine.variant, queue.engine.default_resolution, queue.files)
        job = await run_in_threadpool(queue.submit, settings, output, images, sections)
        return JSONResponse(view(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", summary="List jobs")
    async def list_jobs(
            state: str | None = Query(None, description=f"only jobs in this state: {', '.join(JOB_STATES)}"),
            limit: int = Query(100, ge=1, le=1000, description="the most recent this many")):
        """The most recent jobs, in submission order."""
        if state is not None and state not in JOB_STATES:
            raise RequestError(422, f"Unknown state {state!r}: choose one of {', '.join(JOB_STATES)}.")
        return {"jobs": [view(job) for job in queue.store.list(state, limit)], "counts": queue.store.counts()}

    @app.get("/v1/jobs/{job_id}", summary="A job's state and progress")
    async def get_job(job_id: str):
        return view(queue.store.get(job_id))

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a job (its finished sections are kept), or remove a finished one")
    async def cancel_job(job_id: str, remove: bool = Query(
            False, description="remove a finished job with its inputs and video (409 while queued or running)")):
        """A queued job is cancelled at once (200); a running one stops at its next step (202), and its video keeps
        every finished section. A finished job answers 409. With ?remove=true a finished job is removed with its
        inputs and video (200); a queued or running one answers 409 (cancel it first)."""
        if remove:
            if not await run_in_threadpool(queue.store.remove, job_id):
                raise RequestError(409, f"Job {job_id} is {queue.store.get(job_id).state}: only finished jobs can be "
                                        "removed; cancel it first (DELETE without ?remove).")
            return {"id": job_id, "removed": True}
        job = queue.cancel(job_id)
        return JSONResponse(view(job), status_code=200 if job.state == "cancelled" else 202)

    @app.get("/v1/jobs/{job_id}/video", summary="The video of the sections finished so far",
             responses={200: {"content": {media: {} for media in MEDIA_TYPES.values()}}})
    async def video(job_id: str):
        job = queue.store.get(job_id)
        path = queue.store.folder(job.id) / job.video_name
        try:
            # Open before answering: the file is replaced (atomically) as sections finish, and the open file
            # stays the version whose size we announce.
            file = open(path, "rb")
        except FileNotFoundError:
            raise RequestError(409, f"Job {job.id} has no video yet: it appears once the first finished frames are "
                                    f"encoded (follow GET /v1/jobs/{job.id}/events).") from None
        size = os.fstat(file.fileno()).st_size

        def chunks():
            with file:
                while data := file.read(1 << 20):
                    yield data

        name = f"framepack_{job.id}.{job.output['format']}"
        return StreamingResponse(chunks(), media_type=MEDIA_TYPES[job.output["format"]], headers={
            "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"',
            "X-Sections-Done": str(job.sections_done)})

    @app.get("/v1/jobs/{job_id}/inputs/{name}", summary="An input image of a job, as it was sent",
             responses={200: {"content": {media: {} for media in IMAGE_MEDIA_TYPES.values()}}})
    async def input_image(job_id: str, name: str):
        """The job's `image`, `end_image`, `keyframe_SPEC`, `control_image_N` or `control_mask_N` (see its `inputs`):
        to submit it again, or to show it."""
        job = queue.store.get(job_id)
        if name not in job.inputs:
            raise RequestError(404, f"Job {job.id} has no input {name!r}: its inputs are "
                                    f"{', '.join(sorted(job.inputs)) or 'none'}.")
        try:
            data = (queue.store.folder(job.id) / job.inputs[name]).read_bytes()
        except FileNotFoundError:  # removed meanwhile
            raise RequestError(404, f"Job {job.id} has no input {name!r} any more.") from None
        suffix = Path(job.inputs[name]).suffix
        return Response(data, media_type=IMAGE_MEDIA_TYPES.get(suffix, "application/octet-stream"), headers={
            "Content-Disposition": f'attachment; filename="{name}{suffix}"', "X-Content-Type-Options": "nosniff"})

    @app.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events: state, progress, sections, previews",
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request, job_id: str,
                     previews: bool = Query(False, description="also send latent previews as small JPEGs")):
        """Events: `state` (queued with its position, running), `progress` (section i of n, step j of m, seconds,
        eta_seconds), `section` (a section finished; the video has its frames once they are encoded, in the
        background), `preview` (with ?previews=true: a base64 JPEG of the latent preview), and last `done`,
        `failed` or `cancelled` with the whole job; then it ends. Previews come at most every
        PREVIEW_INTERVAL seconds (the latest one)."""
        queue.store.get(job_id)  # 404 before the stream starts
        return StreamingResponse(_event_stream(request, queue, job_id, previews), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/health", summary="Liveness")
    async def health():
        workers = [{"device": worker.device, "alive": worker.is_alive(), "job": worker.job_id}
                   for worker in queue.workers]
        ok = all(worker["alive"] for worker in workers)
        return JSONResponse({"status": "ok" if ok else "degraded", "workers": workers},
                            status_code=200 if ok else 503)

    @app.get("/v1/info", summary="Device, model, backends, queue")
    async def server_info():
        return {**(info or {}), "queue": queue.store.counts(), "formats": list(OUTPUT_FORMATS),
                "image_formats": list(IMAGE_OUTPUT_FORMATS),
                "limits": {"max_queued": queue.max_queued, "max_body_bytes": max_body_bytes,
                           "max_image_side": MAX_IMAGE_SIDE},
                "api_key_required": api_key is not None}

    return RequestGuard(app, api_key, max_body_bytes)


async def _read_submission(request, max_body_bytes: int) -> tuple[dict, dict[str, bytes]]:
    """(JSON settings, uploaded image bytes) from an application/json or multipart/form-data request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RequestError(400, f"The request body is not valid JSON ({error.msg} at line {error.lineno} column "
                                    f"{error.colno}): send an object such as {{\"prompt\": \"a cat\"}}.") from None
        except UnicodeDecodeError:
            raise RequestError(400, "The request body is not UTF-8 text: send JSON.") from None
        except RecursionError:
            raise RequestError(400, "The request body nests too deeply: send a flat object of settings.") from None
        uploads = {}
    elif content_type == "multipart/form-data":
        from starlette.exceptions import HTTPException

        try:
            form = await request.form(max_files=MAX_UPLOADS, max_fields=1, max_part_size=max_body_bytes)
        except HTTPException as error:
            raise RequestError(400, f"The multipart body cannot be read ({error.detail}): send a 'settings' JSON "
                                    "field and at most the files 'image' and 'end_image' (and keyframe_SPEC, "
                                    "control_image_N, control_mask_N).") from None
        files = (*INPUT_IMAGES, KEYFRAME_PREFIX, CONTROL_IMAGE_PREFIX, CONTROL_MASK_PREFIX)
        unknown = [name for name in form.keys() if name != "settings" and not name.startswith(files)]
        if unknown:
            raise RequestError(422, f"Unknown form field {unknown[0]!r}: send 'settings' (JSON) and the files "
                                    "'image' and 'end_image' (and keyframe_SPEC, control_image_N, control_mask_N).")
        uploads = {}
        for name in [name for name in form.keys() if name != "settings"]:
            upload = form.get(name)
            if upload is not None:
                if isinstance(upload, str):
                    raise RequestError(422, f"{name} must be an uploaded file, not a text field.")
                uploads[name] = await upload.read()
        text = form.get("settings") or "{}"
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise RequestError(400, f"The 'settings' field is not valid JSON ({error.msg} at line {error.lineno} "
                                    f"column {error.colno}).") from None
    else:
        raise RequestError(415, "Send the settings as application/json (images base64) or as multipart/form-data "
                                "(a 'settings' JSON field and image files).")
    if not isinstance(body, dict):
        raise RequestError(422, f"The settings must be a JSON object such as {{\"prompt\": \"a cat\"}}, got "
                                f"{type(body).__name__}.")
    return body, uploads


async def _event_stream(request, queue, job_id: str, previews: bool, heartbeat: float = 15.0,
                        preview_interval: float = PREVIEW_INTERVAL):
    """Polls the job (its row when the store changed, its live progress at every step) and sends what is new."""
    sent_state, sent_sections, sent_progress, sent_preview = None, None, -1, -1
    seen_changes, job = -1, None
    last_sent, preview_sent_at = time.monotonic(), -preview_interval
    while True:
        if queue.store.changes != seen_changes:
            seen_changes = queue.store.changes
            try:
                job = queue.store.get(job_id)
            except JobNotFound:  # removed (finished) while the stream started
                return
        messages = []
        if sent_sections is None:
            sent_sections = job.sections_done
        while sent_sections < job.sections_done:
            sent_sections += 1
            messages.append(_sse("section", {"sections_done": sent_sections, "sections": job.sections,
                                             "frames": job.frames, "video": f"/v1/jobs/{job.id}/video"}))
        if (job.state, job.position) != sent_state:
            sent_state = (job.state, job.position)
            messages.append(_sse("state", {"id": job.id, "state": job.state, "position": job.position}))
        live = queue.live.get(job_id) if job.state == "running" else None
        if live is not None:
            base = job_view(job)["progress"]
            for version, progress in list(live.recent):  # a client that connects late gets the recent steps too
                if version > sent_progress:
                    sent_progress = version
                    messages.append(_sse("progress", {**base, **progress}))
        if previews and live is not None and live.preview is not None and live.preview_version != sent_preview \
                and time.monotonic() - preview_sent_at >= preview_interval:
            sent_preview, preview_sent_at = live.preview_version, time.monotonic()
            messages.append(_sse("preview", {"section": live.progress.get("section"), "step": live.progress.get("step"),
                                             "jpeg": preview_jpeg(live.preview)}))
        if job.state in FINISHED_STATES:
            messages.append(_sse(job.state, job_view(job)))
        if not messages and time.monotonic() - last_sent > heartbeat:
            messages.append(b": keep-alive\n\n")
        if messages:
            last_sent = time.monotonic()
            yield b"".join(messages)
        if job.state in FINISHED_STATES or queue.stopping.is_set() or await request.is_disconnected():
            return
        await asyncio.sleep(0.05 if job.state == "running" else 0.25)


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "framepack"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api_key(host: str, api_key: str | None) -> None:
    """Loopback needs nothing; any other address needs a key, and a key must be long enough to guess at."""
    if api_key is None and not is_loopback(host):
        raise FramePackError(f"Binding {host} opens the server beyond this machine: set an API key with --api-key "
                             f"or {API_KEY_VARIABLE} (every request must then send it), or bind 127.0.0.1.")
    if api_key is not None and len(api_key) < MIN_API_KEY_LENGTH:
        raise FramePackError(f"The API key is {len(api_key)} characters: use at least {MIN_API_KEY_LENGTH} "
                             "(e.g. python3 -c \"import secrets; print(secrets.token_urlsafe(24))\").")


def reserve_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads so a taken port is reported at once."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise FramePackError(f"Cannot resolve the host {host!r}: use an address such as 127.0.0.1.") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise FramePackError(f"Cannot listen on {host}:{port} ({error.strerror}): choose another --port.") from None
    return sock


def require_server_packages() -> None:
    import importlib.util

    # python-multipart installs as `python_multipart` (the old name `multipart` warns on import)
    for package in ("fastapi", "uvicorn", "python_multipart"):
        if importlib.util.find_spec(package) is None:
            raise FramePackError("framepack serve needs the server packages: pip install "
                                 "\"framepack-engine[serve]\" (fastapi, uvicorn, python-multipart).")

