"""`train_and_evaluate`: trains SkipClick (docs/design/training.md) with jitted iterative click simulation, then
runs the NoC evaluation. `train.py` is its command line.

The run directory holds checkpoints/ (orbax, with config.json), tensorboard/, images/
(previews), metrics.jsonl and eval/; re-running with the same directory resumes from its latest
readable checkpoint. The run directory may be local or gs:// (`skipclick_jax.storage`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from skipclick_jax import checkpoint, config_lib, distributed, storage
from skipclick_jax.data.custom_datasets import eval_dataset_names
from skipclick_jax.data.eval_datasets import load_eval_dataset
from skipclick_jax.data.pipeline import make_global_batch, train_dataset
from skipclick_jax.data.points_sampler import MultiPointSampler
from skipclick_jax.data.synthetic import SyntheticConfig
from skipclick_jax.data.train_datasets import load_train_source
from skipclick_jax.evaluation.evaluate import evaluate
from skipclick_jax.model import build_model
from skipclick_jax.defaults.train import profile_range
from skipclick_jax.train import optim, run_checkpoints as checkpointing, sharding, state as state_lib, step as step_lib
from skipclick_jax.train.preemption import Preempted, StopSignals
from skipclick_jax.train.summary import MetricsLog, Writer, preview_image
from skipclick_jax.train.timing import StepTimer, step_flops

__all__ = ["train_and_evaluate"]

log = logging.getLogger("train")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None,
                       log_batch_hashes: bool = False):
    """Trains for cfg.train.num_steps (resuming from `workdir`), then evaluates; returns the
    final TrainState. Raises FloatingPointError on a non-finite loss (checkpoints stay good).

    With several processes (skipclick_jax.distributed) every process runs this: each reads its
    rows of the global batch, all write the checkpoints, process 0 alone writes logs and eval.
    The config is validated first; the workdir is locked, and a config that differs from the
    run's (`checkpointing.RESUMABLE_KEYS` aside) is refused, before anything is written."""
    with contextlib.ExitStack() as cleanup:
        return _train_and_evaluate(cfg, workdir, init_from, cleanup, log_batch_hashes)


def _train_and_evaluate(cfg, workdir, init_from, cleanup: contextlib.ExitStack, log_batch_hashes=False):
    t_start = time.perf_counter()
    config_lib.validate_config(cfg)
    tc = cfg.train
    distributed.initialize(distributed.Launch(auto=tc.distributed))
    workdir = storage.check_access(workdir, write=True, what="--workdir")  # named errors, early
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.is_main()

    # ------------------------------------------------------------------ Mesh
    mesh = sharding.make_mesh(tc.mesh.data, tc.mesh.fsdp)
    if tc.batch_size % mesh.size or tc.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {mesh.size} "
                         f"devices of mesh {dict(mesh.shape)} and by {jax.process_count()} processes")
    steps_per_epoch = cfg.data.epoch_len // tc.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"data.epoch_len={cfg.data.epoch_len} < train.batch_size={tc.batch_size}")
    num_steps = tc.num_steps if tc.num_steps >= 0 else tc.num_epochs * steps_per_epoch
    log.info("mesh %s, %d steps (%d per epoch), global batch %d",
             dict(mesh.shape), num_steps, steps_per_epoch, tc.batch_size)

    # ------------------------------------------------------------------ Checkpoint
    ckpt = cleanup.enter_context(checkpointing.Checkpointer(workdir, keep=tc.keep_checkpoints, config=cfg))

    # ------------------------------------------------------------------ Input
    with distributed.main_first("datasets"):  # a TFDS build runs once, on process 0
        iterator = _train_iterator(cfg)
        eval_datasets = _eval_datasets(cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    sharding.process_rows(batch_sharding, tc.batch_size)  # what _train_iterator reads

    # ------------------------------------------------------------------ Model
    # Shapes only: the weights are initialised (or imported) below unless a checkpoint is restored.
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, seed=tc.seed))
    frozen_backbone = bool(cfg.model.backbone.frozen)
    graphdef, params_shape, frozen_shape = state_lib.split_model(abstract_model, frozen_backbone)
    tx, schedule = optim.make_optimizer(tc, steps_per_epoch)
    state_shape = jax.eval_shape(lambda p: state_lib.init_state(p, tx, tc.seed), params_shape)
    state_sharding = sharding.state_shardings(mesh, state_shape)
    frozen_sharding = sharding.param_shardings(mesh, frozen_shape)
    log.info("%d trainable / %d frozen parameters", _count(params_shape), _count(frozen_shape))

    # ------------------------------------------------------------------ Update
    train_step = sharding.jit_step(
        step_lib.make_train_step(graphdef, tx, schedule, max_num_next_clicks=tc.max_num_next_clicks,
                                 pred_thresh=tc.pred_thresh, click_distance=tc.click_distance,
                                 remat=tc.remat, remat_policy=tc.remat_policy, **tc.loss,
                                 backbone_train_mode=tc.get("backbone_train_mode", True)),
        mesh, state_sharding, frozen_sharding)
    n_preview = min(tc.num_image_summaries, tc.batch_size)
    preview = distributed.SyncedJit(jax.jit(step_lib.make_preview_fn(
        graphdef, num=n_preview, max_num_next_clicks=tc.max_num_next_clicks,
        pred_thresh=tc.pred_thresh, click_distance=tc.click_distance), out_shardings=jax.sharding.NamedSharding(mesh, jax.P())), "preview")
    all_finite = distributed.SyncedJit(jax.jit(
        lambda t: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(t)]))), "all_finite")

    # ------------------------------------------------------------------ Restore
    restored = ckpt.restore_latest(sharding.with_shardings(state_shape, state_sharding),
                                   sharding.with_shardings(frozen_shape, frozen_sharding), iterator)
    if restored is not None:
        state, frozen = restored
        log.info("resumed from %s/%d", ckpt.directory, int(state.step))
    else:
        _, params, frozen = state_lib.split_model(_initial_model(cfg, init_from), frozen_backbone)
        if jax.tree.structure((params, frozen)) != jax.tree.structure((params_shape, frozen_shape)):
            raise ValueError(f"--init-from {init_from}: its parameters do not match cfg.model")
        state = state_lib.init_state(params, tx, tc.seed)
        state, frozen = jax.device_put((state, frozen), (state_sharding, frozen_sharding))
    start = int(state.step)
    if start > num_steps:
        raise checkpointing.WorkdirError(
            f"{workdir} already holds step {start}, past train.num_steps={num_steps}; evaluate it "
            f"with eval.py --checkpoint {workdir}, or pass another --workdir to train {num_steps} steps")
    ckpt.write_config()
    if is_main:
        checkpointing.truncate_metrics(workdir / "metrics.jsonl", start)

    writer = Writer(workdir)
    untrained_eval_s = 0.0  # counted as evaluation in the run's account
    if start == 0 and tc.eval_untrained and eval_datasets:
        t_eval = time.perf_counter()
        _evaluate(cfg, eval_datasets, _local_model(graphdef, state.params, frozen),
                  workdir / "eval" / "untrained", writer, 0)
        untrained_eval_s = time.perf_counter() - t_eval

    # ------------------------------------------------------------------ Train loop
    def check(step: int, metrics) -> dict[str, float]:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            ckpt.wait()
            raise FloatingPointError(
                f"non-finite loss {m['loss']} / grad_norm {m['grad_norm']} at step {step}; training "
                f"stopped. Last good checkpoint: step {ckpt.latest_step} in {ckpt.directory}")
        return m

    def save(step: int) -> None:
        if not bool(all_finite(state.params)):
            raise FloatingPointError(
                f"non-finite parameters after step {step}; not saved. Last good checkpoint: "
                f"step {ckpt.latest_step} in {ckpt.directory}")
        if metrics_file:
            metrics_file.flush()  # gs://: the rows up to this checkpoint survive a kill
        ckpt.save(state, frozen, iterator)

    metrics_file = MetricsLog(workdir / "metrics.jsonl") if is_main else None
    bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not is_main,
               dynamic_ncols=True)
    pending, compile_s = None, None
    batch_log = distributed.BatchLog(workdir if log_batch_hashes else None)
    profile = profile_range(tc.get("profile_steps", ""))
    signals = StopSignals().__enter__()  # only during the loop: a signal in the evaluation stops it
    timer, tracing = None, False
    try:
        for step in range(start + 1, num_steps + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "tensorboard"))
                tracing = True
            t_input = time.perf_counter()
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                rows = next(iterator)
                batch_log.record(step, rows)
                batch = make_global_batch(rows, batch_sharding)
                t_compute = time.perf_counter()
                if timer is None:  # compiled ahead of the first run, timed apart from the steps
                    compiled = train_step.compile(state, frozen, batch)
                    compile_s = time.perf_counter() - t_compute
                    log.info("train step compiled in %.1f s", compile_s)
                    timer = StepTimer(batch_size=tc.batch_size, flops_per_step=step_flops(compiled),
                                      device_kind=jax.devices()[0].device_kind, started=t_start)
                    timer.add("compile", compile_s)
                    timer.add("eval", untrained_eval_s, in_steps=False)
                    t_input += compile_s
                    t_compute = time.perf_counter()
                timer.add("input", t_compute - t_input)
                state, metrics = train_step(state, frozen, batch)
            if pending is not None:  # one step behind, so the host never waits for the device
                check(*pending)
            pending = (step, metrics)
            if tracing and step == profile[1] - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                log.info("profile of steps %d-%d written to %s", profile[0], step,
                         workdir / "tensorboard" / "plugins" / "profile")
            timer.add("compute", time.perf_counter() - t_compute)
            timer.step_done()
            bar.update()

            logging_step = step % tc.log_every_steps == 0 or step == num_steps
            if logging_step:  # waiting for this step's results is compute, not host time
                with timer.phase("compute"):
                    m = check(*pending)
            t_host = time.perf_counter()
            if logging_step:
                m.update(timer.interval())
                if compile_s is not None:
                    m["compile_s"], compile_s = compile_s, None
                writer.scalars(step, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.1e}",
                                samples_s=f"{m['samples_per_sec']:.1f}",
                                input=f"{m['input_wait_s']:.3f}s", compute=f"{m['compute_s']:.3f}s",
                                host=f"{m['host_s']:.3f}s",
                                **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
                if metrics_file:
                    metrics_file.write(dict(step=step, **m))

            if tc.image_summary_every_steps > 0 and step % tc.image_summary_every_steps == 0:
                p = jax.device_get(preview(state, frozen, batch))
                writer.image(step, "train/preview", preview_image(**p))
            timer.add("host", time.perf_counter() - t_host)

            stop = signals.should_stop(step)
            if (stop or (tc.checkpoint_every_steps > 0 and step % tc.checkpoint_every_steps == 0)
                    or step == num_steps):
                with timer.phase("checkpoint"):
                    check(*pending)
                    save(step)
            if stop:
                with timer.phase("checkpoint"):
                    ckpt.wait()
                raise Preempted(signals.signum, step, str(ckpt.directory))
        if pending is not None:
            check(*pending)
    finally:
        signals.__exit__()
        bar.close()
        batch_log.close()
        if timer is not None:
            with timer.phase("checkpoint"):
                ckpt.wait()
        else:
            ckpt.wait()
        if metrics_file:
            metrics_file.close()
        if tracing:  # the run ended inside the profiled steps
            jax.profiler.stop_trace()

    # ------------------------------------------------------------------ Eval
    if eval_datasets:
        t_eval = time.perf_counter()
        _evaluate(cfg, eval_datasets, _local_model(graphdef, state.params, frozen),
                  workdir / "eval" / f"step_{int(state.step)}", writer, int(state.step))
        if timer is not None:
            timer.add("eval", time.perf_counter() - t_eval)
        if is_main:
            _print_tables(workdir / "eval")
    if timer is not None:
        log.info("%s", timer.account())
    writer.close()
    ckpt.close()
    return state


def _train_iterator(cfg):
    """The grain iterator of this process's part of each global batch."""
    d = cfg.data
    source = load_train_source(d.name, d.root or None, d.split, d.data_dir or None,
                               synthetic=SyntheticConfig(**d.synthetic), options=d)
    ds = train_dataset(
        source, crop_size=cfg.model.crop_size, batch_size=cfg.train.batch_size // jax.process_count(),
        seed=cfg.train.seed, num_workers=d.num_workers, epoch_len=d.epoch_len,
        min_object_area=d.min_object_area, keep_background_prob=d.keep_background_prob,
        stuff_prob=d.stuff_prob, sampler=MultiPointSampler(**d.points),
        shard_index=jax.process_index(), shard_count=jax.process_count())
    return iter(ds)


def _initial_model(cfg, init_from: str | None) -> nnx.Module:
    """A fresh model (docs/design/model.md#initialisation), or weights from `init_from` (checked against cfg.model)."""
    if init_from:
        return checkpoint.load(init_from, cfg, seed=cfg.train.seed)[0]
    return build_model(cfg.model, seed=cfg.train.seed)


def _eval_datasets(cfg) -> dict:
    """name -> samples for evaluate(), each folder read (and its layout checked) now, before
    training; datasets without a folder are skipped (warning)."""
    d, out = cfg.data, {}
    for name in eval_dataset_names(d):  # eval_datasets + COCO / ImageMasks given an eval root
        if name == "Synthetic":
            out[name] = load_eval_dataset(name, data_dir=d.data_dir or None,
                                          synthetic=SyntheticConfig(**d.synthetic))
        elif d.eval_roots.get(name):
            out[name] = load_eval_dataset(name, d.eval_roots[name], data_dir=d.data_dir or None,
                                          options=d)
        else:
            log.warning("eval dataset %s skipped: no folder in data.eval_roots.%s", name, name)
    return out


def _local_model(graphdef, params, frozen) -> nnx.Module:
    """The model on this process's first device (the evaluation splits samples over processes and
    lays the model out on each process's devices itself)."""
    params, frozen = jax.device_put(distributed.fully_replicated((params, frozen)), jax.local_devices()[0])
    return nnx.merge(graphdef, params, frozen)


def _evaluate(cfg, datasets: dict, model: nnx.Module, out: pathlib.Path, writer: Writer, step: int):
    """NoC evaluation of `model` (evaluation.evaluate), written to `out` and to TensorBoard."""
    summary = evaluate(model, datasets, out, cfg.eval, data_dir=cfg.data.data_dir or None)
    for name, s in summary.items():
        writer.scalars(step, {f"noc{k}": v for k, v in s["noc"].items()}, prefix=f"eval/{name}")


def _print_tables(eval_dir: pathlib.Path) -> None:
    for table in sorted(eval_dir.glob("*/results.md"), key=lambda p: (p.parent.name != "untrained", p)):
        print(f"\nNoC evaluation, {table.parent.name}:\n{table.read_text()}")


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
