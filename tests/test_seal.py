"""The way out for checkpoints without digests (issue #27): `python -m skipclick_jax.seal`."""

import pytest

from skipclick_jax import checkpoint
from skipclick_jax.config_lib import tiny_model_config
from skipclick_jax.seal import main


def test_seal_an_unsealed_checkpoint_after_confirmation(tiny_model, tmp_path, capsys, monkeypatch):
    path = tmp_path / "ckpt"
    checkpoint.save(path, tiny_model, tiny_model_config())
    (path / checkpoint.DIGESTS).unlink()  # as an old or foreign save
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"python -m skipclick_jax.seal {path}"):
        checkpoint.load(path)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main([str(path)]) == 2 and "not confirmed" in capsys.readouterr().err  # never silently
    assert not (path / checkpoint.DIGESTS).exists()
    assert main([str(path), "--yes"]) == 0
    checkpoint.load(path)  # loads now
    assert main([str(path)]) == 0 and "sealed already, and every file matches" in capsys.readouterr().out
    victim = next(p for p in path.rglob("*") if p.is_file() and p.name != checkpoint.DIGESTS)
    victim.write_bytes(victim.read_bytes() + b"x")
    assert main([str(path)]) == 1  # sealing never blesses a changed file afterwards
