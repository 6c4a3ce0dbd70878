"""NoC evaluation of a checkpoint with the original's protocol (docs/design/evaluation.md).

  python eval.py --checkpoint CKPT --dataset GrabCut=/data/GrabCut [--dataset DAVIS=/data/DAVIS ...]
      --out OUT [--config configs/x.py[:arg]] [--config.eval.batch_size=16 ...] [--overlays N]
      [--no-flip] [--size S] [--all-clicks] [--dtype bfloat16] [--overwrite]

Options and outputs: `skipclick_jax.evaluation.cli`, which holds this command line (`main`).
"""

from __future__ import annotations

import sys

from skipclick_jax.evaluation.cli import main
from skipclick_jax.evaluation.evaluate import evaluate

__all__ = ["evaluate", "main"]

if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as e:  # CheckpointError, ConfigError, LayoutError
        sys.exit(f"eval.py: error: {e}")
