"""Importers and conversion CLIs under hostile or wrong input (issue #27): decompression bounded
by what the declared tensors can need (memory measured in a subprocess), clear errors naming the
file and key, NaN weights named, file modes and --out semantics. Torch-free."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from convert_weights import dump_stages
from convert_weights.convert import CONFIG_KEY, export_weights, import_weights, main
from skipclick_jax.config_lib import tiny_model_config
from skipclick_jax.weights import CheckpointError

ROOT = pathlib.Path(__file__).parents[1]
GIB = 1 << 30


def _bomb(path: pathlib.Path) -> None:
    """A ~1 MB torch-style zip whose DEFLATE-compressed data.pkl is one 1 GiB bytes literal."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("archive/data.pkl", "w", force_zip64=True) as f:
            f.write(b"\x80\x04\x8e" + GIB.to_bytes(8, "little"))  # PROTO 4, BINBYTES8 n
            chunk = bytes(16 << 20)
            for _ in range(GIB // len(chunk)):
                f.write(chunk)
            f.write(b".")  # STOP
        z.writestr("archive/byteorder", "little")


LOAD_SCRIPT = """
import json, sys
from skipclick_jax.weights import CheckpointError
from skipclick_jax.weights.unpickler import load_pth
try:
    load_pth(sys.argv[1])
    message = None
except CheckpointError as e:
    message = str(e)
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps(dict(message=message, peak_mb=int(peak.split()[1]) / 1024)))
"""


def test_deflate_bomb_refused_unread_at_low_memory(tmp_path):
    """Bound: 100 MiB peak RSS (VmHWM: this process only; getrusage would count the forking pytest)
    for the whole process, whose imports (Python, NumPy, ml_dtypes) take ~40 MiB here; reading
    the literal would need >= 1024 MiB more (the issue: 3.4 GB before the refusal)."""
    path = tmp_path / "bomb.pth"
    _bomb(path)
    assert path.stat().st_size < 8 << 20
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    assert m["message"] and "data.pkl declares 1,073,741," in m["message"] and "refused unread" in m["message"]
    assert str(path) in m["message"]
    assert m["peak_mb"] < 100, m


@pytest.fixture(scope="module")
def tiny_sd_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("sd") / "tiny.safetensors"
    export_weights(tiny_model, tiny_model_config(), path)
    return path


def _rewrite(src, dst, metadata=None, change=None):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if change:
        change(sd)
    save_file(sd, str(dst), metadata=meta if metadata is None else metadata)


def test_bad_embedded_config_names_file_and_key(tiny_sd_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite(tiny_sd_file, bad, metadata={CONFIG_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=f"{bad}: metadata key '{CONFIG_KEY}'"):
        import_weights(bad)


def test_nan_weights_warn_naming_tensors(tiny_sd_file, tmp_path):
    bad = tmp_path / "nan.safetensors"
    names = []

    def poison(sd):
        names.append(sorted(k for k, v in sd.items() if v.dtype == np.float32 and v.size > 1)[3])
        sd[names[0]] = sd[names[0]].copy()
        sd[names[0]].flat[0] = np.nan
    _rewrite(tiny_sd_file, bad, change=poison)
    with pytest.warns(UserWarning, match=f"1 tensor\\(s\\) hold NaN or inf values: {names[0]}"):
        import_weights(bad)


def test_wrong_format_is_a_clear_error(tiny_sd_file):
    with pytest.raises(CheckpointError, match="format 'hub' does not fit this file.*'state_dict'"):
        import_weights(tiny_sd_file, tiny_model_config(), fmt="hub")


def test_out_semantics_and_file_mode(tiny_sd_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tiny_sd_file), "--out", str(tmp_path / "x.bin")])
    assert "unsupported file type '.bin'" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()
    old = os.umask(0o022)
    try:
        assert main([str(tiny_sd_file), "--out", str(tmp_path / "y.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "y.safetensors").stat().st_mode) == 0o644


def test_dump_stages_inputs(tmp_path):
    text = tmp_path / "in.npz"
    text.write_text("image = 1\n")
    with pytest.raises(CheckpointError, match=f"{text}: not a .npz archive"):
        dump_stages.read_inputs(str(text))
    image, prev = np.zeros((28, 28, 3), np.uint8), np.zeros((28, 28), np.float32)
    for points, ok in [([[[3, 4, 0], [-1, -1, -1]]], True), ([[[1e9, 4, 0], [-1, -1, -1]]], False),
                       ([[[3, 28, 0], [-1, -1, -1]]], False), ([[[3, 4, 0], [np.nan, 1, 1]]], False)]:
        np.savez(tmp_path / "p.npz", image=image, prev_mask=prev, points=np.asarray(points, np.float32))
        if ok:
            dump_stages.read_inputs(str(tmp_path / "p.npz"))
        else:
            with pytest.raises(CheckpointError, match="points must be .* inside the 28x28 image"):
                dump_stages.read_inputs(str(tmp_path / "p.npz"))


def test_export_size_must_be_positive(tiny_model, tmp_path):
    from skipclick_jax.export import export

    for size in (0, -14):
        with pytest.raises(ValueError, match="positive multiple of the patch size"):
            export(tiny_model, tiny_model_config(), tmp_path / "e", size=size)
