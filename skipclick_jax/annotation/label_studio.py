"""Label Studio ML backend (interactive, smart keypoints -> brush mask), served by the app.

    python -m skipclick_jax.app --checkpoint C --host 127.0.0.1 --port P
    # in Label Studio: Settings -> Model -> Connect model, URL http://127.0.0.1:P/label-studio,
    # "Interactive preannotations" on

The protocol (Label Studio's ML backend API), under the mount point:

    GET  /health   -> {"status": "UP", "model_class": ...}
    POST /setup    {project, schema, hostname, access_token, ...} -> {"model_version": ...}
    POST /predict  {tasks, project, label_config, params: {context}} -> {"results": [prediction]}
    POST /webhook  accepted (SkipClick is not trained from Label Studio) -> {"status": "ok"}

/predict with an interactive context (`keypointlabels` results: x, y in percent of the image,
`is_positive`; optionally one `rectanglelabels` box, which clips the mask) returns one
prediction whose result is a `brushlabels` region: `value.rle` in Label Studio's brush RLE
at the image's original size, with the label the user chose (it must be one of the BrushLabels
labels of the labeling config). Without a context (batch pre-annotation) the results are empty.

The image is fetched from Label Studio: a relative task URL (`/data/upload/...`) from the host
and with the token sent at /setup, where the environment variables LABEL_STUDIO_URL and
LABEL_STUDIO_API_KEY (legacy token or personal access token) are not set; absolute http(s) URLs
and data: URLs work as well. The `ClickEngine`
caches encodings per image content, so each further click costs one run of the click path.

Errors follow the ML backend's own form: an HTTP error status with
{"status": code, "detail": message, "errors": [message]}. Label Studio shows the status line.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from skipclick_jax.annotation.brush_rle import mask_to_rle
from skipclick_jax.annotation.engine import AnnotationError, ClickEngine, clip_to_box

MODEL_VERSION = "skipclick-jax"
FETCH_TIMEOUT_S = 20.0
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
MAX_PROJECTS = 256  # projects whose /setup credentials are remembered (LRU)
ACCESS_TOKEN_TTL_S = 120.0  # reuse of an access token from a personal access token (LS: 5 min)
ENV_URL, ENV_TOKEN = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"


def parse_label_config(config: str) -> dict:
    """The tags this backend needs from a labeling config (XML).

    -> {brush: {name, to_name, labels}, image: {name, value}} where image.value is the task data
    key (`$image` -> "image"). AnnotationError if the config has no BrushLabels or no Image.
    """
    if not isinstance(config, str) or not config.strip():
        raise AnnotationError("no labeling config (label_config / schema) in the request")
    try:
        root = ET.fromstring(config)
    except ET.ParseError as e:
        raise AnnotationError(f"the labeling config is not valid XML ({e})") from e
    brush = next(root.iter("BrushLabels"), None)
    if brush is None:
        raise AnnotationError("the labeling config has no <BrushLabels> tag: SkipClick returns brush "
                              "masks, add e.g. <BrushLabels name=\"mask\" toName=\"image\"><Label "
                              "value=\"Object\"/></BrushLabels>")
    to_name = brush.get("toName", "")
    images = {im.get("name"): im for im in root.iter("Image")}
    image = images.get(to_name)  # an Element without children is falsy: compare with None
    if image is None and images:
        image = next(iter(images.values()))
    if image is None:
        raise AnnotationError("the labeling config has no <Image> tag")
    return dict(brush=dict(name=brush.get("name"), to_name=to_name or image.get("name"),
                           labels=[lab.get("value") for lab in brush.iter("Label") if lab.get("value")]),
                image=dict(name=image.get("name"), value=(image.get("value") or "").lstrip("$")))


def _percent(value: dict, key: str, index: int) -> float:
    try:
        v = float(value[key])
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"context result {index}: value.{key} missing or not a number") from e
    if not (0.0 <= v <= 100.0) or not np.isfinite(v):
        raise AnnotationError(f"context result {index}: point {key}={v:g}% lies outside the image "
                              "(0..100%)")
    return v


def parse_context(context: Any) -> tuple[list[tuple[float, float, bool]], tuple | None, str | None]:
    """Interactive context -> (points [(x%, y%, positive)], box (x0%, y0%, x1%, y1%) or None,
    chosen label or None). AnnotationError without keypoints or for malformed entries."""
    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        raise AnnotationError("the context has no 'result' list of keypointlabels")
    points, box, label = [], None, None
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise AnnotationError(f"context result {i} is not an object with a 'value'")
        kind, value = r.get("type"), r["value"]
        labels = value.get(kind) if isinstance(value.get(kind), list) else value.get("labels")
        if labels:
            label = str(labels[0])
        if kind == "keypointlabels":
            positive = r.get("is_positive", True)
            points.append((_percent(value, "x", i), _percent(value, "y", i), bool(positive)))
        elif kind == "rectanglelabels":
            x, y = _percent(value, "x", i), _percent(value, "y", i)
            w, h = _percent(value, "width", i), _percent(value, "height", i)
            box = (x, y, min(100.0, x + w), min(100.0, y + h))
    if not points:
        raise AnnotationError("the context has no keypointlabels: place a smart keypoint "
                              "(SkipClick segments from clicks)")
    return points, box, label


def percent_to_pixel(x: float, y: float, height: int, width: int) -> tuple[int, int]:
    """Point at (x%, y%) of a width x height image -> (row, col) of the pixel it falls in."""
    return min(int(y * height / 100.0), height - 1), min(int(x * width / 100.0), width - 1)


class LabelStudioBackend:
    """The protocol's logic, independent of the web framework (methods take and return JSON)."""

    def __init__(self, engine: ClickEngine, *, description: str = "",
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, threshold: float = 0.5):
        self.engine, self.description = engine, description
        self.max_image_bytes, self.threshold = max_image_bytes, threshold
        self._projects: collections.OrderedDict[str, tuple[str | None, str | None]] = collections.OrderedDict()
        self._access: dict[tuple[str, str], tuple[str, float]] = {}  # (host, PAT) -> (access token, until)
        self._lock = threading.Lock()

    def health(self) -> dict:
        return dict(status="UP", model_class="SkipClick", model=self.description, model_version=MODEL_VERSION,
                    cached_images=len(self.engine), max_cached_images=self.engine.max_images)

    def setup(self, body: Any) -> dict:
        """Remembers the Label Studio host and token for the project; checks the config."""
        if not isinstance(body, dict):
            raise AnnotationError("/setup needs a JSON object")
        if body.get("schema"):
            parse_label_config(body["schema"])
        project = _project_id(body.get("project"))
        with self._lock:
            self._projects[project] = (body.get("hostname") or None, body.get("access_token") or None)
            self._projects.move_to_end(project)
            while len(self._projects) > MAX_PROJECTS:
                self._projects.popitem(last=False)
        return dict(model_version=MODEL_VERSION)

    def predict(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise AnnotationError("/predict needs a JSON object")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise AnnotationError("/predict needs 'tasks': a non-empty list of task objects")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") or body.get("context")
        if not context:
            return dict(results=[])  # batch pre-annotation: SkipClick needs clicks
        config = parse_label_config(body.get("label_config"))
        points, box, label = parse_context(context)
        labels = config["brush"]["labels"]
        if label is None:
            if not labels:
                raise AnnotationError("no label chosen and the BrushLabels tag has no <Label>")
            label = labels[0]
        elif labels and label not in labels:
            raise AnnotationError(f"label {label!r} is not one of the BrushLabels labels {labels} of "
                                  "the labeling config (give the keypoint and brush labels the same "
                                  "values)")
        task = tasks[0]
        data = task.get("data")
        key = config["image"]["value"]
        if not isinstance(data, dict) or not isinstance(data.get(key), str):
            raise AnnotationError(f"task {task.get('id', '?')} has no image URL under data.{key} "
                                  f"(the <Image value=\"${key}\"> of the labeling config)")
        image_bytes = self.fetch_image(data[key], _project_id(body.get("project"), required=False))

        def clicks(height, width, previous):
            return [(*percent_to_pixel(x, y, height, width), pos) for x, y, pos in points]

        prob = self.engine.probability(image_bytes, clicks)
        height, width = prob.shape
        mask = prob > self.threshold
        if box is not None:
            x0, y0, x1, y1 = box
            mask = clip_to_box(mask, (x0 * width / 100, y0 * height / 100, x1 * width / 100, y1 * height / 100))
        score = float(prob[mask].mean()) if mask.any() else 0.0
        region = dict(
            id=secrets.token_hex(5), from_name=config["brush"]["name"], to_name=config["brush"]["to_name"],
            type="brushlabels", original_width=int(width), original_height=int(height), image_rotation=0,
            value=dict(format="rle", rle=mask_to_rle(mask), brushlabels=[label]), score=score,
            readonly=False)
        return dict(results=[dict(result=[region], score=score, model_version=MODEL_VERSION)])

    def fetch_image(self, url: str, project: str | None) -> bytes:
        """The image bytes behind a task's image URL (see the module docstring)."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise AnnotationError("data: image URLs must be base64 encoded", 422)
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise AnnotationError(f"the data: image URL is not valid base64 ({e})", 422) from e
            if len(data) > self.max_image_bytes:
                raise AnnotationError(f"image too large: {len(data):,} bytes, the limit is "
                                      f"{self.max_image_bytes:,}", 413)
            return data
        with self._lock:
            host, token = self._projects.get(project or "", (None, None))
        # Set by the operator, the environment wins: Label Studio reports its own idea of its
        # address (often http://localhost:8080), which the backend may not reach.
        host = os.environ.get(ENV_URL) or host
        token = os.environ.get(ENV_TOKEN) or token
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme in ("http", "https"):
            full = url
        elif not parsed.scheme and url.startswith("/"):
            if not host:
                raise AnnotationError(f"cannot fetch {url}: no Label Studio host (no /setup for this "
                                      f"project and {ENV_URL} is not set)", 502)
            full = host.rstrip("/") + url
        else:
            raise AnnotationError(f"cannot fetch image {url!r}: only Label Studio paths (/data/...), "
                                  "http(s) and data: URLs are supported", 422)
        headers = {}
        if token and host and full.startswith(host.rstrip("/") + "/"):
            headers["Authorization"] = self._authorization(host.rstrip("/"), token)
        try:
            with urllib.request.urlopen(urllib.request.Request(full, headers=headers),
                                        timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(self.max_image_bytes + 1)
        except urllib.error.HTTPError as e:
            raise AnnotationError(f"cannot fetch image {full}: HTTP {e.code} {e.reason}"
                                  + (" (is the token right?)" if e.code in (401, 403) else ""), 502) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise AnnotationError(f"cannot fetch image {full}: {getattr(e, 'reason', e)}", 502) from e
        if len(data) > self.max_image_bytes:
            raise AnnotationError(f"image {full} too large: over {self.max_image_bytes:,} bytes", 413)
        return data


    def _authorization(self, host: str, token: str) -> str:
        """The Authorization header for `token`: a legacy token as is; a personal access token
        (a JWT refresh token) exchanged at /api/token/refresh/ for a short-lived access token
        (cached until shortly before it expires)."""
        if token.count(".") != 2:
            return f"Token {token}"
        with self._lock:
            cached = self._access.get((host, token))
        if cached and cached[1] > time.time():
            return f"Bearer {cached[0]}"
        request = urllib.request.Request(host + "/api/token/refresh/", data=json.dumps({"refresh": token}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
                access = json.loads(response.read())["access"]
        except urllib.error.HTTPError as e:
            raise AnnotationError(f"Label Studio at {host} refused the personal access token "
                                  f"(HTTP {e.code} from /api/token/refresh/)", 502) from e
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as e:
            raise AnnotationError(f"cannot exchange the personal access token at {host}/api/token/refresh/ "
                                  f"({getattr(e, 'reason', e)})", 502) from e
        with self._lock:
            self._access[(host, token)] = (access, time.time() + ACCESS_TOKEN_TTL_S)
            while len(self._access) > MAX_PROJECTS:
                self._access.pop(next(iter(self._access)))
        return f"Bearer {access}"


def _project_id(project: Any, required: bool = True) -> str | None:
    """'12.1700000000' (Label Studio's project uid) -> '12'."""
    if project is None or project == "":
        if required:
            raise AnnotationError("the request has no 'project'")
        return None
    return str(project).split(".", 1)[0]


def routes(backend: LabelStudioBackend) -> list:
    """Starlette routes of the protocol, to mount under /label-studio."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(e: AnnotationError) -> JSONResponse:
        return JSONResponse(dict(status=e.status, detail=str(e), errors=[str(e)]), status_code=e.status)

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError as e:
            raise AnnotationError(f"the request body is not JSON ({e})") from e

    async def health(request: Request):
        return JSONResponse(backend.health())

    def post(method):
        async def endpoint(request: Request):
            try:
                return JSONResponse(await run_in_threadpool(method, await json_body(request)))
            except AnnotationError as e:
                return error(e)
        return endpoint

    def webhook(body: Any) -> dict:
        if not isinstance(body, dict):
            raise AnnotationError("/webhook needs a JSON object")
        return dict(status="ok", result=None, detail=f"event {body.get('action')!r} accepted; SkipClick "
                    "is not trained from Label Studio")

    async def versions(request: Request):
        return JSONResponse(dict(versions=[MODEL_VERSION], message=""))

    return [
        Route("/", health), Route("/health", health), Route("/versions", versions),
        Route("/setup", post(backend.setup), methods=["POST"]),
        Route("/predict", post(backend.predict), methods=["POST"]),
        Route("/webhook", post(webhook), methods=["POST"]),
    ]
