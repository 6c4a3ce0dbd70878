"""A `test_tiny` SkipClick trained briefly on the synthetic shapes, for tests that need a model
whose clicks mean something (the app's browser test, ONNX mask agreement).

A direct loop over the project's jitted train step (click simulation, NFL loss, Adam) at crop
112 (the main job's `configs/tiny_synthetic.py` model), one object and one positive click (its
deepest pixel) per sample. The checkpoint is kept under pytest's cache, keyed by a hash of the
code it depends on, so it is trained once per checkout and code state (under a file lock: pytest-xdist
workers running different modules wait for the one that trains it).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import pathlib

import numpy as np

from tests.helpers import ROOT

STEPS, BATCH, CROP, SLOTS, LR = 150, 8, 112, 8, 1e-3


def _batch(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from scipy.ndimage import distance_transform_edt

    from skipclick_jax.data.synthetic import synthetic_sample

    images, gts, points = [], [], []
    for _ in range(BATCH):
        sample = synthetic_sample(cfg, "train", int(rng.integers(cfg.num_train)))
        label = sample["layers"][..., 0]
        gt = label == rng.integers(1, sample["num_instance_masks"] + 1)
        dist = distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        pts = -np.ones((2 * SLOTS, 3), np.float32)
        pts[0] = (r, c, 0)
        images.append(sample["image"])
        gts.append(gt.astype(np.float32))
        points.append(pts)
    return dict(image=np.stack(images), gt=np.stack(gts), points=np.stack(points))


SOURCES = ("tests/tiny_trained.py", "skipclick_jax/model", "skipclick_jax/train", "skipclick_jax/clicks.py",
           "skipclick_jax/data/synthetic.py", "skipclick_jax/edt.py", "skipclick_jax/resize.py")


def _code_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        path = ROOT / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def trained_checkpoint(cache_root: str) -> pathlib.Path:
    """A project checkpoint of the trained model under `cache_root` (trained if not there)."""
    path = pathlib.Path(cache_root) / f"tiny_trained-{_code_hash()}"
    with open(pathlib.Path(cache_root) / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            _train(path)
    return path


def _train(path: pathlib.Path) -> None:
    import jax
    import optax
    from flax import nnx

    from skipclick_jax import checkpoint, config_lib
    from skipclick_jax.data.synthetic import SyntheticConfig
    from skipclick_jax.model import build_model
    from skipclick_jax.train import state as state_lib
    from skipclick_jax.train import step as step_lib

    cfg = config_lib.base_config(config_lib.tiny_model_config())
    cfg.model.crop_size = CROP
    model = build_model(cfg.model, seed=0)
    graphdef, params, frozen = state_lib.split_model(model, frozen_backbone=True)
    tx = optax.adam(LR)
    step = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(LR),
                                            max_num_next_clicks=2), donate_argnums=0)
    state = state_lib.init_state(params, tx, seed=0)
    data = SyntheticConfig(image_size=(CROP, CROP), num_train=256)
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        state, metrics = step(state, frozen, _batch(data, rng))
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"tiny training diverged: {metrics}")
    trained = nnx.merge(graphdef, state.params, frozen)
    checkpoint.save(path, trained, cfg, overwrite=True)
