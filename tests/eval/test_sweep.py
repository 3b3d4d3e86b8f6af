"""Sweep summaries: a record per job, one table and a plot per sweep, the swept key found from the overrides."""

from __future__ import annotations

import csv
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from visgen.eval.sweep import SweepSummary


def _job(sweep_dir: Path, num: int, scale: float, fid: float, inception: float) -> None:
    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep_dir)},
                                         "job": {"num": num}}})
    result = JobReturn(overrides=["ckpt=run/last.ckpt", "metrics=adm", f"sampling.cfg_scale={scale}"],
                       status=JobStatus.COMPLETED, _return_value={"fid": fid, "inception_score": inception,
                                                                  "num_samples": 50000, "out_dir": f"eval/{num}",
                                                                  "protocol": {"seed": 0}})
    SweepSummary().on_job_end(config, result)


def test_a_cfg_sweep_becomes_one_table_and_a_plot(tmp_path: Path) -> None:
    for num, (scale, fid, inception) in enumerate([(1.0, 9.6, 120.0), (1.5, 2.3, 270.0), (2.0, 4.1, 330.0)]):
        _job(tmp_path, num, scale, fid, inception)
    failed = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)}, "job": {"num": 3}}})
    SweepSummary().on_job_end(failed, JobReturn(overrides=["ckpt=run/last.ckpt", "metrics=adm",
                                                           "sampling.cfg_scale=3.0"], status=JobStatus.FAILED))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["sampling.cfg_scale"] for r in rows] == ["1.0", "1.5", "2.0", "3.0"]
    assert [r["fid"] for r in rows] == ["9.6", "2.3", "4.1", ""] and rows[3]["status"] == "FAILED"
    assert "ckpt" not in rows[0] and "metrics" not in rows[0]  # not swept: not a column
    table = (tmp_path / "sweep.md").read_text()
    assert table.splitlines()[0] == "| sampling.cfg_scale | fid | inception_score |"
    assert "| 1.5 | 2.3 | 270 |" in table and rows[1]["num_samples"] == "50000"
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_single_runs_leave_no_records(tmp_path: Path) -> None:
    config = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(tmp_path)}, "job": {"num": 0}}})
    SweepSummary().on_job_end(config, JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value={}))
    assert not (tmp_path / "jobs").exists()
