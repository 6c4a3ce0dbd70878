"""Observability: TensorBoard scalars/images (tensorboardX), PNG previews and metrics.jsonl in
the run dir (local or gs://)."""

from __future__ import annotations

import io
import json
import pathlib
import time

import jax
import numpy as np
from PIL import Image

from skipclick_jax import storage

POS, NEG = (0, 230, 0), (230, 0, 0)


def preview_image(image: np.ndarray, points: np.ndarray, prob: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """One row per sample: [image + clicks | prediction | ground truth] -> uint8 [N*S, 3*S, 3].

    image uint8 [N,S,S,3]; points [N,2P,3] (row, col, index; -1 = none; first P positive);
    prob float [N,S,S] in [0,1]; gt [N,S,S] in {0,1,-1} (ignored pixels shown grey).
    """
    n, s = image.shape[:2]
    half = points.shape[1] // 2
    radius = max(2, s // 64)
    yy, xx = np.mgrid[:s, :s]
    rows = []
    for i in range(n):
        canvas = image[i].copy()
        for j, (r, c, _) in enumerate(points[i]):
            if max(r, c) >= 0:
                disk = (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
                canvas[disk] = POS if j < half else NEG
        pred = np.repeat((np.clip(prob[i], 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
        true = np.where(gt[i] < 0, 128, np.clip(gt[i], 0, 1) * 255).astype(np.uint8)
        rows.append(np.concatenate([canvas, pred, np.repeat(true[..., None], 3, -1)], axis=1))
    return np.concatenate(rows, axis=0)


class Writer:
    """Scalars and images to TensorBoard plus PNGs in `<workdir>/images`; no-op off process 0."""

    def __init__(self, workdir: str | pathlib.Path):
        self.active = jax.process_index() == 0
        workdir = storage.as_path(workdir)
        self.image_dir = workdir / "images"
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.image_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))  # tensorboardX writes gs://

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.active:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, name: str, image: np.ndarray) -> pathlib.Path | None:
        """Logs an HWC uint8 image and saves it as `<workdir>/images/<name>_<step>.png`."""
        if not self.active:
            return None
        self._tb.add_image(name, image, step, dataformats="HWC")
        path = self.image_dir / f"{name.replace('/', '_')}_{step:07d}.png"
        if storage.is_remote(path):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            path.write_bytes(buffer.getvalue())
        else:
            Image.fromarray(image).save(path)
        return path

    def text(self, step: int, name: str, text: str) -> None:
        if self.active:
            self._tb.add_text(name, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class MetricsLog:
    """Rows of `metrics.jsonl`, one JSON object per line.

    On a local disk each row is appended and flushed. Object storage cannot append (gcsfs's
    open('a') silently replaces the object), so on gs:// the rows are kept and the whole object
    is rewritten, at most every `every_s` seconds and on `flush` (call it before a checkpoint is
    saved, so the rows up to it survive a kill) and `close`. The rows already in the file (those
    `checkpointing.truncate_metrics` kept) are kept.
    """

    def __init__(self, path: str | pathlib.Path, every_s: float = 60.0):
        self.path = storage.as_path(path)
        self.remote = storage.is_remote(self.path)
        self.every_s = every_s
        self._dirty, self._last = False, time.monotonic()
        if self.remote:
            self._text = self.path.read_text() if self.path.exists() else ""
            if self._text and not self._text.endswith("\n"):
                self._text += "\n"
            self._file = None
        else:
            self._file = self.path.open("a")

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._text += line
        self._dirty = True
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            storage.write_atomic(self.path, self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.flush()
