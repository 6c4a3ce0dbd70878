"""Where runs, checkpoints and datasets live: a local disk or Google Cloud Storage (`gs://`).

Every path the project reads or writes goes through `as_path`: a `pathlib.Path` on a local disk
(behaviour unchanged), an `etils.epath.Path` (gcsfs) for gs://. Object storage has no appends,
no atomic renames of folders and no `flock`; the helpers here give the few operations the
project needs one meaning on both:

  write_atomic(path, data)       complete or absent (local: written beside, renamed; gs://: one
                                 object upload, which is atomic)
  list_files(root)               relative paths of every file below root (epath cannot `rglob`
                                 on gs://)
  copy_tree(src, dst, last=...)  recursive copy between any two places, `last` names copied last
  staged_output(path)            a local folder to fill, copied to a gs:// path when it closes
  local_file(path)               a local copy of a gs:// input file
  create_only(path, data)        create an object only if absent (gs:// `ifGenerationMatch=0`)
  check_access(path, write=...)  named, early errors for a missing bucket, missing credentials
                                 or denied access (`StorageError`)

gs:// needs `gcsfs` (`pip install 'skipclick-jax[gcs]'`) and Google credentials (Application
Default Credentials: a TPU/GCE VM's service account, `gcloud auth application-default login`,
or GOOGLE_APPLICATION_CREDENTIALS). STORAGE_EMULATOR_HOST points every client at a GCS API
emulator (the tests use fake-gcs-server).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator

from etils import epath

from skipclick_jax.atomic import atomic_write

__all__ = ["StorageError", "as_path", "is_remote", "write_atomic", "list_files", "copy_tree",
           "staged_output", "local_file", "create_only", "delete_if_generation", "generation",
           "check_access", "remove_tree", "move_tree"]

REMOTE_PREFIX = "gs://"


class StorageError(OSError):
    """A storage location cannot be used: missing bucket, missing credentials, access denied."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for gs:// paths."""
    return os.fspath(path).startswith(REMOTE_PREFIX)


def as_path(path: str | os.PathLike) -> pathlib.Path | epath.Path:
    """gs:// paths as an epath.Path; a local path as a pathlib.Path, ~ expanded, made absolute."""
    text = os.fspath(path)
    if is_remote(text):
        _require_gcsfs(text)
        return epath.Path(text)
    return pathlib.Path(text).expanduser().absolute()


def _require_gcsfs(path: str) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise StorageError(f"{path}: gs:// paths need gcsfs: pip install 'skipclick-jax[gcs]'") from None


def _fs():
    import fsspec

    return fsspec.filesystem("gs")


def _key(path) -> str:
    """'bucket/object' of a gs:// path (what gcsfs takes)."""
    return os.fspath(path)[len(REMOTE_PREFIX):].rstrip("/")


def bucket(path: str | os.PathLike) -> str:
    return _key(path).split("/", 1)[0]


def write_atomic(path: str | os.PathLike, data: bytes | str) -> pathlib.Path | epath.Path:
    """Writes `data` so that `path` is its old self or complete, never partial."""
    path = as_path(path)
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(data)  # one object upload: visible only once complete
        return path
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def list_files(root: str | os.PathLike) -> list[str]:
    """Sorted posix paths, relative to `root`, of every file below it (none if it is absent)."""
    root = as_path(root)
    if is_remote(root):
        prefix = _key(root) + "/"
        try:
            found = _fs().find(prefix, detail=True)
        except FileNotFoundError:
            return []
        return sorted(k[len(prefix):] for k, info in found.items()
                      if k.startswith(prefix) and info.get("type") != "directory" and not k.endswith("/"))
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in filenames]
    return sorted(out)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, last: Iterable[str] = ()) -> list[str]:
    """Copies every file below `src` to the same relative path below `dst` (either may be
    gs://); files whose name is in `last` are copied after all others (a reader that waits for
    them sees a complete tree). Returns the relative paths copied."""
    src, dst = as_path(src), as_path(dst)
    last = set(last)
    names = list_files(src)
    names = [n for n in names if n.rsplit("/", 1)[-1] not in last] + \
            [n for n in names if n.rsplit("/", 1)[-1] in last]
    for name in names:
        target = dst / name
        if is_remote(src) and not is_remote(dst):
            target.parent.mkdir(parents=True, exist_ok=True)
            _fs().get_file(_key(src / name), os.fspath(target))
        elif is_remote(dst) and not is_remote(src):
            _fs().put_file(os.fspath(src / name), _key(target))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_remote(src):
                _fs().copy(_key(src / name), _key(target))
            else:
                shutil.copyfile(src / name, target)
    return names


def remove_tree(path: str | os.PathLike) -> None:
    """Removes a folder (every object below a gs:// prefix); absent is fine."""
    path = as_path(path)
    if is_remote(path):
        names = list_files(path)
        if names:
            _fs().rm([_key(path / n) for n in names])
    elif path.exists():
        shutil.rmtree(path)


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames a folder (gs://: copies every object, then deletes the originals)."""
    src, dst = as_path(src), as_path(dst)
    if is_remote(src):
        copy_tree(src, dst)
        remove_tree(src)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_output(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields the folder to write `path`'s files into: `path` itself on a local disk; for gs://
    a local temporary folder whose files are copied up when the block ends without error
    (nothing is written to the bucket on error)."""
    path = as_path(path)
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="skipclick-stage-") as tmp:
        yield pathlib.Path(tmp)
        copy_tree(tmp, path)


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a local path holding `path`'s content (a gs:// object is downloaded first; a local
    `path` is yielded as given)."""
    if not is_remote(path):
        yield path
        return
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such object")
    with tempfile.TemporaryDirectory(prefix="skipclick-get-") as tmp:
        local = pathlib.Path(tmp) / path.name
        _fs().get_file(_key(path), os.fspath(local))
        yield local


def create_only(path: str | os.PathLike, data: bytes) -> int | None:
    """Creates the gs:// object `path` holding `data` if no object exists there (the server
    checks: `ifGenerationMatch=0`); returns its generation, or None when it already existed."""
    _require_gcsfs(os.fspath(path))
    fs = _fs()
    try:
        fs.pipe_file(_key(path), data, mode="create")
    except FileExistsError:
        return None
    return generation(path)


def generation(path: str | os.PathLike) -> int | None:
    """The generation of gs:// object `path` (None if absent)."""
    fs = _fs()
    fs.invalidate_cache(_key(path))  # the live object, not a listing's cached entry
    try:
        info = fs.info(_key(path))
    except FileNotFoundError:
        return None
    return int(info["generation"]) if info.get("generation") else None


def delete_if_generation(path: str | os.PathLike, gen: int) -> bool:
    """Deletes gs:// object `path` only if it is still generation `gen`; False if it changed."""
    fs = _fs()
    b, key = _key(path).split("/", 1)
    try:
        fs.call("DELETE", "b/{}/o/{}", b, key, ifGenerationMatch=str(gen))
    except (FileNotFoundError, FileExistsError):  # gone, or 412: another generation now
        return False
    finally:
        fs.invalidate_cache(_key(path))
    return True


def check_access(path: str | os.PathLike, *, write: bool,
                 what: str = "path") -> pathlib.Path | epath.Path:
    """Checks, before any work, that `path` can be read (and written: a probe object is created
    and removed) and returns it (`as_path`). Raises StorageError naming the bucket for a
    missing bucket, missing credentials or denied access. Local paths are returned unchecked."""
    path = as_path(path)
    if not is_remote(path):
        return path
    name = bucket(path)
    if not name:
        raise StorageError(f"{what} {path}: no bucket in the gs:// path")
    _check_credentials(path, what)
    fs = _fs()
    try:
        fs.info(name)
    except FileNotFoundError:
        raise StorageError(f"{what} {path}: bucket gs://{name} does not exist (create it with "
                           f"`gcloud storage buckets create gs://{name}` or fix the path)") from None
    except Exception as e:  # noqa: BLE001 - gcsfs raises HttpError/OSError/aiohttp errors
        raise _named(e, path, what) from None
    if write:
        probe = path / f".write_probe_{uuid.uuid4().hex}"
        try:
            fs.pipe_file(_key(probe), b"")
            fs.rm_file(_key(probe))
        except Exception as e:  # noqa: BLE001
            raise _named(e, path, what, writing=True) from None
    return path


def _check_credentials(path, what: str) -> None:
    """Missing Application Default Credentials, named (gcsfs would silently go anonymous)."""
    if os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("FSSPEC_GCS_TOKEN"):
        return
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:
        return
    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        raise StorageError(
            f"{what} {path}: no Google Cloud credentials ({e}). On a TPU/GCE VM the VM's service "
            "account is used; elsewhere run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None


def _named(e: Exception, path, what: str, writing: bool = False) -> StorageError:
    text = str(e)
    code = getattr(e, "code", None)
    verb = "write to" if writing else "read"
    if (isinstance(e, PermissionError) or code in (401, 403) or text.startswith("Forbidden")
            or "403" in text or "401" in text):  # gcsfs: 403 -> OSError('Forbidden: ...')
        return StorageError(f"{what} {path}: permission denied to {verb} gs://{bucket(path)} "
                            f"({type(e).__name__}: {text[:300]}); grant the account "
                            "roles/storage.objectAdmin (read-only: objectViewer) on the bucket")
    return StorageError(f"{what} {path}: cannot {verb} gs://{bucket(path)} "
                        f"({type(e).__name__}: {text[:300]})")
