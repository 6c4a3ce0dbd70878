"""Shared fixtures. Tests run on CPU; parity tests use float32 matmuls at 'highest' precision."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skipclick_jax.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


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
