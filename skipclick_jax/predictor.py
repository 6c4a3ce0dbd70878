"""Interactive predictors for annotation (spec §5.5, the original demo's glue).

    predictor = Predictor(model)             # JAX: any SkipClick (e.g. skipclick_jax.load(path)[0])
    predictor = OnnxPredictor(export_dir)    # onnxruntime on `python -m skipclick_jax.export` output
    predictor.set_image(image)               # [H, W, 3] uint8 (0..255) or float (0..1), any size
    prob = predictor.add_click(row, col, positive=True)   # [H, W] float32 probability
    predictor.undo(); predictor.reset()

The image is resized once to the model's square size S with bilinear align_corners=True and
encoded once; each click runs only the per-click path. A click (r, c) at the original
resolution maps to (S·r/H, S·c/W), the previous probability is resized to S (align_corners=True)
and fed back, and the output probability is resized back to H×W (align_corners=True).

The host side (`_ClickSession`: clicks, the state stack behind undo, the exact S·r/H click
encoding) is shared by both predictors and framework-free: this module imports neither JAX nor
torch; `Predictor` imports JAX when constructed, `OnnxPredictor` only onnxruntime.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from skipclick_jax import resize
from skipclick_jax.images import as_float_image

if TYPE_CHECKING:
    from skipclick_jax.model import SkipClick


def _point_bucket(n: int) -> int:
    """Slots per polarity, rounded up to a multiple of 8 so new clicks rarely recompile."""
    return max(8, -(-n // 8) * 8)


def encode_points(clicks, size: int, height: int, width: int,
                  slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clicks [(row, col, is_positive)] at H×W -> (points [2P, 3], denom [2]) float32.

    Rows are (S·row, S·col, click index) numerators, positives in 0..P-1, negatives in P..2P-1,
    empty slots -1; with denom (H, W) the model places a click at exactly (S·r/H, S·c/W).
    P is `slots`, else `_point_bucket` of the larger polarity count.
    """
    pos = [(r, c, i) for i, (r, c, p) in enumerate(clicks) if p]
    neg = [(r, c, i) for i, (r, c, p) in enumerate(clicks) if not p]
    p = slots or _point_bucket(max(len(pos), len(neg)))
    points = -np.ones((2 * p, 3), np.float32)
    for offset, group in ((0, pos), (p, neg)):
        for k, (r, c, i) in enumerate(group):
            points[offset + k] = (size * r, size * c, i)
    return points, np.asarray([height, width], np.float32)


@dataclasses.dataclass
class _Step:
    clicks: list[tuple[int, int, bool]]
    prob: np.ndarray


class _ClickSession:
    """Host-side state shared by the predictors: the image size, the encoding, and a stack of
    (clicks, probability) steps (undo pops without recomputing). Subclasses set `size` and
    implement `set_image` and `add_click`."""

    size: int
    _encoding = None
    _history: list[_Step]

    @property
    def clicks(self) -> list[tuple[int, int, bool]]:
        """The clicks so far as (row, col, is_positive) at the original resolution."""
        return list(self._history[-1].clicks) if self._history else []

    @property
    def probability(self) -> np.ndarray:
        """The current probability map [H, W] (zeros before the first click)."""
        self._require_image()
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

    def session_state(self) -> dict:
        """The current image's encoding and click history; `restore_session` switches back to it
        without encoding again (one predictor can serve several images, e.g. in the app)."""
        self._require_image()
        return dict(encoding=self._encoding, history=list(self._history), height=self.height,
                    width=self.width)

    def restore_session(self, state: dict) -> None:
        self._encoding, self._history = state["encoding"], list(state["history"])
        self.height, self.width = state["height"], state["width"]

    def _float_image(self, image: np.ndarray) -> np.ndarray:
        """image [H, W, 3] uint8 or float -> float32 in 0..1; sets height and width."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
        img = as_float_image(image)
        self.height, self.width = image.shape[:2]
        return img

    def _start(self, encoding) -> None:
        self._encoding = encoding
        self._history = [_Step([], np.zeros((self.height, self.width), np.float32))]

    def _next_clicks(self, row: int, col: int, positive: bool) -> list[tuple[int, int, bool]]:
        self._require_image()
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise ValueError(f"click ({row}, {col}) lies outside the {self.height}x{self.width} image")
        return self._history[-1].clicks + [(int(row), int(col), bool(positive))]

    def _points(self, clicks) -> tuple[np.ndarray, np.ndarray]:
        """[2P, 3] (row·S, col·S, index) numerators with denominators (H, W): exact S·r/H."""
        return encode_points(clicks, self.size, self.height, self.width)

    def _require_image(self):
        if self._encoding is None:
            raise RuntimeError("call set_image(image) before adding clicks")


class Predictor(_ClickSession):
    """Click-by-click segmentation of one image at a time with JAX (see the module docstring)."""

    def __init__(self, model: SkipClick, size: int | None = None, dtype: str | None = None,
                 attention: str | None = None):
        """`dtype` / `attention` override the model's compute settings (`SkipClick.set_precision`),
        e.g. dtype='bfloat16' runs a float32 checkpoint in bfloat16 on an accelerator."""
        import jax

        from skipclick_jax.model.api import model_functions

        fns = model_functions(model, dtype, attention)
        self._state = fns.params
        self.size = size or model.backbone_mix.pos_grid * model.patch
        model.check_image_size(self.size, self.size)
        encode, decode = fns.encode, fns.decode
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

    def set_image(self, image: np.ndarray) -> None:
        """image [H, W, 3]: uint8 in 0..255 or float in 0..1. Encodes it once."""
        import jax
        import jax.numpy as jnp

        img = self._float_image(image)
        self._start(jax.block_until_ready(self._encode_jit(self._state, jnp.asarray(img))))
        # Warm up the click path so the first click is as fast as the others: the resizes for
        # this size run once on zeros, the decode (the same for every image) on the first image.
        prev = self._prev_jit(jnp.asarray(self._history[0].prob))
        if not getattr(self, "_decode_warm", False):
            points, denom = self._points([])
            prev = self._decode_jit(self._state, self._encoding, prev, jnp.asarray(points),
                                    jnp.asarray(denom))
            self._decode_warm = True
        jax.block_until_ready(self._prob_jit(prev, (self.height, self.width)))

    def add_click(self, row: int, col: int, positive: bool = True) -> np.ndarray:
        """Adds a click at pixel (row, col) of the original image; returns the new probability."""
        import jax.numpy as jnp

        clicks = self._next_clicks(row, col, positive)
        points, denom = self._points(clicks)
        prev = self._prev_jit(jnp.asarray(self._history[-1].prob))
        prob = self._decode_jit(self._state, self._encoding, prev, jnp.asarray(points),
                                jnp.asarray(denom))
        prob = self._prob_jit(prob, (self.height, self.width))
        self._history.append(_Step(clicks, np.asarray(prob)))
        return self._history[-1].prob


class OnnxPredictor(_ClickSession):
    """The Predictor interface on onnxruntime, from a `python -m skipclick_jax.export` directory
    (`export.json`, `encoder.onnx`, `decoder.onnx`). Imports neither JAX nor torch.

    The resizes to and from S run here in NumPy (the same float32 taps and order as
    `skipclick_jax.resize`); the graphs see S×S inputs only.
    """

    def __init__(self, export_dir, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        export_dir = pathlib.Path(export_dir)
        meta_path = export_dir / "export.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a skipclick_jax.export directory")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != "onnx":
            raise ValueError(f"{export_dir} holds a {self.meta.get('format')!r} export; "
                             "OnnxPredictor needs --format onnx")
        self.size = int(self.meta["size"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._sessions = {}
        for name in ("encoder", "decoder"):
            path = export_dir / self.meta["graphs"][name]["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} ({name} graph) not found")
            self._sessions[name] = ort.InferenceSession(str(path), options, providers=list(providers))
        self._encoding_names = [i["name"] for i in self.meta["graphs"]["encoder"]["outputs"]]
        self._encoding = None
        self._history: list[_Step] = []

    def set_image(self, image: np.ndarray) -> None:
        """image [H, W, 3]: uint8 in 0..255 or float in 0..1. Encodes it once."""
        img = self._float_image(image)
        s = self.size
        images = resize.bilinear_ac_numpy(img[None], (s, s))
        outputs = self._sessions["encoder"].run(None, {"images": images})
        self._start(dict(zip(self._encoding_names, outputs)))

    def add_click(self, row: int, col: int, positive: bool = True) -> np.ndarray:
        """Adds a click at pixel (row, col) of the original image; returns the new probability."""
        clicks = self._next_clicks(row, col, positive)
        points, denom = self._points(clicks)
        s, h, w = self.size, self.height, self.width
        prev = resize.bilinear_ac_numpy(self._history[-1].prob[None], (s, s), channels_last=False)
        logits = self.decode_logits(prev, points[None], denom[None])
        prob = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        prob = resize.bilinear_ac_numpy(prob, (h, w), channels_last=False)[0]
        self._history.append(_Step(clicks, prob))
        return self._history[-1].prob

    def decode_logits(self, prev_prob: np.ndarray, points: np.ndarray, denom: np.ndarray) -> np.ndarray:
        """The decoder graph on the current encoding: prev [1,S,S], points [1,2P,3], denom [1,2]
        -> logits [1, S, S]."""
        self._require_image()
        feeds = {**self._encoding, "prev_prob": np.asarray(prev_prob, np.float32),
                 "points": np.asarray(points, np.float32), "point_denom": np.asarray(denom, np.float32)}
        return self._sessions["decoder"].run(["logits"], feeds)[0]
