"""Files and directories that appear complete or not at all: written beside their final path,
then renamed over it (a rename within one filesystem is atomic)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """Calls `write(tmp)` for a new file `tmp` beside `path` ('.<name>.<pid>.tmp'), then renames it
    to `path`; on any error `tmp` is removed and `path` is left as it was. Returns `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() creates files (some writers make them 0600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux): os.umask
    can only set it, which would briefly give other threads' new files the mask 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """`path.write_text(text)` through `atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a new directory beside `path` to fill; when the block ends without error it takes
    `path`'s place (an existing `path` is moved aside first and removed only after), so `path` is
    always either its old self or complete. On error the new directory is removed, `path` untouched."""
    path = pathlib.Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)
    old = None
    try:
        yield tmp
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
