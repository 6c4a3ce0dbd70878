"""Runs and data on gs://, offline against fake-gcs-server on 127.0.0.1 (`gcs_server` fixture).

The code under test runs in subprocesses started with the server's environment (`gcs_server.env`:
jax/orbax/tensorstore, gcsfs and array_record read it when they are imported):
- one child (this file run as a script) trains the main job's config shrunk to 3 steps with a
  gs:// workdir and a gs:// TFDS data_dir, evaluates it with eval.py, loads it with
  `skipclick_jax.load`, saves and converts it to gs://, compares datasets read from gs:// with
  local ones, and tries the failure cases; it writes a JSON report the tests assert on;
- train.py runs that are SIGKILLed and resumed on gs:// (losses compared with an uninterrupted run).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gcs

# The main job's config (configs/tiny_synthetic.py) at toy sizes: a few seconds a step on CPU.
SMALL = ["--config.model.crop_size=56", "--config.model.backbone.depth=4",
         "--config.model.backbone.taps=(0, 1, 2, 3)", "--config.train.batch_size=4",
         "--config.train.log_every_steps=1", "--config.train.image_summary_every_steps=2",
         "--config.train.num_image_summaries=1", "--config.train.eval_untrained=false",
         "--config.data.epoch_len=64", "--config.data.synthetic.image_size=(56, 56)",
         "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=2",
         "--config.eval.max_clicks=1", "--config.eval.flip=false", "--config.eval.default_size=56",
         "--config.eval.bucket=14"]


def small_config(data_dir: str):
    from skipclick_jax import config_lib

    cfg = config_lib.load_config_file(ROOT / "configs" / "tiny_synthetic.py")
    for arg in SMALL:
        config_lib.override(cfg, *config_lib.override_arg(arg))
    cfg.train.update(num_steps=3, checkpoint_every_steps=1, keep_checkpoints=10)
    cfg.data.data_dir = data_dir
    return cfg


def _outcome(fn) -> str | None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the report records the type and the message
        return f"{type(e).__name__}: {e}"
    return None


def _params(model) -> dict:
    from flax import nnx

    from skipclick_jax.weights.mapping import flatten

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model)))}


def _same_params(a, b) -> bool:
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def _run_child(out: pathlib.Path, bucket: str) -> None:
    import grain

    import skipclick_jax
    from convert_weights import convert
    from skipclick_jax import checkpoint, storage
    from skipclick_jax.data.eval_datasets import load_eval_dataset
    from skipclick_jax.data.pipeline import train_dataset
    from skipclick_jax.data.points_sampler import MultiPointSampler
    from skipclick_jax.data.synthetic import SyntheticConfig
    from skipclick_jax.data.train_datasets import load_train_source
    from skipclick_jax.evaluation import cli as eval_cli
    from skipclick_jax.train import run_checkpoints as checkpointing, trainer

    from skipclick_jax.runtime import enable_compilation_cache

    enable_compilation_cache()  # the project's XLA cache, as train.py and eval.py use it
    logging.basicConfig(level=logging.WARNING)
    gs = f"gs://{bucket}"
    rep = {}
    cfg = small_config(f"{gs}/tfds")

    # A run on gs://: checkpoints sealed and verified, config.json, metrics.jsonl, TensorBoard,
    # previews and the end-of-training evaluation all land in the bucket.
    run = f"{gs}/runs/a"
    trainer.train_and_evaluate(cfg, run)
    rep["run_files"] = storage.list_files(run)
    rep["metrics"] = [json.loads(r) for r in storage.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]
    rep["eval_summary"] = json.loads(storage.as_path(f"{run}/eval/step_3/summary.json").read_text())
    for step in (1, 2, 3):
        checkpoint.verify_digests(f"{run}/checkpoints/{step}")
    rep["tfds_files"] = storage.list_files(f"{gs}/tfds")

    # A second run on the same gs:// workdir while the first holds it: refused.
    held = checkpointing.WorkdirLock(run)
    rep["locked_error"] = _outcome(lambda: trainer.train_and_evaluate(cfg, run))
    held.release()
    rep["lock_after_release"] = storage.as_path(f"{run}/train.lock").exists()
    # A stale lock (its process gone): reported and taken over, as on a local disk.
    storage.write_atomic(f"{run}/train.lock", json.dumps(dict(pid=2**22 + 17, host=os.uname().nodename,
                                                              started="then", heartbeat=time.time())))
    with _captured("skipclick_jax.train.object_lock") as records:
        checkpointing.WorkdirLock(run).release()
    rep["stale_warnings"] = records
    # Another host's lock: refused while its heartbeat is fresh, taken over once it is older than
    # object_lock.STALE_AFTER_S.
    from skipclick_jax.train import object_lock

    other = dict(pid=1, host="another-host", started="then")
    storage.write_atomic(f"{run}/train.lock", json.dumps(dict(other, heartbeat=time.time())))
    rep["other_host_error"] = _outcome(lambda: checkpointing.WorkdirLock(run))
    old = time.time() - object_lock.STALE_AFTER_S - 5
    storage.write_atomic(f"{run}/train.lock", json.dumps(dict(other, heartbeat=old)))
    with _captured("skipclick_jax.train.object_lock") as records:
        checkpointing.WorkdirLock(run).release()
    rep["old_heartbeat_warnings"] = records

    # skipclick_jax.load reads the gs:// run; checkpoint.save writes gs:// (digests last); the
    # converter reads gs:// and writes gs://.
    model, loaded_cfg = skipclick_jax.load(run)
    local_model, _ = skipclick_jax.load(_download(storage, run, out / "run_copy"))
    rep["load_equal_to_local_copy"] = _same_params(model, local_model)
    from skipclick_jax.demo import load_model  # the app's --checkpoint

    app_model, rep["app_description"] = load_model(run)
    rep["app_equal"] = _same_params(app_model, model)
    checkpoint.save(f"{gs}/exported", model, loaded_cfg)
    rep["exported_files"] = storage.list_files(f"{gs}/exported")
    rep["exported_equal"] = _same_params(skipclick_jax.load(f"{gs}/exported")[0], model)
    # --init-from gs://: a new run starts from the exported weights (0 steps: its state is them).
    import copy

    from skipclick_jax.weights.mapping import flatten

    cfg0 = copy.deepcopy(cfg)
    cfg0.train.num_steps, cfg0.data.eval_datasets = 0, ()
    started = dict(flatten(trainer.train_and_evaluate(cfg0, f"{gs}/runs/b", init_from=f"{gs}/exported").params))
    exported = _params(model)
    rep["init_from_equal"] = bool(started) and all(np.array_equal(np.asarray(v), exported[k]) for k, v in started.items())
    rep["save_again_error"] = _outcome(lambda: checkpoint.save(f"{gs}/exported", model, loaded_cfg))
    rep["convert_rc"] = convert.main([run, "--out", f"{gs}/converted.safetensors"])
    rep["converted_equal"] = _same_params(
        skipclick_jax.load(f"{gs}/converted.safetensors", loaded_cfg)[0], model)

    # eval.py: --checkpoint gs://, --out gs://, --data-dir gs://; results kept unless --overwrite.
    args = ["--checkpoint", run, "--dataset", "Synthetic=", "--out", f"{gs}/eval_a",
            "--config.eval.max_clicks=1", "--no-flip", "--data-dir", f"{gs}/tfds"]
    summary = eval_cli.main(args)
    rep["eval_cli"] = summary["Synthetic"]["instances"]
    rep["eval_cli_files"] = storage.list_files(f"{gs}/eval_a")
    rep["eval_cli_clicks"] = json.loads(storage.as_path(f"{gs}/eval_a/Synthetic/clicks.json").read_text())
    rep["eval_again"] = _outcome(lambda: eval_cli.main(args))

    # Datasets: a gs:// data_dir (built locally, uploaded) gives the same records and batches as a
    # local one; grain workers read gs://.
    synthetic = SyntheticConfig(**cfg.data.synthetic)
    os.environ["SKIPCLICK_TFDS_STAGING"] = str(out / "staging")
    local_eval = load_eval_dataset("Synthetic", data_dir=str(out / "tfds_local"), synthetic=synthetic)
    remote_eval = load_eval_dataset("Synthetic", data_dir=f"{gs}/tfds2", synthetic=synthetic)
    rep["eval_records"] = [len(local_eval), len(remote_eval)]
    rep["eval_records_equal"] = all(
        _equal_records(local_eval[i], remote_eval[i]) for i in range(len(local_eval)))

    def batches(data_dir, workers):
        src = load_train_source("Synthetic", None, "train", data_dir, synthetic=synthetic)
        ds = train_dataset(src, crop_size=56, batch_size=4, seed=3, num_workers=workers, epoch_len=64,
                           min_object_area=cfg.data.min_object_area,
                           keep_background_prob=cfg.data.keep_background_prob,
                           stuff_prob=cfg.data.stuff_prob, sampler=MultiPointSampler(**cfg.data.points))
        it = iter(ds)
        return [next(it) for _ in range(2)]

    local_b, remote_b = batches(str(out / "tfds_local"), 0), batches(f"{gs}/tfds2", 1)
    rep["batches_equal"] = all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(local_b, remote_b))
    rep["grain"] = grain.__version__ if hasattr(grain, "__version__") else ""

    # One command copies local builds up; a build whose upload was cut off (no dataset_info.json)
    # is not read but uploaded again.
    from skipclick_jax.data import upload

    rep["upload_rc"] = upload.main(["--from", str(out / "tfds_local"), "--to", f"{gs}/tfds3"])
    rep["uploaded"] = storage.list_files(f"{gs}/tfds3")
    info = next(n for n in rep["uploaded"] if n.startswith("skipclick_eval/") and n.endswith("dataset_info.json"))
    storage.as_path(f"{gs}/tfds3/{info}").unlink()
    os.environ["SKIPCLICK_TFDS_STAGING"] = str(out / "staging3")
    again = load_eval_dataset("Synthetic", data_dir=f"{gs}/tfds3", synthetic=synthetic)
    rep["reupload_equal"] = len(again) == len(local_eval) and all(
        _equal_records(local_eval[i], again[i]) for i in range(len(local_eval)))
    rep["reuploaded_info"] = storage.as_path(f"{gs}/tfds3/{info}").is_file()
    rep["upload_again"] = _outcome(lambda: upload.main(["--from", str(out / "tfds_local"), "--to", f"{gs}/tfds3"]))

    # Named, early errors; nothing written.
    rep["no_bucket_train"] = _outcome(lambda: trainer.train_and_evaluate(cfg, "gs://no-such-bucket-x/run"))
    rep["no_bucket_load"] = _outcome(lambda: skipclick_jax.load("gs://no-such-bucket-x/ckpt"))
    rep["no_bucket_eval"] = _outcome(lambda: eval_cli.main(
        ["--checkpoint", run, "--dataset", "Synthetic=", "--out", "gs://no-such-bucket-x/e"]))
    rep["buckets"] = _buckets()
    (out / "report.json").write_text(json.dumps(rep))


def _download(storage, src: str, dst: pathlib.Path) -> pathlib.Path:
    storage.copy_tree(src, dst)
    return dst


def _equal_records(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class _captured:
    """Collects the messages logged to `name` (warnings and above)."""

    def __init__(self, name):
        self.logger, self.records = logging.getLogger(name), []

    def __enter__(self):
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: self.records.append(record.getMessage())
        self.handler = handler
        self.logger.addHandler(handler)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def _buckets() -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b", timeout=10) as r:
        return sorted(b["name"] for b in json.loads(r.read()).get("items", []))


def _env(server) -> dict:
    return dict(os.environ, **server.env, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def report(gcs_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("gcs")
    bucket = "skipclick-test"
    gcs_server.make_bucket(bucket)
    proc = subprocess.run([sys.executable, __file__, str(out), bucket], env=_env(gcs_server),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rep = json.loads((out / "report.json").read_text())
    rep["stderr"], rep["stdout"] = proc.stderr, proc.stdout
    return rep


def test_run_on_gs_writes_everything_to_the_bucket(report):
    files = report["run_files"]
    for step in (1, 2, 3):
        assert f"checkpoints/{step}/SHA256SUMS.json" in files
        assert any(f.startswith(f"checkpoints/{step}/params/") for f in files)
        assert any(f.startswith(f"checkpoints/{step}/dataset/") for f in files)
    assert "checkpoints/config.json" in files and "train.lock" not in files
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert "images/train_preview_0000002.png" in files
    assert {"eval/step_3/summary.json", "eval/step_3/results.md", "eval/step_3/Synthetic/clicks.json"} <= set(files)
    assert [r["step"] for r in report["metrics"]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in report["metrics"])
    assert report["eval_summary"]["Synthetic"]["instances"] > 0
    assert any(f.startswith("skipclick_train/") and f.endswith("dataset_info.json") for f in report["tfds_files"])


def test_second_run_on_a_gs_workdir_is_refused_and_stale_lock_taken_over(report):
    assert report["locked_error"].startswith("WorkdirError: ") and "in use by another train.py run" in report["locked_error"]
    assert not report["lock_after_release"]
    assert len(report["stale_warnings"]) == 1 and "stale lock" in report["stale_warnings"][0]
    assert "is gone" in report["stale_warnings"][0]
    assert report["other_host_error"].startswith("WorkdirError: ")
    assert "(pid 1 on another-host, started then)" in report["other_host_error"]
    assert len(report["old_heartbeat_warnings"]) == 1 and "no heartbeat for" in report["old_heartbeat_warnings"][0]


def test_load_save_and_convert_on_gs(report):
    assert report["load_equal_to_local_copy"]
    assert report["app_equal"] and report["app_description"] == "checkpoint gs://skipclick-test/runs/a"
    assert "SHA256SUMS.json" in report["exported_files"] and "config.json" in report["exported_files"]
    assert report["exported_equal"]
    assert report["init_from_equal"]
    assert report["save_again_error"].startswith("FileExistsError")
    assert report["convert_rc"] == 0 and report["converted_equal"]


def test_eval_cli_reads_and_writes_gs(report):
    assert report["eval_cli"] == len(report["eval_cli_clicks"]) > 0
    assert {"summary.json", "results.md", "Synthetic/clicks.json"} <= set(report["eval_cli_files"])
    assert report["eval_again"].startswith("SystemExit") and "already holds results" in report["stderr"]


def test_dataset_from_gs_data_dir_equals_local(report):
    assert report["eval_records"][0] == report["eval_records"][1] > 0
    assert report["eval_records_equal"]
    assert report["batches_equal"]


def test_upload_command_and_interrupted_upload(report):
    assert report["upload_rc"] == 0 and report["upload_again"] is None
    for kind in ("skipclick_eval", "skipclick_train"):
        assert any(n.startswith(f"{kind}/") and n.endswith("/dataset_info.json") for n in report["uploaded"])
    assert report["reupload_equal"] and report["reuploaded_info"]
    assert "already on gs://skipclick-test/tfds3, skipped" in report["stdout"]


def test_missing_bucket_is_named_early_and_nothing_is_written(report):
    for key in ("no_bucket_train", "no_bucket_load"):
        assert report[key].startswith("StorageError: ") and "no-such-bucket-x does not exist" in report[key], report[key]
    assert report["no_bucket_eval"].startswith("SystemExit")
    assert "no-such-bucket-x does not exist" in report["stderr"]
    assert report["buckets"] == ["skipclick-test"]


def test_missing_credentials_are_named(tmp_path):
    """Outside the emulator, missing Application Default Credentials are an error naming the fix."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "FSSPEC_GCS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"), NO_GCE_CHECK="True",
               PYTHONPATH=str(ROOT))
    code = ("from skipclick_jax import storage\n"
            "try:\n storage.check_access('gs://some-bucket/run', write=True, what='--workdir')\n"
            "except storage.StorageError as e:\n print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "--workdir gs://some-bucket/run: no Google Cloud credentials" in proc.stdout, proc.stdout + proc.stderr
    assert "GOOGLE_APPLICATION_CREDENTIALS" in proc.stdout


def test_permission_and_other_errors_are_named():
    """fake-gcs-server has no IAM: the mapping of a 403 (gcsfs raises it as an HttpError or a
    PermissionError) to the message is checked directly."""
    from skipclick_jax import storage

    class HttpError(Exception):
        code = 403

    for error in (OSError("Forbidden: runs-bucket/a/.write_probe_1\nno storage.objects.create"),
                  PermissionError("denied"), HttpError("caller does not have storage.objects.create")):
        e = storage._named(error, "gs://runs-bucket/a", "--workdir", writing=True)
        assert isinstance(e, storage.StorageError)
        assert str(e).startswith("--workdir gs://runs-bucket/a: permission denied to write to gs://runs-bucket")
        assert "roles/storage.objectAdmin" in str(e)
    other = storage._named(TimeoutError("timed out"), "gs://runs-bucket/a", "checkpoint")
    assert str(other).startswith("checkpoint gs://runs-bucket/a: cannot read gs://runs-bucket (TimeoutError")
    with pytest.raises(storage.StorageError, match="no bucket in the gs:// path"):
        storage.check_access("gs://", write=False)


# ---------------------------------------------------------------------- kill and resume
def _train_cmd(workdir: str, data_dir: str, num_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_synthetic.py"),
            "--workdir", workdir, *SMALL, f"--config.data.data_dir={data_dir}",
            f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every_steps=2",
            "--config.data.eval_datasets=()", "--config.train.image_summary_every_steps=0"]


def test_killed_gs_run_resumes_with_identical_losses(gcs_server, tmp_path):
    bucket = "skipclick-resume"
    gs = gcs_server.make_bucket(bucket)
    env = _env(gcs_server)
    steps = 6
    ref = subprocess.run(_train_cmd(f"{gs}/ref", f"{gs}/tfds", steps), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-5000:]

    # Killed (SIGKILL: no cleanup, the lock object stays) once step 2 is sealed and committed (on
    # gs:// orbax marks a step complete with commit_success.txt, written after the digests).
    proc = subprocess.Popen(_train_cmd(f"{gs}/run", f"{gs}/tfds", steps), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    committed = {"run/checkpoints/2/SHA256SUMS.json", "run/checkpoints/2/commit_success.txt"}
    while not committed <= set(gcs_server.list_objects(bucket, "run/")):  # sealed and committed
        assert proc.poll() is None, proc.stderr.read()[-5000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr_killed = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr_killed[-3000:]
    objects = gcs_server.list_objects(bucket, "run/")
    assert "run/train.lock" in objects and f"run/checkpoints/{steps}/SHA256SUMS.json" not in objects

    resumed = subprocess.run(_train_cmd(f"{gs}/run", f"{gs}/tfds", steps), env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "stale lock" in resumed.stderr and "resumed from" in resumed.stderr, resumed.stderr[:6000]

    def rows(run):
        text = subprocess.run([sys.executable, "-c", "import sys; from skipclick_jax import storage; "
                               "print(storage.as_path(sys.argv[1]).read_text(), end='')", f"{gs}/{run}/metrics.jsonl"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, text.splitlines())]

    ref_rows, run_rows = rows("ref"), rows("run")
    assert [r[0] for r in ref_rows] == list(range(1, steps + 1))
    assert run_rows == ref_rows
    assert "run/train.lock" not in gcs_server.list_objects(bucket, "run/")


if __name__ == "__main__":
    _run_child(pathlib.Path(sys.argv[1]), sys.argv[2])
