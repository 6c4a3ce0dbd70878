"""Dataset builders and readers on tiny fixture folders in the real on-disk layouts."""

import dataclasses
import os
import pathlib
import pickle
import shutil
import sys

import cv2
import grain
import numpy as np
import pytest
from PIL import Image

from skipclick_jax.data import (
    EVAL_DATASETS,
    WSESEG_CLASSES,
    SyntheticConfig,
    load_eval_dataset,
    load_train_source,
    synthetic_sample,
)
from skipclick_jax.data.folder_datasets import HQSEG_SUBSETS, LayoutError
from tests import fixtures_data as fx

SYNTH = SyntheticConfig(image_size=(48, 64), num_train=4, num_val=3)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    return {
        "GrabCut": fx.write_grabcut(base / "grabcut"),
        "Berkeley": fx.write_berkeley(base / "berkeley"),
        "DAVIS": fx.write_davis(base / "davis"),
        "SBD": fx.write_sbd(base / "sbd"),
        "HQSeg44k": fx.write_hqseg44k(base / "hqseg"),
        "SHSeg": fx.write_shseg(base / "shseg"),
        "WSESeg": fx.write_wseseg(base / "wseseg"),
        "COCO+LVIS": fx.write_coco_lvis(base / "cocolvis"),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def cv2_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def grabcut_gt(mask: np.ndarray) -> np.ndarray:
    return np.where(mask == 128, -1, np.where((mask > 128) | (mask == 1), 1, 0))


def check_sample(sample, sample_id, image, gt):
    assert sample["id"] == sample_id
    assert sample["image"].dtype == image.dtype and sample["image"].shape == image.shape
    np.testing.assert_array_equal(sample["image"], image)
    assert sample["gt"].dtype == np.int32
    np.testing.assert_array_equal(sample["gt"], gt)


def test_grabcut(roots, data_dir):
    root = roots["GrabCut"]
    ds = load_eval_dataset("GrabCut", root, data_dir)
    assert isinstance(ds, grain.MapDataset) and len(ds) == 2
    for sample, (name, seed) in zip(ds, [("flower", 1), ("sheep", 0)], strict=True):
        gt = grabcut_gt(fx.grabcut_mask(seed))
        assert set(np.unique(gt)) == {-1, 0, 1}
        check_sample(sample, f"{name}#0", cv2_rgb(root / "data_GT" / f"{name}.jpg"), gt)


def test_berkeley(roots, data_dir):
    root = roots["Berkeley"]
    ds = load_eval_dataset("Berkeley", root, data_dir)
    expected = [("12003", 1), ("21077", 2), ("42049", 0)]
    assert [s["id"] for s in ds] == [f"{n}#0" for n, _ in expected]
    for i, (name, seed) in enumerate(expected):
        check_sample(ds[i], f"{name}#0", cv2_rgb(root / "images" / f"{name}.jpg"),
                     grabcut_gt(fx.grabcut_mask(seed)))


def test_davis(roots, data_dir):
    root = roots["DAVIS"]
    ds = load_eval_dataset("DAVIS", root, data_dir)
    for sample, (name, seed) in zip(ds, [("bear", 1), ("boat", 0)], strict=True):
        check_sample(sample, f"{name}#0", cv2_rgb(root / "img" / f"{name}.jpg"),
                     fx.davis_mask(seed).max(axis=2) > 0)


def test_sbd_eval_follows_val_txt_and_instance_ids(roots, data_dir):
    root = roots["SBD"]
    ds = load_eval_dataset("SBD", root, data_dir)
    expected = [("2008_000009", 0, 1), ("2008_000009", 0, 2),
                ("2008_000008", 1, 1), ("2008_000008", 1, 2), ("2008_000008", 1, 4)]
    assert len(ds) == len(expected)
    counts = {}
    for sample, (name, seed, instance_id) in zip(ds, expected, strict=True):
        k = counts[name] = counts.get(name, -1) + 1
        check_sample(sample, f"{name}#{k}", cv2_rgb(root / "img" / f"{name}.jpg"),
                     fx.sbd_instances(seed) == instance_id)


def test_hqseg44k_val_subfolder_order(roots, data_dir):
    root = roots["HQSeg44k"]
    ds = load_eval_dataset("HQSeg44k", root, data_dir)
    assert len(ds) == len(HQSEG_SUBSETS["val"])
    for i, (sample, (_, image_dir, mask_dir)) in enumerate(zip(ds, HQSEG_SUBSETS["val"], strict=True)):
        mask = cv2.imread(str(root / mask_dir / f"img{i}.png"))
        assert sample["gt"][0, 0] == 1  # anti-aliased value 3 counts as foreground
        check_sample(sample, f"img{i}#0", cv2_rgb(root / image_dir / f"img{i}.jpg"), mask.max(axis=2) > 0)


def float_rgb(path) -> np.ndarray:
    image = np.array(Image.open(path)) / 255.0
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=2)
    return image.astype(np.float32)


@pytest.mark.parametrize("name", ["SHSeg", *(f"WSESeg_{c}" for c in WSESEG_CLASSES)])
def test_wseseg_and_shseg(roots, data_dir, name):
    if name == "SHSeg":
        root = folder = roots["SHSeg"]
    else:
        root, cls = roots["WSESeg"], name.removeprefix("WSESeg_")
        folder = root / ("yt_sports/skijump/annotated_frames/0" if cls == "yt_sports" else cls)
    ds = load_eval_dataset(name, root, data_dir)
    expected = [("frame_a", 1, 5), ("frame_b", 0, 3), ("frame_b", 0, 7)]
    assert [s["id"] for s in ds] == ["frame_a#0", "frame_b#0", "frame_b#1"]
    for sample, (stem, seed, instance_id) in zip(ds, expected, strict=True):
        assert sample["image"].dtype == np.float32 and sample["image"].max() <= 1.0
        check_sample(sample, sample["id"], float_rgb(folder / f"{stem}.jpg"),
                     fx.wseseg_mask(seed) == instance_id)


def test_synthetic_eval_is_one_sample_per_object(data_dir):
    ds = load_eval_dataset("Synthetic", data_dir=data_dir, synthetic=SYNTH)
    expected = []
    for i in range(SYNTH.num_val):
        sample = synthetic_sample(SYNTH, "val", i)
        for k in range(sample["num_instance_masks"]):
            expected.append((f"val_{i:05d}#{k}", sample["image"], sample["layers"][:, :, 0] == k + 1))
    assert len(ds) == len(expected)
    for sample, (sample_id, image, gt) in zip(ds, expected, strict=True):
        check_sample(sample, sample_id, image, gt)


def test_eval_names_are_the_evaluation_scripts():
    assert len(EVAL_DATASETS) == 19 and EVAL_DATASETS[-2:] == ("COCO", "ImageMasks") and "HQSeg44k" in EVAL_DATASETS and "WSESeg_yt_sports" in EVAL_DATASETS


def test_cache_is_keyed_by_root(roots, data_dir, tmp_path):
    other = shutil.copytree(roots["GrabCut"], tmp_path / "grabcut_copy")
    for folder in ("data_GT", "boundary_GT"):
        next((other / folder).glob("sheep.*")).unlink()
    assert [s["id"] for s in load_eval_dataset("GrabCut", other, data_dir)] == ["flower#0"]
    assert len(load_eval_dataset("GrabCut", roots["GrabCut"], data_dir)) == 2
    moved = other.rename(tmp_path / "moved")  # the cache is never served for a folder that is gone
    with pytest.raises(LayoutError, match="grabcut_copy does not exist"):
        load_eval_dataset("GrabCut", other, data_dir)
    assert len(load_eval_dataset("GrabCut", moved, data_dir)) == 1


def test_coco_lvis_train(roots, data_dir):
    root = roots["COCO+LVIS"]
    source = load_train_source("COCO+LVIS", root, "train", data_dir)
    assert len(source) == 2
    for i, (image_id, seed) in enumerate([("000000000139", 1), ("000000000285", 0)]):
        sample = source[i]
        assert sample["id"] == image_id
        np.testing.assert_array_equal(sample["image"], cv2_rgb(root / "train/images" / f"{image_id}.jpg"))
        assert sample["layers"].dtype == np.uint8
        np.testing.assert_array_equal(sample["layers"], fx.coco_lvis_layers(seed))
        np.testing.assert_array_equal(sample["objects"], [[0, 1], [0, 2], [1, 1]])
        assert sample["objects"].dtype == np.int32 and sample["parents"].dtype == np.int32
        np.testing.assert_array_equal(sample["parents"], [-1, 0, -1])
        assert sample["num_instance_masks"] == 2
    restored = pickle.loads(pickle.dumps(source))
    assert grain.MapDataset.source(restored)[1]["id"] == "000000000285"


def test_sbd_train_drops_buggy_masks(roots, data_dir):
    root = roots["SBD"]
    source = load_train_source("SBD", root, "train", data_dir)
    assert [source[i]["id"] for i in range(len(source))] == ["2008_000002", "2008_000003"]
    sample = source[1]
    expected = fx.sbd_instances(1)
    expected[expected == 4] = 0
    np.testing.assert_array_equal(sample["layers"][:, :, 0], expected)
    np.testing.assert_array_equal(sample["objects"], [[0, 1], [0, 2]])
    np.testing.assert_array_equal(sample["parents"], [-1, -1])
    assert sample["num_instance_masks"] == 2
    np.testing.assert_array_equal(sample["image"], cv2_rgb(root / "img/2008_000003.jpg"))


def test_hqseg44k_train(roots, data_dir):
    root = roots["HQSeg44k"]
    source = load_train_source("HQSeg44k", root, "train", data_dir)
    offset = len(HQSEG_SUBSETS["val"])
    assert len(source) == len(HQSEG_SUBSETS["train"])
    for i, (subset, image_dir, mask_dir) in enumerate(HQSEG_SUBSETS["train"]):
        sample = source[i]
        assert sample["id"] == f"{subset}/img{offset + i}"
        mask = cv2.imread(str(root / mask_dir / f"img{offset + i}.png")).max(axis=2) > 0
        np.testing.assert_array_equal(sample["layers"], mask[:, :, None].astype(np.uint8))
        np.testing.assert_array_equal(sample["objects"], [[0, 1]])
        np.testing.assert_array_equal(sample["image"], cv2_rgb(root / image_dir / f"img{offset + i}.jpg"))


def test_synthetic_train_matches_generator(data_dir):
    source = load_train_source("Synthetic", None, "train", data_dir, synthetic=SYNTH)
    assert len(source) == SYNTH.num_train
    for i in range(len(source)):
        stored, generated = source[i], synthetic_sample(SYNTH, "train", i)
        assert stored.keys() == generated.keys()
        for key in stored:
            np.testing.assert_array_equal(stored[key], generated[key], err_msg=key)


def test_synthetic_generator_is_deterministic_and_well_formed():
    cfg = SyntheticConfig(image_size=(64, 80))
    a = synthetic_sample(cfg, "train", 7)
    b = synthetic_sample(dataclasses.replace(cfg, num_train=9), "train", 7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = synthetic_sample(dataclasses.replace(cfg, seed=1), "train", 7)
    assert not np.array_equal(a["image"], c["image"])
    for i in range(6):
        s = synthetic_sample(cfg, "val", i)
        k = s["num_instance_masks"]
        assert cfg.min_objects <= k <= cfg.max_objects
        assert s["image"].shape == (64, 80, 3) and s["image"].dtype == np.uint8
        assert s["layers"].shape == (64, 80, 1) and s["layers"].dtype == np.uint8
        areas = np.bincount(s["layers"].ravel(), minlength=k + 1)
        assert len(areas) == k + 1 and areas[1:].min() >= cfg.min_visible_fraction * 64 * 80
        np.testing.assert_array_equal(s["objects"], np.stack([np.zeros(k), np.arange(1, k + 1)], 1))
    with pytest.raises(IndexError, match="out of range"):
        synthetic_sample(cfg, "val", cfg.num_val)


def test_missing_folder_names_path_and_layout(roots, tmp_path, data_dir):
    root = shutil.copytree(roots["GrabCut"], tmp_path / "g")
    shutil.rmtree(root / "boundary_GT")
    with pytest.raises(LayoutError, match=r"GrabCut: expected <root>/data_GT/.*boundary_GT"):
        load_eval_dataset("GrabCut", root, data_dir)
    with pytest.raises(LayoutError, match="root folder .* does not exist"):
        load_eval_dataset("DAVIS", tmp_path / "nowhere", data_dir)


@pytest.mark.parametrize("name,remove,message", [
    ("DAVIS", "gt/bear.png", "image .*bear.jpg has no mask"),
    ("DAVIS", "img/boat.jpg", "mask .*boat.png has no image"),
    ("SHSeg", "frame_b.jpg", "missing file .*frame_b.jpg"),
    ("SBD", "inst/2008_000008.mat", "missing file .*inst/2008_000008.mat"),
])
def test_unpaired_files_are_named(roots, tmp_path, data_dir, name, remove, message):
    root = shutil.copytree(roots[name], tmp_path / name)
    (root / remove).unlink()
    with pytest.raises(LayoutError, match=message):
        load_eval_dataset(name, root, data_dir)


def test_mask_of_wrong_size_is_named(roots, tmp_path, data_dir):
    root = shutil.copytree(roots["GrabCut"], tmp_path / "g")
    cv2.imwrite(str(root / "boundary_GT/sheep.bmp"), np.zeros((10, 10), np.uint8))
    message = r"sheep.bmp has size \(10, 10\) but image .*sheep.jpg has \(40, 60\)"
    with pytest.raises(ValueError, match=message):
        load_eval_dataset("GrabCut", root, data_dir)


def test_coco_lvis_pickles_may_not_name_other_globals(roots, tmp_path, data_dir):
    root = shutil.copytree(roots["COCO+LVIS"], tmp_path / "c")
    with open(root / "train/masks/000000000285.pickle", "wb") as f:
        pickle.dump(pathlib.PurePosixPath("x"), f)
    with pytest.raises(ValueError, match="000000000285.pickle.*pathlib.*not allowed"):
        load_train_source("COCO+LVIS", root, "train", data_dir)


def test_unknown_names_and_splits(data_dir):
    with pytest.raises(ValueError, match="unknown eval dataset 'Grabcut'"):
        load_eval_dataset("Grabcut", "/tmp", data_dir)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_train_source("SBD", "/tmp", "test", data_dir)
    with pytest.raises(ValueError, match="root folder is required"):
        load_train_source("SBD", None, "train", data_dir)


def test_tensorflow_is_never_imported(tmp_path):
    """In a fresh process (independent of what other tests imported): the builders, an eval
    dataset read from its folder, and the grain train pipeline never import TensorFlow."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        from tests import fixtures_data as testing
        from skipclick_jax.data.eval_datasets import load_eval_dataset
        root = testing.write_grabcut({str(tmp_path / "GrabCut")!r})
        samples = list(load_eval_dataset("GrabCut", root, {str(tmp_path / "tfds")!r}))
        assert len(samples) == 2 and samples[0]["image"].shape[-1] == 3
        import train  # the trainer and everything it imports (grain pipeline, tfds builders)
        assert "tensorflow_datasets" in sys.modules
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        print("TF_MODULES", bad)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TF_MODULES []" in proc.stdout, proc.stdout[-2000:]
