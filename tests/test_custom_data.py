"""The user's own data: COCO instances JSON and ImageMasks folders, for evaluation and training.

Fixtures are written in the real formats by tests/custom_data_fixtures.py (pycocotools RLE,
polygons, crowd regions, palette and 16-bit instance PNGs, ignore values).
"""

import json
import logging
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from skipclick_jax.data import custom_datasets as cd
from skipclick_jax.data import load_eval_dataset, load_train_source
from skipclick_jax.data.augment import Augmenter
from skipclick_jax.data.folder_datasets import LayoutError
from skipclick_jax.data.pipeline import TrainSample
from tests import custom_data_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[1]


def records(source):
    return [source[i] for i in range(len(source))]


def object_masks(sample):
    return [sample["layers"][..., l] == v for l, v in sample["objects"]]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return fx.write_coco(root), root


def test_coco_eval_one_sample_per_object_with_crowd_as_ignore(coco, tmp_path):
    info, _ = coco
    ds = load_eval_dataset("COCO", info["json"], tmp_path)
    expected = [(name.rsplit(".", 1)[0], k, m, info["ignore"][name])
                for name, masks in info["objects"].items() for k, m in enumerate(masks)]
    assert [s["id"] for s in ds] == [f"{stem}#{k}" for stem, k, _, _ in expected]
    for s, (stem, k, mask, ignore) in zip(ds, expected):
        assert s["image"].shape[:2] == mask.shape and s["image"].dtype == np.uint8
        assert s["gt"].dtype == np.int32
        if stem == "a" and k == 2:  # the polygon: pycocotools' rasterisation of the rectangle
            inter = ((s["gt"] == 1) & mask).sum()
            assert inter / ((s["gt"] == 1) | mask).sum() > 0.8
        else:  # RLE: exact
            np.testing.assert_array_equal(s["gt"] == 1, mask)
        np.testing.assert_array_equal(s["gt"] == -1, ignore & ~(s["gt"] == 1))
    assert (ds[0]["gt"] == -1).sum() > 100  # the crowd region of a.jpg
    assert ds[len(ds) - 1]["image"].shape == (900, 1400, 3)


def test_coco_category_filter_and_min_area(coco, tmp_path):
    info, _ = coco
    dogs = load_eval_dataset("COCO", info["json"], tmp_path, options={"categories": ("dog",)})
    assert [s["id"] for s in dogs] == ["sub/b#0"]
    by_id = load_eval_dataset("COCO", info["json"], tmp_path, options={"categories": (2,)})
    assert [s["id"] for s in by_id] == ["sub/b#0"]
    big = load_eval_dataset("COCO", info["json"], tmp_path, options={"min_annotation_area": 400})
    stems = [(n.rsplit(".", 1)[0], m.sum()) for n, ms in info["objects"].items() for m in ms]
    want, counts = [], {}
    for stem, area in stems:  # kept objects are renumbered per image
        if area >= 400:
            want.append(f"{stem}#{counts.get(stem, 0)}")
            counts[stem] = counts.get(stem, 0) + 1
    assert [s["id"] for s in big] == want and 0 < len(want) < len(stems)
    with pytest.raises(ValueError, match="unknown category 'cat'"):
        load_eval_dataset("COCO", info["json"], tmp_path, options={"categories": ("cat",)})


def test_coco_train_records_hold_every_object_as_layers(coco, tmp_path):
    info, _ = coco
    source = load_train_source("COCO", info["json"], data_dir=tmp_path)
    recs = records(source)
    assert [r["id"] for r in recs] == ["a", "sub/b", "c"]
    for r, name in zip(recs, ["a.jpg", "sub/b.png", "c.jpg"]):
        got = object_masks(r)
        want = info["objects"][name]
        assert len(got) == len(want) == r["num_instance_masks"]
        for g, w in zip(got, want):
            assert ((g & w).sum() / (g | w).sum()) > 0.8
        if info["ignore"][name].any():
            np.testing.assert_array_equal(r["ignore"], info["ignore"][name])
        else:
            assert "ignore" not in r


def test_compressed_rle_total_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for h, w in ((7, 9), (48, 80), (300, 200)):
        m = rng.random((h, w)) < 0.3
        m[: h // 2] |= fx.disk(h, w, h / 3, w / 3, min(h, w) / 4)[: h // 2]
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert cd._compressed_rle_total(rle["counts"], "x") == h * w


def test_pack_layers_overlapping_objects():
    a, b, c = fx.rect(20, 20, 0, 0, 10, 10), fx.rect(20, 20, 5, 5, 15, 15), fx.rect(20, 20, 15, 15, 20, 20)
    layers, objects = cd.pack_layers([a, b, c])
    assert layers.shape == (20, 20, 2) and objects.tolist() == [[0, 1], [1, 1], [0, 2]]
    for m, (l, v) in zip([a, b, c], objects):
        np.testing.assert_array_equal(layers[..., l] == v, m)


def test_image_masks_binary_and_per_object_with_ignore(tmp_path, caplog):
    info = fx.write_image_masks(tmp_path / "im")
    with caplog.at_level(logging.WARNING, "skipclick_jax.data"):
        ds = load_eval_dataset("ImageMasks", tmp_path / "im", tmp_path / "tfds",
                               options={"ignore_value": 255})
    assert "1 images without objects (e.g. none.jpg)" in caplog.text
    assert [s["id"] for s in ds] == ["one#0", "two#0", "two#1"]
    want = [(m, info["ignore"][stem]) for stem in ("one", "two") for m in info["objects"][stem]]
    for s, (mask, ignore) in zip(ds, want):
        np.testing.assert_array_equal(s["gt"] == 1, mask)
        np.testing.assert_array_equal(s["gt"] == -1, ignore & ~mask)
    assert (ds[0]["gt"] == -1).any()
    # without an ignore value the 255 band is part of the object
    plain = load_eval_dataset("ImageMasks", tmp_path / "im", tmp_path / "tfds")
    np.testing.assert_array_equal(plain[0]["gt"] == 1, info["objects"]["one"][0] | info["ignore"]["one"])
    train = records(load_train_source("ImageMasks", tmp_path / "im", data_dir=tmp_path / "tfds",
                                      options={"ignore_value": 255}))
    assert [r["id"] for r in train] == ["one", "two"]
    assert train[1]["layers"].shape[2] == 2  # two overlapping objects: two layers
    for r in train:
        for g, w in zip(object_masks(r), info["objects"][r["id"]]):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(train[0]["ignore"], info["ignore"]["one"])


def test_image_masks_instance_labels_palette_and_16_bit(tmp_path):
    info = fx.write_instance_masks(tmp_path / "ins")
    assert Image.open(tmp_path / "ins" / "masks" / "p.png").mode == "P"
    assert Image.open(tmp_path / "ins" / "masks" / "q.png").mode.startswith("I")
    ds = load_eval_dataset("ImageMasks", tmp_path / "ins", tmp_path / "tfds",
                           options={"mask_mode": "instances", "ignore_value": 255})
    assert [s["id"] for s in ds] == ["p#0", "p#1", "p#2", "q#0", "q#1"]
    want = [(m, info["ignore"][stem]) for stem in ("p", "q") for m in info["objects"][stem]]
    for s, (mask, ignore) in zip(ds, want):
        np.testing.assert_array_equal(s["gt"] == 1, mask)
        np.testing.assert_array_equal(s["gt"] == -1, ignore & ~mask)
    binary = load_eval_dataset("ImageMasks", tmp_path / "ins", tmp_path / "tfds")
    assert len(binary) == 2  # binary mode: one object per image


def test_augmenter_moves_ignore_with_the_layers_and_keeps_the_random_stream():
    rng_image = fx.smooth_image(0, 60, 90)
    layers = fx.rect(60, 90, 10, 10, 40, 50).astype(np.uint8)[..., None]
    ignore = fx.rect(60, 90, 5, 5, 45, 55)
    objects, parents = np.array([[0, 1]], np.int32), np.array([-1], np.int32)
    aug = Augmenter(crop_size=48, min_object_area=10)
    a = aug.augment(rng_image, layers, objects, parents, np.random.default_rng(3), ignore=ignore)
    b = aug(rng_image, layers, objects, parents, np.random.default_rng(3))
    for x, y in zip(a[:4], b):
        np.testing.assert_array_equal(x, y)
    # the ignore box contains the object box, so after any crop the object lies within it
    assert a[4].shape == (48, 48) and a[4].dtype == bool
    assert not ((a[1][..., 0] == 1) & ~a[4]).any()

    sample = TrainSample(source=[{"image": rng_image, "layers": layers, "objects": objects,
                                  "parents": parents, "num_instance_masks": 1, "ignore": ignore}],
                         seed=0, augmenter=aug)
    gts = [sample(i)["gt"] for i in range(6)]
    assert any((g == -1).any() for g in gts)
    for g in gts:
        assert set(np.unique(g)) <= {-1.0, 0.0, 1.0}


# ------------------------------------------------------------------------------------ bad input
def _coco_copy(coco, tmp_path, edit):
    info, root = coco
    dst = tmp_path / "c"
    shutil.copytree(root, dst)
    data = json.loads((dst / "annotations.json").read_text())
    edit(data, dst)
    (dst / "annotations.json").write_text(json.dumps(data))
    return dst / "annotations.json"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 3 // 4])  # the header stays readable


def _first(data, image_id):
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


@pytest.mark.parametrize("edit, match", [
    (lambda d, r: d["annotations"][0]["segmentation"].update(size=[10, 10]),
     r"annotation id 101.*RLE size \[10, 10\] differs"),
    (lambda d, r: d["annotations"][0].update(category_id=7), "annotation id 101 has unknown category_id 7"),
    (lambda d, r: d["annotations"][0]["segmentation"].update(counts="0j1"),
     r"annotation id 101.*compressed RLE covers \d+ pixels, expected height\*width = 3840"),
    (lambda d, r: d["annotations"][0]["segmentation"].update(counts="f03\x7f"),
     "annotation id 101.*malformed compressed RLE"),
    (lambda d, r: d["annotations"][1]["segmentation"]["counts"].append(5),
     "annotation id 102.*uncompressed RLE counts sum to 3845"),
    (lambda d, r: (r / "images" / "a.jpg").unlink(), "image id 1 file_name 'a.jpg': missing"),
    (lambda d, r: (r / "images" / "a.jpg").write_bytes(b"not a jpeg"), "a.jpg"),
    (lambda d, r: _truncate(r / "images" / "a.jpg"),
     r"COCO: cannot decode image .*a.jpg: image file is truncated"),
    (lambda d, r: d["images"][0].update(height=47), r"a.jpg is 48x80 \(HxW\) but the JSON says 47x80"),
    (lambda d, r: d["images"].append(dict(d["images"][0], id=77)), "duplicate file_name 'a.jpg'"),
    (lambda d, r: d.update(annotations=[]), "holds no usable object"),
    (lambda d, r: d.pop("categories"), "no 'categories' list"),
])
def test_coco_bad_input_raises_naming_the_culprit(coco, tmp_path, edit, match):
    path = _coco_copy(coco, tmp_path, edit)
    with pytest.raises((ValueError, LayoutError), match=match):
        load_eval_dataset("COCO", path, tmp_path / "tfds")


def test_coco_recoverable_problems_are_skipped_and_counted(coco, tmp_path, caplog):
    def edit(d, r):
        d["annotations"].append(dict(_first(d, 1), id=500, image_id=12345))
        d["annotations"].append(dict(_first(d, 1), id=501, segmentation=[[1, 1, 5, 5]]))
        d["annotations"].append(dict(_first(d, 1), id=502, segmentation=[[-5, -5, 30, -5, 30, 20]]))
        d["annotations"].append(dict(_first(d, 1), id=503, segmentation=[]))
        d["annotations"].append(dict(_first(d, 1), id=504, segmentation=[["a", "b", 1, 2, 3, 4]]))

    path = _coco_copy(coco, tmp_path, edit)
    with caplog.at_level(logging.WARNING, "skipclick_jax.data"):
        ds = load_eval_dataset("COCO", path, tmp_path / "tfds")
    text = caplog.text
    assert "1 annotations of unknown image ids (e.g. annotation 500)" in text
    assert "1 polygons with fewer than 3 points" in text and "annotation id 501" in text
    assert "1 polygons reaching outside the image (clipped)" in text
    assert "annotations without a segmentation" in text
    assert "1 malformed polygons (not a list of numbers) (e.g. annotations.json annotation id 504)" in text
    assert "1 images without objects (e.g. empty.jpg)" in text
    assert len(ds) == 7  # 6 objects + the clipped polygon
    clipped = ds[3]["gt"] == 1
    assert clipped[0, 20] and not clipped[15, 5] and clipped.sum() > 100


def test_image_masks_bad_input(tmp_path):
    root = tmp_path / "im"
    fx.write_image_masks(root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "two_3.png")
    with pytest.raises(ValueError, match=r"two_3.png has size \(10, 10\) but image .*two.png"):
        load_eval_dataset("ImageMasks", root, tmp_path / "tfds")
    (root / "masks" / "two_3.png").unlink()
    fx.write_rgb(root / "images" / "one.png", fx.smooth_image(0, 40, 64))
    with pytest.raises(LayoutError, match="duplicate image stem 'one'"):
        load_eval_dataset("ImageMasks", root, tmp_path / "tfds")
    (root / "images" / "one.png").unlink()
    Image.fromarray(np.ones((10, 10), np.uint8)).save(root / "masks" / "stray.png")
    with pytest.raises(LayoutError, match="stray.png has no image"):
        load_eval_dataset("ImageMasks", root, tmp_path / "tfds")
    (root / "masks" / "stray.png").unlink()
    Image.fromarray(np.ones((40, 64, 3), np.uint8)).save(root / "masks" / "one.png")
    with pytest.raises(ValueError, match="one.png is RGB with 3 channels"):
        load_eval_dataset("ImageMasks", root, tmp_path / "tfds", options={"mask_mode": "instances"})
    for p in (root / "masks").iterdir():
        Image.fromarray(np.zeros(Image.open(p).size[::-1], np.uint8)).save(p)
    with pytest.raises(ValueError, match="holds no usable object"):
        load_eval_dataset("ImageMasks", root, tmp_path / "tfds")
    with pytest.raises(ValueError, match="mask_mode"):
        cd.CustomOptions(mask_mode="rgb")


def test_rebuilt_when_a_file_changes(tmp_path):
    root = tmp_path / "im"
    fx.write_image_masks(root)
    assert len(load_eval_dataset("ImageMasks", root, tmp_path / "tfds")) == 3
    (root / "masks" / "two_2.png").unlink()
    assert len(load_eval_dataset("ImageMasks", root, tmp_path / "tfds")) == 2


def test_roots_are_checked_before_any_build(tmp_path, coco):
    info, root = coco
    with pytest.raises(LayoutError, match="annotation file .*none.json does not exist"):
        load_train_source("COCO", tmp_path / "none.json", data_dir=tmp_path / "tfds")
    with pytest.raises(LayoutError, match="is a folder, not a file"):
        load_eval_dataset("COCO", root, tmp_path / "tfds")
    with pytest.raises(LayoutError, match="ImageMasks: dataset root folder .*nowhere does not exist"):
        load_eval_dataset("ImageMasks", tmp_path / "nowhere", tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


def test_custom_eval_sets_with_a_root_are_evaluated_after_training():
    cfg = {"eval_datasets": ("GrabCut",), "eval_roots": {"GrabCut": "", "COCO": "v.json", "ImageMasks": ""}}
    assert cd.eval_dataset_names(cfg) == ("GrabCut", "COCO")
    assert cd.eval_dataset_names({**cfg, "eval_datasets": ("COCO",)}) == ("COCO",)


def test_config_keys_and_validation():
    from skipclick_jax import config_lib

    cfg = config_lib.load_config_file(ROOT / "configs" / "finetune.py")
    assert cfg.data.eval_datasets == ("COCO", "ImageMasks") and cfg.model.backbone.frozen
    assert set(cfg.data.eval_roots) >= {"COCO", "ImageMasks", "GrabCut"}
    cfg.data.update(name="COCO", mask_mode="instances", ignore_value=255, categories=("person", 3))
    config_lib.validate_config(cfg)
    for key, value, match in (("mask_mode", "rgb", "data.mask_mode='rgb'"),
                              ("ignore_value", 0, "background"),
                              ("min_annotation_area", -1, "min_annotation_area")):
        bad = config_lib.load_config_file(ROOT / "configs" / "finetune.py")
        bad.data[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate_config(bad)
    opts = cd.CustomOptions.from_config(cd.custom_data_defaults({"mask_mode": "instances"}))
    assert opts == cd.CustomOptions(mask_mode="instances")


def test_coco_through_the_training_pipeline_marks_crowd_as_ignore(coco, tmp_path):
    from skipclick_jax.data.pipeline import train_dataset

    info, _ = coco
    source = load_train_source("COCO", info["json"], data_dir=tmp_path)
    it = iter(train_dataset(source, crop_size=64, batch_size=4, seed=0, epoch_len=64, num_epochs=1,
                            min_object_area=10))
    batches = list(it)
    assert len(batches) == 16
    gts = np.concatenate([b["gt"] for b in batches])
    assert gts.shape == (64, 64, 64) and set(np.unique(gts)) == {-1.0, 0.0, 1.0}
    assert all(b["image"].shape == (4, 64, 64, 3) and b["points"].shape == (4, 48, 3) for b in batches)
