"""skipclick_jax.runtime: the version header of benchmarks, XLA's memory estimate, read the
same way on every supported jax, and the reuse of large host buffers."""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import pytest

from skipclick_jax.runtime import compiled_memory, has_glibc, versions_line


def test_versions_line_names_the_stack():
    line = versions_line()
    assert f"jax {jax.__version__}," in line and f"flax {flax.__version__}," in line
    assert f"backend {jax.default_backend()}" in line


def test_compiled_memory_reads_argument_and_output_sizes():
    x = jnp.ones((64, 32), jnp.float32)
    mem = compiled_memory(jax.jit(lambda a: a @ a.T).lower(x).compile())
    assert mem["argument"] == 64 * 32 * 4
    assert mem["output"] == 64 * 64 * 4
    assert mem["peak"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert set(mem) == {"argument", "output", "temp", "alias", "generated_code", "peak", "xla_peak"}


def test_compiled_memory_counts_donated_aliases():
    x = jnp.ones((128,), jnp.float32)
    mem = compiled_memory(jax.jit(lambda a: a + 1, donate_argnums=0).lower(x).compile())
    assert mem["alias"] == 128 * 4


_PAGE_FAULTS = """
import resource, sys
import numpy as np
from skipclick_jax import runtime
applied = runtime.reuse_large_buffers() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(12 << 20, np.float32)  # 48 MiB: above glibc's largest mmap threshold
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not has_glibc(), reason="reuse_large_buffers changes glibc's malloc only")
def test_reuse_large_buffers_keeps_freed_blocks_mapped():
    """By default every 48 MiB block is mapped afresh and page-faulted in; after
    reuse_large_buffers the second and later ones reuse the first one's pages."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True,
                             check=True)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    applied, reused = run("reuse")
    not_applied, fresh = run("default")
    assert applied and not not_applied
    assert fresh > 100, fresh
    assert reused == 0, (reused, fresh)
