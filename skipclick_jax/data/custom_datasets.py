"""Users' own data: folders of image + mask files ('ImageMasks') and COCO instances JSON ('COCO').

ImageMasks (`root` a folder):
  <root>/images/<stem>.<ext>   any image format cv2 reads (jpg, png, bmp, tif, webp, ...)
  <root>/masks/<stem>.png      mask_mode 'binary': every nonzero pixel is the one object;
                               mask_mode 'instances': each value 1..K one object, 0 background
  <root>/masks/<stem>_<k>.png  (either mode) one file per object, nonzero = the object
  Pixels equal to `ignore_value` (e.g. 128 or 255; -1 = none) are ignore regions in every mask.
COCO (`root` an instances JSON): 'images' (id, file_name, height, width), 'annotations' (id,
  image_id, category_id, segmentation as polygons, uncompressed or compressed RLE, iscrowd),
  'categories' (id, name). An image is read from `<json folder>/<file_name>` or
  `<json folder>/images/<file_name>`. Crowd annotations are ignore regions; `categories` keeps only
  the named categories (names or ids).

Every object below `min_annotation_area` pixels (in the original image) is skipped. Ignore regions
become the original's -1: in evaluation the clicker and the IoU leave them out, in training the
loss does (they go through the same augmentation as the object layers).

Structural problems raise `ValueError`/`LayoutError` naming the file or annotation id: a mask or
RLE whose size differs from its image, unreadable or missing images, duplicate image stems or file
names, unknown categories, an empty dataset. Recoverable problems are skipped and counted, and the
counts are logged (WARNING) with examples: annotations of unknown images, degenerate polygons,
polygons outside the image (clipped), annotations without a usable segmentation, empty or too small
objects, images without objects or without a mask file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
from PIL import Image

from skipclick_jax.data import folder_datasets as fd

log = logging.getLogger("skipclick_jax.data")

CUSTOM_DATASETS = ("COCO", "ImageMasks")
MASK_MODES = ("binary", "instances")
IMAGE_MASKS_LAYOUT = ("<root>/images/<stem>.<ext> with <root>/masks/<stem>.png (one object, or an "
                      "instance-label map with mask_mode=instances) or <root>/masks/<stem>_<k>.png "
                      "(one file per object)")
COCO_LAYOUT = ("an instances JSON with its images at <json folder>/<file_name> or "
               "<json folder>/images/<file_name>")
_OBJECT_FILE = re.compile(r"^(.*)_(\d+)$")
_MAX_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class CustomOptions:
    """How a COCO / ImageMasks dataset is read (the `data` config keys of the same names).

    mask_mode: 'binary' or 'instances' (ImageMasks `<stem>.png` files).
    ignore_value: mask pixel value marking ignore regions (ImageMasks), -1 for none.
    categories: COCO category names or ids to keep; empty keeps all.
    min_annotation_area: objects with fewer pixels (original image) are skipped.
    """

    mask_mode: str = "binary"
    ignore_value: int = -1
    categories: tuple = ()
    min_annotation_area: int = 0

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"data.mask_mode={self.mask_mode!r}: expected one of {MASK_MODES}")
        if not isinstance(self.ignore_value, (int, np.integer)) or not -1 <= self.ignore_value <= 65535:
            raise ValueError(f"data.ignore_value={self.ignore_value!r}: expected -1 (none) or a "
                             "mask pixel value 0..65535")
        if self.ignore_value == 0:
            raise ValueError("data.ignore_value=0: 0 is the background value")
        if not isinstance(self.min_annotation_area, (int, np.integer)) or self.min_annotation_area < 0:
            raise ValueError(f"data.min_annotation_area={self.min_annotation_area!r}: expected an "
                             "integer >= 0")
        object.__setattr__(self, "categories", tuple(self.categories))

    @classmethod
    def from_config(cls, data: Mapping | None) -> CustomOptions:
        """The options from a `data` config section (missing keys take the defaults)."""
        data = data or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: data[k] for k in fields if k in data})


class Skipped:
    """Counts (with a few example names) of what a reader skipped; `log()` reports them."""

    def __init__(self, dataset: str, source: object):
        self.dataset, self.source = dataset, source
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, reason: str, what: object) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(str(what))

    def log(self, kept: str) -> None:
        if not self.counts:
            log.info("%s %s: %s, nothing skipped", self.dataset, self.source, kept)
            return
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                 for reason, n in sorted(self.counts.items())]
        log.warning("%s %s: %s; skipped: %s", self.dataset, self.source, kept, "; ".join(parts))


@dataclasses.dataclass
class ImageObjects:
    """One image with its objects: id, image path and bytes, bool [H,W] masks, bool [H,W] ignore."""

    id: str
    path: pathlib.Path
    data: bytes
    masks: list[np.ndarray]
    ignore: np.ndarray


def read_custom(name: str, root: pathlib.Path, options: CustomOptions) -> Iterator[ImageObjects]:
    """The images with at least one object of dataset `name` ('COCO' or 'ImageMasks') in order
    (ImageMasks: sorted stems; COCO: the JSON's image order); logs the skip counts at the end and
    raises if no object is left."""
    skipped = Skipped(name, root)
    reader = _coco if name == "COCO" else _image_masks
    images = objects = 0
    for item in reader(root, options, skipped):
        images += 1
        objects += len(item.masks)
        yield item
    kept = f"{images} images, {objects} objects"
    skipped.log(kept)
    if not objects:
        raise ValueError(f"{name}: {root} holds no usable object ({kept}; skipped: "
                         f"{dict(skipped.counts) or 'nothing'}); expected "
                         f"{COCO_LAYOUT if name == 'COCO' else IMAGE_MASKS_LAYOUT}")


def _image_hw(data: bytes, path: pathlib.Path, dataset: str) -> tuple[int, int]:
    """(H, W) as cv2 decodes the image, after decoding it fully once (a truncated or corrupt
    file raises here, naming it, instead of in a training run)."""
    hw = fd.cv2_image_hw(data, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Image.DecompressionBombError:  # beyond PIL's limit: OpenCV's decode is the check
        fd.cv2_decode(data, path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{dataset}: cannot decode image {path}: {e}") from e
    return hw


def _keep_objects(masks, where: str, options: CustomOptions, skipped: Skipped):
    """Drops empty and too-small masks (counted)."""
    kept = []
    for k, mask in masks:
        area = int(np.count_nonzero(mask))
        if area == 0:
            skipped.add("empty objects", f"{where} {k}")
        elif area < options.min_annotation_area:
            skipped.add(f"objects under min_annotation_area={options.min_annotation_area}", f"{where} {k}")
        else:
            kept.append(mask)
    return kept


# ------------------------------------------------------------------------------------ ImageMasks
def _read_mask(path: pathlib.Path, instances: bool) -> np.ndarray:
    """int32 [H,W] values of a mask PNG (palette indices for palette PNGs; the maximum over the
    colour channels of an RGB mask, refused for instance maps)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.array(im)
    except OSError as e:
        raise ValueError(f"ImageMasks: cannot read mask {path}: {e}") from e
    if array.ndim == 3:
        if instances:
            raise ValueError(f"ImageMasks: instance-label mask {path} is {mode} with "
                             f"{array.shape[2]} channels; expected a single-channel (grey or "
                             "palette) PNG of object ids")
        array = array[..., :3].max(axis=2) if mode != "LA" else array[..., 0]
    return array.astype(np.int32)


def _image_masks(root: pathlib.Path, options: CustomOptions, skipped: Skipped) -> Iterator[ImageObjects]:
    image_dir = fd.require_dir(root / "images", "ImageMasks", IMAGE_MASKS_LAYOUT)
    mask_dir = fd.require_dir(root / "masks", "ImageMasks", IMAGE_MASKS_LAYOUT)
    images: dict[str, pathlib.Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.stem in images:
            raise fd.LayoutError(f"ImageMasks: duplicate image stem {p.stem!r}: {images[p.stem]} "
                                 f"and {p}")
        images[p.stem] = p
    if not images:
        raise fd.LayoutError(f"ImageMasks: expected {IMAGE_MASKS_LAYOUT}; no images in {image_dir}")
    whole: dict[str, pathlib.Path] = {}
    per_object: dict[str, list[tuple[int, pathlib.Path]]] = collections.defaultdict(list)
    for p in sorted(mask_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() != ".png":
            raise fd.LayoutError(f"ImageMasks: mask {p} is not a .png (expected {IMAGE_MASKS_LAYOUT})")
        match = _OBJECT_FILE.match(p.stem)
        if p.stem in images:
            whole[p.stem] = p
        elif match and match.group(1) in images:
            per_object[match.group(1)].append((int(match.group(2)), p))
        else:
            raise fd.LayoutError(f"ImageMasks: mask {p} has no image {image_dir}/{p.stem}.* "
                                 f"(expected {IMAGE_MASKS_LAYOUT})")
    instances = options.mask_mode == "instances"
    for stem, image_path in images.items():
        files = sorted(per_object.get(stem, []))
        if stem in whole and files:
            raise fd.LayoutError(f"ImageMasks: image {image_path} has both {whole[stem]} and "
                                 f"per-object masks ({files[0][1].name}, ...); keep one form")
        if stem not in whole and not files:
            skipped.add("images without a mask file", image_path.name)
            continue
        data = image_path.read_bytes()
        image_hw = _image_hw(data, image_path, "ImageMasks")
        ignore = np.zeros(image_hw, bool)
        masks = []
        for k, path in files or [(None, whole[stem])]:
            values = _read_mask(path, instances and k is None)
            fd.check_same_hw(values.shape, image_hw, path, image_path)
            if options.ignore_value >= 0:
                ignore |= values == options.ignore_value
                values = np.where(values == options.ignore_value, 0, values)
            if k is None and instances:
                ids = np.unique(values)
                masks += [(f"id {i}", values == i) for i in ids[ids != 0]]
            else:
                masks.append((path.name if k is not None else "object", values != 0))
        kept = _keep_objects(masks, image_path.name, options, skipped)
        if not kept:
            skipped.add("images without objects", image_path.name)
            continue
        yield ImageObjects(stem, image_path, data, kept, ignore)


# ------------------------------------------------------------------------------------------ COCO
def _coco_json(path: pathlib.Path) -> dict:
    try:
        coco = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"COCO: cannot read {path} as JSON: {e}") from e
    if not isinstance(coco, dict):
        raise ValueError(f"COCO: {path} holds a {type(coco).__name__}, expected an object with "
                         "'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"COCO: {path} has no {key!r} list (expected {COCO_LAYOUT})")
    return coco


def _category_filter(coco: dict, path: pathlib.Path, wanted: tuple) -> set[int]:
    """Ids of the categories to keep (all when `wanted` is empty); unknown names/ids raise."""
    by_id, by_name = {}, {}
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            raise ValueError(f"COCO: {path}: category {c!r} has no 'id'")
        by_id[c["id"]] = c
        by_name[str(c.get("name"))] = c["id"]
    if not wanted:
        return set(by_id)
    keep = set()
    for w in wanted:
        if w in by_name:
            keep.add(by_name[w])
        elif isinstance(w, (int, np.integer)) and int(w) in by_id:
            keep.add(int(w))
        elif isinstance(w, str) and w.isdigit() and int(w) in by_id:
            keep.add(int(w))
        else:
            raise ValueError(f"COCO: data.categories names unknown category {w!r}; {path} has "
                             f"{sorted(by_name)[:20]}{' ...' if len(by_name) > 20 else ''}")
    return keep


def _find_image(folder: pathlib.Path, file_name: str, image_id) -> pathlib.Path:
    tried = [folder / file_name, folder / "images" / file_name]
    for p in tried:
        if p.is_file():
            return p
    raise fd.LayoutError(f"COCO: image id {image_id!r} file_name {file_name!r}: missing, looked "
                         f"for {tried[0]} and {tried[1]}")


def _compressed_rle_total(counts: bytes, where: str) -> int:
    """Sum of the run lengths of a COCO compressed RLE string (pycocotools' `rleFrString` format:
    6-bit groups offset by 48, runs after the second delta-coded); raises on a malformed string.
    (pycocotools decodes a string that covers too few pixels into uninitialised memory.)"""
    runs: list[int] = []
    pos = 0
    try:
        while pos < len(counts):
            value, shift, more = 0, 0, True
            while more:
                c = counts[pos] - 48
                if not 0 <= c < 64:
                    raise ValueError(f"byte {counts[pos]!r} at {pos}")
                value |= (c & 0x1F) << shift
                more = bool(c & 0x20)
                pos += 1
                shift += 5
                if not more and c & 0x10:
                    value |= -1 << shift
            if len(runs) > 2:
                value += runs[-2]
            if value < 0:
                raise ValueError(f"negative run length {value}")
            runs.append(value)
    except (IndexError, ValueError) as e:
        raise ValueError(f"COCO: {where}: malformed compressed RLE counts ({e})") from None
    return sum(runs)


def _rle(segm, h: int, w: int, where: str, skipped: Skipped):
    """pycocotools RLE of one annotation's segmentation, or None if it is skipped (counted)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, dict):
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or "counts" not in segm:
            raise ValueError(f"COCO: {where}: RLE segmentation needs 'size' [h, w] and 'counts'")
        if [int(size[0]), int(size[1])] != [h, w]:
            raise ValueError(f"COCO: {where}: RLE size {list(size)} differs from its image's "
                             f"[height, width] {[h, w]}")
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise ValueError(f"COCO: {where}: uncompressed RLE counts must be integers >= 0")
            if sum(counts) != h * w:
                raise ValueError(f"COCO: {where}: uncompressed RLE counts sum to {sum(counts)}, "
                                 f"expected height*width = {h * w}")
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, str):
            counts = counts.encode()
        if not isinstance(counts, bytes):
            raise ValueError(f"COCO: {where}: RLE counts must be a list or a string")
        total = _compressed_rle_total(counts, where)
        if total != h * w:
            raise ValueError(f"COCO: {where}: compressed RLE covers {total} pixels, expected "
                             f"height*width = {h * w}")
        return {"size": [h, w], "counts": counts}
    if not isinstance(segm, list) or not segm:
        skipped.add("annotations without a segmentation", where)
        return None
    polygons = []
    for poly in segm:
        try:
            coords = np.asarray(poly, np.float64).ravel() if isinstance(poly, list) else None
        except (ValueError, TypeError):
            coords = None
        if coords is None or not np.isfinite(coords).all():
            skipped.add("malformed polygons (not a list of numbers)", where)
            continue
        if coords.size < 6 or coords.size % 2:
            skipped.add("polygons with fewer than 3 points", where)
            continue
        xs, ys = coords[0::2], coords[1::2]
        if xs.min() < 0 or ys.min() < 0 or xs.max() > w or ys.max() > h:
            skipped.add("polygons reaching outside the image (clipped)", where)
        polygons.append(coords.tolist())
    if not polygons:
        skipped.add("annotations without a usable polygon", where)
        return None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))


def _coco(path: pathlib.Path, options: CustomOptions, skipped: Skipped) -> Iterator[ImageObjects]:
    from pycocotools import mask as mask_utils

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise fd.LayoutError(f"COCO: annotation file {path} {what} (expected {COCO_LAYOUT})")
    coco = _coco_json(path)
    keep_categories = _category_filter(coco, path, options.categories)
    known_categories = {c["id"] for c in coco["categories"]}
    images, names = {}, {}
    for info in coco["images"]:
        if not isinstance(info, dict) or "id" not in info or not isinstance(info.get("file_name"), str):
            raise ValueError(f"COCO: {path}: image entry {info!r} needs 'id' and 'file_name'")
        if info["id"] in images:
            raise ValueError(f"COCO: {path}: duplicate image id {info['id']!r}")
        if info["file_name"] in names:
            raise ValueError(f"COCO: {path}: duplicate file_name {info['file_name']!r} (image ids "
                             f"{names[info['file_name']]!r} and {info['id']!r})")
        images[info["id"]] = info
        names[info["file_name"]] = info["id"]
    per_image = collections.defaultdict(list)
    for ann in coco["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"COCO: {path}: annotation {str(ann)[:200]} has no 'image_id'")
        ann_id = ann.get("id", "?")
        if ann.get("category_id") not in known_categories:
            raise ValueError(f"COCO: {path}: annotation id {ann_id!r} has unknown category_id "
                             f"{ann.get('category_id')!r} (categories: {sorted(known_categories)[:20]})")
        if ann["image_id"] not in images:
            skipped.add("annotations of unknown image ids", f"annotation {ann_id}")
            continue
        if ann["category_id"] not in keep_categories:
            skipped.add("annotations of other categories (data.categories)", f"annotation {ann_id}")
            continue
        per_image[ann["image_id"]].append(ann)
    folder = path.parent
    for image_id, info in images.items():
        anns = per_image.get(image_id, [])
        if not any(not a.get("iscrowd") for a in anns):
            skipped.add("images without objects", info["file_name"])
            continue
        image_path = _find_image(folder, info["file_name"], image_id)
        try:
            data = image_path.read_bytes()
        except OSError as e:
            raise ValueError(f"COCO: image id {image_id!r}: cannot read {image_path}: {e}") from e
        h, w = _image_hw(data, image_path, "COCO")
        if (info.get("height"), info.get("width")) not in ((h, w), (None, None)):
            raise ValueError(f"COCO: image id {image_id!r}: {image_path} is {h}x{w} (HxW) but the "
                             f"JSON says {info.get('height')}x{info.get('width')}")
        ignore = np.zeros((h, w), bool)
        masks = []
        for ann in anns:
            where = f"{path.name} annotation id {ann.get('id', '?')!r}"
            rle = _rle(ann.get("segmentation"), h, w, where, skipped)
            if rle is None:
                continue
            try:
                mask = mask_utils.decode(rle).astype(bool)
            except (ValueError, TypeError) as e:
                raise ValueError(f"COCO: {where}: cannot decode its RLE: {e}") from e
            if mask.ndim == 3:
                mask = mask.any(axis=2)
            if ann.get("iscrowd"):
                ignore |= mask
            else:
                masks.append((f"annotation {ann.get('id', '?')}", mask))
        kept = _keep_objects(masks, info["file_name"], options, skipped)
        if not kept:
            skipped.add("images without objects", info["file_name"])
            continue
        stem = str(pathlib.PurePosixPath(info["file_name"]).with_suffix(""))
        yield ImageObjects(stem, image_path, data, kept, ignore)


# --------------------------------------------------------------------------------------- records
def pack_layers(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Packs bool [H,W] masks into as few uint8 label layers as possible.

    Each mask goes to the first layer where it overlaps no earlier mask (and that has < 255
    labels), as the next label there. Returns (layers uint8 [H,W,L], objects int32 [K,2] rows
    (layer, label)) with `layers[..., l] == label` equal to the mask.
    """
    layers: list[np.ndarray] = []
    used: list[int] = []
    objects = []
    for mask in masks:
        for l, layer in enumerate(layers):
            if used[l] < 255 and not layer[mask].any():
                break
        else:
            layers.append(np.zeros(mask.shape, np.uint8))
            used.append(0)
            l = len(layers) - 1
        used[l] += 1
        layers[l][mask] = used[l]
        objects.append((l, used[l]))
    return np.stack(layers, axis=2), np.asarray(objects, np.int32).reshape(-1, 2)


def train_examples(name: str, root: pathlib.Path, options: CustomOptions) -> Iterator[dict]:
    """Train records (`builders` train_custom schema) of every image with objects."""
    from skipclick_jax.data.builders import pack_array

    for item in read_custom(name, root, options):
        layers, objects = pack_layers(item.masks)
        yield {
            "id": item.id,
            "image": item.data,
            "layers": pack_array(layers),
            "layers_shape": np.asarray(layers.shape, np.int32),
            "objects": objects,
            "parents": np.full(len(objects), -1, np.int32),
            "num_instance_masks": len(objects),
            "ignore": pack_array(item.ignore) if item.ignore.any() else b"",
        }


def eval_examples(name: str, root: pathlib.Path, options: CustomOptions) -> Iterator[dict]:
    """Eval records: one per object, gt 1 on it, -1 on the ignore regions outside it, else 0."""
    for item in read_custom(name, root, options):
        for k, mask in enumerate(item.masks):
            gt = np.where(mask, 1, np.where(item.ignore, -1, 0)).astype(np.int8)
            yield {"id": f"{item.id}#{k}", "image": item.data, "float_image": False, "gt": gt}


def cache_key(name: str, root: pathlib.Path, options: CustomOptions) -> tuple:
    """What determines a build's content: the resolved root, the fingerprint of the folder it is
    in (COCO: the JSON's folder, which holds the images) or of the root folder, and the options."""
    from skipclick_jax.data import builders

    folder = root.parent if name == "COCO" else root
    return (str(root), *builders.folder_key(folder), dataclasses.astuple(options))


def eval_dataset_names(data: Mapping) -> tuple[str, ...]:
    """`data.eval_datasets`, plus COCO / ImageMasks when `data.eval_roots` gives them a root."""
    names = tuple(data.get("eval_datasets", ()))
    roots = data.get("eval_roots", {}) or {}
    return names + tuple(n for n in CUSTOM_DATASETS if roots.get(n) and n not in names)


def require_root(name: str, root: pathlib.Path) -> None:
    """Checks, before any build, that a COCO root is a file and an ImageMasks root a folder."""
    if name == "COCO" and not root.is_file():
        what = "is a folder, not a file" if root.is_dir() else "does not exist"
        raise fd.LayoutError(f"COCO: annotation file {root} {what} (expected {COCO_LAYOUT})")
    if name == "ImageMasks" and not root.is_dir():
        raise fd.LayoutError(f"ImageMasks: dataset root folder {root} does not exist (expected "
                             f"{IMAGE_MASKS_LAYOUT})")


def custom_data_defaults(data: Mapping | None):
    """A copy of a `data` config section with the `CustomOptions` keys it lacks set to their
    defaults (configs saved before these keys existed), as an `ml_collections.ConfigDict`."""
    import ml_collections

    out = ml_collections.ConfigDict(dict(data or {}))
    for f in dataclasses.fields(CustomOptions):
        if f.name not in out:
            out[f.name] = f.default
    return out
