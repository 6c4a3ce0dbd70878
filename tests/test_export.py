"""Export (ONNX via jax2onnx, StableHLO via jax.export) and OnnxPredictor against JAX.

Tolerances: decoder logits within 1e-4 of JAX (float32, measured ~1e-5; SkipClick at 448: 2.9e-6
with the GroupNorms' staged statistics, 9.1e-4 without), encodings within 1e-5,
probabilities through the Predictor interface within 2.5e-5 (= 1e-4 × the sigmoid's largest
slope 1/4), thresholded masks identical. The model is `test_tiny` briefly trained
(`tests/tiny_trained.py`) so that probabilities are decided, not all near 0.5.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_trained
from PIL import Image

from skipclick_jax import export as export_lib
from skipclick_jax import resize
from skipclick_jax.predictor import Predictor, encode_points
from tests.helpers import ROOT, run_python

EXAMPLE = ROOT / "skipclick_jax" / "assets" / "demo.png"  # 336x448: not square
# Positive and negative clicks on the example's blue disc and red ellipse, and background.
CLICKS = [(120, 320, True), (150, 280, False), (60, 300, True), (170, 150, True), (100, 40, False),
          (230, 180, False)]

needs_onnx = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnxruntime", "onnx", "jax2onnx")),
    reason="the ONNX tests need the 'export' extra (onnx, onnx-ir, onnxruntime, jax2onnx --no-deps)")


@pytest.fixture(scope="module")
def trained(request):
    from skipclick_jax.checkpoint import load

    path = tiny_trained.trained_checkpoint(str(request.config.cache.mkdir("tiny-trained")))
    model, cfg = load(path)
    return path, model, cfg


@pytest.fixture(scope="module")
def onnx_dir(trained, tmp_path_factory):
    _, model, cfg = trained
    out = tmp_path_factory.mktemp("export") / "tiny_onnx"
    export_lib.export(model, cfg.model, out, fmt="onnx")
    return out


@pytest.fixture(scope="module")
def image():
    return np.asarray(Image.open(EXAMPLE).convert("RGB"))


@needs_onnx
def test_export_json(onnx_dir):
    meta = json.loads((onnx_dir / "export.json").read_text())
    assert meta["format"] == "onnx" and meta["size"] == 112
    enc, dec = meta["graphs"]["encoder"], meta["graphs"]["decoder"]
    assert [i["name"] for i in enc["inputs"]] == ["images"] and enc["inputs"][0]["shape"] == ["B", 112, 112, 3]
    names = [o["name"] for o in enc["outputs"]]
    assert names == ["fused", "skip_0", "skip_1", "skip_2", "skip_3"]
    assert [i["name"] for i in dec["inputs"]] == names + ["prev_prob", "points", "point_denom"]
    assert dec["inputs"][-2]["shape"] == ["B", "2*P", 3] and dec["outputs"][0]["shape"] == ["B", 112, 112]
    assert meta["model_config"]["crop_size"] == 112
    for g in (enc, dec):
        assert g["bytes"] == sum((onnx_dir / f).stat().st_size for f in g["files"]) > 0


@needs_onnx
def test_onnx_graphs_match_jax_with_symbolic_batch_and_clicks(trained, onnx_dir):
    import onnxruntime as ort

    _, model, _ = trained
    rng = np.random.default_rng(0)
    images = rng.random((2, 112, 112, 3), dtype=np.float32)
    enc_sess = ort.InferenceSession(str(onnx_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec_sess = ort.InferenceSession(str(onnx_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    got_enc = enc_sess.run(None, {"images": images})
    want_enc = model.encode_image(jnp.asarray(images))
    for g, w in zip(got_enc, [want_enc["fused"], *want_enc["skips"]], strict=True):
        np.testing.assert_allclose(g, np.asarray(w), atol=1e-5, rtol=0)
    prev = rng.random((2, 112, 112), dtype=np.float32)
    for slots in (1, 8, 13):  # P is symbolic
        pts = np.stack([encode_points(CLICKS[:k], 112, 336, 448, slots=max(slots, 3))[0] for k in (2, 6)])
        denom = np.asarray([[336, 448], [336, 448]], np.float32)
        feeds = {i.name: x for i, x in zip(dec_sess.get_inputs(), got_enc)}
        logits = dec_sess.run(None, {**feeds, "prev_prob": prev, "points": pts, "point_denom": denom})[0]
        want = model.decode_clicks(want_enc, jnp.asarray(prev), jnp.asarray(pts), jnp.asarray(denom))
        assert logits.shape == (2, 112, 112)
        np.testing.assert_allclose(logits, np.asarray(want), atol=1e-4, rtol=0)


@needs_onnx
def test_onnx_predictor_matches_jax_predictor(trained, onnx_dir, image):
    from skipclick_jax.predictor import OnnxPredictor

    _, model, _ = trained
    onnx, ref = OnnxPredictor(onnx_dir), Predictor(model)
    onnx.set_image(image)
    ref.set_image(image)
    for key in ("fused", "skip_0", "skip_3"):
        want = ref._encoding["fused"] if key == "fused" else ref._encoding["skips"][int(key[-1])]
        np.testing.assert_allclose(onnx._encoding[key], np.asarray(want), atol=1e-5, rtol=0)
    positives, history = 0, []
    for row, col, positive in CLICKS:
        prev = onnx.probability
        got, want = onnx.add_click(row, col, positive), ref.add_click(row, col, positive)
        assert got.shape == want.shape == image.shape[:2]
        np.testing.assert_allclose(got, want, atol=2.5e-5, rtol=0)
        np.testing.assert_array_equal(got > 0.5, want > 0.5)
        # the decoder's logits at S on the same inputs, against JAX's
        points, denom = encode_points(onnx.clicks, 112, *image.shape[:2])
        prev_s = resize.bilinear_ac_numpy(prev[None], (112, 112), channels_last=False)
        logits = onnx.decode_logits(prev_s, points[None], denom[None])
        want_logits = model.decode_clicks(ref._encoding, jnp.asarray(prev_s), jnp.asarray(points[None]),
                                          jnp.asarray(denom[None]))
        np.testing.assert_allclose(logits, np.asarray(want_logits), atol=1e-4, rtol=0)
        positives += (got > 0.5).sum() > 0
        history.append(got)
    assert positives, "no click produced a mask: the check would be vacuous"
    np.testing.assert_array_equal(onnx.undo(), history[-2])  # the stack: no recompute
    np.testing.assert_allclose(ref.undo(), history[-2], atol=2.5e-5, rtol=0)
    assert onnx.clicks == ref.clicks == [(r, c, p) for r, c, p in CLICKS[:-1]]
    onnx.reset()
    assert onnx.clicks == [] and not onnx.probability.any()


@needs_onnx
def test_onnx_predictor_imports_neither_jax_nor_torch(onnx_dir, tmp_path):
    np.save(tmp_path / "image.npy", np.random.default_rng(0).integers(0, 256, (90, 130, 3), np.uint8))
    script = f"""
import sys
import numpy as np
from skipclick_jax.predictor import OnnxPredictor
p = OnnxPredictor({str(onnx_dir)!r})
p.set_image(np.load({str(tmp_path / 'image.npy')!r}))
prob = p.add_click(40, 70, True)
p.add_click(10, 10, False)
p.undo()
assert prob.shape == (90, 130), prob.shape
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'torch', 'optax'))
assert not loaded, loaded
print('ok')
"""
    out = run_python("-c", script, timeout=300)
    assert out.stdout.strip() == "ok", out.stdout[-3000:]


@needs_onnx
def test_app_annotator_on_onnx(onnx_dir, image):
    from skipclick_jax.app import Annotator
    from skipclick_jax.predictor import OnnxPredictor

    annotator = Annotator(OnnxPredictor(onnx_dir), f"ONNX export {onnx_dir}")
    sid, _ = annotator.open_image(image)
    one = annotator.act(sid, "click", row=120, col=320, positive=True)
    annotator.act(sid, "click", row=150, col=280, positive=False)
    assert annotator.act(sid, "undo")["overlay"] == one["overlay"]
    annotator.act(sid, "next")
    annotator.act(sid, "click", row=170, col=150, positive=True)
    labels = annotator.labels(sid)
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) == {0, 1, 2}
    assert (labels == 1).sum() > 0.5 * one["current_area"]


@needs_onnx
def test_onnx_group_norm_statistics_are_accurate(tmp_path):
    """onnxruntime's single ReduceMean over a whole 64x64x256 map (a neck GroupNorm's size at 224)
    is off by ~1e-3; the export's staged statistics bring it to float32 rounding (float64 reference)."""
    import onnxruntime as ort
    from flax import nnx
    from jax2onnx import to_onnx

    from skipclick_jax.model import layers

    x = (np.random.default_rng(0).standard_normal((1, 64, 64, 256)) * 2 + 1.5).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean()
    want = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean() + 1e-5)
    errors = {}
    for staged in (False, True):
        norm = layers.group_norm(256, nnx.Rngs(0))
        norm.staged_stats = staged
        np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, atol=1e-6, rtol=0)  # JAX either way
        path = tmp_path / f"gn_{staged}.onnx"
        to_onnx(lambda t: norm(t), [x.shape], model_name="gn", return_mode="file", output_path=str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        errors[staged] = float(np.abs(sess.run(None, {sess.get_inputs()[0].name: x})[0] - want).max())
    assert errors[True] <= 2e-6, errors
    assert errors[False] > 1e-4, errors  # the runtime fact that makes the staging necessary


def test_stablehlo_round_trip(trained, tmp_path):
    _, model, cfg = trained
    meta = export_lib.export(model, cfg.model, tmp_path / "hlo", fmt="stablehlo")
    assert meta["graphs"]["decoder"]["file"] == "decoder.stablehlo"
    encoder = jax.export.deserialize((tmp_path / "hlo" / "encoder.stablehlo").read_bytes())
    decoder = jax.export.deserialize((tmp_path / "hlo" / "decoder.stablehlo").read_bytes())
    images = np.random.default_rng(1).random((3, 112, 112, 3), dtype=np.float32)
    enc = encoder.call(images)
    want = model.encode_image(jnp.asarray(images))
    np.testing.assert_allclose(enc[0], want["fused"], atol=1e-5, rtol=0)
    pts = np.stack([encode_points(CLICKS, 112, 336, 448, slots=5)[0]] * 3)
    prev = np.zeros((3, 112, 112), np.float32)
    denom = np.tile(np.float32([336, 448]), (3, 1))
    logits = decoder.call(*enc, prev, pts, denom)
    np.testing.assert_allclose(logits, model.decode_clicks(want, prev, pts, denom), atol=1e-5, rtol=0)


def test_refuses_to_overwrite(trained, tmp_path, capsys):
    path, model, cfg = trained
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit):
        export_lib.main(["--checkpoint", str(path), "--out", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_lib.export(model, cfg.model, out, fmt="stablehlo")
    assert (out / "keep.txt").read_text() == "precious"
    export_lib.export(model, cfg.model, out, fmt="stablehlo", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "export.json").is_file()


def test_conversion_errors_name_the_graph(trained, tmp_path, monkeypatch):
    pytest.importorskip("jax2onnx", reason="needs jax2onnx")
    import jax2onnx

    _, model, cfg = trained
    calls = []

    def failing(fn, inputs, **kwargs):
        calls.append(kwargs["model_name"])
        if kwargs["model_name"] == "skipclick_decoder":
            raise NotImplementedError("No ONNX handler registered for primitive 'cumlogsumexp'")

    monkeypatch.setattr(jax2onnx, "to_onnx", failing)
    with pytest.raises(export_lib.ExportError,
                       match=r"the decoder graph failed to convert to ONNX: NotImplementedError: .*cumlogsumexp"):
        export_lib.export(model, cfg.model, tmp_path / "x", fmt="onnx")
    assert calls == ["skipclick_encoder", "skipclick_decoder"] and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--format must be one of"):
        export_lib.export(model, cfg.model, tmp_path / "y", fmt="tflite")


@pytest.mark.slow
@needs_onnx
def test_full_skipclick_export(tmp_path):
    """SkipClick (ViT-B/14 DINOv2, 448) exports; onnxruntime matches JAX on one click."""
    import onnxruntime as ort

    from skipclick_jax import config_lib
    from skipclick_jax.model import build_model

    cfg = config_lib.load_config_file(ROOT / "configs" / "skipclick.py").model
    model = build_model(cfg, seed=0)
    meta = export_lib.export(model, cfg, tmp_path / "full", fmt="onnx")
    assert meta["size"] == 448
    sess = {n: ort.InferenceSession(str(tmp_path / "full" / f"{n}.onnx"), providers=["CPUExecutionProvider"])
            for n in ("encoder", "decoder")}
    images = np.random.default_rng(0).random((1, 448, 448, 3), dtype=np.float32)
    enc = sess["encoder"].run(None, {"images": images})
    want_enc = model.encode_image(jnp.asarray(images))
    np.testing.assert_allclose(enc[0], np.asarray(want_enc["fused"]), atol=1e-4, rtol=0)
    pts, denom = encode_points(CLICKS[:3], 448, 336, 448)
    prev = np.zeros((1, 448, 448), np.float32)
    same = [np.asarray(x) for x in (want_enc["fused"], *want_enc["skips"])]  # the decoder's own error
    feeds = {i.name: x for i, x in zip(sess["decoder"].get_inputs(), same)}
    logits = sess["decoder"].run(None, {**feeds, "prev_prob": prev, "points": pts[None], "point_denom": denom[None]})[0]
    want = model.decode_clicks(want_enc, prev, pts[None], denom[None])
    np.testing.assert_allclose(logits, np.asarray(want), atol=1e-4, rtol=0)  # measured 2.9e-6


def test_default_model_is_the_main_jobs_checkpoint_else_random(trained, tmp_path, monkeypatch):
    from skipclick_jax import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "ASSET", tmp_path / "skipclick_jax" / "assets" / "demo.png")
    _, description = demo.load_model(None)
    assert description.startswith("RANDOM WEIGHTS") and "meaningless" in description
    run = tmp_path / "runs" / "tiny_synthetic" / "checkpoints"
    run.mkdir(parents=True)
    (run / "config.json").write_text((trained[0] / "config.json").read_text())
    import shutil

    from skipclick_jax.checkpoint import write_digests

    shutil.copytree(trained[0] / "params", run / "300" / "params")
    write_digests(run / "300")  # a complete train.py step carries its digests
    model, description = demo.load_model(None)
    assert description == f"checkpoint {tmp_path / 'runs' / 'tiny_synthetic'}"
    assert model.backbone_mix.pos_grid * model.patch == 112


@pytest.mark.parametrize("shape, size, channels_last", [
    ((1, 336, 448, 3), (112, 112), True), ((1, 112, 112), (336, 448), False), ((2, 37, 53), (100, 31), False)])
def test_host_resize_is_bit_identical_to_jax(shape, size, channels_last):
    """OnnxPredictor's NumPy resizes equal `resize.bilinear_ac` exactly (same taps, same order)."""
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    want = np.asarray(resize.bilinear_ac(jnp.asarray(x), size, channels_last=channels_last))
    np.testing.assert_array_equal(resize.bilinear_ac_numpy(x, size, channels_last=channels_last), want)
