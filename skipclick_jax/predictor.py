"""Interactive predictor for annotation (spec §5.5, the original demo's glue).

    predictor = Predictor(model)             # any SkipClick (e.g. skipclick_jax.load(path)[0])
    predictor.set_image(image)               # [H, W, 3] uint8 (0..255) or float (0..1), any size
    prob = predictor.add_click(row, col, positive=True)   # [H, W] float32 probability
    predictor.undo(); predictor.reset()

The image is resized once to the model's square size S with bilinear align_corners=True and
encoded once; each click runs only the jitted per-click path. A click (r, c) at the original
resolution maps to (S·r/H, S·c/W), the previous probability is resized to S (align_corners=True)
and fed back, and the output probability is resized back to H×W (align_corners=True).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skipclick_jax import resize
from skipclick_jax.images import as_float_image
from skipclick_jax.model import SkipClick, decode_fn, encode_fn


def _point_bucket(n: int) -> int:
    """Slots per polarity, rounded up to a multiple of 8 so new clicks rarely recompile."""
    return max(8, -(-n // 8) * 8)


@dataclasses.dataclass
class _Step:
    clicks: list[tuple[int, int, bool]]
    prob: np.ndarray


class Predictor:
    """Click-by-click segmentation of one image at a time (see the module docstring)."""

    def __init__(self, model: SkipClick, size: int | None = None):
        graphdef, self._state = nnx.split(model)
        self.size = size or model.backbone_mix.pos_grid * model.patch
        model.check_image_size(self.size, self.size)
        encode, decode = encode_fn(graphdef), decode_fn(graphdef)
        s = self.size

        # Resizes to and from the image's own size are jitted apart from the model, so a new
        # image size compiles only them; the encode and the decode at S×S compile once.
        resize_image = jax.jit(lambda image: resize.bilinear_ac(image[None], (s, s)))
        encode_jit = jax.jit(encode)

        def _encode(state, image):
            return encode_jit(state, resize_image(image))

        @jax.jit
        def _prev(prev_prob):
            return resize.bilinear_ac(prev_prob[None], (s, s), channels_last=False)

        @jax.jit
        def _decode(state, encoding, prev, points, denom):
            return jax.nn.sigmoid(decode(state, encoding, prev, points[None], denom[None]))

        @functools.partial(jax.jit, static_argnums=1)
        def _prob(prob, size):
            return resize.bilinear_ac(prob, size, channels_last=False)[0]

        self._encode_jit = _encode
        self._prev_jit, self._decode_jit, self._prob_jit = _prev, _decode, _prob
        self._encoding = None
        self._history: list[_Step] = []

    @property
    def clicks(self) -> list[tuple[int, int, bool]]:
        """The clicks so far as (row, col, is_positive) at the original resolution."""
        return list(self._history[-1].clicks) if self._history else []

    @property
    def probability(self) -> np.ndarray:
        """The current probability map [H, W] (zeros before the first click)."""
        self._require_image()
        return self._history[-1].prob

    def set_image(self, image: np.ndarray) -> None:
        """image [H, W, 3]: uint8 in 0..255 or float in 0..1. Encodes it once."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
        img = as_float_image(image)
        self.height, self.width = image.shape[:2]
        self._encoding = jax.block_until_ready(self._encode_jit(self._state, jnp.asarray(img)))
        self._history = [_Step([], np.zeros((self.height, self.width), np.float32))]
        # Warm up the click path so the first click is as fast as the others: the resizes for
        # this size run once on zeros, the decode (the same for every image) on the first image.
        prev = self._prev_jit(jnp.asarray(self._history[0].prob))
        if not getattr(self, "_decode_warm", False):
            prev = self._decode_jit(self._state, self._encoding, prev, *self._points([]))
            self._decode_warm = True
        jax.block_until_ready(self._prob_jit(prev, (self.height, self.width)))

    def add_click(self, row: int, col: int, positive: bool = True) -> np.ndarray:
        """Adds a click at pixel (row, col) of the original image; returns the new probability."""
        self._require_image()
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise ValueError(f"click ({row}, {col}) lies outside the {self.height}x{self.width} image")
        clicks = self._history[-1].clicks + [(int(row), int(col), bool(positive))]
        points, denom = self._points(clicks)
        prev = self._prev_jit(jnp.asarray(self._history[-1].prob))
        prob = self._decode_jit(self._state, self._encoding, prev, points, denom)
        prob = self._prob_jit(prob, (self.height, self.width))
        self._history.append(_Step(clicks, np.asarray(prob)))
        return self._history[-1].prob

    def undo(self) -> np.ndarray:
        """Removes the last click; returns the probability before it."""
        self._require_image()
        if len(self._history) > 1:
            self._history.pop()
        return self._history[-1].prob

    def reset(self) -> None:
        """Removes all clicks (keeps the encoded image)."""
        self._require_image()
        self._history = self._history[:1]

    def _points(self, clicks) -> tuple[jnp.ndarray, jnp.ndarray]:
        """[2P, 3] (row·S, col·S, index) numerators with denominators (H, W): exact S·r/H."""
        pos = [(r, c, i) for i, (r, c, p) in enumerate(clicks) if p]
        neg = [(r, c, i) for i, (r, c, p) in enumerate(clicks) if not p]
        p = _point_bucket(max(len(pos), len(neg)))
        points = -np.ones((2 * p, 3), np.float32)
        for offset, group in ((0, pos), (p, neg)):
            for k, (r, c, i) in enumerate(group):
                points[offset + k] = (self.size * r, self.size * c, i)
        return jnp.asarray(points), jnp.asarray([self.height, self.width], jnp.float32)

    def _require_image(self):
        if self._encoding is None:
            raise RuntimeError("call set_image(image) before adding clicks")
