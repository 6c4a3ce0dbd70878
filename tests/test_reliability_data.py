"""Reliability of the dataset caches: a build is keyed by a fingerprint of the folder's files, so a
changed or emptied folder is rebuilt (never the old records); concurrent builders of one cache
both succeed with the same records."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from skipclick_jax.data import builders
from skipclick_jax.data.eval_datasets import load_eval_dataset
from skipclick_jax.data.folder_datasets import LayoutError
from tests import fixtures_data as testing

from tests.helpers import ROOT


def _gts(ds) -> list[np.ndarray]:
    return [ds[i]["gt"] for i in range(len(ds))]


def test_fingerprint_changes_with_any_file_change(tmp_path):
    root = testing.write_grabcut(tmp_path / "GrabCut")
    first = builders.folder_fingerprint(root)
    assert builders.folder_fingerprint(root) == first
    mask = root / "boundary_GT" / "flower.bmp"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 1))
    second = builders.folder_fingerprint(root)
    assert second != first
    (root / "data_GT" / "extra.txt").write_text("x")
    assert builders.folder_fingerprint(root) not in (first, second)


def test_changed_masks_and_emptied_folder_are_not_served_from_the_cache(tmp_path):
    root = testing.write_grabcut(tmp_path / "GrabCut")
    data_dir = tmp_path / "tfds"
    before = _gts(load_eval_dataset("GrabCut", root, data_dir))
    assert [int((g == 1).sum()) for g in before] == [301, 301]

    # The masks change (same file names): the next load sees the new masks.
    for name in ("flower", "sheep"):
        m = np.zeros((testing.H, testing.W), np.uint8)
        m[:10, :10] = 255
        assert cv2.imwrite(str(root / "boundary_GT" / f"{name}.bmp"), m)
    after = _gts(load_eval_dataset("GrabCut", root, data_dir))
    assert [int((g == 1).sum()) for g in after] == [100, 100]

    # The folder is emptied: a layout error, not the old records.
    for p in (root / "data_GT").iterdir():
        p.unlink()
    with pytest.raises(LayoutError, match=r"GrabCut: expected .*; no \*\.\* images in .*data_GT"):
        load_eval_dataset("GrabCut", root, data_dir)


def test_two_processes_building_one_cache(tmp_path):
    root = testing.write_davis(tmp_path / "DAVIS")
    data_dir = tmp_path / "tfds"
    code = ("import sys, hashlib, numpy as np; from skipclick_jax.data.eval_datasets import load_eval_dataset; "
            "ds = load_eval_dataset('DAVIS', sys.argv[1], sys.argv[2]); "
            "h = hashlib.sha1(b''.join(np.ascontiguousarray(ds[i]['gt']).tobytes() for i in range(len(ds)))); "
            "print(len(ds), h.hexdigest())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(data_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    lines = [o.strip().splitlines()[-1] for o, _ in outs]
    assert lines[0] == lines[1] and lines[0].startswith("2 "), lines
    builds = list((data_dir / "skipclick_eval").glob("davis-val-*/1.0.0"))
    assert len(builds) == 1, builds
