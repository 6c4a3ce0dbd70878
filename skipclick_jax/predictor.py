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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skipclick_jax import resize
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

    def __init__(self, model: SkipClick, size: int | None = None, dtype: str | None = None,
                 attention: str | None = None):
        """`dtype` / `attention` override the model's compute settings (`SkipClick.set_precision`),
        e.g. dtype='bfloat16' runs a float32 checkpoint in bfloat16 on an accelerator."""
        if dtype or attention:
            model = nnx.clone(model)
            model.set_precision(dtype, attention)
        graphdef, self._state = nnx.split(model)
        self.size = size or model.backbone_mix.pos_grid * model.patch
        model.check_image_size(self.size, self.size)
        encode, decode = encode_fn(graphdef), decode_fn(graphdef)
        s = self.size

        @jax.jit
        def _encode(state, image):
            return encode(state, resize.bilinear_ac(image[None], (s, s)))

        @jax.jit
        def _click(state, encoding, prev_prob, points, denom):
            h, w = prev_prob.shape
            prev = resize.bilinear_ac(prev_prob[None], (s, s), channels_last=False)
            logits = decode(state, encoding, prev, points[None], denom[None])
            prob = jax.nn.sigmoid(logits)
            return resize.bilinear_ac(prob, (h, w), channels_last=False)[0]

        self._encode_jit, self._click_jit = _encode, _click
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
        img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        self.height, self.width = image.shape[:2]
        self._encoding = jax.block_until_ready(self._encode_jit(self._state, jnp.asarray(img)))
        self._history = [_Step([], np.zeros((self.height, self.width), np.float32))]

    def add_click(self, row: int, col: int, positive: bool = True) -> np.ndarray:
        """Adds a click at pixel (row, col) of the original image; returns the new probability."""
        self._require_image()
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise ValueError(f"click ({row}, {col}) lies outside the {self.height}x{self.width} image")
        clicks = self._history[-1].clicks + [(int(row), int(col), bool(positive))]
        points, denom = self._points(clicks)
        prob = self._click_jit(self._state, self._encoding, jnp.asarray(self._history[-1].prob),
                               points, denom)
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
