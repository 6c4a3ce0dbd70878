"""COCO-format export of annotated objects (segmentation as COCO RLE via pycocotools).

One image, one category; each object is an annotation with `segmentation` = compressed RLE
{size: [H, W], counts: str}, `area` and `bbox` [x, y, w, h] from pycocotools, `iscrowd` 0.
pycocotools' `COCO` reads the result directly (`annToMask` gives the masks back).
"""

from __future__ import annotations

import numpy as np


def masks_to_coco(masks: list[np.ndarray], *, file_name: str = "image.png", category: str = "object",
                  image_id: int = 1) -> dict:
    """bool masks [H, W] (one per object, in order) -> a COCO dataset dict (JSON-serialisable).

    Empty masks are left out (an object painted over entirely by later ones has no pixels).
    """
    from pycocotools import mask as mask_utils

    if not masks:
        raise ValueError("no objects to export")
    height, width = masks[0].shape
    annotations = []
    for mask in masks:
        if mask.shape != (height, width):
            raise ValueError(f"object masks differ in shape: {mask.shape} vs {(height, width)}")
        if not mask.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(dict(
            id=len(annotations) + 1, image_id=image_id, category_id=1, iscrowd=0,
            segmentation=dict(size=[int(height), int(width)], counts=rle["counts"].decode("ascii")),
            area=int(mask_utils.area(rle)), bbox=[float(v) for v in mask_utils.toBbox(rle)]))
    return dict(
        images=[dict(id=image_id, file_name=file_name, width=int(width), height=int(height))],
        annotations=annotations,
        categories=[dict(id=1, name=category, supercategory=category)],
    )


def labels_to_masks(labels: np.ndarray) -> list[np.ndarray]:
    """Label map [H, W] (0 background, 1..K objects) -> K bool masks."""
    return [labels == k for k in range(1, int(labels.max(initial=0)) + 1)]
