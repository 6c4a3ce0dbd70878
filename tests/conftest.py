"""Shared fixtures. Tests run on CPU; parity tests use float32 matmuls at 'highest' precision.

The suite runs in pytest-xdist workers, a module per worker (`--dist loadfile`: module fixtures
such as trained checkpoints are built once).

Tests that need PyTorch or timm (the `torch` extra, Python 3.11 only) start with
`pytest.importorskip("torch")` / `("timm")`, so without the extra they are skipped with the
reason. With SKIPCLICK_REQUIRE_TORCH=1 (`.ci/run`'s Python 3.11 leg) a missing torch/timm is a
usage error and any torch/timm skip fails the run, so a suite without its parity tests cannot
look green.
"""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipclick_jax.runtime import enable_compilation_cache, versions_line  # noqa: E402

enable_compilation_cache()

TORCH_MODULES = ("torch", "timm")
REQUIRE_TORCH = os.environ.get("SKIPCLICK_REQUIRE_TORCH") == "1"
_torch_skips: list[str] = []


def _missing_torch_modules() -> list[str]:
    return [m for m in TORCH_MODULES if importlib.util.find_spec(m) is None]


def pytest_configure(config):
    missing = _missing_torch_modules()
    if REQUIRE_TORCH and missing:
        raise pytest.UsageError(f"SKIPCLICK_REQUIRE_TORCH=1 but {', '.join(missing)} cannot be imported: "
                                f"install the torch extra (Python 3.11: pip install -e '.[torch]')")


def pytest_xdist_auto_num_workers(config):
    """Workers for `-n auto` (the default, see pyproject's addopts; `-n 0` runs in one process):
    one per core, at most 4 and one per 6 GiB of memory, since each compiles SkipClick graphs and
    some tests start training subprocesses."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(os.cpu_count() or 1, 4, int(memory_gib // 6)))


def pytest_report_header(config):
    missing = _missing_torch_modules()
    torch_line = (f"torch extra: missing {', '.join(missing)}; tests that need it are skipped"
                  if missing else "torch extra: installed")
    return [versions_line(), torch_line + (" (required: SKIPCLICK_REQUIRE_TORCH=1)" if REQUIRE_TORCH else "")]


def _note_torch_skip(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(f"'{m}'" in reason or f"No module named '{m}" in reason for m in TORCH_MODULES):
            _torch_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    _note_torch_skip(report)


def pytest_runtest_logreport(report):
    _note_torch_skip(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if REQUIRE_TORCH and _torch_skips:
        terminalreporter.section("torch required but skipped", red=True)
        for line in _torch_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_TORCH and _torch_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_config():
    from skipclick_jax import config_lib

    return config_lib.tiny_model_config()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from skipclick_jax.model import build_model

    return build_model(tiny_config, seed=0)


@pytest.fixture
def on_cpu():
    """CPU as the default device for the test: bit-exact and measured-tolerance assertions are
    CPU facts (other backends may fuse, use TF32 or reorder reductions)."""
    import jax

    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1 (tests/gcs_server.py: in-memory, free port, stopped by its
    PID) for the `gcs` tests. Its `.env` points jax/orbax/gcsfs/array_record at it: pass it to the
    subprocesses that run the code under test (they must see it before those libraries import)."""
    import gcs_server as server_module

    with server_module.serve() as server:
        yield server
