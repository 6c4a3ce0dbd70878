"""Browser annotation app: a Starlette + uvicorn server and one static page (no CDN, offline).

    python -m skipclick_jax.app [--checkpoint C | --onnx DIR] [--host 127.0.0.1] [--port 8000]

Open an image (file picker, drag and drop, or the bundled example), left click adds a positive
click, right click a negative one; undo, reset, next object (keeps the finished masks); download
the label PNG (the image's resolution, 0 = background, 1..K = objects in order, later over
earlier). The server encodes each uploaded image once and decodes per click; each session keeps
its encoding and a stack of states, so undo recomputes nothing. Model calls are serialised; the
least recently used sessions are dropped beyond --max-sessions.

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
import base64
import collections
import dataclasses
import io
import pathlib
import secrets
import sys
import threading
import time

import numpy as np
from PIL import Image

PACKAGE = pathlib.Path(__file__).parent
STATIC = PACKAGE / "static"
EXAMPLE = PACKAGE / "assets" / "demo.png"
MAX_OBJECTS = 255
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)],
                   np.uint8)


class BadRequest(ValueError):
    """A client error: `status` and a message for the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3] RGB; BadRequest for anything that is not a usable image."""
    if not data:
        raise BadRequest("empty upload: the file has zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadRequest(f"image too large: {w}x{h} pixels, the limit is {max_pixels:,}", 413)
            if w == 0 or h == 0:
                raise BadRequest(f"image is zero-sized ({w}x{h})")
            image = np.asarray(im.convert("RGB"))
    except BadRequest:
        raise
    except Image.UnidentifiedImageError as e:
        raise BadRequest("not an image: the file format is not recognised (PNG, JPEG, WebP, ... "
                         "expected)") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"not a readable image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or min(image.shape[:2]) == 0:
        raise BadRequest(f"image is zero-sized ({image.shape[1]}x{image.shape[0]})")
    return image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class Session:
    state: dict  # the predictor's session_state()
    objects: list[np.ndarray]  # finished masks, bool [H, W]


class Annotator:
    """The model side of the app: one predictor, many sessions, one model call at a time."""

    def __init__(self, predictor, description: str, *, max_sessions: int = 8):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.predictor, self.description, self.max_sessions = predictor, description, max_sessions
        self.random_weights = description.startswith("RANDOM")
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.lock = threading.Lock()

    def warm_up(self) -> float:
        """Compiles the encode and per-click paths on the example image; returns seconds."""
        t0 = time.perf_counter()
        image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
        with self.lock:
            self.predictor.set_image(image)
            self.predictor.add_click(image.shape[0] // 2, image.shape[1] // 2, True)
            self.predictor.add_click(image.shape[0] // 3, image.shape[1] // 3, False)
        return time.perf_counter() - t0

    def open_image(self, image: np.ndarray) -> tuple[str, float]:
        """Encodes `image` once into a new session; -> (session id, encode ms)."""
        with self.lock:
            t0 = time.perf_counter()
            self.predictor.set_image(image)
            ms = 1e3 * (time.perf_counter() - t0)
            sid = secrets.token_urlsafe(12)
            self.sessions[sid] = Session(self.predictor.session_state(), [])
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return sid, ms

    def act(self, sid: str, action: str, **kwargs) -> dict:
        """Runs `action` (click, undo, reset, next) on session `sid`; -> the page's view of it."""
        with self.lock:
            session = self.sessions.get(sid)
            if session is None:
                raise BadRequest("unknown or expired session: open the image again", 404)
            self.sessions.move_to_end(sid)
            p = self.predictor
            p.restore_session(session.state)
            t0 = time.perf_counter()
            if action == "click":
                row, col = int(kwargs["row"]), int(kwargs["col"])
                if not (0 <= row < p.height and 0 <= col < p.width):
                    raise BadRequest(f"click ({row}, {col}) lies outside the {p.height}x{p.width} image")
                p.add_click(row, col, bool(kwargs["positive"]))
            elif action == "undo":
                p.undo()
            elif action == "reset":
                p.reset()
            elif action == "next":
                if p.clicks:
                    if len(session.objects) + 1 >= MAX_OBJECTS:
                        raise BadRequest(f"at most {MAX_OBJECTS - 1} objects per image")
                    session.objects.append(p.probability > 0.5)
                    p.reset()
            elif action != "view":
                raise BadRequest(f"unknown action {action!r}")
            ms = 1e3 * (time.perf_counter() - t0)
            session.state = p.session_state()
            current = p.probability > 0.5
            return dict(session=sid, action=action, latency_ms=round(ms, 2),
                        clicks=[dict(row=r, col=c, positive=pos) for r, c, pos in p.clicks],
                        objects=len(session.objects), current_area=int(current.sum()),
                        overlay=self._overlay(session.objects, current))

    def masks(self, sid: str) -> tuple[list[np.ndarray], tuple[int, int]]:
        """The objects' bool masks [H, W] in order (the current one last, if clicked); (H, W)."""
        with self.lock:
            session = self.sessions.get(sid)
            if session is None:
                raise BadRequest("unknown or expired session: open the image again", 404)
            self.predictor.restore_session(session.state)
            masks = list(session.objects)
            if self.predictor.clicks:
                masks.append(self.predictor.probability > 0.5)
            return masks, (session.state["height"], session.state["width"])

    def labels(self, sid: str) -> np.ndarray:
        """uint8 [H, W]: 0 background, k = the k-th object (the current one last, if clicked)."""
        masks, shape = self.masks(sid)
        labels = np.zeros(shape, np.uint8)
        for k, mask in enumerate(masks, 1):
            labels[mask] = k
        return labels

    @staticmethod
    def _overlay(objects: list[np.ndarray], current: np.ndarray) -> str:
        """RGBA PNG data URL: object k in PALETTE[k], opaque; background transparent."""
        rgba = np.zeros((*current.shape, 4), np.uint8)
        for k, mask in enumerate([*objects, current]):
            rgba[mask] = (*PALETTE[k % len(PALETTE)], 255)
        return "data:image/png;base64," + base64.b64encode(png_bytes(rgba)).decode()


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

    async def upload(request: Request):
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
                raise BadRequest(f"upload too large: {int(declared):,} bytes, the limit is "
                                 f"{max_upload_bytes:,}", 413)
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_upload_bytes:
                    raise BadRequest(f"upload too large: over {max_upload_bytes:,} bytes", 413)
                chunks.append(chunk)
            image = await run_in_threadpool(decode_upload, b"".join(chunks), max_pixels)
            sid, ms = await run_in_threadpool(annotator.open_image, image)
            view = await run_in_threadpool(annotator.act, sid, "view")
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
                args = {}
                if name == "click":
                    missing = [k for k in ("row", "col", "positive") if k not in body]
                    if missing:
                        raise BadRequest(f"a click needs {', '.join(missing)}")
                    try:
                        args = dict(row=int(body["row"]), col=int(body["col"]), positive=bool(body["positive"]))
                    except (TypeError, ValueError) as e:
                        raise BadRequest(f"row and col must be integers ({e})") from e
                view = await run_in_threadpool(annotator.act, str(body["session"]), name, **args)
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
    annotator = Annotator(predictor, description, max_sessions=args.max_sessions)
    print(f"warm-up (compiling) ... {annotator.warm_up():.1f} s", flush=True)
    app = build_app(annotator, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"serving on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
