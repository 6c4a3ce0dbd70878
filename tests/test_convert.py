"""convert_weights: file reading, key layout, import/export round trips and every bad input.

Released `.pth` files are imitated: {'state_dict', 'config'} with an isegm CrossEntropyLoss object
pickled in the config (the class lives in fake `isegm.*` modules only while saving).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skipclick_jax.weights import CheckpointError, ForbiddenGlobalError, mapping  # noqa: E402
from convert_weights.convert import export_weights, import_weights, main  # noqa: E402
from convert_weights.torch_reference import build_reference  # noqa: E402
from skipclick_jax.weights.unpickler import IsegmStub, load_pth  # noqa: E402
from skipclick_jax import checkpoint  # noqa: E402
from skipclick_jax.config_lib import model_config, tiny_model_config  # noqa: E402

LOSS_MODULE = "isegm.model.modeling.transformer_helper.cross_entropy_loss"
SPEC_KEYS = pathlib.Path(__file__).parent / "fixtures" / "skipclick_full_keys.txt"  # docs/design/formats.md#released-pth-files


def tiny(**changes):
    cfg = tiny_model_config()
    for path, value in changes.items():
        section, key = path.split("__")
        cfg[section][key] = value
    return cfg


VARIANTS = {  # every structural option at least once
    "skipclick": tiny(),
    "single_tap_x2": tiny(backbone__taps=(2,), neck__skip_connections=False, head__upsample="x2"),
    "intermediate_x4_depth3": tiny(neck__skip_connections=False, head__upsample="x4", stack__depth=3),
}


@contextlib.contextmanager
def fake_isegm():
    """Injects isegm.*.cross_entropy_loss with a CrossEntropyLoss nn.Module (for pickling only)."""
    parts, added = LOSS_MODULE.split("."), []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    mod = sys.modules[LOSS_MODULE]

    def cross_entropy(pred, label):
        return pred

    class CrossEntropyLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.use_sigmoid, self.loss_weight, self.cls_criterion = False, 1.0, cross_entropy

    for obj, name in ((cross_entropy, "cross_entropy"), (CrossEntropyLoss, "CrossEntropyLoss")):
        obj.__module__, obj.__qualname__ = LOSS_MODULE, name
        setattr(mod, name, obj)
    try:
        yield CrossEntropyLoss
    finally:
        for name in added:
            del sys.modules[name]


def released_entry(cfg, loss_cls):
    entry = mapping.released_config_entry(cfg)
    entry["params"]["head_params"]["value"]["loss_decode"] = loss_cls()
    return entry


def write_released(path, ref, cfg):
    with fake_isegm() as loss_cls:
        torch.save({"state_dict": ref.state_dict(), "config": released_entry(cfg, loss_cls)}, path)
    return path


@pytest.fixture(scope="module")
def ref():
    return build_reference(tiny(), seed=0)


@pytest.fixture(scope="module")
def released(ref, tmp_path_factory):
    return write_released(tmp_path_factory.mktemp("rel") / "skipclick.pth", ref, tiny())


def assert_same_state_dict(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def numpy_sd(sd):
    return {k: v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- layout
def test_full_layout_matches_original_checkpoint():
    layout = mapping.torch_layout(model_config())
    assert sum(int(np.prod(s)) for s in layout.values()) == 153_164_417
    single = model_config(taps=(2,), skip_connections=False, frozen=False)
    assert sum(int(np.prod(s)) for s in mapping.torch_layout(single).values()) == 126_589_505
    inter = model_config(skip_connections=False)
    assert sum(int(np.prod(s)) for s in mapping.torch_layout(inter).values()) == 128_949_569
    rows = [line.split("\t") for line in SPEC_KEYS.read_text().splitlines() if not line.startswith("#")]
    assert [(r[0], tuple(json.loads(r[1].replace("(", "[").replace(",)", "]").replace(")", "]"))))
            for r in rows] == list(layout.items())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_and_jax_tree_follow_layout(name):
    from flax import nnx

    from skipclick_jax.model import build_model

    cfg = VARIANTS[name]
    layout = mapping.torch_layout(cfg)
    ref_sd = build_reference(cfg, seed=None).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ref_sd.items()] == list(layout.items())
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param))
    zeros = {k: np.zeros(s, np.float32) for k, s in layout.items()}
    params = mapping.state_dict_to_params(zeros, cfg, name)
    shapes = lambda tree: [(k, tuple(v.shape)) for k, v in mapping.flatten(tree)]  # noqa: E731
    assert shapes(params) == shapes(abstract)


# ----------------------------------------------------------------------------- unpickler
def test_unpickler_reads_released_structure(released, ref):
    obj = load_pth(released)
    assert_same_state_dict(obj["state_dict"], numpy_sd(ref.state_dict()))
    loss = obj["config"]["params"]["head_params"]["value"]["loss_decode"]
    assert isinstance(loss, IsegmStub) and type(loss).__module__ == LOSS_MODULE
    criterion = loss.state["cls_criterion"]  # a pickled isegm function: an inert stub class
    assert isinstance(criterion, type) and issubclass(criterion, IsegmStub)
    assert LOSS_MODULE not in sys.modules


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w')",))


def test_forbidden_global_is_named_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": _Evil(marker)}, path)
    with pytest.raises(ForbiddenGlobalError, match=r"forbidden global .*\.exec'"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "text", "legacy", "list", "missing", "safetensors"])
def test_unreadable_files(kind, released, tmp_path):
    path = tmp_path / ("x.safetensors" if kind == "safetensors" else "x.pth")
    data = released.read_bytes()
    expected = {"truncated": "truncated", "text": "not a torch checkpoint", "legacy": "legacy",
                "list": "not a checkpoint", "missing": "no such file",
                "safetensors": "not a readable safetensors"}[kind]
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("hello")
    elif kind == "legacy":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif kind == "list":
        torch.save([torch.zeros(1)], path)
    elif kind == "safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=expected):
        import_weights(path, tiny())
    assert main([str(path), "--out", str(out), "--config", "configs/test_tiny.py"]) == 2
    assert not out.exists()


def test_storage_overrun_is_detected(released, tmp_path):
    """A zip whose storage entry is shorter than its tensors claim (edited archive)."""
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(released) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:4] if info.filename.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match="data/0"):
        load_pth(path)


# ----------------------------------------------------------------------------- import / export
def test_released_config_inferred(released):
    model, cfg, info = import_weights(released)
    assert info["format"] == "released"
    expected = tiny()
    expected.backbone.heads = cfg.backbone.heads  # not visible in shapes (dim / 64)
    assert cfg.to_dict() == expected.to_dict()


def test_released_variant_inferred(tmp_path):
    cfg = tiny(backbone__taps=(2,), neck__skip_connections=False, head__upsample="x4",
               stack__depth=3)
    path = write_released(tmp_path / "v.pth", build_reference(cfg, seed=1), cfg)
    _, inferred, _ = import_weights(path)
    inferred.backbone.heads = cfg.backbone.heads
    assert inferred.to_dict() == cfg.to_dict()


def test_round_trip_is_bit_exact(released, ref, tmp_path):
    model, cfg, _ = import_weights(released, tiny())
    original = numpy_sd(ref.state_dict())
    for suffix in (".pth", ".safetensors"):
        out = export_weights(model, cfg, tmp_path / f"back{suffix}")
        sd = import_weights(out)[0]  # embedded config, no --config needed
        assert_same_state_dict(mapping.params_to_state_dict(_pure(sd), cfg), original)
    back = torch.load(tmp_path / "back.pth", weights_only=True)  # no pickled objects left
    assert_same_state_dict(numpy_sd(back["state_dict"]), original)
    fresh = build_reference(tiny(), seed=None)
    fresh.load_state_dict(back["state_dict"], strict=True)
    saved = checkpoint.save(tmp_path / "ckpt", model, cfg)
    restored, restored_cfg = checkpoint.load(saved)
    assert restored_cfg.to_dict() == cfg.to_dict()
    assert_same_state_dict(mapping.params_to_state_dict(_pure(restored), cfg), original)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", "dir"])
def test_interrupted_conversion_leaves_no_partial_output(released, tmp_path, monkeypatch, suffix):
    """A write interrupted half way (KeyboardInterrupt after some bytes) leaves neither the output
    nor a temporary file, and an existing output stays as it was."""
    import orbax.checkpoint as ocp
    import safetensors.numpy

    def half_then_interrupt(obj, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out" / ("ckpt" if suffix == "dir" else f"model{suffix}")
    out.parent.mkdir()
    model, cfg, _ = import_weights(released, tiny())
    if suffix == ".pth":
        monkeypatch.setattr(torch, "save", half_then_interrupt)
    elif suffix == ".safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", lambda sd, path, **kw: half_then_interrupt(sd, path))
    else:  # once orbax has written the parameters
        finish = ocp.StandardCheckpointer.wait_until_finished
        monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished",
                            lambda self: (finish(self), interrupt()))
    with pytest.raises(KeyboardInterrupt):
        main([str(released), "--out", str(out)])
    assert list(out.parent.iterdir()) == []
    if suffix != "dir":  # an existing file is replaced only by a complete one
        out.write_bytes(b"old")
        with pytest.raises(KeyboardInterrupt):
            export_weights(model, cfg, out)
        assert out.read_bytes() == b"old" and list(out.parent.iterdir()) == [out]


def _pure(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_config_mismatch_names_key_and_shapes(released):
    expected = r"neck\.down_4\.0\.weight.*\(192, 96, 2, 2\) in the file.*\(96, 64, 2, 2\) in the model"
    with pytest.raises(CheckpointError, match=expected):
        import_weights(released, tiny(neck__skip_connections=False))


def test_config_entry_contradicting_shapes(ref, tmp_path):
    with fake_isegm() as loss_cls:
        entry = released_entry(tiny(), loss_cls)
        entry["params"]["skip_connections"]["value"] = False
        torch.save({"state_dict": ref.state_dict(), "config": entry}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="skip_connections = False contradicts"):
        import_weights(tmp_path / "bad.pth")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_and_unexpected_keys(change, ref, tmp_path):
    sd = dict(ref.state_dict())
    if change == "missing":
        del sd["head.conv_seg.bias"]
    else:
        sd["head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "sd.pth"
    torch.save(sd, path)
    key = "head.conv_seg.bias" if change == "missing" else "head.extra.weight"
    with pytest.raises(CheckpointError, match=rf"{change} keys: .*{key}"):
        import_weights(path, tiny())
    with pytest.raises(CheckpointError, match="needs a model config"):
        import_weights(path)


def test_hub_and_timm_files_give_identical_params(tmp_path):
    """The same DINOv2 weights as a hub file and as timm's own conversion of it."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    from convert_weights.convert import backbone_params, read_file
    from convert_weights.torch_reference import Dinov2Reg, randomize_, timm_dinov2

    cfg = tiny()
    hub = randomize_(Dinov2Reg(**cfg.backbone), seed=3).state_dict()
    assert float(hub["pos_embed"][0, 0].abs().sum()) > 0 and float(hub["mask_token"].abs().sum()) > 0
    timm_sd = checkpoint_filter_fn({k: v.clone() for k, v in hub.items()}, timm_dinov2(**cfg.backbone))
    torch.save(hub, tmp_path / "hub.pth")
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, tmp_path / "timm.safetensors")
    files = {"hub": tmp_path / "hub.pth", "timm": tmp_path / "timm.safetensors"}
    a, b = (backbone_params(read_file(files[k])[0], k, cfg, k) for k in ("hub", "timm"))
    assert np.array_equal(a.pop("mask_token"), hub["mask_token"].numpy())
    assert not np.any(b.pop("mask_token"))  # timm drops it; the model never uses it
    la, lb = mapping.flatten(a), mapping.flatten(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert np.array_equal(x, y), k
    with pytest.raises(CheckpointError, match="needs a model config"):
        import_weights(files["hub"])
    bad = dict(hub, pos_embed=hub["pos_embed"][:, :100])
    torch.save(bad, tmp_path / "bad_hub.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed' has shape \(1, 100, 96\).*\(1, 1370, 96\)"):
        import_weights(tmp_path / "bad_hub.pth", cfg)
    out = tmp_path / "from_hub"
    assert main([str(files["timm"]), "--out", str(out), "--config", "configs/test_tiny.py"]) == 0
    model, _ = checkpoint.load(out)
    got = mapping.flatten(_pure(model)["feature_extractor"])
    assert [k for k, _ in got if k != "mask_token"] == [k for k, _ in lb]
    for (k, x), (_, y) in zip([g for g in got if g[0] != "mask_token"], lb):
        assert np.array_equal(np.asarray(x), y), k


# ----------------------------------------------------------------------------- checkpoints, CLI
def test_train_run_directory_loads_latest_step(released, tmp_path):
    import orbax.checkpoint as ocp

    from skipclick_jax.config_lib import base_config, config_to_json

    model, cfg, _ = import_weights(released)
    root = tmp_path / "run" / "checkpoints"
    manager = ocp.CheckpointManager(root, item_names=("params",),
                                    options=ocp.CheckpointManagerOptions(create=True))
    (root / "config.json").write_text(config_to_json(base_config(cfg)))
    for step in (5, 10):
        pure = _pure(model)
        pure["head"]["conv_seg"]["bias"] = np.full((1,), step, np.float32)
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(pure)))
    manager.wait_until_finished()
    for step in (5, 10):
        checkpoint.write_digests(root / str(step))  # as train.py seals a completed step
    loaded, loaded_cfg = checkpoint.load(tmp_path / "run")
    assert float(np.asarray(loaded.head.conv_seg.bias[...])[0]) == 10.0
    assert loaded_cfg.model.to_dict() == cfg.to_dict()
    expected = r"head\.conv_seg\.kernel has shape \(1, 1, 64, 1\).*\(1, 1, 32, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.load(tmp_path / "run", tiny(head__upsample="x2"))


def test_cli_import_export_and_summary(released, ref, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main([str(released), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "format: released" in text and "feature_extractor" in text and "total" in text
    assert (out / "config.json").is_file() and (out / "params").is_dir()
    assert main([str(out), "--out", str(tmp_path / "x.safetensors")]) == 0
    back, _, _ = import_weights(tmp_path / "x.safetensors")
    assert_same_state_dict(mapping.params_to_state_dict(_pure(back), tiny()), numpy_sd(ref.state_dict()))
    with pytest.raises(SystemExit):
        main([str(released), "--out", str(out)])  # exists, no --overwrite
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0


def test_import_and_safetensors_export_without_torch(released, tmp_path):
    """The converter path (read .pth, convert, save, export .safetensors) never imports torch."""
    import subprocess

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from skipclick_jax import checkpoint\n"
        "from convert_weights.convert import export_weights\n"
        f"model, cfg = checkpoint.load({str(released)!r})\n"
        f"export_weights(model, cfg, {str(tmp_path / 'x.safetensors')!r})\n"
        f"checkpoint.save({str(tmp_path / 'ckpt')!r}, model, cfg)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "x.safetensors").is_file() and (tmp_path / "ckpt" / "config.json").is_file()
