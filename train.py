r"""Trains SkipClick (docs/design/training.md) with jitted iterative click simulation, then runs the NoC evaluation.

  python train.py --config configs/tiny_synthetic.py --workdir runs/tiny
  python train.py --config configs/skipclick.py --workdir runs/skipclick \
      --config.data.root=/data/cocolvis --init-from dinov2_vitb14_reg4_pretrain.pth

Config values are overridden with --config.<section>.<key>=<value>. Re-running with the same
--workdir resumes from its latest readable checkpoint. The run directory holds checkpoints/
(orbax, with config.json), tensorboard/, images/ (previews), metrics.jsonl and eval/. The trainer
is `skipclick_jax.train.trainer.train_and_evaluate`.
"""

from __future__ import annotations

import logging
import shlex
import sys

from absl import app, flags

from skipclick_jax import checkpoint, config_lib, distributed, storage
from skipclick_jax.runtime import enable_compilation_cache, reuse_large_buffers
from skipclick_jax.train import run_checkpoints as checkpointing
from skipclick_jax.train.preemption import Preempted
from skipclick_jax.train.trainer import train_and_evaluate

config_lib.define_config_flag("config")  # configs/*.py or a run's checkpoints/config.json
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, previews, eval).")
flags.DEFINE_string("init-from", None, "DINOv2 hub/timm backbone file or SkipClick checkpoint to start from.")
flags.DEFINE_bool("log-batch-hashes", False, "Write per-row hashes of each process's input to <workdir>/batches/.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_absl_flags()

log = logging.getLogger("train")


def main(argv):
    del argv
    cfg = flags.FLAGS.config
    distributed.initialize(distributed.launch_from_absl_flags(auto=cfg.train.distributed))
    distributed.configure_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # gcsfs: a line per object read
    enable_compilation_cache()
    reuse_large_buffers()
    try:
        train_and_evaluate(cfg, flags.FLAGS.workdir, flags.FLAGS["init-from"].value,
                           flags.FLAGS["log-batch-hashes"].value)
    except Preempted as e:  # the step is saved and sealed; all processes stopped at it
        print(f"train.py: {e} Resume with the same command: python {shlex.join(sys.argv)}",
              flush=True)
        distributed.shutdown()
        sys.exit(e.exit_code)
    except (config_lib.ConfigError, checkpoint.CheckpointError, checkpointing.WorkdirError,
            checkpointing.CheckpointSaveError, FileNotFoundError, FloatingPointError,
            storage.StorageError) as e:
        log.error("%s: %s", type(e).__name__, e)
        distributed.fail(e)
        sys.exit(f"train.py: error: {e}")
    except BaseException as e:
        distributed.fail(e)
        raise
    distributed.shutdown()


def _parse_flags(argv):
    """absl's flag parsing, with a bad --config file or --config.<key>=<value> as one error line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"train.py: error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).replace("\\'", "'").replace("\\n", " ").strip("'\"")
        sys.exit(f"train.py: error: bad --config or --config.<key>=<value>: {msg}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
