"""Empty and all-ignore ground truths (issue #27): skipped with a warning, strict JSON, finite
dataset means."""

import json

import numpy as np
import pytest

from skipclick_jax.evaluation.evaluate import evaluate
from tests.test_eval_cli import flip_config
from tests.test_eval_engine import PREDICTOR, SIZES, make_sample


def test_empty_and_all_ignore_gt_are_skipped_and_named(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, h, w, i) for i, (h, w) in enumerate(SIZES)]
    empty = {**samples[1], "id": "empty", "gt": np.zeros_like(samples[1]["gt"])}
    ignored = {**samples[2], "id": "ignored", "gt": np.full_like(samples[2]["gt"], -1)}
    with pytest.warns(UserWarning, match=r"GrabCut: 2 instance\(s\) skipped.*\(empty, ignored\)"):
        summary = evaluate(PREDICTOR, {"GrabCut": [samples[0], empty, ignored, samples[3]],
                                       "Berkeley": [empty]}, tmp_path, flip_config(), progress=False)
    reference = evaluate(PREDICTOR, {"GrabCut": [samples[0], samples[3]]}, tmp_path / "ref",
                         flip_config(), progress=False)["GrabCut"]
    s = summary["GrabCut"]
    assert s["skipped"] == dict(count=2, ids=["empty", "ignored"]) and s["instances"] == 2
    assert s["noc"] == reference["noc"] and s["miou"] == reference["miou"]  # the others only
    assert all(np.isfinite(s["miou"])) and all(np.isfinite(list(s["noc"].values())))
    text = (tmp_path / "GrabCut" / "clicks.json").read_text()
    records = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert [r.get("skipped", "")[:20] for r in records] == ["", "the ground truth is ", "every ground-truth p", ""]
    assert records[1]["ious"] == [] and records[2]["ious"] == []
    json.loads((tmp_path / "summary.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    b = summary["Berkeley"]  # nothing scorable: no means at all rather than NaN
    assert b["instances"] == 0 and b["miou"] == [] and set(b["noc"].values()) == {None}
    assert "| Berkeley | 0 | - | - | - | - |" in (tmp_path / "results.md").read_text()
