"""CVAT interactor: SkipClick as a nuclio function (see function.yaml, docs/annotation.md).

Request (CVAT's interactor convention; the whole image comes with every click):

    {"image": base64 PNG/JPEG, "pos_points": [[x, y], ...], "neg_points": [[x, y], ...],
     "obj_bbox": [x0, y0, x1, y1] or [[x0, y0], [x1, y1]] (optional, clips the mask),
     "threshold": 0.5 (optional)}

Response: {"mask": [[0 | 1, ...] per row] at the image's size, "points": [[x, y], ...]} (the
outline of the largest region as a polygon, empty for an empty mask). Errors: HTTP 400 / 413 /
422 with {"error": message}.

Environment: SKIPCLICK_CHECKPOINT (required: anything skipclick_jax.checkpoint.load accepts),
SKIPCLICK_CONFIG (optional config file for a checkpoint without one), SKIPCLICK_MAX_IMAGES
(encodings cached, default 8). Encodings are cached by image content, so later clicks on the
same frame run only the click path. CVAT sends the points unordered (all positives, then all
negatives); the order of the previous request is kept and new points follow it
(`skipclick_jax.annotation.engine.order_clicks`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np

from skipclick_jax.annotation.engine import (DEFAULT_MAX_IMAGES, AnnotationError, ClickEngine, clip_to_box,
                                             order_clicks)


def init_context(context):
    """Loads the checkpoint named by SKIPCLICK_CHECKPOINT into a predictor and a click engine."""
    from skipclick_jax.demo import load_model
    from skipclick_jax.predictor import Predictor
    from skipclick_jax.runtime import enable_compilation_cache

    checkpoint = os.environ.get("SKIPCLICK_CHECKPOINT")
    if not checkpoint:
        raise RuntimeError("set SKIPCLICK_CHECKPOINT to the SkipClick checkpoint to serve "
                           "(see docs/annotation.md)")
    enable_compilation_cache()
    context.logger.info(f"loading {checkpoint}")
    model, description = load_model(checkpoint, os.environ.get("SKIPCLICK_CONFIG") or None)
    max_images = int(os.environ.get("SKIPCLICK_MAX_IMAGES", DEFAULT_MAX_IMAGES))
    context.user_data.engine = ClickEngine(Predictor(model), max_images=max_images)
    context.logger.info(f"ready: {description}")


def _points(body: dict, key: str) -> list[tuple[float, float]]:
    value = body.get(key, [])
    if value is None:
        return []
    try:
        points = [(float(x), float(y)) for x, y in value]
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"{key} must be a list of [x, y] pairs ({e})") from e
    if points and not np.isfinite(points).all():
        raise AnnotationError(f"{key} holds a NaN or infinite coordinate")
    return points


def _box(body: dict) -> tuple[float, float, float, float] | None:
    box = body.get("obj_bbox")
    if box is None:
        return None
    try:
        flat = [float(v) for v in np.asarray(box, np.float64).ravel()]
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"obj_bbox must be [x0, y0, x1, y1] or [[x0, y0], [x1, y1]] ({e})") from e
    if len(flat) != 4:
        raise AnnotationError(f"obj_bbox must hold 4 numbers, got {len(flat)}")
    return tuple(flat)


def polygon(mask: np.ndarray) -> list[list[int]]:
    """The outer contour of the largest region of `mask` as [[x, y], ...] (empty if none)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    return [[int(x), int(y)] for x, y in max(contours, key=cv2.contourArea).reshape(-1, 2)]


def segment(engine: ClickEngine, body) -> dict:
    """The interactor's work on a parsed request body -> the response body."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise AnnotationError(f"the request body is not JSON ({e})") from e
    if not isinstance(body, dict):
        raise AnnotationError("the request body must be a JSON object with 'image' and 'pos_points'")
    if not isinstance(body.get("image"), str):
        raise AnnotationError("the request has no 'image' (base64 string)")
    try:
        data = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise AnnotationError(f"'image' is not valid base64 ({e})", 422) from e
    positives, negatives = _points(body, "pos_points"), _points(body, "neg_points")
    if not positives:
        raise AnnotationError("no pos_points: SkipClick needs at least one positive point")
    try:
        threshold = float(body.get("threshold", 0.5))
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"threshold must be a number ({e})") from e
    if not 0.0 <= threshold < 1.0:
        raise AnnotationError(f"threshold must be in [0, 1), got {threshold:g}")
    box = _box(body)

    def clicks(height, width, previous):
        for x, y in positives + negatives:
            if not (0 <= x < width and 0 <= y < height):
                raise AnnotationError(f"point ({x:g}, {y:g}) lies outside the {width}x{height} image")
        rc = lambda pts: [(int(y), int(x)) for x, y in pts]  # noqa: E731
        return order_clicks(previous, rc(positives), rc(negatives))

    prob = engine.probability(data, clicks)
    mask = clip_to_box(prob > threshold, box)
    return dict(mask=mask.astype(np.uint8).tolist(), points=polygon(mask))


def handler(context, event):
    try:
        body = segment(context.user_data.engine, event.body)
        status = 200
    except AnnotationError as e:
        context.logger.warn(f"bad request: {e}")
        body, status = dict(error=str(e)), e.status
    return context.Response(body=json.dumps(body), headers={}, content_type="application/json",
                            status_code=status)
