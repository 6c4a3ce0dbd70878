"""Training data: augmentation, click sampler, grain pipeline (docs/design/training.md)."""

import cv2
import jax
import numpy as np
import pytest

from skipclick_jax.data.augment import (Augmenter, brightness_contrast_lut, drop_objects,
                                        rgb_shift_lut)
from skipclick_jax.data.pipeline import make_global_batch, train_dataset
from skipclick_jax.data.points_sampler import MultiPointSampler, select_stuff
from skipclick_jax.data.synthetic import SyntheticConfig
from skipclick_jax.data.train_datasets import load_train_source

N = 24
STILL = dict(scale_range=(1.0, 1.0), flip_prob=0.0, brightness_contrast_prob=0.0,
             rgb_shift_prob=0.0, min_object_area=1)


def _record(seed, h=64, w=64):
    """Objects: 0 big root, 1 child of 0, 2 second root, 3 stuff region (num_instance_masks = 3)."""
    rng = np.random.default_rng(seed)
    layers = np.zeros((h, w, 2), np.uint8)
    layers[4:36, 4:36, 0] = 1
    layers[10:22, 10:22, 1] = 1
    layers[38:62, 30:62, 0] = 2
    layers[:4, :, 1] = 2
    return {'id': str(seed), 'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            'layers': layers, 'objects': np.array([[0, 1], [1, 1], [0, 2], [1, 2]], np.int32),
            'parents': np.array([-1, 0, -1, -1], np.int32), 'num_instance_masks': 3}


def _split(points):
    pos, neg = points[:N], points[N:]
    return pos[pos[:, 2] > 0, :2].astype(int), neg[neg[:, 2] > 0, :2].astype(int)


def _assert_padding(points):
    for block in (points[:N], points[N:]):
        n = int((block[:, 2] > 0).sum())
        np.testing.assert_array_equal(block[:n, 2], 100)
        np.testing.assert_array_equal(block[n:], -1)


# ----------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize('h, w, top, left', [(40, 50, 12, 7), (41, 64, 11, 0)])
def test_centred_padding(h, w, top, left):
    image = np.random.default_rng(0).integers(1, 256, (h, w, 3), dtype=np.uint8)
    layers = np.ones((h, w, 1), np.uint8)
    out, out_layers = Augmenter(crop_size=64, **STILL).transform(
        image, layers, np.random.default_rng(0))
    assert out.shape == (64, 64, 3) and out_layers.shape == (64, 64, 1)
    np.testing.assert_array_equal(out[top:top + h, left:left + w], image)
    assert out.sum() == image.sum() and out_layers.sum() == h * w


def test_resize_size_and_interpolation():
    image = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    layers = np.random.default_rng(2).integers(0, 4, (40, 30, 5), dtype=np.uint8)
    aug = Augmenter(crop_size=64, **{**STILL, 'scale_range': (1.3, 1.3)})
    out, out_layers = aug.transform(image, layers, np.random.default_rng(0))
    h, w = round(40 * 1.3), round(30 * 1.3)
    top, left = (64 - h) // 2, (64 - w) // 2
    np.testing.assert_array_equal(out[top:top + h, left:left + w],
                                  cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out_layers[top:top + h, left:left + w],
                                  cv2.resize(layers, (w, h), interpolation=cv2.INTER_NEAREST))


def _reference_geometry(image, layers, crop, scale_range, rng):
    """Steps 1-4 done literally: resize, flip, centred np.pad, crop."""
    s = rng.uniform(*scale_range)
    h, w = round(image.shape[0] * s), round(image.shape[1] * s)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    layers = cv2.resize(layers, (w, h), interpolation=cv2.INTER_NEAREST)[..., None]
    if rng.random() < 0.5:
        image, layers = image[:, ::-1], layers[:, ::-1]
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
    image, layers = np.pad(image, pad), np.pad(layers, pad)
    top = int((image.shape[0] - crop + 1) * rng.random())
    left = int((image.shape[1] - crop + 1) * rng.random())
    return image[top:top + crop, left:left + crop], layers[top:top + crop, left:left + crop]


def test_geometry_matches_literal_pipeline_and_flip_consistency():
    layers = np.random.default_rng(3).integers(0, 5, (50, 70, 1), dtype=np.uint8)
    image = np.repeat(layers * 50, 3, axis=2)
    aug = Augmenter(crop_size=64, **{**STILL, 'scale_range': (0.75, 1.4), 'flip_prob': 0.5})
    for seed in range(12):
        out, out_layers = aug.transform(image, layers, np.random.default_rng(seed))
        ref, ref_layers = _reference_geometry(image, layers, 64, (0.75, 1.4),
                                              np.random.default_rng(seed))
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(out_layers, ref_layers)
    still = Augmenter(crop_size=48, **{**STILL, 'flip_prob': 0.5})
    for seed in range(4):
        out, out_layers = still.transform(image, layers, np.random.default_rng(seed))
        np.testing.assert_array_equal(out[..., 0], out_layers[..., 0] * 50)


@pytest.mark.parametrize('alpha, beta', [(1.25, -0.2), (0.875, 0.25), (1.375, 0.0), (1.0, 0.1)])
def test_brightness_contrast_lut_matches_formula(alpha, beta):
    values = np.arange(256)
    expected = np.floor(np.clip(values * alpha + beta * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(brightness_contrast_lut(alpha, beta), expected)


def test_photometric_on_constant_image():
    aug = Augmenter(crop_size=16, **{**STILL, 'brightness_contrast_prob': 1.0,
                                     'rgb_shift_prob': 1.0})
    for value in (0, 37, 128, 250):
        image = np.full((16, 16, 3), value, np.uint8)
        out, _ = aug.transform(image, np.zeros((16, 16, 1), np.uint8), np.random.default_rng(value))
        rng = np.random.default_rng(value)
        rng.uniform(1.0, 1.0), rng.random(), rng.random(), rng.random(), rng.random()
        alpha = 1.0 + rng.uniform(-0.15, 0.4)
        beta = rng.uniform(-0.25, 0.25)
        rng.random()
        shifts = rng.uniform(-10, 10, size=3)
        v = np.float32(value) * np.float32(alpha) + np.float32(beta * 255)
        v = np.uint8(np.clip(v, 0, 255))
        expected = np.clip(np.float32(v) + shifts.astype(np.float32), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))
        composed = rgb_shift_lut(shifts)[brightness_contrast_lut(alpha, beta)[value]]
        np.testing.assert_array_equal(composed, expected)


def test_drop_objects_reparents_to_nearest_kept_ancestor():
    objects = np.arange(8, dtype=np.int32).reshape(4, 2)
    parents = np.array([-1, 0, 1, 2], np.int32)
    kept, new_parents = drop_objects(objects, parents, np.array([True, False, False, True]))
    np.testing.assert_array_equal(kept, objects[[0, 3]])
    np.testing.assert_array_equal(new_parents, [-1, 0])
    _, new_parents = drop_objects(objects, parents, np.array([False, True, False, True]))
    np.testing.assert_array_equal(new_parents, [-1, 0])


@pytest.mark.parametrize('num_layers', [1, 5])
def test_object_filtering_after_augmentation(num_layers):
    layers = np.zeros((32, 32, num_layers), np.uint8)
    layers[2:30, 2:20, -1] = 1
    layers[22:26, 24:28, -1] = 2
    layers[5:7, 25:27, -1] = 9
    layers[0, 0, 0] = 7
    objects = np.array([[num_layers - 1, 1], [num_layers - 1, 2]], np.int32)
    aug = Augmenter(crop_size=32, **{**STILL, 'min_object_area': 100})
    _, out_layers, kept, parents = aug(np.zeros((32, 32, 3), np.uint8), layers, objects,
                                       np.array([-1, 0], np.int32), np.random.default_rng(0))
    np.testing.assert_array_equal(kept, objects[:1])
    np.testing.assert_array_equal(parents, [-1])
    expected = np.where(np.isin(layers, [1, 2]), layers, 0)
    expected[..., :-1] = 0
    np.testing.assert_array_equal(out_layers, expected)


def test_reaugments_until_an_object_is_visible():
    layers = np.zeros((64, 64, 1), np.uint8)
    layers[60:62, 60:62, 0] = 1
    aug = Augmenter(crop_size=16, **{**STILL, 'keep_background_prob': 1e-12})
    for seed in range(3):
        _, out_layers, kept, _ = aug(np.zeros((64, 64, 3), np.uint8), layers,
                                     np.array([[0, 1]], np.int32), np.array([-1], np.int32),
                                     np.random.default_rng(seed))
        assert len(kept) == 1 and out_layers.any()


# ----------------------------------------------------------------------------- sampler

def test_sampler_points_in_bounds_and_regions():
    rec = _record(0)
    layers = rec['layers'][..., :1].copy()
    objects, parents = rec['objects'][[0, 2]], np.array([-1, -1], np.int32)
    masks = [layers[..., 0] == 1, layers[..., 0] == 2]
    eroded = [cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=3) > 0
              for m in masks]
    sampler = MultiPointSampler(merge_objects_prob=0.0, positive_erode_prob=1.0)
    counts = set()
    for seed in range(40):
        points, gt = sampler(layers, objects, parents, np.random.default_rng(seed))
        assert points.shape == (2 * N, 3) and points.dtype == np.float32
        assert gt.shape == (64, 64) and gt.dtype == np.float32
        _assert_padding(points)
        pos, neg = _split(points)
        target = [k for k in range(2) if np.array_equal(gt > 0, masks[k])]
        assert len(target) == 1
        assert 1 <= len(pos) <= N and len(neg) <= N
        assert eroded[target[0]][pos[:, 0], pos[:, 1]].all()
        assert not gt[neg[:, 0], neg[:, 1]].any()
        counts.add(len(neg))
    assert 0 in counts and len(counts) > 3


def test_sampler_count_distributions():
    """P(n_pos = k) ∝ 0.8^(k-1), k = 1..24 and P(n_neg = k) ∝ 0.8^k, k = 0..24 (docs/design/training.md#multipointsampler)."""
    layers = np.zeros((32, 32, 1), np.uint8)
    layers[8:24, 8:24, 0] = 1
    sampler = MultiPointSampler()
    counts = []
    for seed in range(400):
        points, _ = sampler(layers, np.array([[0, 1]]), np.array([-1]),
                            np.random.default_rng(seed))
        counts.append([(points[:N, 2] > 0).sum(), (points[N:, 2] > 0).sum()])
    counts = np.array(counts)
    for observed, support in ((counts[:, 0], np.arange(1, N + 1)),
                              (counts[:, 1], np.arange(N + 1))):
        p = 0.8 ** (support - support[0])
        p /= p.sum()
        mean = (p * support).sum()
        std = np.sqrt((p * (support - mean) ** 2).sum())
        assert abs(observed.mean() - mean) < 4 * std / np.sqrt(len(observed))
        assert abs((observed == support[0]).mean() - p[0]) < 0.08


def test_sampler_merged_objects():
    rec = _record(0)
    layers = rec['layers'][..., :1].copy()
    masks = [layers[..., 0] == 1, layers[..., 0] == 2]
    sampler = MultiPointSampler(merge_objects_prob=1.0)
    for seed in range(10):
        points, gt = sampler(layers, rec['objects'][[0, 2]], np.array([-1, -1]),
                             np.random.default_rng(seed))
        np.testing.assert_array_equal(gt > 0, masks[0] | masks[1])
        _assert_padding(points)
        pos, neg = _split(points)
        assert 2 <= len(pos) <= N
        assert masks[0][pos[0, 0], pos[0, 1]] != masks[0][pos[1, 0], pos[1, 1]]
        assert gt[pos[:, 0], pos[:, 1]].all() and not gt[neg[:, 0], neg[:, 1]].any()


def test_sampler_only_roots_are_targets():
    rec = _record(0)
    parent_mask = rec['layers'][..., 0] == 1
    for seed in range(10):
        _, gt = MultiPointSampler()(rec['layers'], rec['objects'][:2], np.array([-1, 0]),
                                    np.random.default_rng(seed))
        np.testing.assert_array_equal(gt > 0, parent_mask)


def test_sampler_background_only():
    layers = np.zeros((32, 32, 1), np.uint8)
    layers[4:12, 4:12, 0] = 5
    for seed in range(10):
        points, gt = MultiPointSampler()(layers, np.zeros((0, 2), np.int32),
                                         np.zeros((0,), np.int32), np.random.default_rng(seed))
        assert not gt.any()
        np.testing.assert_array_equal(points[:N], -1)
        _assert_padding(points)
        _, neg = _split(points)
        assert not layers[neg[:, 0], neg[:, 1], 0].any()


def test_select_stuff():
    rec = _record(0)
    objects, parents = select_stuff(rec['objects'], rec['parents'], 3, 1.0,
                                    np.random.default_rng(0))
    np.testing.assert_array_equal(objects, rec['objects'])
    np.testing.assert_array_equal(parents, [-1, 0, -1, -1])
    objects, parents = select_stuff(rec['objects'], rec['parents'], 3, 0.0,
                                    np.random.default_rng(0))
    np.testing.assert_array_equal(objects, rec['objects'][:3])
    np.testing.assert_array_equal(parents, [-1, 0, -1])
    _, layers, _, _ = Augmenter(crop_size=64, **STILL)(rec['image'], rec['layers'], objects,
                                                        parents, np.random.default_rng(0))
    np.testing.assert_array_equal(layers[..., 0], rec['layers'][..., 0])
    np.testing.assert_array_equal(layers[..., 1], np.where(rec['layers'][..., 1] == 1, 1, 0))
    with pytest.raises(ValueError, match='num_instance_masks'):
        select_stuff(rec['objects'], rec['parents'], 5, 0.3, np.random.default_rng(0))


# ----------------------------------------------------------------------------- pipeline

SOURCE = [_record(i) for i in range(5)]


def _dataset(seed=0, **kwargs):
    kwargs = {'crop_size': 48, 'batch_size': 3, 'epoch_len': 12, 'min_object_area': 50,
              **kwargs}
    return train_dataset(SOURCE, seed=seed, **kwargs)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ('image', 'points', 'gt'):
            np.testing.assert_array_equal(x[key], y[key])


def test_pipeline_batches_and_determinism():
    batches = _take(iter(_dataset()), 3)
    b = batches[0]
    assert b['image'].shape == (3, 48, 48, 3) and b['image'].dtype == np.uint8
    assert b['points'].shape == (3, 2 * N, 3) and b['points'].dtype == np.float32
    assert b['gt'].shape == (3, 48, 48) and b['gt'].dtype == np.float32
    _assert_batches_equal(batches, _take(iter(_dataset()), 3))
    other = _take(iter(_dataset(seed=1)), 3)
    assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(batches, other))


def test_pipeline_epochs_and_shards():
    assert len(list(_dataset(num_epochs=2, epoch_len=13))) == 8
    full = _take(iter(_dataset(batch_size=4)), 2)
    halves = [_take(iter(_dataset(batch_size=2, shard_index=i, shard_count=2)), 2)
              for i in range(2)]
    for step, batch in enumerate(full):
        for key in batch:
            np.testing.assert_array_equal(
                batch[key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_pipeline_resume_from_state():
    it = iter(_dataset())
    next(it)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = iter(_dataset())
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), expected)


def test_pipeline_worker_matches_in_process_and_resumes():
    expected = _take(iter(_dataset()), 3)
    it = iter(_dataset(num_workers=1))
    try:
        first = next(it)
        state = it.get_state()
        _assert_batches_equal([first] + _take(it, 2), expected)
        it.set_state(state)
        _assert_batches_equal(_take(it, 2), expected[1:])
    finally:
        it.close()


def test_make_global_batch():
    batch = next(iter(_dataset()))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    out = make_global_batch(batch, sharding)
    for key, value in batch.items():
        assert out[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[key]), value)


def test_train_dataset_argument_errors():
    with pytest.raises(ValueError, match='shard_index'):
        _dataset(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match='epoch_len'):
        _dataset(epoch_len=2)
    with pytest.raises(ValueError, match='source'):
        train_dataset([], crop_size=48, batch_size=2, seed=0)


def test_pipeline_on_synthetic_train_source(tmp_path):
    source = load_train_source('Synthetic', data_dir=tmp_path,
                               synthetic=SyntheticConfig(image_size=(64, 64), num_train=4,
                                                         num_val=1))
    batch = next(iter(train_dataset(source, crop_size=48, batch_size=2, seed=0, epoch_len=4,
                                    min_object_area=50)))
    assert batch['image'].shape == (2, 48, 48, 3) and batch['gt'].shape == (2, 48, 48)
    for points in batch['points']:
        _assert_padding(points)
