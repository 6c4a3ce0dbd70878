"""Browser annotation app: a Starlette + uvicorn server and one static page (no CDN, offline).

    python -m skipclick_jax.app [--checkpoint C | --onnx DIR] [--host 127.0.0.1] [--port 8000]

Open an image (file picker, drag and drop, or the bundled example), left click adds a positive
click, right click a negative one; undo, reset, next object (keeps the finished masks); download
the label PNG (the image's resolution, 0 = background, 1..K = objects in order, later over
earlier). The server encodes each uploaded image once and decodes per click; each session keeps
its encoding and a stack of network-size states, so undo recomputes nothing. Model calls are
serialised. Memory is bounded (see `Annotator`, docs/app.md): least recently used sessions are
dropped beyond --max-sessions / --max-memory-mb, a just-uploaded image is kept until it was used
(or --fresh-session-s passed), and an upload that finds no room gets 503 with a message.

Without --checkpoint or --onnx it serves the main job's checkpoint (runs/tiny_synthetic) if it
exists, else a randomly initialised test_tiny (and says so: its masks are meaningless).

API (JSON unless noted): GET /api/info; POST /api/image (raw image bytes as the body) -> session;
POST /api/click {session, row, col, positive}; POST /api/undo|reset|next {session};
GET /api/mask?session=ID -> label PNG; GET /api/coco?session=ID[&file_name=F] -> the objects as
COCO JSON (RLE); GET /api/example -> the example PNG. Mask responses carry an RGBA PNG overlay
(opaque object colours, transparent background) as a data URL. Under /label-studio: the Label
Studio ML backend (skipclick_jax.annotation.label_studio; docs/annotation.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import ctypes
import dataclasses
import io
import json
import pathlib
import secrets
import sys
import threading
import time

import numpy as np
from PIL import Image

from skipclick_jax import images
from skipclick_jax.predictor import check_click

PACKAGE = pathlib.Path(__file__).parent
STATIC = PACKAGE / "static"
EXAMPLE = PACKAGE / "assets" / "demo.png"
MAX_OBJECTS = 255
UPLOADS = 2  # uploads read and decoded at once (each up to --max-upload-mb + 40 MP x 3 bytes)
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)],
                   np.uint8)


class BadRequest(ValueError):
    """A client error: `status` and a message for the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3] RGB; BadRequest (400, or 413 above `max_pixels`) otherwise."""
    try:
        return images.decode_image(data, max_pixels)
    except images.ImageDecodeError as e:
        raise BadRequest(str(e), 413 if e.too_large else 400) from e


def click_args(body: dict) -> dict:
    """{row, col, positive} of a click request: JSON integers and a JSON boolean only (no strings,
    no floats such as 1e400 or Infinity, no true as 1); BadRequest naming the field otherwise."""
    missing = [k for k in ("row", "col", "positive") if k not in body]
    if missing:
        raise BadRequest(f"a click needs {', '.join(missing)}")
    for key in ("row", "col"):
        v = body[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadRequest(f"{key} must be an integer pixel index, got {json.dumps(v)[:40]}")
    if not isinstance(body["positive"], bool):
        raise BadRequest(f"positive must be true or false, got {json.dumps(body['positive'])[:40]}")
    return dict(row=body["row"], col=body["col"], positive=body["positive"])


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _trim_heap() -> None:
    """Returns free C-heap pages to the system after sessions went (glibc malloc_trim; the
    JAX app keeps freed blocks for reuse otherwise, `runtime.reuse_large_buffers`)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _nbytes(tree) -> int:
    """Bytes of the arrays in a nested dict/list/tuple (an encoding)."""
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return int(getattr(tree, "nbytes", 0))


@dataclasses.dataclass
class Session:
    state: dict  # the predictor's session_state()
    labels: np.ndarray | None = None  # uint8 [H, W]: finished objects 1..K (later over earlier)
    objects: int = 0
    created: float = dataclasses.field(default_factory=time.monotonic)
    used: bool = False  # a request after the upload came for it

    @property
    def nbytes(self) -> int:
        history = sum(step.nbytes for step in self.state["history"])
        return _nbytes(self.state["encoding"]) + history + (0 if self.labels is None else self.labels.nbytes)


class Annotator:
    """The model side of the app: one predictor, many sessions, one model call at a time.

    Memory is bounded: a session holds its encoding, S×S probabilities per undo step and one
    uint8 label map (nothing float at the image's size); a click that would take a session over
    `max_session_mb` is refused (413), and sessions beyond `max_sessions` or `max_memory_mb` in
    all are dropped least recently used first. A session that was not used since its upload is
    kept for `fresh_s` seconds whatever comes: a new upload that finds no room is refused (503)
    instead of dropping someone's just-opened image."""

    def __init__(self, predictor, description: str, *, max_sessions: int = 8,
                 max_session_mb: float = 256, max_memory_mb: float = 2048, fresh_s: float = 300):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if not 0 < max_session_mb <= max_memory_mb:
            raise ValueError(f"need 0 < max_session_mb <= max_memory_mb, got {max_session_mb} and "
                             f"{max_memory_mb}")
        self.predictor, self.description, self.max_sessions = predictor, description, max_sessions
        self.max_session_bytes, self.max_memory_bytes = int(max_session_mb * 2**20), int(max_memory_mb * 2**20)
        self.fresh_s = fresh_s
        self.random_weights = description.startswith("RANDOM")
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by all sessions."""
        return sum(s.nbytes for s in self.sessions.values())

    def warm_up(self) -> float:
        """Compiles the encode and per-click paths on the example image; returns seconds."""
        t0 = time.perf_counter()
        image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
        with self.lock:
            self.predictor.set_image(image)
            self.predictor.push_click(image.shape[0] // 2, image.shape[1] // 2, True)
            self.predictor.push_click(image.shape[0] // 3, image.shape[1] // 3, False)
            self.predictor.mask()
        return time.perf_counter() - t0

    def _make_room(self, sessions: int, nbytes: int, keep: str | None = None) -> None:
        """Drops least recently used sessions (never `keep`, never a fresh one) until at most
        `sessions` remain and `nbytes` more fit; 503 when that is impossible."""
        now, dropped = time.monotonic(), False
        for sid in list(self.sessions):
            if len(self.sessions) <= sessions and self.nbytes + nbytes <= self.max_memory_bytes:
                break
            s = self.sessions[sid]
            if sid != keep and (s.used or now - s.created > self.fresh_s):
                del self.sessions[sid]
                dropped = True
        if dropped:
            _trim_heap()
        if len(self.sessions) > sessions or self.nbytes + nbytes > self.max_memory_bytes:
            raise BadRequest(
                f"the server is full: {len(self.sessions)} images are open ({self.nbytes / 2**20:.0f} "
                f"MiB) and were opened in the last {self.fresh_s:.0f} s; try again in a minute (or "
                "start the server with a larger --max-sessions / --max-memory-mb)", 503)

    def open_image(self, image: np.ndarray, view: bool = False):
        """Encodes `image` once into a new session; -> (session id, encode ms), with the page's
        view of it as a third item if `view` (in the same locked step: nothing can drop the new
        session in between)."""
        with self.lock:
            self._make_room(self.max_sessions - 1, 0)
            t0 = time.perf_counter()
            self.predictor.set_image(image)
            ms = 1e3 * (time.perf_counter() - t0)
            sid = secrets.token_urlsafe(12)
            session = Session(self.predictor.session_state())
            self._make_room(self.max_sessions - 1, session.nbytes)
            self.sessions[sid] = session
            if view:
                return sid, ms, self._view(sid, session, "view", 0.0)
        return sid, ms

    def act(self, sid: str, action: str, **kwargs) -> dict:
        """Runs `action` (click, undo, reset, next, view) on session `sid`; -> the page's view."""
        with self.lock:
            session = self.sessions.get(sid)
            if session is None:
                raise BadRequest("unknown or expired session: open the image again", 404)
            self.sessions.move_to_end(sid)
            session.used = True
            p = self.predictor
            p.restore_session(session.state)
            t0 = time.perf_counter()
            if action == "click":
                try:
                    row, col, positive = check_click(kwargs["row"], kwargs["col"], kwargs["positive"])
                except TypeError as e:
                    raise BadRequest(str(e)) from e
                if not (0 <= row < p.height and 0 <= col < p.width):
                    raise BadRequest(f"click ({row}, {col}) lies outside the {p.height}x{p.width} image")
                step = p.size * p.size * 4
                if session.nbytes + step > self.max_session_bytes:
                    raise BadRequest(
                        f"this image's session is at its memory limit ({self.max_session_bytes / 2**20:.0f} "
                        f"MiB, {len(p.clicks)} clicks on this object): press Next or Reset to go on", 413)
                self._make_room(self.max_sessions, step, keep=sid)
                p.push_click(row, col, positive)
            elif action == "undo":
                p.pop_click()
            elif action == "reset":
                p.reset()
            elif action == "next":
                if p.clicks:
                    if session.objects + 1 >= MAX_OBJECTS:
                        raise BadRequest(f"at most {MAX_OBJECTS - 1} objects per image")
                    if session.labels is None:
                        self._make_room(self.max_sessions, p.height * p.width, keep=sid)
                        session.labels = np.zeros((p.height, p.width), np.uint8)
                    session.objects += 1
                    session.labels[p.mask()] = session.objects
                    p.reset()
            elif action != "view":
                raise BadRequest(f"unknown action {action!r}")
            ms = 1e3 * (time.perf_counter() - t0)
            session.state = p.session_state()
            return self._view(sid, session, action, ms)

    def _view(self, sid: str, session: Session, action: str, ms: float) -> dict:
        labels = self._labels(session)
        current = labels == session.objects + 1
        return dict(session=sid, action=action, latency_ms=round(ms, 2),
                    clicks=[dict(row=r, col=c, positive=pos) for r, c, pos in self.predictor.clicks],
                    objects=session.objects, current_area=int(current.sum()),
                    overlay=self._overlay(labels))

    def _labels(self, session: Session) -> np.ndarray:
        """uint8 [H, W] of the restored session: its objects, the current mask (if clicked) last."""
        p = self.predictor
        labels = (np.zeros((p.height, p.width), np.uint8) if session.labels is None
                  else session.labels.copy())
        if p.clicks:
            labels[p.mask()] = session.objects + 1
        return labels

    def labels(self, sid: str) -> np.ndarray:
        """uint8 [H, W]: 0 background, k = the k-th object (the current one last, if clicked)."""
        with self.lock:
            session = self.sessions.get(sid)
            if session is None:
                raise BadRequest("unknown or expired session: open the image again", 404)
            session.used = True
            self.predictor.restore_session(session.state)
            return self._labels(session)

    def masks(self, sid: str) -> tuple[list[np.ndarray], tuple[int, int]]:
        """The objects' bool masks [H, W] in order (the current one last, if clicked), as the
        label map holds them (a later object over an earlier one); (H, W)."""
        labels = self.labels(sid)
        count = int(labels.max())
        return [labels == k for k in range(1, count + 1)], labels.shape

    @staticmethod
    def _overlay(labels: np.ndarray) -> str:
        """PNG data URL of `labels` as a palette image: object k in PALETTE[(k - 1) % 10], opaque;
        background (0) transparent (one byte per pixel, not an RGBA copy)."""
        image = Image.fromarray(labels, mode="P")
        colours = np.concatenate([[(0, 0, 0)], np.resize(PALETTE, (255, 3))]).astype(np.uint8)
        image.putpalette(colours.tobytes())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", transparency=bytes([0] + [255] * 255))
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def build_app(annotator: Annotator, *, max_upload_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000):
    """The Starlette application around `annotator`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def error(e: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def info(request: Request):
        p = annotator.predictor
        return JSONResponse(dict(model=annotator.description, random_weights=annotator.random_weights,
                                 backend=type(p).__name__, size=p.size,
                                 max_upload_bytes=max_upload_bytes, max_pixels=max_pixels))

    async def example(request: Request):
        return FileResponse(EXAMPLE, media_type="image/png")

    uploads = asyncio.Semaphore(UPLOADS)

    async def upload(request: Request):
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
                raise BadRequest(f"upload too large: {int(declared):,} bytes, the limit is "
                                 f"{max_upload_bytes:,}", 413)
            async with uploads:  # bodies and decoded images in memory: at most UPLOADS at once
                chunks, total = [], 0
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > max_upload_bytes:
                        raise BadRequest(f"upload too large: over {max_upload_bytes:,} bytes", 413)
                    chunks.append(chunk)
                image = await run_in_threadpool(decode_upload, b"".join(chunks), max_pixels)
                del chunks
                sid, ms, view = await run_in_threadpool(annotator.open_image, image, True)
        except BadRequest as e:
            return error(e)
        return JSONResponse(dict(view, width=int(image.shape[1]), height=int(image.shape[0]),
                                 encode_ms=round(ms, 2)))

    def action(name: str):
        async def endpoint(request: Request):
            try:
                try:
                    body = await request.json()
                except ValueError as e:
                    raise BadRequest(f"the request body is not JSON ({e})") from e
                if not isinstance(body, dict) or "session" not in body:
                    raise BadRequest("the request needs a JSON object with a 'session'")
                if not isinstance(body["session"], str):
                    raise BadRequest("'session' must be a string (the id /api/image returned)")
                args = {}
                if name == "click":
                    args = click_args(body)
                view = await run_in_threadpool(annotator.act, body["session"], name, **args)
            except BadRequest as e:
                return error(e)
            return JSONResponse(view)

        return endpoint

    async def mask(request: Request):
        try:
            labels = await run_in_threadpool(annotator.labels, request.query_params.get("session", ""))
        except BadRequest as e:
            return error(e)
        return Response(png_bytes(labels), media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="mask.png"'})

    async def coco(request: Request):
        from skipclick_jax.annotation.coco import masks_to_coco

        name = pathlib.PurePath(request.query_params.get("file_name") or "image.png").name
        try:
            masks, _ = await run_in_threadpool(annotator.masks, request.query_params.get("session", ""))
            if not masks:
                raise BadRequest("no objects yet: click on an object first")
        except BadRequest as e:
            return error(e)
        body = await run_in_threadpool(masks_to_coco, masks, file_name=name)
        return JSONResponse(body, headers={"Content-Disposition": 'attachment; filename="annotations.json"'})

    from skipclick_jax.annotation import label_studio
    from skipclick_jax.annotation.engine import ClickEngine

    ls_backend = label_studio.LabelStudioBackend(
        ClickEngine(annotator.predictor, max_pixels=max_pixels, lock=annotator.lock),
        description=annotator.description)
    routes = [
        Route("/", index), Route("/api/info", info), Route("/api/example", example),
        Route("/api/image", upload, methods=["POST"]),
        *[Route(f"/api/{n}", action(n), methods=["POST"]) for n in ("click", "undo", "reset", "next")],
        Route("/api/mask", mask), Route("/api/coco", coco),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Mount("/label-studio", routes=label_studio.routes(ls_backend)),  # Label Studio ML backend
    ]
    app = Starlette(routes=routes)
    app.state.label_studio = ls_backend
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="anything skipclick_jax.checkpoint.load accepts")
    source.add_argument("--onnx", help="a `python -m skipclick_jax.export --format onnx` directory")
    parser.add_argument("--config", help="config file for a checkpoint without one, or the random model")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-sessions", type=int, default=8, help="open images kept (LRU)")
    parser.add_argument("--max-session-mb", type=float, default=256,
                        help="memory of one open image (its encoding, undo steps, label map); a click "
                             "beyond it is refused (413)")
    parser.add_argument("--max-memory-mb", type=float, default=2048,
                        help="memory of all open images; least recently used ones go beyond it")
    parser.add_argument("--fresh-session-s", type=float, default=300,
                        help="an image not used since its upload is kept this long; uploads that "
                             "find no room meanwhile are refused (503)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        sys.exit("the app needs starlette and uvicorn: pip install starlette uvicorn")

    if args.onnx:
        from skipclick_jax.predictor import OnnxPredictor

        predictor, description = OnnxPredictor(args.onnx), f"ONNX export {args.onnx}"
    else:
        from skipclick_jax.demo import load_model
        from skipclick_jax.predictor import Predictor
        from skipclick_jax.runtime import enable_compilation_cache, reuse_large_buffers

        enable_compilation_cache()
        reuse_large_buffers()
        model, description = load_model(args.checkpoint, args.config)
        predictor = Predictor(model)
    print(f"model: {description}", flush=True)
    annotator = Annotator(predictor, description, max_sessions=args.max_sessions,
                          max_session_mb=args.max_session_mb, max_memory_mb=args.max_memory_mb,
                          fresh_s=args.fresh_session_s)
    print(f"warm-up (compiling) ... {annotator.warm_up():.1f} s", flush=True)
    app = build_app(annotator, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"serving on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
