"""Datasets: TFDS ArrayRecord builds of the original folders and their readers.

`load_eval_dataset` (one sample per evaluated instance) and `load_train_source` (one sample per
image with all object masks) build on first use, without TensorFlow; `SyntheticConfig` describes
the generated dataset that needs no files.
"""

from skipclick_jax.data.eval_datasets import EVAL_DATASETS, WSESEG_CLASSES, load_eval_dataset
from skipclick_jax.data.synthetic import SyntheticConfig, synthetic_sample
from skipclick_jax.data.train_datasets import TRAIN_DATASETS, TrainSource, load_train_source

__all__ = [
    "EVAL_DATASETS",
    "TRAIN_DATASETS",
    "WSESEG_CLASSES",
    "SyntheticConfig",
    "TrainSource",
    "load_eval_dataset",
    "load_train_source",
    "synthetic_sample",
]
