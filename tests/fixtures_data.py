"""Tiny fixture folders in each dataset's real on-disk layout (docs/design/formats.md#dataset-layouts), for tests.

Every `write_*(root)` creates `root` (and parents), writes 1-3 small images (H=40, W=60 unless
stated) with masks in the real file formats, and returns `root` as a `pathlib.Path`. The
contents are deterministic; the docstrings state what a reader must find.
"""

from __future__ import annotations

import pathlib
import pickle

import cv2
import numpy as np
import scipy.io
from PIL import Image

from skipclick_jax.data.eval_datasets import WSESEG_CLASSES
from skipclick_jax.data.folder_datasets import HQSEG_SUBSETS

H, W = 40, 60


def fixture_image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w,3] smooth random image (compresses well as JPEG)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def grabcut_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w] trimap-like mask: 255 box, 128 band around it, one pixel 1, one pixel 50.

    Decoded gt: 1 on the box and the value-1 pixel, -1 on the band, 0 elsewhere (incl. the 50).
    """
    m = np.zeros((h, w), np.uint8)
    top, left = 5 + seed % 3, 10 + seed % 5
    m[top - 2:top + 17, left - 2:left + 22] = 128
    m[top:top + 15, left:left + 20] = 255
    m[h - 2, 1] = 1
    m[h - 2, w - 2] = 50
    return m


def _write_jpg(path: pathlib.Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_cv2(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")


def write_grabcut(root) -> pathlib.Path:
    """<root>/data_GT/{flower,sheep}.jpg + <root>/boundary_GT/{flower,sheep}.bmp (`grabcut_mask`)."""
    root = pathlib.Path(root)
    for seed, name in enumerate(["sheep", "flower"]):
        _write_jpg(root / "data_GT" / f"{name}.jpg", fixture_image(seed))
        _write_cv2(root / "boundary_GT" / f"{name}.bmp", grabcut_mask(seed))
    return root


def write_berkeley(root) -> pathlib.Path:
    """<root>/images/{12003,21077,42049}.jpg + <root>/masks/<same>.png (`grabcut_mask`)."""
    root = pathlib.Path(root)
    for seed, name in enumerate(["42049", "12003", "21077"]):
        _write_jpg(root / "images" / f"{name}.jpg", fixture_image(10 + seed))
        _write_cv2(root / "masks" / f"{name}.png", grabcut_mask(seed))
    return root


def davis_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w,3] BGR mask: the object is nonzero in one channel only (decoded gt = box)."""
    m = np.zeros((h, w, 3), np.uint8)
    m[8 + seed:30, 12:40 + seed, seed % 3] = 200
    return m


def write_davis(root) -> pathlib.Path:
    """<root>/img/{bear,boat}.jpg + <root>/gt/<same>.png (`davis_mask`: gt = any channel > 0)."""
    root = pathlib.Path(root)
    for seed, name in enumerate(["boat", "bear"]):
        _write_jpg(root / "img" / f"{name}.jpg", fixture_image(20 + seed))
        _write_cv2(root / "gt" / f"{name}.png", davis_mask(seed))
    return root


def sbd_instances(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w] instance map with ids {1, 2} (+ id 4, a 20-px diagonal line, for seed 1)."""
    m = np.zeros((h, w), np.uint8)
    m[2:20, 3:25] = 1
    m[22:38, 30:58] = 2
    if seed == 1:
        idx = np.arange(20)
        m[2 + idx, 28 + idx] = 4
    return m


def write_sbd(root) -> pathlib.Path:
    """<root>/img/*.jpg, <root>/inst/*.mat (GTinst.Segmentation = `sbd_instances`),
    <root>/train.txt = [2008_000002, 2008_000003], <root>/val.txt = [2008_000009, 2008_000008].

    Eval (val): 2008_000009 has ids [1, 2]; 2008_000008 (seed 1) has ids [1, 2, 4].
    Train: id 4 is a "buggy" mask (area/bbox < 0.08) and is dropped.
    """
    root = pathlib.Path(root)
    names = {"2008_000002": 0, "2008_000003": 1, "2008_000009": 0, "2008_000008": 1}
    for i, (name, seed) in enumerate(names.items()):
        _write_jpg(root / "img" / f"{name}.jpg", fixture_image(30 + i))
        (root / "inst").mkdir(parents=True, exist_ok=True)
        segmentation = sbd_instances(seed)
        gtinst = {"Segmentation": segmentation, "Boundaries": np.zeros((1, 1), np.uint8),
                  "Categories": np.ones((int(segmentation.max()), 1), np.uint8)}
        scipy.io.savemat(str(root / "inst" / f"{name}.mat"), {"GTinst": gtinst})
    (root / "train.txt").write_text("2008_000002\n2008_000003\n")
    (root / "val.txt").write_text("2008_000009\n2008_000008\n")
    return root


def write_hqseg44k(root) -> pathlib.Path:
    """One <name>.jpg + <name>.png pair in every train and val sub-folder of HQSeg-44k.

    Image i (in subset order, val first then train) is named `img{i}`; its mask has a 255 box and
    a value-3 pixel at (0, 0) (anti-aliasing: also foreground).
    """
    root = pathlib.Path(root)
    subsets = HQSEG_SUBSETS["val"] + HQSEG_SUBSETS["train"]
    for i, (_, image_dir, mask_dir) in enumerate(subsets):
        _write_jpg(root / image_dir / f"img{i}.jpg", fixture_image(40 + i))
        mask = np.zeros((H, W), np.uint8)
        mask[10:30, 5 + i:40 + i] = 255
        mask[0, 0] = 3
        _write_cv2(root / mask_dir / f"img{i}.png", mask)
    return root


def wseseg_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w] id map with ids {0, 3, 7} (seed 0) or {0, 5} (seed 1)."""
    m = np.zeros((h, w), np.uint8)
    m[4:18, 4:30] = 3 if seed == 0 else 5
    if seed == 0:
        m[20:36, 35:55] = 7
    return m


def _write_wseseg_folder(folder: pathlib.Path, seed0: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(["frame_b", "frame_a"]):
        image = fixture_image(seed0 + seed)
        if seed == 1:
            Image.fromarray(image[:, :, 0]).save(folder / f"{name}.jpg")
        else:
            Image.fromarray(image).save(folder / f"{name}.jpg")
        Image.fromarray(wseseg_mask(seed)).save(folder / f"mask_{name}.png")


def write_wseseg(root, classes=WSESEG_CLASSES) -> pathlib.Path:
    """Per class: mask_frame_{a,b}.png + frame_{a,b}.jpg; yt_sports under skijump/annotated_frames/0.

    frame_a (a greyscale JPEG) has instance ids {5}; frame_b (RGB) has {3, 7}; so the samples
    are frame_a#0, frame_b#0, frame_b#1.
    """
    root = pathlib.Path(root)
    for i, cls in enumerate(classes):
        folder = root / "yt_sports/skijump/annotated_frames/0" if cls == "yt_sports" else root / cls
        _write_wseseg_folder(folder, 60 + 2 * i)
    return root


def write_shseg(root) -> pathlib.Path:
    """<root>/mask_frame_{a,b}.png + <root>/frame_{a,b}.jpg, as one WSESeg class folder."""
    root = pathlib.Path(root)
    _write_wseseg_folder(root, 90)
    return root


def coco_lvis_layers(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [h,w,2]: layer 0 ids {1, 2} (2 inside 1), layer 1 id 1 (a stuff region)."""
    layers = np.zeros((h, w, 2), np.uint8)
    layers[2:30, 2:40, 0] = 1
    layers[8:20, 10:30, 0] = 2
    layers[30:40, :, 1] = 1
    layers[0, w - 1 - seed, 1] = 1
    return layers


def write_coco_lvis(root, splits=("train",)) -> pathlib.Path:
    """RITM's combined COCO+LVIS layout for each split: images/<id>.jpg, masks/<id>.pickle,
    hannotation.pickle, with image ids '000000000285' and '000000000139'.

    Each image has objects [(0,1), (0,2), (1,1)]; num_instance_masks 2; object 1's parent is 0;
    object 2 (index >= 2) is stuff.
    """
    root = pathlib.Path(root)
    for split in splits:
        split_dir = root / split
        annotation = {}
        for seed, image_id in enumerate(["000000000285", "000000000139"]):
            _write_jpg(split_dir / "images" / f"{image_id}.jpg", fixture_image(100 + seed))
            layers = coco_lvis_layers(seed)
            encoded = [cv2.imencode(".png", layers[:, :, i])[1] for i in range(layers.shape[2])]
            (split_dir / "masks").mkdir(parents=True, exist_ok=True)
            with open(split_dir / "masks" / f"{image_id}.pickle", "wb") as f:
                pickle.dump((encoded, [(0, 1), (0, 2), (1, 1)]), f)
            annotation[image_id] = {
                "num_instance_masks": 2,
                "hierarchy": {0: {"children": [1], "parent": None, "node_level": 0},
                              1: {"children": [], "parent": 0, "node_level": 1}},
            }
        with open(split_dir / "hannotation.pickle", "wb") as f:
            pickle.dump(annotation, f)
    return root


EVAL_FIXTURES = {
    "GrabCut": write_grabcut,
    "Berkeley": write_berkeley,
    "DAVIS": write_davis,
    "SBD": write_sbd,
    "HQSeg44k": write_hqseg44k,
    "SHSeg": write_shseg,
    **{f"WSESeg_{c}": write_wseseg for c in WSESEG_CLASSES},
}
"""Eval dataset name -> writer of a fixture root for `load_eval_dataset(name, root)`."""

TRAIN_FIXTURES = {"COCO+LVIS": write_coco_lvis, "SBD": write_sbd, "HQSeg44k": write_hqseg44k}
"""Train dataset name -> writer of a fixture root for `load_train_source(name, root, 'train')`."""
