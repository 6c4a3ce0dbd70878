"""Process-level JAX settings shared by the command-line tools and the tests."""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform

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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def has_glibc() -> bool:
    """Whether this process runs on Linux with glibc (what `reuse_large_buffers` tunes)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_large_buffers() -> bool:
    """Makes glibc keep freed blocks of up to 64 MiB for reuse instead of unmapping them, for this
    process (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB); True if applied.

    XLA:CPU allocates each execution's buffers anew. glibc maps any block above its mmap
    threshold (at most 32 MiB) freshly and unmaps it on free, so every call of a jitted function
    with large temporaries page-faults them in again (a ViT-B block at 448 has 51 MiB of attention
    scores). The SkipClick encode and per-click decode get ~1.2x faster on CPU for ~100 MiB more
    resident heap (docs/performance.md#quick-response; bench/model_speed.py --no-reuse-buffers compares).
    Blocks above 64 MiB allocated by worker threads are still mapped per call (glibc's per-thread
    heaps are at most 64 MiB). A no-op returning False where the C library is not glibc.
    """
    if not has_glibc():
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


def versions_line() -> str:
    """One line naming the stack a measured figure comes from, e.g. for benchmark headers:
    'python 3.12.1, jax 0.12.0.1, jaxlib 0.12.0.1, flax 0.12.12, backend cpu (1 device)'."""
    import platform

    import flax
    import jaxlib

    return (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"flax {flax.__version__}, backend {jax.default_backend()} ({jax.device_count()} device(s))")


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's memory estimate of a `jax.jit(f).lower(...).compile()` result, in bytes, read the same
    way on every supported jax: argument, output, temp, alias, generated_code, and peak
    (argument + output + temp - alias; XLA's own `peak_memory_in_bytes` is kept as xla_peak
    where the backend fills it in, 0 otherwise)."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # one entry per device on some versions
        stats = stats[0]
    out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    out["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return out
