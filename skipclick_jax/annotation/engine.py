"""The click engine behind the annotation-tool integrations (Label Studio, CVAT).

Annotation tools send the whole click list (and, for CVAT, the whole image) with every request.
`ClickEngine` keeps SkipClick's quick response under that protocol:

- the image is encoded once per *content* (SHA-256 of the bytes as received): encodings and
  click histories live in a bounded LRU cache (`max_images`), so later clicks on the same image
  cost no image decode and no encode;
- the clicks of a request replay from the longest cached prefix (the last `KEEP_STEPS` steps
  are kept), so one new click, or removing the last one, costs at most one run of the click
  path (the predictor's `add_click`); the result equals a fresh `Predictor` given the same
  clicks in the same order.

One predictor serves every request; model calls are serialised by `lock` (shared with the app's
own sessions when both run in one server).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from typing import Callable, Sequence

import numpy as np

from skipclick_jax import images

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_IMAGES = 8
KEEP_STEPS = 2  # cached click steps per image: a new click or an undo costs at most one click run

Click = tuple[int, int, bool]  # (row, col, is_positive) at the image's own resolution


class AnnotationError(ValueError):
    """A client error with an HTTP-like `status` (400 bad request, 404 unknown, 413 too large,
    422 unusable content, 502 upstream fetch failed)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def image_key(data: bytes) -> str:
    """The cache key of an image: the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB; AnnotationError (422, or 413 above `max_pixels`)
    for anything else."""
    try:
        return images.decode_image(data, max_pixels)
    except images.ImageDecodeError as e:
        raise AnnotationError(str(e), 413 if e.too_large else 422) from e


def clip_to_box(mask: np.ndarray, box: Sequence[float] | None) -> np.ndarray:
    """Zeroes `mask` [H, W] outside box (x0, y0, x1, y1) in pixels (inclusive, clipped); None: as is."""
    if box is None:
        return mask
    h, w = mask.shape
    x0, y0, x1, y1 = box
    c0, r0 = max(0, int(np.floor(min(x0, x1)))), max(0, int(np.floor(min(y0, y1))))
    c1, r1 = min(w, int(np.floor(max(x0, x1))) + 1), min(h, int(np.floor(max(y0, y1))) + 1)
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = mask[r0:r1, c0:c1]
    return out


@dataclasses.dataclass
class _Entry:
    state: dict  # the predictor's session_state(): encoding + click history
    height: int
    width: int


class ClickEngine:
    """Masks for (image bytes, clicks) with encodings cached per image content (see module doc).

    predictor: a `Predictor` / `OnnxPredictor` (set_image, add_click, session_state,
    restore_session). max_images: encodings kept (LRU). lock: serialises model calls (a new
    one if None). The counters `encodes` and `clicks_run` say how much model work was done.
    """

    def __init__(self, predictor, *, max_images: int = DEFAULT_MAX_IMAGES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, lock: threading.Lock | None = None):
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.predictor, self.max_images, self.max_pixels = predictor, max_images, max_pixels
        self.lock = lock or threading.Lock()
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self.encodes = 0
        self.clicks_run = 0

    def __len__(self) -> int:
        return len(self._cache)

    def probability(self, data: bytes,
                    clicks: Callable[[int, int, list[Click]], Sequence[Click]] | Sequence[Click],
                    ) -> np.ndarray:
        """float32 [H, W] probability after `clicks` on the image encoded in `data`.

        `clicks` is a list of (row, col, is_positive), or a function (height, width, previous)
        -> that list, where `previous` are the clicks of the last request on this image (for
        clicks given relative to the image size, or without an order). Raises AnnotationError
        for an unusable image, no clicks, or a click outside the image.
        """
        key = image_key(data)
        with self.lock:
            entry = self._cache.get(key)
            if entry is None:
                image = decode_image(data, self.max_pixels)
                self.predictor.set_image(image)
                self.encodes += 1
                entry = _Entry(self.predictor.session_state(), *image.shape[:2])
                self._cache[key] = entry
                while len(self._cache) > self.max_images:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            wanted = [(int(r), int(c), bool(pos)) for r, c, pos in
                      (clicks(entry.height, entry.width, list(entry.state["history"][-1].clicks))
                       if callable(clicks) else clicks)]
            check_clicks(wanted, entry.height, entry.width)
            return self._replay(entry, wanted)

    def _replay(self, entry: _Entry, wanted: list[Click]) -> np.ndarray:
        """Runs the clicks after the longest cached step whose clicks begin `wanted`."""
        p = self.predictor
        history = entry.state["history"]
        base = history[0]  # no clicks, zero probability
        for step in history[1:]:
            n = len(step.clicks)
            if len(base.clicks) < n <= len(wanted) and step.clicks == wanted[:n]:
                base = step
        p.restore_session(dict(entry.state, history=[history[0]] + ([base] if base is not history[0] else [])))
        for row, col, positive in wanted[len(base.clicks):]:
            p.add_click(row, col, positive)
            self.clicks_run += 1
        state = p.session_state()
        # Keep the empty step and the last KEEP_STEPS (full-resolution probabilities each).
        state["history"] = [state["history"][0]] + state["history"][1:][-KEEP_STEPS:]
        entry.state = state
        return p.probability


def order_clicks(previous: Sequence[Click], positives: Sequence[tuple[int, int]],
                 negatives: Sequence[tuple[int, int]]) -> list[Click]:
    """Orders clicks that arrive as unordered sets (CVAT sends all positive and all negative
    points with every request): the previous request's clicks still present keep their order,
    the new ones follow (positives first). With one new click per request (the usual case) this
    is the order the user clicked in.
    """
    remaining = collections.Counter([(int(r), int(c), True) for r, c in positives]
                                    + [(int(r), int(c), False) for r, c in negatives])
    ordered = []
    for click in previous:
        if remaining[click] > 0:
            ordered.append(click)
            remaining[click] -= 1
    for click in [*[(int(r), int(c), True) for r, c in positives], *[(int(r), int(c), False) for r, c in negatives]]:
        if remaining[click] > 0:
            ordered.append(click)
            remaining[click] -= 1
    return ordered


def check_clicks(clicks: Sequence[Click], height: int, width: int) -> None:
    """AnnotationError unless there is a click and every click lies in the image."""
    if not clicks:
        raise AnnotationError("no clicks: at least one positive or negative point is needed")
    for row, col, _ in clicks:
        if not (0 <= row < height and 0 <= col < width):
            raise AnnotationError(f"click at row {row}, column {col} lies outside the "
                                  f"{width}x{height} (width x height) image")
