"""Collect a Hydra multirun of `evaluate.py` into one table and a plot in the sweep directory.

    python evaluate.py -m ckpt=... metrics=adm sampling.cfg_scale=1.0,1.25,1.5,1.75,2.0

Each finished job leaves a record (`<sweep dir>/jobs/<n>.json`: its overrides, numbers and output folder); when
the sweep ends, `sweep.csv`, `sweep.md` and `sweep.png` (FID against IS, and FID against the swept value) are
written from every record found, so a job launched elsewhere (submitit on SLURM) is collected as well and a
rerun of the sweep rebuilds the table.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["SweepSummary", "summarize"]

#: The quality number on the y axis and the second number on the x axis: the first present of each list.
FID_KEYS = ("fid", "fd_dinov2", "fid_classifier")
SECOND_KEYS = ("inception_score", "precision", "classifier_accuracy")


class SweepSummary(Callback):
    """Hydra callback: a record per evaluate job, a table and a plot per sweep."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.get("mode") != RunMode.MULTIRUN:
            return
        record: dict[str, Any] = {"job": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
                                  "status": job_return.status.name}
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            record["numbers"] = {k: v for k, v in job_return.return_value.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
            record["out_dir"] = job_return.return_value.get("out_dir")
        jobs = Path(config.hydra.sweep.dir) / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        (jobs / f"{record['job']:04d}.json").write_text(json.dumps(record, indent=2))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(Path(config.hydra.sweep.dir))


def _swept(records: list[dict[str, Any]]) -> list[str]:
    """Override keys whose values differ between jobs, in command-line order (all of them for a single job)."""
    values: dict[str, set[str]] = {}
    for record in records:
        for override in record["overrides"]:
            key, _, value = override.lstrip("+~").partition("=")
            values.setdefault(key, set()).add(value)
    varying = [k for k, v in values.items() if len(v) > 1]
    return varying or [k for k in values if k != "ckpt"]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def summarize(sweep_dir: Path) -> Path | None:
    """Write sweep.csv, sweep.md and sweep.png from `sweep_dir/jobs/*.json`; returns the table's path."""
    records = [json.loads(p.read_text()) for p in sorted((sweep_dir / "jobs").glob("*.json"))]
    if not records:
        log.warning("sweep %s: no job records to summarise", sweep_dir)
        return None
    keys = _swept(records)
    numbers = sorted({name for r in records for name in r.get("numbers", {})})
    rows = []
    for record in records:
        settings = dict(o.lstrip("+~").partition("=")[::2] for o in record["overrides"])
        rows.append({**{k: settings.get(k, "") for k in keys}, "status": record["status"],
                     **{n: record.get("numbers", {}).get(n, "") for n in numbers}, "out_dir": record.get("out_dir")})
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shown = [n for n in (*FID_KEYS, "sfid", *SECOND_KEYS, "recall", "inception_score_std") if n in numbers]
    columns = [*keys, *shown]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(sweep_dir / "sweep.png", rows, keys, numbers)
    print("\n".join(lines))
    print(f"sweep table: {sweep_dir / 'sweep.csv'} (and sweep.md, sweep.png)")
    return sweep_dir / "sweep.csv"


def _plot(path: Path, rows: list[dict[str, Any]], keys: list[str], numbers: list[str]) -> None:
    """FID against the second number (IS), and FID against the first swept value when it is numeric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_key = next((k for k in FID_KEYS if k in numbers), None)
    second_key = next((k for k in SECOND_KEYS if k in numbers), None)
    done = [r for r in rows if fid_key and isinstance(r.get(fid_key), float)]
    if not done:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    label_key = keys[0] if keys else None
    if second_key:
        xs, ys = [r[second_key] for r in done], [r[fid_key] for r in done]
        axes[0].plot(xs, ys, "o-")
        for r, x, y in zip(done, xs, ys, strict=True):
            if label_key:
                axes[0].annotate(str(r[label_key]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes[0].set_xlabel(second_key)
        axes[0].set_ylabel(fid_key)
        axes[0].set_title(f"{fid_key} against {second_key}")
    if label_key and all(_number(str(r[label_key])) is not None for r in done):
        ordered = sorted(done, key=lambda r: float(r[label_key]))
        axes[1].plot([float(r[label_key]) for r in ordered], [r[fid_key] for r in ordered], "o-")
        axes[1].set_xlabel(label_key)
        axes[1].set_ylabel(fid_key)
        axes[1].set_title(f"{fid_key} against {label_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
