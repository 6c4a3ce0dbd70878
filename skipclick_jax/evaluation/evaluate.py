"""`evaluate`: NoC evaluation of a model on several datasets, with the report files of `eval.py`.

Writes into `out`:
  summary.json          per dataset: noc/nof at {80,85,90,95}, miou (mIoU@1..max_clicks),
                        instances, clicks, seconds, clicks_per_second, size, flip, target_iou
  <NAME>/clicks.json    per instance in dataset order: {id, height, width, clicks
                        [[row, col, is_positive], ...], ious [...]}
  <NAME>/overlays/*.png the first `cfg.overlays` instances with their final mask and clicks
  results.md            a Markdown table in the paper's style
  miou_curve.png        mIoU vs number of clicks, one curve per dataset

With several processes (skipclick_jax.distributed) each process runs a contiguous share of every
dataset on its own devices; the results are gathered in dataset order and process 0 alone writes
the files. Every process returns the same summary.

Unscorable instances: an instance whose ground truth has no object pixel (empty, or every pixel
ignore, -1) has no IoU: the original's `get_iou` (intersection / union over non-ignored pixels)
gives 0 once anything is predicted and NaN (0/0) otherwise, and one NaN makes its dataset means
NaN. Such instances are skipped with a warning naming them: they are listed in clicks.json with
`skipped` (the reason) and no ious, counted in the summary's `skipped` {count, ids}, and left out
of every mean. All JSON is strict (no NaN or Infinity).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from skipclick_jax import distributed, metrics, storage
from skipclick_jax.evaluation.protocol import Protocol
from skipclick_jax.evaluation.scheduler import run_samples
from skipclick_jax.model.api import ModelFunctions, model_functions

THRESHOLD_KEYS = ("80", "85", "90", "95")


def evaluate(
    model_or_predictor: Any,
    datasets: Mapping[str, Sequence[dict] | str | os.PathLike],
    out: str | os.PathLike,
    cfg: ml_collections.ConfigDict,
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluates on every dataset and writes the report files; returns the summary dict.

    Args:
      model_or_predictor: a SkipClick `nnx` model (run in `cfg.dtype` / `cfg.attention` when they
        are set) or its `model.ModelFunctions`.
      datasets: name -> samples ({'id', 'image', 'gt'}, sequence-like, in dataset order) or the
        dataset's root folder (read with `skipclick_jax.data.eval_datasets.load_eval_dataset`).
      out: output folder (created; gs:// is written locally first, copied up at the end).
      cfg: the `eval` config section (`skipclick_jax.defaults.evaluation.eval_defaults()`).
      data_dir: TFDS cache folder for datasets given as folders.
    """
    predictor = (model_or_predictor if isinstance(model_or_predictor, ModelFunctions)
                 else model_functions(model_or_predictor, cfg.get("dtype"), cfg.get("attention")))
    write = distributed.is_main()
    if storage.is_remote(out) and write:
        storage.check_access(out, write=True, what="evaluation output")
    with storage.staged_output(out) if write else contextlib.nullcontext(pathlib.Path(out)) as folder:
        return _evaluate_into(predictor, datasets, folder, cfg, data_dir, progress, write)


def _evaluate_into(predictor, datasets, out: pathlib.Path, cfg, data_dir, progress, write) -> dict:
    summary: dict[str, dict] = {}
    for name, samples in datasets.items():
        if isinstance(samples, (str, os.PathLike)):
            from skipclick_jax.data.eval_datasets import load_eval_dataset

            with distributed.main_first(f"load {name}"):  # a TFDS build runs once, on process 0
                samples = load_eval_dataset(name, samples, data_dir)
        protocol = Protocol.from_config(cfg, name)
        summary[name] = _evaluate_dataset(predictor, name, samples, protocol, cfg, out / name,
                                          progress and write, write)
    if write:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        (out / "results.md").write_text(results_markdown(summary))
        if summary:
            plot_miou(summary, out / "miou_curve.png")
    return summary


def _evaluate_dataset(predictor, name, samples, protocol, cfg, folder, progress, write) -> dict:
    from tqdm import tqdm

    n_overlays = int(cfg.overlays)
    share, first, total = _share(samples)
    bar = tqdm(total=total, desc=f"{name} (S={protocol.size})", unit="inst", disable=not progress)
    start = time.perf_counter()
    areas = []
    results = run_samples(predictor, _record_gt(share, areas), protocol,
                          batch_size=int(cfg.batch_size) or None, bucket=int(cfg.bucket),
                          keep_masks=max(0, n_overlays - first), on_done=bar.update)
    for r, area in zip(results, areas, strict=True):
        reason = unscorable(*area)
        if reason:
            r["skipped"] = reason
    if share is not samples:
        results = [r for part in distributed.allgather_objects(results) for r in part]
    seconds = time.perf_counter() - start
    bar.close()
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        warnings.warn(f"{name}: {len(skipped)} instance(s) skipped, their ground truth has no object "
                      f"pixel ({', '.join(str(r['id']) for r in skipped[:10])}"
                      f"{', ...' if len(skipped) > 10 else ''}): not scored", stacklevel=2)
    scored = [r for r in results if "skipped" not in r]
    all_ious = [metrics.ious_from_counts(r["inter"], r["union"]) for r in scored]
    clicks = sum(len(r["clicks"]) for r in scored)
    noc, nof = metrics.noc(all_ious, metrics.NOC_THRESHOLDS, protocol.max_clicks) if scored else (
        [None] * len(THRESHOLD_KEYS), [0] * len(THRESHOLD_KEYS))
    ious_of = {id(r): ious for r, ious in zip(scored, all_ious)}
    records = [dict(id=r["id"], height=int(r["height"]), width=int(r["width"]), clicks=r["clicks"],
                    ious=[float(x) for x in ious_of.get(id(r), [])],
                    **({"skipped": r["skipped"]} if "skipped" in r else {})) for r in results]
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "clicks.json").write_text(json.dumps(records, allow_nan=False))
        if n_overlays:
            _write_overlays(samples, results[:n_overlays], folder / "overlays")
    return dict(
        noc=dict(zip(THRESHOLD_KEYS, (None if x is None else float(x) for x in noc))),
        nof=dict(zip(THRESHOLD_KEYS, map(int, nof))),
        miou=[float(x) for x in metrics.miou_curve(all_ious, protocol.max_clicks)] if scored else [],
        instances=len(scored),
        skipped=dict(count=len(skipped), ids=[str(r["id"]) for r in skipped[:100]]),
        clicks=clicks,
        seconds=seconds,
        clicks_per_second=clicks / seconds if seconds > 0 else 0.0,
        size=protocol.size,
        flip=protocol.flip,
        target_iou=protocol.target_iou,
    )


def unscorable(object_pixels: int, valid_pixels: int) -> str | None:
    """Why an instance has no IoU (None if it has one): see the module docstring."""
    if valid_pixels == 0:
        return "every ground-truth pixel is ignore (-1): no object to segment"
    if object_pixels == 0:
        return "the ground truth is empty: no object pixel"
    return None


def _record_gt(samples, areas: list):
    """Passes `samples` through, appending (object pixels, non-ignored pixels) of each gt."""
    for sample in samples:
        gt = np.asarray(sample["gt"]) if isinstance(sample, Mapping) and "gt" in sample else None
        areas.append((-1, -1) if gt is None else (int((gt == 1).sum()), int((gt != -1).sum())))
        yield sample


def _share(samples) -> tuple[Any, int, int | None]:
    """(this process's samples, global index of its first, progress total): all of them for one
    process; with several, its contiguous share (`distributed.shard_range`) with global ids."""
    if jax.process_count() == 1:
        return samples, 0, _length(samples)
    if _length(samples) is None:
        samples = list(samples)
    share = distributed.shard_range(len(samples))
    return ({**samples[i], "id": samples[i].get("id", str(i))} for i in share), share.start, len(share)


def _length(samples) -> int | None:
    try:
        return len(samples)
    except TypeError:
        return None


def _write_overlays(samples, results, folder: pathlib.Path) -> None:
    from PIL import Image

    from skipclick_jax.visualize import overlay

    folder.mkdir(parents=True, exist_ok=True)
    for i, res in enumerate(results):
        sample = samples[i]
        image = overlay(sample["image"], res["mask"], res["clicks"], gt=sample["gt"])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in res["id"])
        Image.fromarray(image).save(folder / f"{i:04d}_{safe}.png")


def results_markdown(summary: Mapping[str, dict]) -> str:
    """The summary as a Markdown table: NoC@80..95, NoF@85/90/95 (">=20"), mIoU@1/5, clicks/s;
    plus an unweighted 'Avg. WSESeg' row when WSESeg classes were evaluated."""
    columns = ["Dataset", "#inst", *(f"NoC@{k}" for k in THRESHOLD_KEYS),
               *(f">=20@{k}" for k in THRESHOLD_KEYS[1:]), "mIoU@1", "mIoU@5", "clicks/s"]

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    def row(name, s):
        miou = s["miou"]
        return line([name, str(s["instances"]),
                     *("-" if s["noc"][k] is None else f"{s['noc'][k]:.2f}" for k in THRESHOLD_KEYS),
                     *(str(s["nof"][k]) for k in THRESHOLD_KEYS[1:]),
                     *(f"{miou[k - 1]:.4f}" if len(miou) >= k else "-" for k in (1, 5)),
                     f"{s['clicks_per_second']:.1f}"])

    lines = [line(columns), line(["---"] * len(columns))]
    lines += [row(name, s) for name, s in summary.items()]
    wse = [s for name, s in summary.items() if name.startswith("WSESeg_")]
    if len(wse) > 1:
        avg = [f"{np.mean(v):.3f}" if (v := [s["noc"][k] for s in wse if s["noc"][k] is not None])
               else "-" for k in THRESHOLD_KEYS]
        cells = [f"Avg. WSESeg ({len(wse)} classes)", str(sum(s["instances"] for s in wse)), *avg]
        lines.append(line(cells + [""] * (len(columns) - len(cells))))
    return "\n".join(lines) + "\n"


def plot_miou(summary: Mapping[str, dict], path: pathlib.Path) -> None:
    """mIoU@k vs k, one curve per dataset, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, s in summary.items():
        if s["miou"]:
            ax.plot(np.arange(1, len(s["miou"]) + 1), s["miou"], marker="o", markersize=3, label=name)
    ax.set(xlabel="number of clicks", ylabel="mIoU", title="mIoU vs clicks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
