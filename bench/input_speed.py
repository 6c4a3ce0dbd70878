"""Training input pipeline speed: samples/s of `train_dataset` at crop 448 (record read, image and
mask decode, augmentation, MultiPointSampler, batching) with 0, 1 and 2 grain worker processes,
on COCO-format data (640x480 JPEGs, about 7 objects per image) beside the Synthetic source, and
where the time of one sample goes.

    python bench/input_speed.py [--images 64] [--batches 12] [--batch 8] [--workers 0,1,2]
        [--data-dir DIR]

The COCO data (compressed-RLE and polygon objects, written with pycocotools) and the TFDS builds
go to a temporary folder unless --data-dir is given. 'samples/s' is the median of 3 runs of
--batches batches after one warm-up batch (the workers' start-up excluded). The stage table times
one process: reading the record (ArrayRecord + TFDS deserialisation; for Synthetic this includes
TFDS' zlib of its layers), decoding the JPEG/PNG, decoding the masks (COCO / ImageMasks layers and
ignore regions), the augmentation (resize, crop, flip, colour LUT, object areas) and the sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CROP = 448


def write_coco_data(root: pathlib.Path, num_images: int, seed: int = 0) -> pathlib.Path:
    """<root>/annotations.json + <root>/images/*.jpg: 640x480 JPEGs (quality 90) of smooth noise
    with 5-9 filled ellipses/polygons each, half as compressed RLE, half as polygons."""
    import cv2
    import numpy as np

    from tests.custom_data_fixtures import rle_compressed, smooth_image, write_rgb

    rng = np.random.default_rng(seed)
    h, w = 480, 640
    images, annotations = [], []
    for i in range(num_images):
        image = smooth_image(seed * 100000 + i, h, w)
        for k in range(int(rng.integers(5, 10))):
            mask = np.zeros((h, w), np.uint8)
            center = (int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40)))
            if k % 2:
                axes = (int(rng.integers(15, 120)), int(rng.integers(15, 120)))
                cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
                segmentation = rle_compressed(mask.astype(bool))
            else:
                angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
                radii = rng.uniform(20, 110, 8)
                poly = np.stack([center[0] + radii * np.cos(angles),
                                 center[1] + radii * np.sin(angles)], axis=1).clip(0, [w - 1, h - 1])
                cv2.fillPoly(mask, [poly.round().astype(np.int32)], 1)
                segmentation = [poly.ravel().round(2).tolist()]
            image[mask.astype(bool)] = rng.integers(0, 256, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "iscrowd": 0, "segmentation": segmentation,
                                "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})
        write_rgb(root / "images" / f"{i:06d}.jpg", image, quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def samples_per_second(source, workers: int, batches: int, batch: int) -> float:
    from skipclick_jax.data.pipeline import train_dataset

    ds = train_dataset(source, crop_size=CROP, batch_size=batch, seed=0, num_workers=workers,
                       epoch_len=100000, min_object_area=1000)
    it = iter(ds)
    next(it)  # start-up (worker processes, first reads)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch / (time.perf_counter() - start))
    return sorted(rates)[1]


def stage_times(source, samples: int) -> dict[str, float]:
    """Mean milliseconds per sample of each stage, in this process."""
    import numpy as np

    from skipclick_jax.data import builders
    from skipclick_jax.data import folder_datasets as fd
    from skipclick_jax.data.augment import Augmenter
    from skipclick_jax.data.points_sampler import MultiPointSampler, select_stuff

    records = source._records
    augmenter, sampler = Augmenter(crop_size=CROP, min_object_area=1000), MultiPointSampler()
    names = ("read record", "decode JPEG", "decode masks", "augment", "sampler")
    totals = np.zeros(len(names))
    rng = np.random.default_rng(0)
    for i in range(samples):
        t = [time.perf_counter()]
        record = records[i % len(records)]
        t.append(time.perf_counter())
        image = fd.decode_rgb(record["image"], i)
        t.append(time.perf_counter())
        ignore = None
        if "layers_shape" in record:
            layers = builders.unpack_array(record["layers"], record["layers_shape"], i)
            if len(record["ignore"]):
                ignore = builders.unpack_array(record["ignore"], layers.shape[:2], i).view(bool)
        else:
            layers = np.asarray(record["layers"], np.uint8)
        t.append(time.perf_counter())
        objects, parents = select_stuff(np.asarray(record["objects"]).reshape(-1, 2),
                                        np.asarray(record["parents"]),
                                        int(record["num_instance_masks"]), 0.3, rng)
        image, layers, objects, parents, _ = augmenter.augment(image, layers, objects, parents, rng,
                                                               ignore=ignore)
        t.append(time.perf_counter())
        sampler(layers, objects, parents, rng)
        t.append(time.perf_counter())
        totals += np.diff(t)
    return dict(zip(names, 1000 * totals / samples))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--data-dir", default=None, help="folder for the COCO data and TFDS builds")
    args = parser.parse_args(argv)

    import numpy as np

    from skipclick_jax.data import SyntheticConfig, load_train_source
    from skipclick_jax.runtime import versions_line

    work = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="input_speed-"))
    json_path = work / "coco" / "annotations.json"
    if not json_path.is_file():
        write_coco_data(work / "coco", args.images)
    start = time.perf_counter()
    coco = load_train_source("COCO", json_path, data_dir=work / "tfds")
    build = time.perf_counter() - start
    synthetic = load_train_source("Synthetic", data_dir=work / "tfds", synthetic=SyntheticConfig(
        image_size=(480, 640), num_train=args.images))
    objects = np.mean([len(coco._records[i]["objects"]) for i in range(len(coco))])
    print(f"# {versions_line()}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"COCO: {len(coco)} images 640x480, {objects:.1f} objects/image, TFDS build {build:.1f} s; "
          f"batch {args.batch}, crop {CROP}, {args.batches} timed batches\n")
    print("| source | workers | samples/s | per worker process |\n|---|---|---|---|")
    for name, source in (("COCO", coco), ("Synthetic", synthetic)):
        for workers in map(int, args.workers.split(",")):
            rate = samples_per_second(source, workers, args.batches, args.batch)
            print(f"| {name} | {workers} | {rate:.1f} | {rate / max(workers, 1):.1f} |", flush=True)
    print("\nms per sample by stage (one process):\n\n| source | " +
          " | ".join(stage_times(coco, 2)) + " |\n|---|---|---|---|---|---|")
    for name, source in (("COCO", coco), ("Synthetic", synthetic)):
        times = stage_times(source, 4 * args.batch)
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in times.values()) + " |")


if __name__ == "__main__":
    main()
