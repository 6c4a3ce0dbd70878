"""skipclick_jax.runtime: the version header of benchmarks and XLA's memory estimate, read the
same way on every supported jax."""

import flax
import jax
import jax.numpy as jnp

from skipclick_jax.runtime import compiled_memory, versions_line


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
