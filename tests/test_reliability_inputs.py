"""Reliability, in-process: project checkpoints verified by digests (corrupted, truncated, deleted
files), config files and values refused naming the key, images of the wrong dtype or range refused,
hostile `.pth` tensors refused before anything is materialised, eval.py's argument checks."""

from __future__ import annotations

import json
import pathlib
import struct
import zipfile

import numpy as np
import pytest

from skipclick_jax import checkpoint, config_lib
from skipclick_jax.images import as_float_image
from skipclick_jax.weights import CheckpointError
from tests.helpers import ROOT, small_model_config


@pytest.fixture(scope="module")
def small_model():
    from skipclick_jax.model import build_model

    return build_model(small_model_config().model, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_model):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(path, small_model, small_model_config())
    return path


def _copy(saved, tmp_path) -> pathlib.Path:
    import shutil

    return pathlib.Path(shutil.copytree(saved, tmp_path / "copy"))


def _largest(path: pathlib.Path) -> pathlib.Path:
    return max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- checkpoint digests
def test_saved_checkpoint_records_every_file_and_loads(saved):
    table = json.loads((saved / checkpoint.DIGESTS).read_text())
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert set(table) == files - {checkpoint.DIGESTS} and "config.json" in table
    model, cfg = checkpoint.load(saved)
    assert cfg.model.backbone.depth == 4


@pytest.mark.parametrize("where", [0.0, 0.5, 0.97])
def test_overwritten_array_bytes_are_detected(saved, tmp_path, where):
    """Random bytes inside the array data (start, middle, end), size unchanged."""
    path = _copy(saved, tmp_path)
    target = _largest(path)
    data = bytearray(target.read_bytes())
    at = int(where * (len(data) - 16))
    data[at:at + 16] = bytes((b + 1) % 256 for b in data[at:at + 16])
    target.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{target.name}.*differs from the SHA-256"):
        checkpoint.load(path)


def test_truncated_and_deleted_files_are_detected(saved, tmp_path):
    path = _copy(saved, tmp_path)
    target = _largest(path)
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{target.name}: checkpoint file is 100 bytes"):
        checkpoint.load(path)
    path2 = pathlib.Path(tmp_path / "second")
    import shutil

    shutil.copytree(saved, path2)
    (path2 / "params" / "_METADATA").unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"params/_METADATA: checkpoint file is missing"):
        checkpoint.load(path2)
    (path2 / checkpoint.DIGESTS).unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="SHA256SUMS.json is missing"):
        checkpoint.load(path2)


@pytest.mark.parametrize("content", ["", "{\"model\": {\"crop_", "\x00\x01binary"])
def test_corrupt_config_json_is_named(saved, tmp_path, content):
    path = _copy(saved, tmp_path)
    (path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.load(path)
    with pytest.raises(config_lib.ConfigError, match=r"config.json (is empty|is not valid JSON)"):
        config_lib.read_config_json(path / "config.json")


def test_save_refuses_to_overwrite_and_keeps_the_original(saved, small_model):
    before = (saved / checkpoint.DIGESTS).read_bytes()
    with pytest.raises(FileExistsError):
        checkpoint.save(saved, small_model, small_model_config())
    assert (saved / checkpoint.DIGESTS).read_bytes() == before


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("change, message", [
    (lambda c: c.train.update(batch_size=0), r"train.batch_size=0 is invalid: expected an integer >= 1"),
    (lambda c: c.train.update(keep_checkpoints=0), r"train.keep_checkpoints=0 is invalid"),
    (lambda c: c.train.update(log_every_steps=0), r"train.log_every_steps=0"),
    (lambda c: c.model.backbone.update(heads=5), r"model.backbone.heads=5 is invalid: the head count must divide model.backbone.dim=96"),
    (lambda c: c.model.stack.update(heads=7), r"model.stack.heads=7"),
    (lambda c: c.model.update(crop_size=57), r"model.crop_size=57 is invalid: expected a multiple of the patch size 14"),
    (lambda c: c.model.update(crop_size=-14), r"model.crop_size=-14"),
    (lambda c: c.model.backbone.update(taps=(0, 9)), r"model.backbone.taps=\(0, 9\)"),
    (lambda c: c.data.update(epoch_len=4), r"data.epoch_len=4 is invalid: must be at least train.batch_size=32"),
    (lambda c: c.data.update(eval_datasets=("GrabCat",)), r"'GrabCat' is not one of"),
    (lambda c: c.data.update(stuff_prob=1.5), r"data.stuff_prob=1.5"),
    (lambda c: c.train.update(batch_sise=8), r"unknown config key train.batch_sise"),
    (lambda c: c.data.synthetic.update(image_sise=(8, 8)), r"unknown config key data.synthetic.image_sise"),
    (lambda c: c.eval.update(max_clicks=0), r"eval.max_clicks=0"),
    (lambda c: c.eval.sizes.update(DAVIS=0), r"eval.sizes.DAVIS=0"),
])
def test_config_values_refused_naming_key_and_value(change, message):
    cfg = small_model_config()
    config_lib.validate_config(cfg)
    change(cfg)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_config(cfg)


def test_config_argument_suffix_works_everywhere():
    cfg = config_lib.load_config_file(ROOT / "configs" / "frozen.py:paper")
    assert tuple(cfg.model.backbone.taps) == (11,)
    assert tuple(config_lib.load_config_file(str(ROOT / "configs" / "frozen.py")).model.backbone.taps) == (2,)
    with pytest.raises(config_lib.ConfigError, match="frozen.py: get_config\\('nope'\\) failed"):
        config_lib.load_config_file(f"{ROOT}/configs/frozen.py:nope")


def test_config_diff_names_the_keys():
    a, b = small_model_config(), small_model_config()
    b.model.head.embed_dim = 32
    b.train.seed = 3
    assert config_lib.config_diff(a, b) == [("model.head.embed_dim", 64, 32), ("train.seed", 0, 3)]


# ----------------------------------------------------------------------------- images
def test_documented_images_pass_unchanged():
    u8 = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    np.testing.assert_array_equal(as_float_image(u8), u8.astype(np.float32) / np.float32(255))
    f = np.linspace(0, 1, 18, dtype=np.float64).reshape(2, 3, 3)
    out = as_float_image(f)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, f.astype(np.float32))


@pytest.mark.parametrize("image, message", [
    (np.full((4, 4, 3), 200.0, np.float32), r"values in \[200, 200\], expected 0..1; it looks like 0..255"),
    (np.full((4, 4, 3), 1000, np.uint16), r"dtype uint16.*image / 65535"),
    (np.full((4, 4, 3), 7, np.int32), r"dtype int32; expected uint8 in 0..255 or float in 0..1"),
    (np.ones((4, 4, 3), bool), r"dtype bool"),
    (np.full((4, 4, 3), -0.5, np.float32), r"values in \[-0.5, -0.5\]"),
    (np.zeros((0, 5, 3), np.uint8), r"is empty"),
    (np.zeros((4, 4), np.uint8), r"must be \[H, W, 3\]"),
])
def test_wrong_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        as_float_image(image)


def test_nan_and_inf_pixels_are_refused():
    image = np.zeros((4, 5, 3), np.float32)
    image[2, 3, 1] = np.nan
    image[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf values \(first at pixel \(0, 1\)\)"):
        as_float_image(image)


def test_predictor_and_engine_refuse_wrongly_scaled_images(small_model):
    from skipclick_jax.evaluation import protocol, scheduler
    from skipclick_jax.predictor import Predictor

    predictor = Predictor(small_model, size=56)
    with pytest.raises(ValueError, match="expected 0..1"):
        predictor.set_image(np.full((20, 30, 3), 128.0, np.float32))
    with pytest.raises(ValueError, match="dtype uint16"):
        predictor.set_image(np.zeros((20, 30, 3), np.uint16))
    sample = dict(id="x#0", image=np.full((8, 8, 3), 3.0), gt=np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match=r"sample 'x#0': image has values in \[3, 3\]"):
        scheduler.make_batch([sample], protocol.Protocol(size=28, max_clicks=1), (8, 8), 1)


# ----------------------------------------------------------------------------- hostile .pth files
def _pickle_pth(path: pathlib.Path, storage_numel: int, size, stride, storage_override: bytes | None = None,
                copies: int = 1) -> None:
    """A torch.save-layout zip, written by hand (no torch): {'w<i>': tensor(size, stride)} over one
    float32 storage '0' of `storage_numel` elements; `storage_override` replaces the storage
    persistent-id opcodes (e.g. by an int)."""

    def text(s: str) -> bytes:
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def ints(values) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    storage = storage_override or (b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0")
                                   + text("cpu") + b"J" + struct.pack("<i", storage_numel) + b"tQ")
    body = b""
    for i in range(copies):
        body += (text(f"w{i}") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"J\x00\x00\x00\x00"
                 + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"Rs")
    pkl = b"\x80\x02}" + body + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", np.zeros(storage_numel, np.float32).tobytes())


def test_handwritten_pth_reads(tmp_path):
    from skipclick_jax.weights.unpickler import load_pth

    _pickle_pth(tmp_path / "ok.pth", 6, (2, 3), (3, 1))
    sd = load_pth(tmp_path / "ok.pth")
    assert sd["w0"].shape == (2, 3) and sd["w0"].dtype == np.float32


@pytest.mark.parametrize("size, stride, message", [
    ((1 << 20, 1 << 20), (0, 0), r"declares 1099511627776 elements over a storage of 4 \(zero or overlapping strides"),
    ((1000,), (0,), r"declares 1000 elements over a storage of 4"),
    ((2, -1), (1, 1), r"non-negative"),
])
def test_zero_stride_and_oversized_tensors_are_refused(tmp_path, size, stride, message):
    from skipclick_jax.weights.unpickler import load_pth

    path = tmp_path / "bad.pth"
    _pickle_pth(path, 4, size, stride)
    with pytest.raises(CheckpointError, match=f"{path}: .*{message}"):
        load_pth(path)


def test_implausible_total_and_non_storage_are_refused(tmp_path):
    from skipclick_jax.weights.unpickler import load_pth

    path = tmp_path / "many.pth"
    _pickle_pth(path, 1 << 18, (1 << 18,), (1,), copies=40)  # 40 views of one 1 MiB storage
    with pytest.raises(CheckpointError, match=r"declare 40.0 MiB over 1.0 MiB of file; implausible"):
        load_pth(path)
    path = tmp_path / "int.pth"
    _pickle_pth(path, 4, (4,), (1,), storage_override=b"K\x07")
    with pytest.raises(CheckpointError, match=f"{path}: tensor rebuilt from a int where a storage is expected"):
        load_pth(path)
    text = tmp_path / "weights.npz"
    text.write_text("not an archive")
    with pytest.raises(CheckpointError, match=f"{text}: not a torch checkpoint"):
        checkpoint.load(text, small_model_config())


# ----------------------------------------------------------------------------- eval.py arguments
def test_eval_refuses_existing_results_and_repeated_datasets(tmp_path):
    from skipclick_jax.evaluation import cli as eval_cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    base = ["--checkpoint", "ck", "--dataset", "GrabCut=/d/gc", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        eval_cli._parse(base)
    assert e.value.code == 2
    args, _, _ = eval_cli._parse(base + ["--overwrite"])
    assert args.overwrite
    with pytest.raises(SystemExit):
        eval_cli._parse(base + ["--overwrite", "--dataset", "GrabCut=/d/other"])
    with pytest.raises(SystemExit):
        eval_cli._parse(base + ["--overwrite", "--dataset", "Grabcut=/d/x"])
    assert (out / "summary.json").read_text() == "{}"
    args, overrides, _ = eval_cli._parse(["--checkpoint", "ck", "--dataset", "Synthetic=", "--out",
                                          str(tmp_path / "new"), "--config", "configs/frozen.py:paper",
                                          "--config.eval.max_clicks=2"])
    assert args.config == "configs/frozen.py:paper" and overrides == [("eval.max_clicks", "2")]
    cfg = config_lib.base_config(config_lib.tiny_model_config())
    with pytest.raises(ValueError, match=r"--config.eval.max_clicks=two: not a valid int"):
        config_lib.override(cfg, "eval.max_clicks", "two")
