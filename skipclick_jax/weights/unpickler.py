"""Reads `torch.save` zip files into numpy without torch and without executing foreign code.

`load_pth(path)` returns the pickled object with every tensor as a read-only numpy array backed by
a memory map of the file (torch stores entries uncompressed). The unpickler resolves only the
globals these files need: tensor/parameter rebuild functions, `OrderedDict`, `set`, and any
`isegm.*` global, which becomes an inert `IsegmStub` (released checkpoints pickle an isegm
`CrossEntropyLoss` in their config). Anything else raises `ForbiddenGlobalError` naming it.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from skipclick_jax.weights import CheckpointError, ForbiddenGlobalError

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


# A state dict's tensors declare at most this many bytes per byte of file (shared/tied views).
MAX_DECLARED_RATIO = 4
# data.pkl holds keys, shapes and a small config, not data (tensors are separate zip entries):
# at most this much uncompressed, plus PICKLE_BYTES_PER_STORAGE per storage entry. A SkipClick
# ViT-B checkpoint's data.pkl is ~40 KB for ~300 storages; the bound is ~35 MiB for it.
PICKLE_BASE_BYTES = 16 << 20
PICKLE_BYTES_PER_STORAGE = 64 << 10


class IsegmStub:
    """Inert stand-in for an `isegm.*` class or function: records its arguments and state only."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"tensor {what} is {value!r}, expected a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """A read-only view of `storage`; refuses views that declare more elements than the storage
    holds (zero or overlapping strides), negative sizes/strides and out-of-range offsets."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__} where a storage is "
                              "expected")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise CheckpointError(f"tensor storage offset is {offset!r}, expected an integer")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor has size {size} and stride {stride}: expected equally many "
                              "non-negative entries")
    numel = int(np.prod(size, dtype=object))
    if numel > storage.size:
        raise CheckpointError(f"tensor of size {size} declares {numel} elements over a storage of "
                              f"{storage.size} (zero or overlapping strides {stride}); refused")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if offset < 0 or last >= storage.size:
        raise CheckpointError(f"tensor of size {size} at offset {offset} overruns its storage "
                              f"({storage.size} elements)")
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * item for s in stride], writeable=False)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for `data.pkl` of a torch zip checkpoint; storages come from `load_storage`."""

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage, self._source, self._stubs = load_storage, source, {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "isegm" or module.startswith("isegm."):
            key = (module, name)
            if key not in self._stubs:
                self._stubs[key] = type(name, (IsegmStub,), {"__module__": module})
            return self._stubs[key]
        raise ForbiddenGlobalError(
            f"{self._source}: pickle references forbidden global '{module}.{name}'; allowed are "
            f"torch tensor rebuilds, torch storages, OrderedDict, set and inert isegm.* stubs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _entry_offset(fh, info: zipfile.ZipInfo) -> int:
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"bad local zip header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_pth(path: str | pathlib.Path):
    """Loads a `torch.save` zip file; tensors become read-only numpy arrays (memory-mapped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            head = fh.read(2)
        kind = ("truncated or corrupt zip archive" if head == b"PK" else
                "a legacy (torch<1.6) or raw pickle file; re-save it with a recent torch"
                if head[:1] == b"\x80" else "not a torch checkpoint (no zip archive)")
        raise CheckpointError(f"{path}: {kind}") from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (no <archive>/data.pkl entry)")
        prefix = pkl[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        file_size = path.stat().st_size

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise CheckpointError(f"{path}: storage entry {name} is missing") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: storage entry {name} is compressed")
            dt = dtype.newbyteorder("<" if order == "little" else ">")
            if info.file_size != numel * dt.itemsize:
                raise CheckpointError(f"{path}: storage {name} holds {info.file_size} bytes, "
                                      f"expected {numel} x {dt}")
            with open(path, "rb") as fh:
                offset = _entry_offset(fh, info)
            if offset + info.file_size > file_size:
                raise CheckpointError(f"{path}: truncated (storage {name} ends past end of file)")
            if numel == 0:
                return np.zeros(0, dt)
            return np.memmap(path, dtype=dt, mode="r", offset=offset, shape=(numel,))

        storages = sum(1 for n in names if n.startswith(prefix + "data/"))
        limit = PICKLE_BASE_BYTES + PICKLE_BYTES_PER_STORAGE * storages
        declared = archive.getinfo(pkl[0]).file_size
        if declared > limit:  # before decompressing anything (zipfile reads no more than declared)
            raise CheckpointError(
                f"{path}: {pkl[0]} declares {declared:,} bytes uncompressed, over the {limit:,} that "
                f"the metadata of {storages} tensor storages can need; refused unread")
        with archive.open(pkl[0]) as fh:
            try:
                obj = RestrictedUnpickler(fh, load_storage, str(path)).load()
            except CheckpointError as err:
                if str(err).startswith(str(path)):
                    raise
                raise CheckpointError(f"{path}: {err}") from None
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                    IndexError, KeyError, zipfile.BadZipFile) as err:
                raise CheckpointError(f"{path}: corrupt pickle in {pkl[0]}: "
                                      f"{type(err).__name__}: {err}") from None
        _check_total(obj, path, file_size)
        return obj


def _check_total(obj, path: pathlib.Path, file_size: int) -> None:
    """Refuses a file whose tensors declare far more data than the file holds (views sharing one
    storage beyond what any real checkpoint does)."""
    total, stack, seen = 0, [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, np.ndarray):
            total += x.nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif isinstance(x, IsegmStub):
            stack.extend([getattr(x, "args", ()), getattr(x, "kwargs", {}), getattr(x, "state", None)])
    if total > MAX_DECLARED_RATIO * file_size + (1 << 20):
        raise CheckpointError(f"{path}: its tensors declare {total / 2**20:.1f} MiB over "
                              f"{file_size / 2**20:.1f} MiB of file; implausible for a checkpoint, "
                              "refused")
