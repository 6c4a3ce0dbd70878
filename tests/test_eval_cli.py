"""`evaluate` report files and the `eval.py` command line (`skipclick_jax.evaluation.cli`)."""

import json
import time

import ml_collections
import numpy as np
import pytest

from skipclick_jax import config_lib, metrics
from skipclick_jax.evaluation import cli as eval_cli
from skipclick_jax.defaults.evaluation import eval_defaults, size_for
from skipclick_jax.evaluation.scheduler import run_samples
from skipclick_jax.evaluation.evaluate import evaluate
from tests.test_eval_engine import FLIP, PREDICTOR, SIZES, make_sample


def flip_config():
    cfg = eval_defaults()
    cfg.update(default_size=FLIP.size, max_clicks=FLIP.max_clicks, batch_size=3, bucket=48, overlays=2)
    cfg.sizes = {}  # every dataset at S = FLIP.size
    return cfg


def test_evaluate_writes_the_report(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, h, w, i) for i, (h, w) in enumerate(SIZES)]
    start = time.perf_counter()
    summary = evaluate(PREDICTOR, {"GrabCut": samples, "WSESeg_a": samples[:2], "WSESeg_b": samples[2:]},
                       tmp_path, flip_config(), progress=False)
    wall = time.perf_counter() - start
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    expected = run_samples(PREDICTOR, samples, FLIP, batch_size=3, bucket=48)
    records = json.loads((tmp_path / "GrabCut" / "clicks.json").read_text())
    assert [r["id"] for r in records] == [s["id"] for s in samples]
    assert [r["clicks"] for r in records] == [e["clicks"] for e in expected]
    assert [(r["height"], r["width"]) for r in records] == SIZES
    all_ious = [metrics.ious_from_counts(e["inter"], e["union"]) for e in expected]
    assert [r["ious"] for r in records] == [list(x) for x in all_ious]
    # NoC/NoF/mIoU restated here (docs/design/evaluation.md#metrics), not with the metrics functions the report uses
    m = FLIP.max_clicks
    noc = [[next((k + 1 for k, v in enumerate(ious) if v >= t), m) for ious in all_ious]
           for t in metrics.NOC_THRESHOLDS]
    s = summary["GrabCut"]
    np.testing.assert_allclose(list(s["noc"].values()), [np.mean(n) for n in noc], rtol=1e-12)
    assert list(s["nof"].values()) == [sum(k >= m for k in n) for n in noc]
    assert len({len(x) for x in all_ious}) > 1 and set(list(s["noc"].values())) != {m}
    miou = [np.mean([ious[min(k, len(ious) - 1)] for ious in all_ious]) for k in range(m)]
    np.testing.assert_allclose(s["miou"], miou, rtol=1e-12)
    assert s["instances"] == len(samples) and s["clicks"] == sum(len(r["clicks"]) for r in records)
    assert 0 < s["seconds"] <= wall
    assert s["clicks_per_second"] == pytest.approx(s["clicks"] / s["seconds"])
    table = (tmp_path / "results.md").read_text()
    assert "| GrabCut | 4 |" in table and "Avg. WSESeg (2 classes)" in table
    assert (tmp_path / "miou_curve.png").stat().st_size > 0
    assert len(list((tmp_path / "GrabCut" / "overlays").glob("*.png"))) == 2


def test_command_line_parsing_and_overrides():
    args, overrides, datasets = eval_cli._parse(
        ["--checkpoint", "ck", "--dataset", "GrabCut=/d/gc", "--dataset", "DAVIS=/d/davis", "--out", "o",
         "--no-flip", "--size", "224", "--config.eval.batch_size=16", "--config.eval.sizes.DAVIS=448"])
    assert datasets == {"GrabCut": "/d/gc", "DAVIS": "/d/davis"} and args.no_flip and args.size == 224
    cfg = ml_collections.ConfigDict({"eval": eval_defaults()})
    for key, value in overrides:
        config_lib.override(cfg, key, value)
    assert cfg.eval.batch_size == 16 and size_for(cfg.eval, "DAVIS") == 448
    config_lib.override(cfg, "eval.flip", "false")
    assert cfg.eval.flip is False
    with pytest.raises(KeyError, match="unknown field"):
        config_lib.override(cfg, "eval.nope", "1")
    with pytest.raises(SystemExit):
        eval_cli._parse(["--checkpoint", "c", "--dataset", "GrabCut", "--out", "o"])


def test_sizes_per_dataset():
    cfg = eval_defaults()
    assert {n: size_for(cfg, n) for n in ("GrabCut", "Berkeley", "SBD", "DAVIS", "HQSeg44k", "SHSeg",
                                          "WSESeg_yt_sports")} == {
        "GrabCut": 448, "Berkeley": 448, "SBD": 448, "DAVIS": 672, "HQSeg44k": 896, "SHSeg": 896,
        "WSESeg_yt_sports": 896}


@pytest.mark.parametrize("flags", [[], ["--no-flip", "--all-clicks", "--size", "42"]],
                         ids=["defaults", "no_flip_all_clicks_size"])
def test_eval_main_flags(tmp_path, monkeypatch, flags):
    """eval.main on a real GrabCut folder (tfds builder, grain) with the oracle predictor in place
    of a checkpoint: --size sets S for the dataset, --no-flip encodes each image once instead of
    with its flip, --all-clicks runs every click (target IoU 1.01)."""
    import jax
    import ml_collections

    from skipclick_jax import checkpoint
    from tests import fixtures_data as testing
    from skipclick_jax.model.api import ModelFunctions
    from tests.test_eval_engine import oracle_decode, oracle_encode

    encoded = []

    def counting_encode(params, images):
        jax.debug.callback(lambda n: encoded.append(int(n)), images.shape[0])
        return oracle_encode(params, images)

    predictor = ModelFunctions(counting_encode, oracle_decode, PREDICTOR.params)
    cfg = ml_collections.ConfigDict({"eval": flip_config()})
    cfg.eval.update(max_clicks=4, overlays=0)
    monkeypatch.setattr(checkpoint, "load", lambda path, config=None: (predictor, cfg))
    root = testing.write_grabcut(tmp_path / "GrabCut")
    summary = eval_cli.main(["--checkpoint", "unused", "--dataset", f"GrabCut={root}",
                             "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "tfds")] + flags)
    jax.effects_barrier()
    s = summary["GrabCut"]
    records = json.loads((tmp_path / "out" / "GrabCut" / "clicks.json").read_text())
    assert s["instances"] == len(records) == 2
    if flags:
        assert (s["size"], s["flip"], s["target_iou"]) == (42, False, 1.01)
        assert sum(encoded) == 2 and [len(r["clicks"]) for r in records] == [4, 4]
    else:
        assert (s["size"], s["flip"], s["target_iou"]) == (FLIP.size, True, 0.95)
        assert sum(encoded) == 2 * 2


@pytest.mark.slow
def test_eval_main_end_to_end(tmp_path):
    from skipclick_jax import checkpoint, config_lib
    from tests import fixtures_data as testing
    from skipclick_jax.model import build_model

    cfg = config_lib.base_config(config_lib.tiny_model_config())
    checkpoint.save(tmp_path / "ckpt", build_model(cfg.model, seed=0), cfg)
    root = testing.write_grabcut(tmp_path / "GrabCut")
    summary = eval_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--dataset", f"GrabCut={root}",
                             "--out", str(tmp_path / "out"), "--size", "56", "--overlays", "1",
                             "--config.eval.max_clicks=3", "--data-dir", str(tmp_path / "tfds")])
    assert summary["GrabCut"]["instances"] == 2 and summary["GrabCut"]["size"] == 56
    assert (tmp_path / "out" / "GrabCut" / "clicks.json").is_file()
