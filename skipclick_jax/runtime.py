"""Process-level JAX settings shared by the command-line tools and the tests."""

from __future__ import annotations

import os
import pathlib

import jax


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Persists XLA compilations across runs (SkipClick's compiles take seconds to a minute on CPU).

    Location: `path`, else $SKIPCLICK_XLA_CACHE, else ~/.cache/skipclick-jax/xla.
    """
    path = pathlib.Path(path or os.environ.get("SKIPCLICK_XLA_CACHE")
                        or pathlib.Path.home() / ".cache" / "skipclick-jax" / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
