"""Training datasets (docs/design/training.md#data, docs/design/formats.md#dataset-layouts): one record per image with all its object masks.

`load_train_source(name, root, split)` builds the TFDS train records from the original folder on
first use (cached per resolved root, fingerprint of its files and split) and returns a picklable random-access source of
decoded samples, for `grain.MapDataset.source(...)`.
Object k of a sample has mask `layers[..., objects[k, 0]] == objects[k, 1]`; objects with
index >= num_instance_masks are stuff regions (COCO+LVIS only).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Iterator, Mapping

import cv2
import numpy as np

from skipclick_jax.data import builders
from skipclick_jax.data import custom_datasets as cd
from skipclick_jax.data import folder_datasets as fd
from skipclick_jax.data.synthetic import SyntheticConfig, png_bytes, synthetic_sample

TRAIN_SPLITS = ("train", "val")
SBD_BUGGY_MASK_THRESH = 0.08

COCO_LVIS = "COCO+LVIS"
TRAIN_DATASETS = (COCO_LVIS, "SBD", "HQSeg44k", "Synthetic", *cd.CUSTOM_DATASETS)
COCO_LVIS_LAYOUT = (
    "<root>/<split>/hannotation.pickle, <root>/<split>/images/<image_id>.jpg and "
    "<root>/<split>/masks/<image_id>.pickle"
)


class TrainSource:
    """Random-access decoded train samples; picklable (grain workers) and cheap to copy.

    `source[i]` -> {'id': str, 'image': uint8 [H,W,3] RGB, 'layers': uint8 [H,W,L],
    'objects': int32 [K,2], 'parents': int32 [K], 'num_instance_masks': int}, plus 'ignore'
    bool [H,W] for COCO / ImageMasks images that have ignore regions.
    """

    def __init__(self, records, name: str):
        self._records = records
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return decode_train_record(self._records[index])

    def __repr__(self) -> str:
        return f"TrainSource({self.name!r}, {len(self)} images)"


def load_train_source(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    synthetic: SyntheticConfig | None = None,
    options: Mapping | cd.CustomOptions | None = None,
) -> TrainSource:
    """The decoded training samples of dataset `name`, split `split`, in the original's order
    (COCO+LVIS: sorted image ids; SBD: `<split>.txt`; HQSeg-44k: sub-folders, then file names).

    Args:
      name: one of `TRAIN_DATASETS`: 'COCO+LVIS' (RITM's combined layout, docs/design/formats.md#dataset-layouts), 'SBD'
        (<root>/{img,inst}, <split>.txt; one object per instance), 'HQSeg44k' (its train
        sub-folders for 'train', the val ones for 'val'; one object, mask > 0) or 'Synthetic'.
      root: the dataset's original folder; unused for 'Synthetic', which `synthetic` (default
        `SyntheticConfig()`) describes. 'COCO' (root: an instances JSON) and 'ImageMasks'
        (root: a folder) are the user's own data (`custom_datasets`); the root is one split.
      split: 'train' or 'val' (not used by COCO / ImageMasks).
      data_dir: TFDS cache folder, default `~/.cache/skipclick_jax/tfds`.
      options: for COCO / ImageMasks, a `CustomOptions` or the `data` config section it is read
        from (mask_mode, ignore_value, categories, min_annotation_area).
    """
    if name not in TRAIN_DATASETS:
        raise ValueError(f"unknown train dataset {name!r}; expected one of {TRAIN_DATASETS}")
    if split not in TRAIN_SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {TRAIN_SPLITS}")
    if name == "Synthetic":
        cfg = synthetic or SyntheticConfig()
        examples = functools.partial(_synthetic, cfg, split)
        config = builders.config_name(name, split, cfg)
    elif name in cd.CUSTOM_DATASETS:
        path = builders.resolve_root(root, name)
        cd.require_root(name, path)
        opts = options if isinstance(options, cd.CustomOptions) else cd.CustomOptions.from_config(options)
        examples = functools.partial(cd.train_examples, name, path, opts)
        config = builders.config_name(name, "train", *cd.cache_key(name, path, opts))
        source = builders.build_source("train_custom", config, "train", examples, data_dir)
        return TrainSource(source, name)
    else:
        path = builders.resolve_root(root, name)
        examples = functools.partial(fd.folder_examples, _FOLDER_EXAMPLES[name], path, name, split)
        config = builders.config_name(name, split, *builders.folder_key(path))
    return TrainSource(builders.build_source("train", config, split, examples, data_dir), name)


def decode_train_record(record: dict) -> dict:
    """Stored train record -> decoded sample (see `TrainSource`)."""
    sample_id = record["id"].decode() if isinstance(record["id"], bytes) else record["id"]
    image = fd.decode_rgb(record["image"], sample_id)
    if "layers_shape" in record:  # COCO / ImageMasks (builders.SkipclickTrainCustom)
        layers = builders.unpack_array(record["layers"], record["layers_shape"], f"layers of {sample_id}")
    else:
        layers = np.asarray(record["layers"], np.uint8)
    fd.check_same_hw(layers.shape, image.shape, f"layers of {sample_id}", sample_id)
    sample = {
        "id": sample_id,
        "image": image,
        "layers": layers,
        "objects": np.asarray(record["objects"], np.int32).reshape(-1, 2),
        "parents": np.asarray(record["parents"], np.int32),
        "num_instance_masks": int(record["num_instance_masks"]),
    }
    if "ignore" in record and len(record["ignore"]):
        sample["ignore"] = builders.unpack_array(record["ignore"], layers.shape[:2],
                                                 f"ignore of {sample_id}").view(bool)
    return sample


def _single_layer(sample_id: str, data: bytes, label: np.ndarray, ids) -> dict:
    ids = np.asarray(ids, np.int32)
    return {
        "id": sample_id,
        "image": data,
        "layers": label.astype(np.uint8)[:, :, None],
        "objects": np.stack([np.zeros_like(ids), ids], axis=1).reshape(-1, 2),
        "parents": np.full(ids.shape, -1, np.int32),
        "num_instance_masks": len(ids),
    }


def _coco_lvis(root: pathlib.Path, split: str) -> Iterator[dict]:
    """RITM's CocoLvisDataset: samples sorted by image id; stuff objects kept (index >= n)."""

    def require(path: pathlib.Path) -> pathlib.Path:
        return fd.require_file(path, COCO_LVIS, COCO_LVIS_LAYOUT)

    split_dir = fd.require_dir(root / split, COCO_LVIS, COCO_LVIS_LAYOUT)
    annotation_path = require(split_dir / "hannotation.pickle")
    annotation = fd.load_container_pickle(annotation_path)
    if not isinstance(annotation, dict):
        raise ValueError(f"{COCO_LVIS}: {annotation_path} holds a {type(annotation).__name__}, "
                         "expected a dict")
    for image_id, sample in sorted(annotation.items()):
        where = f"{annotation_path} [{image_id!r}]"
        image_path = require(split_dir / "images" / f"{image_id}.jpg")
        masks_path = require(split_dir / "masks" / f"{image_id}.pickle")
        data = image_path.read_bytes()
        layers, objects = _read_masks(masks_path, fd.cv2_image_hw(data, image_path), image_path)
        num_instances = int(sample["num_instance_masks"])
        if not 0 <= num_instances <= len(objects):
            raise ValueError(f"{COCO_LVIS}: {where} num_instance_masks={num_instances} but "
                             f"{masks_path} has {len(objects)} objects")
        yield {
            "id": str(image_id),
            "image": data,
            "layers": layers,
            "objects": objects,
            "parents": _parents(sample["hierarchy"], len(objects), where),
            "num_instance_masks": num_instances,
        }


def _read_masks(masks_path: pathlib.Path, image_hw, image_path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [H,W,L] layers, int32 [K,2] (layer, local id) objects) of a COCO+LVIS masks pickle."""
    packed = fd.load_container_pickle(masks_path)
    if not (isinstance(packed, (tuple, list)) and len(packed) == 2 and len(packed[0]) > 0):
        raise ValueError(f"{COCO_LVIS}: {masks_path} must hold (non-empty list of PNG-encoded "
                         "layers, list of (layer, id) per object)")
    layers = [fd.cv2_decode(x, f"{masks_path} layer {i}", cv2.IMREAD_UNCHANGED)
              for i, x in enumerate(packed[0])]
    for i, layer in enumerate(layers):
        if layer.dtype != np.uint8 or layer.ndim != 2:
            raise ValueError(f"{COCO_LVIS}: {masks_path} layer {i} is {layer.dtype} "
                             f"{layer.shape}, expected a uint8 [H,W] map")
        fd.check_same_hw(layer.shape, image_hw, f"{masks_path} layer {i}", image_path)
    objects = np.asarray(packed[1], np.int32).reshape(-1, 2)
    if not ((objects[:, 0] >= 0) & (objects[:, 0] < len(layers))).all():
        raise ValueError(f"{COCO_LVIS}: {masks_path} maps an object to a layer outside "
                         f"0..{len(layers) - 1}")
    return np.stack(layers, axis=2), objects


def _parents(hierarchy: dict, num_objects: int, where: str) -> np.ndarray:
    """int32 [K] parent index per object (-1 = root; objects absent from `hierarchy` are roots)."""
    parents = np.full((num_objects,), -1, np.int32)
    for key, info in hierarchy.items():
        parent = None if info is None else info.get("parent")
        for index in (key, parent):
            if index is not None and not 0 <= int(index) < num_objects:
                raise ValueError(f"{COCO_LVIS}: {where} hierarchy entry {key!r}: {info!r} names "
                                 f"object {index} outside 0..{num_objects - 1}")
        if parent is not None:
            parents[int(key)] = int(parent)
    return parents


def _sbd(root: pathlib.Path, split: str) -> Iterator[dict]:
    """SBD in `<split>.txt` order; every nonzero instance id is an object, except "buggy" ones
    (area / bbox area < 0.08, zeroed as in the original's SBDDataset)."""
    for image_path, data, instances in fd.read_sbd_split(root, split):
        name = image_path.stem
        ids = np.unique(instances)
        ids = ids[ids != 0]
        if len(ids) and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"SBD: {root / 'inst' / f'{name}.mat'} has instance ids outside 1..255: "
                             f"{ids.tolist()}")
        kept = []
        for instance_id in ids:
            rows, cols = np.nonzero(instances == instance_id)
            box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            if len(rows) / box_area < SBD_BUGGY_MASK_THRESH:
                instances[instances == instance_id] = 0
            else:
                kept.append(instance_id)
        yield _single_layer(name, data, instances, kept)


def _hqseg(root: pathlib.Path, split: str) -> Iterator[dict]:
    """HQSeg-44k: every image is one object, mask = (max over channels > 0); ids '<subset>/<stem>'."""
    subsets = fd.HQSEG_SUBSETS[split]
    layout = "under <root>: " + ", ".join(f"{im}/<name>.jpg + {gt}/<name>.png" for _, im, gt in subsets)
    for subset, image_dir, mask_dir in subsets:
        pairs = fd.pair_images_masks(root / image_dir, root / mask_dir, "HQSeg44k", layout,
                                     image_glob="*.jpg", mask_glob="*.png", first_dot=False)
        for image_path, mask_path in pairs:
            data = image_path.read_bytes()
            mask = fd.cv2_decode(mask_path.read_bytes(), mask_path).max(axis=2) > 0
            fd.check_same_hw(mask.shape, fd.cv2_image_hw(data, image_path), mask_path, image_path)
            yield _single_layer(f"{subset}/{image_path.stem}", data, mask, [1])


def _synthetic(cfg: SyntheticConfig, split: str) -> Iterator[dict]:
    for i in range(cfg.num_images(split)):
        sample = synthetic_sample(cfg, split, i)
        yield {**sample, "image": png_bytes(sample["image"])}


_FOLDER_EXAMPLES = {COCO_LVIS: _coco_lvis, "SBD": _sbd, "HQSeg44k": _hqseg}
