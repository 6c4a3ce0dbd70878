"""Reading the original datasets' on-disk layouts (docs/design/formats.md#dataset-layouts): file pairing, decoding, checks.

Every failure raises with the dataset name, the file or folder at fault and the expected layout.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections.abc import Iterator

import cv2
import numpy as np
import scipy.io
from PIL import Image

# (name, image folder, mask folder) relative to the HQSeg-44k root, in the original's order.
HQSEG_SUBSETS = {
    "train": (
        ("DIS5K-TR", "DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt"),
        ("ThinObject5k-TR", "thin_object_detection/ThinObject5K/images_train",
         "thin_object_detection/ThinObject5K/masks_train"),
        ("FSS", "cascade_psp/fss_all", "cascade_psp/fss_all"),
        ("DUTS-TR", "cascade_psp/DUTS-TR", "cascade_psp/DUTS-TR"),
        ("DUTS-TE", "cascade_psp/DUTS-TE", "cascade_psp/DUTS-TE"),
        ("ECSSD", "cascade_psp/ecssd", "cascade_psp/ecssd"),
        ("MSRA10K", "cascade_psp/MSRA_10K", "cascade_psp/MSRA_10K"),
    ),
    "val": (
        ("DIS5K-VD", "DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt"),
        ("ThinObject5k-TE", "thin_object_detection/ThinObject5K/images_test",
         "thin_object_detection/ThinObject5K/masks_test"),
        ("COIFT", "thin_object_detection/COIFT/images", "thin_object_detection/COIFT/masks"),
        ("HRSOD", "thin_object_detection/HRSOD/images", "thin_object_detection/HRSOD/masks_max255"),
    ),
}
SBD_LAYOUT = "<root>/{split}.txt listing names, <root>/img/<name>.jpg and <root>/inst/<name>.mat"


class LayoutError(FileNotFoundError):
    """A dataset folder does not have the expected layout."""


def folder_examples(generate, root: pathlib.Path, dataset: str, *args):
    """Yields `generate(root, *args)` after checking that the dataset root folder exists."""
    if not root.is_dir():
        raise LayoutError(f"{dataset}: dataset root folder {root} does not exist")
    yield from generate(root, *args)


def require_dir(path: pathlib.Path, dataset: str, layout: str) -> pathlib.Path:
    if not path.is_dir():
        raise LayoutError(f"{dataset}: expected {layout}; missing folder {path}")
    return path


def require_file(path: pathlib.Path, dataset: str, layout: str) -> pathlib.Path:
    if not path.is_file():
        raise LayoutError(f"{dataset}: expected {layout}; missing file {path}")
    return path


def pair_images_masks(
    image_dir: pathlib.Path, mask_dir: pathlib.Path, dataset: str, layout: str,
    image_glob: str = "*.*", mask_glob: str = "*.*", first_dot: bool = True,
) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(image, mask) pairs in sorted image-name order, matched by name like the original loaders.

    With `first_dot`, image `a.b.jpg` matches the mask whose stem is `a` (GrabCut/Berkeley/DAVIS
    split at the first dot); otherwise the full stem `a.b` (HQSeg-44k). Raises if a folder is
    missing or has no images, an image has no mask, or a mask has no image.
    """
    require_dir(image_dir, dataset, layout)
    require_dir(mask_dir, dataset, layout)
    images = sorted(p for p in image_dir.glob(image_glob) if p.is_file())
    if not images:
        raise LayoutError(f"{dataset}: expected {layout}; no {image_glob} images in {image_dir}")
    masks: dict[str, pathlib.Path] = {}
    for p in sorted(q for q in mask_dir.glob(mask_glob) if q.is_file()):
        if p.stem in masks:
            raise LayoutError(f"{dataset}: two masks with stem {p.stem!r}: {masks[p.stem]} and {p}")
        masks[p.stem] = p
    pairs = []
    for image in images:
        mask = masks.pop(image.name.split(".")[0] if first_dot else image.stem, None)
        if mask is None:
            raise LayoutError(f"{dataset}: image {image} has no mask in {mask_dir} (expected {layout})")
        pairs.append((image, mask))
    if masks:
        raise LayoutError(
            f"{dataset}: mask {next(iter(masks.values()))} has no image in {image_dir} "
            f"(expected {layout})"
        )
    return pairs


def cv2_decode(data: bytes | np.ndarray, what: object, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """cv2.imdecode (same result as cv2.imread, EXIF orientation included); raises naming `what`."""
    array = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data, np.uint8)
    decoded = cv2.imdecode(array, flags) if array.size else None
    if decoded is None:
        raise ValueError(f"cannot decode image {what}")
    return decoded


def decode_rgb(data: bytes, what: object) -> np.ndarray:
    """uint8 [H,W,3] RGB from encoded image bytes (cv2 BGR decode, then BGR->RGB)."""
    return cv2.cvtColor(cv2_decode(data, what), cv2.COLOR_BGR2RGB)


def decode_float_rgb(data: bytes, what: object) -> np.ndarray:
    """float32 [H,W,3] in [0,1] the WSESeg/SHSeg way: PIL decode, /255 in float64, grey -> 3 channels."""
    try:
        image = np.array(Image.open(io.BytesIO(data))) / 255.0
    except OSError as e:
        raise ValueError(f"cannot decode image {what}: {e}") from e
    if image.ndim == 2:
        image = np.stack([image, image, image], axis=2)
    if image.shape[2] != 3:
        raise ValueError(f"image {what} has {image.shape[2]} channels, expected 1 or 3")
    return image.astype(np.float32)


def cv2_image_hw(data: bytes, what: object) -> tuple[int, int]:
    """(H, W) that cv2 decoding gives, read from the header (EXIF rotations swap the sides)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except OSError as e:
        raise ValueError(f"cannot read image {what}: {e}") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def check_same_hw(mask_hw: tuple[int, ...], image_hw: tuple[int, ...], mask_what, image_what) -> None:
    if tuple(mask_hw[:2]) != tuple(image_hw[:2]):
        raise ValueError(
            f"mask {mask_what} has size {tuple(mask_hw[:2])} but image {image_what} has "
            f"{tuple(image_hw[:2])}"
        )


def read_sbd_instances(path: pathlib.Path) -> np.ndarray:
    """int32 [H,W] instance-id map `GTinst.Segmentation` of an SBD `inst/<name>.mat`."""
    try:
        gtinst = scipy.io.loadmat(str(path))["GTinst"]
        return np.asarray(gtinst["Segmentation"][0, 0], np.int32)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"SBD: {path} has no GTinst.Segmentation struct field ({e})") from e


def read_sbd_split(root: pathlib.Path, split: str) -> Iterator[tuple[pathlib.Path, bytes, np.ndarray]]:
    """(image path, image file bytes, int32 [H,W] instance map) per name of `<root>/<split>.txt`."""
    layout = SBD_LAYOUT.format(split=split)
    for name in read_sbd_list(root, split, "SBD"):
        image_path = require_file(root / "img" / f"{name}.jpg", "SBD", layout)
        mat_path = require_file(root / "inst" / f"{name}.mat", "SBD", layout)
        data = image_path.read_bytes()
        instances = read_sbd_instances(mat_path)
        check_same_hw(instances.shape, cv2_image_hw(data, image_path), mat_path, image_path)
        yield image_path, data, instances


def read_sbd_list(root: pathlib.Path, split: str, dataset: str) -> list[str]:
    """Image names of `<root>/<split>.txt` in file order (blank lines skipped)."""
    path = require_file(root / f"{split}.txt", dataset, SBD_LAYOUT.format(split=split))
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class _ContainerUnpickler(pickle.Unpickler):
    """Unpickles builtin containers/scalars and numpy arrays only (RITM's COCO+LVIS pickles)."""

    _ALLOWED = {
        ("builtins", name) for name in
        ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
         "bytearray", "bool")
    } | {
        ("collections", "OrderedDict"), ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def load_container_pickle(path: pathlib.Path):
    """Loads a pickle of builtin containers and numpy arrays; any other global is refused."""
    try:
        with open(path, "rb") as f:
            return _ContainerUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read pickle {path}: {e}") from e
