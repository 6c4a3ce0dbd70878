"""TFDS ArrayRecord builders for the eval and train record schemas (built without TensorFlow).

A dataset is built once from Python (never the `tfds` CLI) into
`<data_dir>/skipclick_{eval,train}/<config name>/<version>/` and read back as a random-access
`ArrayRecordDataSource`. The config name carries a digest of whatever determines the content
(the resolved root folder with the `folder_fingerprint` of its files, the split, the synthetic
config), so a different root, or a root whose files changed, gets its own build. Builds of one
config are serialised by a file lock, so concurrent processes build it once and share it.
Examples are written in generation order (shuffling disabled), so record i has index i.

Eval record (one per evaluated instance): 'index' int64, 'id' str '<image stem>#<instance>',
'image' the original file's bytes, 'float_image' bool (decode with PIL to float32 instead of
cv2 to uint8), 'gt' int8 [H,W] in {0, 1, -1}.
Train record (one per image): 'id' str, 'image' file bytes, 'layers' uint8 [H,W,L],
'objects' int32 [K,2] rows (layer, local id), 'parents' int32 [K] (-1 = root),
'num_instance_masks' int32 (objects with index >= it are stuff regions).
Custom train record (COCO / ImageMasks): a train record whose 'layers' are bytes, the uint8
[H,W,L] array compressed by `pack_array` (zlib level 1: decompresses 3x faster than TFDS' default
level, the largest cost of reading a record), 'layers_shape' int32 [3], and 'ignore' the bool
[H,W] ignore regions packed the same way (b'' when the image has none).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import pathlib
import re
import zlib
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/skipclick_jax/tfds")

_ZLIB = tfds.features.Encoding.ZLIB


def _raw_bytes():
    """Feature of one variable-length bytes string (an encoded image file, stored as is)."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """One dataset build: `examples()` yields the records of `split` in dataset order."""

    split: str = "val"
    examples: Callable[[], Iterable[dict]] | None = dataclasses.field(default=None, repr=False)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes `builder_config.examples()` as the single split `builder_config.split`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial schema."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code folder: these builders download nothing, so TFDS needs no checksums file
        beside the code (and its lookup would import the uninstalled `importlib_resources`)."""
        return None

    def _create_builder_config(self, builder_config, version):
        """Accepts the `SourceConfig` as given (TFDS would warn that it is not predefined)."""
        del version
        if not isinstance(builder_config, SourceConfig):
            raise TypeError(f"{type(self).__name__} needs a SourceConfig, got {builder_config!r}")
        return builder_config

    def _features(self) -> dict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(self._features())
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {self.builder_config.split: self._generate_examples()}

    def _generate_examples(self):
        for i, example in enumerate(self.builder_config.examples()):
            yield i, example


class SkipclickEval(_Builder):
    """Eval records (see the module docstring); 'index' is set to the position."""

    def _features(self) -> dict:
        return {
            "index": tfds.features.Scalar(np.int64),
            "id": tfds.features.Text(),
            "image": _raw_bytes(),
            "float_image": tfds.features.Scalar(np.bool_),
            "gt": tfds.features.Tensor(shape=(None, None), dtype=np.int8, encoding=_ZLIB),
        }

    def _generate_examples(self):
        for i, example in enumerate(self.builder_config.examples()):
            yield i, {**example, "index": i}


class SkipclickTrain(_Builder):
    """Train records (see the module docstring)."""

    def _features(self) -> dict:
        return {
            "id": tfds.features.Text(),
            "image": _raw_bytes(),
            "layers": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding=_ZLIB),
            "objects": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
            "parents": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "num_instance_masks": tfds.features.Scalar(np.int32),
        }


class SkipclickTrainCustom(SkipclickTrain):
    """Custom train records (COCO / ImageMasks, see the module docstring)."""

    def _features(self) -> dict:
        return {
            **super()._features(),
            "layers": _raw_bytes(),
            "layers_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
            "ignore": _raw_bytes(),
        }


def pack_array(array: np.ndarray) -> bytes:
    """zlib (level 1) of a uint8 array's C-order bytes; `unpack_array` inverts it."""
    return zlib.compress(np.ascontiguousarray(array, np.uint8).tobytes(), 1)


def unpack_array(data: bytes, shape, what: object) -> np.ndarray:
    """uint8 array of `shape` from `pack_array` bytes; raises naming `what` if they do not fit."""
    try:
        raw = zlib.decompress(data)
    except zlib.error as e:
        raise ValueError(f"{what}: corrupted array bytes ({e})") from e
    shape = tuple(int(x) for x in shape)
    if len(raw) != int(np.prod(shape)):
        raise ValueError(f"{what}: {len(raw)} bytes do not fit the shape {shape}")
    return np.frombuffer(raw, np.uint8).reshape(shape)


def config_name(name: str, split: str, *key: object) -> str:
    """TFDS config name '<name as [a-z0-9_]>-<split>-<12 hex digits of (name, split, *key)>'."""
    digest = hashlib.sha1(repr((name, split, *key)).encode()).hexdigest()[:12]
    return f"{re.sub('[^a-z0-9_]', '', name.lower())}-{split}-{digest}"


def folder_fingerprint(root: pathlib.Path) -> str:
    """SHA-1 of (relative path, size, mtime in ns) of every file below `root` (symlinks followed;
    unreadable entries count by name), so any added, removed, resized or rewritten file changes it."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
                entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
            except OSError:
                entries.append((os.path.relpath(path, root), -1, -1))
    return hashlib.sha1(repr(entries).encode()).hexdigest()


def folder_key(path: pathlib.Path) -> tuple[str, str]:
    """The cache key of a dataset folder: (resolved path, `folder_fingerprint`)."""
    return str(path), folder_fingerprint(path) if path.is_dir() else "missing"


def resolve_root(root: str | os.PathLike | None, dataset: str) -> pathlib.Path:
    """`root` made absolute with symlinks resolved (with `folder_fingerprint`, the cache key; the
    files are only read when that build does not exist yet)."""
    if root is None or str(root) == "":
        raise ValueError(f"{dataset}: a dataset root folder is required")
    return pathlib.Path(root).expanduser().resolve()


def build_source(
    kind: str,
    config_name: str,
    split: str,
    examples: Callable[[], Iterable[dict]],
    data_dir: str | os.PathLike | None = None,
):
    """Builds (first call only) and opens one split as an `ArrayRecordDataSource`.

    data_dir None or '' means `DEFAULT_DATA_DIR`.
    kind: 'eval', 'train' or 'train_custom'. config_name: unique to the content (see `config_name`).
    examples: called only when the build does not exist yet.
    """
    builder_cls = {"eval": SkipclickEval, "train": SkipclickTrain,
                   "train_custom": SkipclickTrainCustom}[kind]
    data_dir = pathlib.Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".{kind}-{config_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds the build done
        builder = builder_cls(
            config=SourceConfig(name=config_name, split=split, examples=examples),
            data_dir=str(data_dir),
            file_format="array_record",
        )
        builder.download_and_prepare()
    return builder.as_data_source(split)
