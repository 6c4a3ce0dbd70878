"""Interactive predictors for annotation (docs/design/evaluation.md#quick-response-split, the original demo's glue).

    predictor = Predictor(model)             # JAX: any SkipClick (e.g. skipclick_jax.load(path)[0])
    predictor = OnnxPredictor(export_dir)    # onnxruntime on `python -m skipclick_jax.export` output
    predictor.set_image(image)               # [H, W, 3] uint8 (0..255) or float (0..1), any size
    prob = predictor.add_click(row, col, positive=True)   # [H, W] float32 probability
    predictor.undo(); predictor.reset()

The image is resized once to the model's square size S with bilinear align_corners=True and
encoded once; each click runs only the per-click path. A click (r, c) at the original
resolution maps to (S·r/H, S·c/W), the previous probability is resized to S (align_corners=True)
and fed back, and the output probability is resized back to H×W (align_corners=True). The
resizes to and from H×W run on the host in NumPy (torch's kernels, `skipclick_jax.resize`), so
the compiled graphs see S×S only: a new image size compiles nothing. The undo stack keeps S×S
probabilities; the feedback H×W -> S×S is computed exactly without an H×W map.

The host side (`_ClickSession`: clicks, the state stack behind undo, the exact S·r/H click
encoding) is shared by both predictors and framework-free: this module imports neither JAX nor
torch; `Predictor` imports JAX when constructed, `OnnxPredictor` only onnxruntime.
"""

from __future__ import annotations

import dataclasses
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
    """One undo step: the clicks and the network-size probability [S, S] (None: no click yet).
    Nothing H×W is kept: the image-size probability is resized from `prob_s` when asked for."""
    clicks: list[tuple[int, int, bool]]
    prob_s: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return 0 if self.prob_s is None else int(self.prob_s.nbytes)


def check_click(row, col, positive) -> tuple[int, int, bool]:
    """Integers (Python or NumPy, not bool) and a bool; anything else is a TypeError naming it."""
    for name, v in (("row", row), ("col", col)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer pixel index, got {type(v).__name__} {v!r}")
    if not isinstance(positive, (bool, np.bool_)):
        raise TypeError(f"positive must be True or False, got {type(positive).__name__} {positive!r}")
    return int(row), int(col), bool(positive)


def check_size(size, patch: int) -> int:
    """The network size: a positive integer multiple of the patch size; ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % patch:
        raise ValueError(f"size must be a positive multiple of the patch size {patch} "
                         f"(e.g. {4 * patch}), got {size!r}")
    return int(size)


class _ClickSession:
    """Host-side state shared by the predictors: the image size, the encoding, and a stack of
    (clicks, network-size probability) steps (undo pops without recomputing). Subclasses set
    `size` and implement `set_image` and `_decode(prev_s, points, denom) -> prob [S, S]`.

    Everything image-size is NumPy on the host (`resize.*_numpy`, torch's kernels, the same
    float32 sums): the compiled graphs see S×S only, so a new image size compiles nothing, and
    memory per undo step is S²·4 bytes whatever the image size."""

    size: int
    _encoding = None
    _history: list[_Step]
    _full = (None, None)  # (step, H×W probability) cache of the last full-size resize

    @property
    def clicks(self) -> list[tuple[int, int, bool]]:
        """The clicks so far as (row, col, is_positive) at the original resolution."""
        return list(self._history[-1].clicks) if self._history else []

    @property
    def probability(self) -> np.ndarray:
        """The current probability map [H, W] float32 (zeros before the first click)."""
        self._require_image()
        return self._full_prob(self._history[-1])

    @property
    def network_probability(self) -> np.ndarray | None:
        """The current probability at network size [S, S] (None before the first click)."""
        self._require_image()
        return self._history[-1].prob_s

    def mask(self, threshold: float = 0.5, prob_s: np.ndarray | None = None) -> np.ndarray:
        """bool [H, W]: `probability > threshold` (of `prob_s` if given) without a float H×W map."""
        self._require_image()
        prob_s = self._history[-1].prob_s if prob_s is None else prob_s
        if prob_s is None:
            return np.zeros((self.height, self.width), bool)
        return resize.bilinear_ac_threshold_numpy(prob_s, (self.height, self.width), threshold)

    @property
    def history_nbytes(self) -> int:
        """Bytes held by the undo stack (network-size probabilities)."""
        return sum(step.nbytes for step in self._history)

    def undo(self) -> np.ndarray:
        """Removes the last click; returns the probability before it."""
        self.pop_click()
        return self.probability

    def pop_click(self) -> None:
        """`undo` without making the H×W probability (read `mask()` or `probability` later)."""
        self._require_image()
        if len(self._history) > 1:
            self._history.pop()

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
        self._full = (None, None)

    def add_click(self, row: int, col: int, positive: bool = True) -> np.ndarray:
        """Adds a click at pixel (row, col) of the original image; returns the new probability
        [H, W]. row and col are integers, positive a bool (TypeError otherwise)."""
        self.push_click(row, col, positive)
        return self.probability

    def push_click(self, row: int, col: int, positive: bool = True) -> None:
        """`add_click` without making the H×W probability (read `mask()` or `probability` later):
        what a server holding many images calls."""
        clicks = self._next_clicks(row, col, positive)
        points, denom = self._points(clicks)
        prob_s = np.asarray(self._decode(self._prev_s(), points, denom), np.float32)
        self._history.append(_Step(clicks, prob_s))

    def _prev_s(self) -> np.ndarray:
        """The previous probability as the model sees it: resized to H×W and back to S×S (exactly,
        without the H×W map; zeros before the first click)."""
        prob_s = self._history[-1].prob_s
        if prob_s is None:
            return np.zeros((self.size, self.size), np.float32)
        return resize.bilinear_ac_roundtrip_numpy(prob_s, (self.height, self.width))

    def _full_prob(self, step: _Step) -> np.ndarray:
        if self._full[0] is not step:
            prob = (np.zeros((self.height, self.width), np.float32) if step.prob_s is None else
                    resize.bilinear_ac_numpy(step.prob_s, (self.height, self.width), channels_last=False))
            self._full = (step, prob)
        return self._full[1]

    def _network_image(self, image: np.ndarray) -> np.ndarray:
        """image [H, W, 3] uint8 or float -> float32 [S, S, 3] in 0..1 (torch bilinear,
        align_corners=True); sets height and width. A uint8 image is converted in row blocks:
        no float copy of a large image is made."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
        if image.dtype == np.uint8 and image.size:
            convert = lambda block: block.astype(np.float32) / np.float32(255)  # noqa: E731
        else:
            image, convert = as_float_image(image), (lambda block: block)
        out = resize.bilinear_ac_image_numpy(image, (self.size, self.size), convert)
        self.height, self.width = image.shape[:2]
        return out

    def _start(self, encoding) -> None:
        self._encoding = encoding
        self._history = [_Step([], None)]
        self._full = (None, None)

    def _next_clicks(self, row: int, col: int, positive: bool) -> list[tuple[int, int, bool]]:
        row, col, positive = check_click(row, col, positive)
        self._require_image()
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise ValueError(f"click ({row}, {col}) lies outside the {self.height}x{self.width} image")
        return self._history[-1].clicks + [(row, col, positive)]

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
        """`size` (default: the model's crop size) is the square network size, a positive
        multiple of the patch size that the model accepts. `dtype` / `attention` override the
        model's compute settings (`SkipClick.set_precision`), e.g. dtype='bfloat16' runs a
        float32 checkpoint in bfloat16 on an accelerator."""
        import jax
        import jax.numpy as jnp

        from skipclick_jax.model.api import model_functions

        fns = model_functions(model, dtype, attention)
        self._state = fns.params
        self.size = (model.backbone_mix.pos_grid * model.patch if size is None
                     else check_size(size, model.patch))
        s = self.size
        encode, decode = fns.encode, fns.decode
        try:  # shapes only: a size the network cannot take fails here, not in set_image
            enc = jax.eval_shape(encode, self._state, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
            jax.eval_shape(decode, self._state, enc, jax.ShapeDtypeStruct((1, s, s), jnp.float32),
                           jax.ShapeDtypeStruct((1, 16, 3), jnp.float32),
                           jax.ShapeDtypeStruct((1, 2), jnp.float32))
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"size {s} does not fit this model ({type(e).__name__}: {e}); use a "
                             f"larger multiple of the patch size {model.patch}, e.g. "
                             f"{model.backbone_mix.pos_grid * model.patch}") from e

        # Only S×S inputs reach the compiled functions: each compiles once (the decode once per
        # click-slot bucket), whatever the image sizes.
        encode_jit = jax.jit(encode)

        @jax.jit
        def _decode(state, encoding, prev, points, denom):
            return jax.nn.sigmoid(decode(state, encoding, prev[None], points[None], denom[None]))[0]

        self._encode_jit, self._decode_jit = encode_jit, _decode
        self._encoding = None
        self._history: list[_Step] = []

    def set_image(self, image: np.ndarray) -> None:
        """image [H, W, 3]: uint8 in 0..255 or float in 0..1. Encodes it once."""
        import jax
        import jax.numpy as jnp

        img = self._network_image(image)
        self._start(jax.block_until_ready(self._encode_jit(self._state, jnp.asarray(img)[None])))
        if not getattr(self, "_decode_warm", False):  # the first click as fast as the others
            points, denom = self._points([])
            jax.block_until_ready(self._decode(self._prev_s(), points, denom))
            self._decode_warm = True

    def _decode(self, prev_s, points, denom):
        import jax.numpy as jnp

        return self._decode_jit(self._state, self._encoding, jnp.asarray(prev_s), jnp.asarray(points),
                                jnp.asarray(denom))


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
        images = self._network_image(image)[None]
        outputs = self._sessions["encoder"].run(None, {"images": images})
        self._start(dict(zip(self._encoding_names, outputs)))

    def _decode(self, prev_s, points, denom):
        logits = self.decode_logits(prev_s[None], points[None], denom[None])[0]
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def decode_logits(self, prev_prob: np.ndarray, points: np.ndarray, denom: np.ndarray) -> np.ndarray:
        """The decoder graph on the current encoding: prev [1,S,S], points [1,2P,3], denom [1,2]
        -> logits [1, S, S]."""
        self._require_image()
        feeds = {**self._encoding, "prev_prob": np.asarray(prev_prob, np.float32),
                 "points": np.asarray(points, np.float32), "point_denom": np.asarray(denom, np.float32)}
        return self._sessions["decoder"].run(["logits"], feeds)[0]
