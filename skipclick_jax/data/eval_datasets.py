"""Evaluation datasets (docs/design/evaluation.md#datasets, docs/design/formats.md#dataset-layouts): one record per evaluated instance, in the original's order.

`load_eval_dataset(name, root)` builds the TFDS eval records from the original folder on first
use (cached per resolved root and fingerprint of its files) and returns a grain `MapDataset` of decoded samples.
Instance `k` of an image (0-based, in the original's instance order) has id '<image stem>#k'.
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Iterator, Mapping

import grain
import numpy as np
from PIL import Image

from skipclick_jax.data import builders
from skipclick_jax.data import custom_datasets as cd
from skipclick_jax.data import folder_datasets as fd
from skipclick_jax.data.synthetic import SyntheticConfig, png_bytes, synthetic_sample

WSESEG_CLASSES = (
    "flickr_bobsleighs", "flickr_curling_stone", "flickr_ski_helmets", "flickr_snow_kites",
    "yt_sports", "flickr_curling_brooms", "flickr_ski_goggles", "flickr_ski_misc",
    "flickr_slalom_obstacles", "flickr_snowboards",
)
EVAL_DATASETS = (
    "GrabCut", "Berkeley", "DAVIS", "SBD", "HQSeg44k", "SHSeg",
    *(f"WSESeg_{c}" for c in WSESEG_CLASSES), "Synthetic", *cd.CUSTOM_DATASETS,
)


def load_eval_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    synthetic: SyntheticConfig | None = None,
    options: Mapping | cd.CustomOptions | None = None,
) -> grain.MapDataset:
    """The evaluation samples of dataset `name` in dataset order.

    Args:
      name: one of `EVAL_DATASETS`.
      root: the dataset's original folder (docs/design/formats.md#dataset-layouts); for WSESeg_* the WSESeg root holding the
        class folders. Unused for 'Synthetic' (its val split, one sample per object, is made by
        `synthetic`, default `SyntheticConfig()`). 'COCO': an instances JSON; 'ImageMasks': a
        folder (`custom_datasets`), one sample per object, ignore regions as -1.
      data_dir: TFDS cache folder, default `~/.cache/skipclick_jax/tfds`.
      options: for COCO / ImageMasks, a `CustomOptions` or the `data` config section it is read
        from (mask_mode, ignore_value, categories, min_annotation_area).

    Returns:
      A `grain.MapDataset` (len, integer indexing, iteration) of {'id': str, 'image': uint8
      [H,W,3] RGB, or float32 [H,W,3] in [0,1] for WSESeg/SHSeg, 'gt': int32 [H,W] in {0,1,-1}}.
    """
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown eval dataset {name!r}; expected one of {EVAL_DATASETS}")
    if name == "Synthetic":
        cfg = synthetic or SyntheticConfig()
        examples = functools.partial(_synthetic, cfg)
        config = builders.config_name(name, "val", cfg)
    elif name in cd.CUSTOM_DATASETS:
        path = builders.resolve_root(root, name)
        cd.require_root(name, path)
        opts = options if isinstance(options, cd.CustomOptions) else cd.CustomOptions.from_config(options)
        examples = functools.partial(cd.eval_examples, name, path, opts)
        config = builders.config_name(name, "val", *cd.cache_key(name, path, opts))
    else:
        path = builders.resolve_root(root, name)
        examples = functools.partial(fd.folder_examples, _FOLDER_EXAMPLES[name], path, name)
        config = builders.config_name(name, "val", *builders.folder_key(path))
    source = builders.build_source("eval", config, "val", examples, data_dir)
    return grain.MapDataset.source(source).map_with_index(decode_eval_record)


def decode_eval_record(index: int, record: dict) -> dict:
    """Stored eval record at position `index` -> {'id', 'image', 'gt' int32 [H,W]}."""
    sample_id = record["id"].decode() if isinstance(record["id"], bytes) else record["id"]
    if record["index"] != index:
        raise ValueError(f"eval record {sample_id!r} at position {index} has index {record['index']}")
    decode = fd.decode_float_rgb if record["float_image"] else fd.decode_rgb
    image = decode(record["image"], sample_id)
    gt = np.asarray(record["gt"], np.int32)
    fd.check_same_hw(gt.shape, image.shape, f"gt of {sample_id}", sample_id)
    return {"id": sample_id, "image": image, "gt": gt}


def _record(image_path: pathlib.Path, k: int, data: bytes, gt: np.ndarray, float_image=False) -> dict:
    return {"id": f"{image_path.stem}#{k}", "image": data, "float_image": float_image,
            "gt": gt.astype(np.int8)}


def _cv2_mask(path: pathlib.Path, image_data: bytes, image_path: pathlib.Path) -> np.ndarray:
    """uint8 [H,W,3] mask as cv2.imread (BGR) gives it, checked against the image size."""
    mask = fd.cv2_decode(path.read_bytes(), path)
    fd.check_same_hw(mask.shape, fd.cv2_image_hw(image_data, image_path), path, image_path)
    return mask


def _grabcut_like(root: pathlib.Path, dataset: str, image_dir: str, mask_dir: str) -> Iterator[dict]:
    """GrabCut/Berkeley: channel 0; 128 -> -1 (ignore); > 128 or == 1 -> 1; other values -> 0.

    (The original maps 128 -> -1 and > 128 -> 1 in place, then takes `mask == 1` as the object,
    so a raw value of 1 is foreground and 2..127 are background.)
    """
    layout = f"<root>/{image_dir}/<name>.* images and <root>/{mask_dir}/<name>.* masks"
    pairs = fd.pair_images_masks(root / image_dir, root / mask_dir, dataset, layout)
    for image_path, mask_path in pairs:
        data = image_path.read_bytes()
        m = _cv2_mask(mask_path, data, image_path)[:, :, 0]
        gt = np.where(m == 128, -1, np.where((m > 128) | (m == 1), 1, 0))
        yield _record(image_path, 0, data, gt)


def _max_channel_pairs(pairs) -> Iterator[dict]:
    """DAVIS/HQSeg-44k: maximum over the 3 channels, anything > 0 is foreground."""
    for image_path, mask_path in pairs:
        data = image_path.read_bytes()
        yield _record(image_path, 0, data, _cv2_mask(mask_path, data, image_path).max(axis=2) > 0)


def _davis(root: pathlib.Path) -> Iterator[dict]:
    layout = "<root>/img/<name>.* images and <root>/gt/<name>.* masks"
    yield from _max_channel_pairs(fd.pair_images_masks(root / "img", root / "gt", "DAVIS", layout))


def _hqseg(root: pathlib.Path) -> Iterator[dict]:
    subsets = fd.HQSEG_SUBSETS["val"]
    layout = "under <root>: " + ", ".join(f"{im}/<name>.jpg + {gt}/<name>.png" for _, im, gt in subsets)
    for _, image_dir, mask_dir in subsets:
        pairs = fd.pair_images_masks(root / image_dir, root / mask_dir, "HQSeg44k", layout,
                                     image_glob="*.jpg", mask_glob="*.png", first_dot=False)
        yield from _max_channel_pairs(pairs)


def _sbd(root: pathlib.Path) -> Iterator[dict]:
    """One sample per (val.txt image, nonzero instance id), ids ascending; mask = (map == id)."""
    for image_path, data, instances in fd.read_sbd_split(root, "val"):
        ids = np.unique(instances)
        for k, instance_id in enumerate(ids[ids != 0]):
            yield _record(image_path, k, data, instances == instance_id)


def _wseseg_like(folder: pathlib.Path, dataset: str) -> Iterator[dict]:
    """WSESeg/SHSeg: sorted mask_<name>.png; one sample per np.unique(mask)[1:] value."""
    layout = f"{folder}/mask_<name>.png instance-id masks next to {folder}/<name>.jpg images"
    fd.require_dir(folder, dataset, layout)
    mask_paths = sorted(folder.glob("mask_*.png"))
    if not mask_paths:
        raise fd.LayoutError(f"{dataset}: expected {layout}; no mask_*.png in {folder}")
    for mask_path in mask_paths:
        image_path = fd.require_file(folder / f"{mask_path.name[5:-4]}.jpg", dataset, layout)
        with Image.open(mask_path) as im:
            mask = np.array(im)
        if mask.ndim != 2:
            raise ValueError(f"{dataset}: mask {mask_path} has shape {mask.shape}, expected an "
                             "[H,W] id map")
        data = image_path.read_bytes()
        with Image.open(image_path) as im:
            fd.check_same_hw(mask.shape, im.size[::-1], mask_path, image_path)
        for k, instance_id in enumerate(np.unique(mask)[1:]):
            yield _record(image_path, k, data, mask == instance_id, float_image=True)


def _wseseg(root: pathlib.Path, cls: str) -> Iterator[dict]:
    folder = root / "yt_sports/skijump/annotated_frames/0" if cls == "yt_sports" else root / cls
    return _wseseg_like(folder, f"WSESeg_{cls}")


def _synthetic(cfg: SyntheticConfig) -> Iterator[dict]:
    """One sample per visible object of each synthetic val image, ids 'val_<i>#<k>'."""
    for i in range(cfg.num_images("val")):
        sample = synthetic_sample(cfg, "val", i)
        data = png_bytes(sample["image"])
        for k, (_, local_id) in enumerate(sample["objects"]):
            gt = (sample["layers"][:, :, 0] == local_id).astype(np.int8)
            yield {"id": f"{sample['id']}#{k}", "image": data, "float_image": False, "gt": gt}


_FOLDER_EXAMPLES = {
    "GrabCut": functools.partial(_grabcut_like, dataset="GrabCut", image_dir="data_GT",
                                 mask_dir="boundary_GT"),
    "Berkeley": functools.partial(_grabcut_like, dataset="Berkeley", image_dir="images",
                                  mask_dir="masks"),
    "DAVIS": _davis,
    "SBD": _sbd,
    "HQSeg44k": _hqseg,
    "SHSeg": functools.partial(_wseseg_like, dataset="SHSeg"),
    **{f"WSESeg_{c}": functools.partial(_wseseg, cls=c) for c in WSESEG_CLASSES},
}
