"""Observability: TensorBoard scalars/images (tensorboardX) and PNG previews in the run dir."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from PIL import Image

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
        self.image_dir = pathlib.Path(workdir) / "images"
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.image_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

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
        Image.fromarray(image).save(path)
        return path

    def text(self, step: int, name: str, text: str) -> None:
        if self.active:
            self._tb.add_text(name, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
