"""NoC / NoF / mIoU / IoU against hand-computed values (docs/design/evaluation.md#metrics)."""

import numpy as np

from skipclick_jax import metrics


def test_thresholds_are_the_originals_arange():
    assert metrics.NOC_THRESHOLDS.tolist() == [0.8, 0.8500000000000001, 0.9000000000000001, 0.9500000000000002]


def test_iou_with_ignore():
    gt = np.array([[1, 1, 0], [0, -1, -1]])
    pred = np.array([[1, 0, 1], [0, 1, 0]], bool)
    assert metrics.iou(gt, pred) == 1 / 3  # inter {(0,0)}, union {(0,0),(0,1),(0,2)}
    assert np.isnan(metrics.iou(np.zeros((2, 2), int), np.zeros((2, 2), bool)))  # 0/0 as in NumPy


def test_noc_nof_and_the_click_20_quirk():
    all_ious = [
        [0.5, 0.81, 0.86, 0.91, 0.96],  # NoC 2, 3, 4, 5
        [0.9500000000000001],  # 0.95 rounds below 0.9500000000000002: NoC@95 = 20
        [0.1] * 19 + [0.97],  # first reaches everything at click 20: counted in NoF
        [0.85],  # 0.85 < 0.8500000000000001: NoC@85 = 20
    ]
    noc, nof = metrics.noc(all_ious)
    np.testing.assert_allclose(noc, [(2 + 1 + 20 + 1) / 4, (3 + 1 + 20 + 20) / 4, (4 + 1 + 20 + 20) / 4,
                                     (5 + 20 + 20 + 20) / 4])
    assert nof.tolist() == [1, 2, 2, 3]


def test_miou_curve_holds_the_last_iou_after_stopping():
    curve = metrics.miou_curve([[0.5, 0.7, 0.96], [0.2, 0.4, 0.6, 0.8]], max_clicks=5)
    np.testing.assert_allclose(curve, [0.35, 0.55, 0.78, 0.88, 0.88])


def test_ious_from_counts_is_float64_division():
    ious = metrics.ious_from_counts([19, 0], [20, 0])
    assert ious.dtype == np.float64 and ious[0] == 19 / 20 and np.isnan(ious[1])
