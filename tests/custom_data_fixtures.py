"""Writers of COCO-format and ImageMasks fixtures in the real file formats, for tests and benches.

`write_coco` encodes its masks with pycocotools (polygons, uncompressed and compressed RLE, crowd
regions); `write_image_masks` writes binary, per-object, palette and 16-bit instance-label PNGs
with ignore values. Each returns what a reader must find.
"""

from __future__ import annotations

import json
import pathlib

import cv2
import numpy as np
from PIL import Image


def smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    """uint8 [h,w,3] smooth random RGB image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def write_rgb(path: pathlib.Path, rgb: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"cannot write {path}")


def rect(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def rle_compressed(mask: np.ndarray) -> dict:
    """COCO compressed RLE {'size': [h, w], 'counts': str} (pycocotools)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode()}


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE {'size': [h, w], 'counts': [run lengths]} (column-major, 0s first)."""
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def polygon_of_rect(top, left, bottom, right) -> list[float]:
    return [left, top, right, top, right, bottom, left, bottom]


def write_coco(root, large: bool = True) -> dict:
    """<root>/annotations.json + <root>/images/*.jpg (and one image beside the JSON).

    Images: 'a.jpg' 48x80 (3 objects: compressed RLE disk, uncompressed RLE rect, polygon rect;
    a crowd rect as ignore), 'sub/b.png' 70x50 in <root>/ (2 objects, one a 'dog' for the category
    filter), 'c.jpg' large 900x1400 if `large` (1 compressed RLE object), 'empty.jpg' (listed, no
    annotations, file absent). Returns {'json': path, 'objects': {file_name: [bool masks in
    order]}, 'ignore': {file_name: bool mask}, 'categories': {file_name: [category names]}}.
    """
    root = pathlib.Path(root)
    images, annotations, objects, ignore, cats = [], [], {}, {}, {}
    ann_id = [100]

    def add(image_id, file_name, h, w, where):
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        write_rgb(root / where / file_name, smooth_image(image_id, h, w))
        objects[file_name], ignore[file_name], cats[file_name] = [], np.zeros((h, w), bool), []

    def ann(image_id, file_name, mask, segmentation, category=1, crowd=0):
        ann_id[0] += 1
        annotations.append({"id": ann_id[0], "image_id": image_id, "category_id": category,
                            "segmentation": segmentation, "iscrowd": crowd,
                            "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})
        if crowd:
            ignore[file_name] |= mask
        else:
            objects[file_name].append(mask)
            cats[file_name].append({1: "person", 2: "dog"}[category])

    h, w = 48, 80
    add(1, "a.jpg", h, w, "images")
    d = disk(h, w, 20, 20, 9)
    ann(1, "a.jpg", d, rle_compressed(d))
    r = rect(h, w, 5, 40, 30, 70)
    ann(1, "a.jpg", r, rle_uncompressed(r))
    p = rect(h, w, 34, 10, 44, 60)
    ann(1, "a.jpg", p, [polygon_of_rect(34, 10, 44, 60)])
    crowd = rect(h, w, 0, 0, 12, 80)
    ann(1, "a.jpg", crowd, rle_uncompressed(crowd), crowd=1)
    h, w = 70, 50
    add(2, "sub/b.png", h, w, ".")
    d = disk(h, w, 50, 25, 12)
    ann(2, "sub/b.png", d, rle_compressed(d), category=2)
    r = rect(h, w, 4, 4, 30, 46)
    ann(2, "sub/b.png", r, rle_compressed(r))
    if large:
        h, w = 900, 1400
        add(3, "c.jpg", h, w, "images")
        d = disk(h, w, 450, 700, 300)
        ann(3, "c.jpg", d, rle_compressed(d))
    images.append({"id": 9, "file_name": "empty.jpg", "height": 10, "width": 10})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return {"json": path, "objects": objects, "ignore": ignore, "categories": cats}


def write_image_masks(root) -> dict:
    """<root>/images + <root>/masks in three forms, ignore value 255 (mask_mode 'binary').

    'one.jpg' 40x64 with masks/one.png (nonzero = object; a 255 band = ignore), 'two.png' 56x36
    with masks/two_1.png and two_2.png (one object each, overlapping), 'none.jpg' with an all-zero
    mask (skipped: no object). Returns {'objects': {stem: [bool masks]}, 'ignore': {stem: mask}}.
    """
    root = pathlib.Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    objects, ignore = {}, {}
    h, w = 40, 64
    write_rgb(root / "images" / "one.jpg", smooth_image(11, h, w))
    obj, band = rect(h, w, 10, 10, 30, 40), rect(h, w, 8, 8, 32, 42)
    m = np.where(obj, 200, np.where(band, 255, 0)).astype(np.uint8)
    Image.fromarray(m).save(root / "masks" / "one.png")
    objects["one"], ignore["one"] = [obj], band & ~obj
    h, w = 56, 36
    write_rgb(root / "images" / "two.png", smooth_image(12, h, w))
    a, b = disk(h, w, 20, 18, 10), rect(h, w, 25, 5, 50, 30)
    Image.fromarray(a.astype(np.uint8)).save(root / "masks" / "two_1.png")
    Image.fromarray((b * 200).astype(np.uint8)).convert("RGB").save(root / "masks" / "two_2.png")
    objects["two"], ignore["two"] = [a, b], np.zeros((h, w), bool)
    write_rgb(root / "images" / "none.jpg", smooth_image(13, 20, 20))
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "none.png")
    return {"objects": objects, "ignore": ignore}


def write_instance_masks(root) -> dict:
    """<root>/images + <root>/masks/<stem>.png instance-label maps (mask_mode 'instances'),
    ignore value 255: 'p.jpg' 60x44 palette PNG (ids 1, 2, 5; a 255 border band), 'q.jpg'
    30x90 16-bit PNG (ids 1 and 300). Returns {'objects': {stem: [masks by id]}, 'ignore': ...}."""
    root = pathlib.Path(root)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = 60, 44
    write_rgb(root / "images" / "p.jpg", smooth_image(21, h, w))
    labels = np.zeros((h, w), np.uint8)
    masks = [rect(h, w, 2, 2, 20, 20), rect(h, w, 25, 5, 40, 40), disk(h, w, 50, 22, 6)]
    for i, m in zip((1, 2, 5), masks):
        labels[m] = i
    labels[0, :] = 255
    im = Image.fromarray(labels, mode="P")
    im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, i)])
    im.save(root / "masks" / "p.png")
    objects = {"p": masks}
    ignore = {"p": labels == 255}
    h, w = 30, 90
    write_rgb(root / "images" / "q.jpg", smooth_image(22, h, w))
    labels16 = np.zeros((h, w), np.uint16)
    m1, m2 = rect(h, w, 5, 5, 25, 40), rect(h, w, 5, 50, 25, 85)
    labels16[m1], labels16[m2] = 1, 300
    Image.fromarray(labels16).save(root / "masks" / "q.png")
    objects["q"], ignore["q"] = [m1, m2], np.zeros((h, w), bool)
    return {"objects": objects, "ignore": ignore}


def write_shapes(root, num_images: int, seed: int, h: int = 96, w: int = 128,
                 coco: bool = False) -> int:
    """An easy ImageMasks folder: 1-2 bright, differently coloured discs or boxes per image on a
    dark noisy background, masks/<stem>_<k>.png per object (and, with `coco`,
    <root>/annotations.json in COCO format over the same images and objects, RLE). Returns the
    number of objects."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    count = 0
    for i in range(num_images):
        image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
        taken = np.zeros((h, w), bool)
        stem = f"img{i:03d}"
        for k in range(1 + int(rng.integers(2))):
            for _ in range(20):
                size = int(rng.integers(14, 28))
                cy, cx = int(rng.integers(size, h - size)), int(rng.integers(size, w - size))
                m = (disk(h, w, cy, cx, size * 0.8) if rng.random() < 0.5
                     else rect(h, w, cy - size // 2, cx - size, cy + size // 2, cx + size))
                if not (m & taken).any():
                    break
            else:
                continue
            taken |= m
            image[m] = rng.integers(150, 256, size=3)
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / f"{stem}_{k + 1}.png")
            count += 1
            annotations.append({"id": count, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "segmentation": rle_compressed(m), "area": int(m.sum()),
                                "bbox": [0, 0, 1, 1]})
        write_rgb(root / "images" / f"{stem}.png", image)
        images.append({"id": i + 1, "file_name": f"{stem}.png", "height": h, "width": w})
    if coco:
        (root / "annotations.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "shape"}]}))
    return count
