"""A real SLURM (Debian's slurm-wlm + munge) with two nodes on this machine: train.sbatch on 2 nodes x 2 tasks,
preemption by SIGUSR1, requeue and resume; a 2-job submitit sweep; evaluate.sbatch.

Opt-in (`VISGEN_SLURM_TEST=1`, set by .ci/run, which also installs the packages), so that `make test` on a
cluster's login node never starts daemons; without it, or where the machine cannot run it (not root, no
slurm-wlm/munge), the tests are skipped with the reason. Budget: ~5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_run import LAUNCHER_VARS

ROOT = Path(__file__).resolve().parents[2]
OPT_IN = "VISGEN_SLURM_TEST"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")

# A 2-block SiT on the digits; every rank reads batch 8 (4 ranks = global batch 32), no loader workers.
TINY = ["experiment=demo_sit", "trainer.accelerator=cpu", "trainer.precision=32-true", "~callbacks.progress_bar",
        "trainer.limit_val_batches=0", "data.num_workers=0", "data.batch_global=32", "data.num_train_samples=320",
        "model.net.hidden_size=32", "model.net.depth=2", "model.net.num_heads=2", "sampling.num_steps=2",
        "callbacks.sample_grid.every_n_steps=0", "trainer.log_every_n_steps=1"]


def _skip_reason() -> str | None:
    if os.environ.get(OPT_IN) != "1":
        return f"real SLURM test is opt-in: set {OPT_IN}=1 (.ci/run does, after apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "real SLURM test needs root to start munged, slurmctld and slurmd on this machine"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"real SLURM test: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """munged + slurmctld + two slurmd (n1, n2), torn down by their PIDs afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "slurm" / "local_cluster.sh"
    started = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # No launcher variables of this process (a MASTER_PORT would put every job's ranks on one port).
        inherited = {k: v for k, v in os.environ.items()
                     if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
        env = {**inherited, "SLURM_CONF": str(state / "slurm.conf"), "VISGEN_PYTHON": sys.executable,
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "offline",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               # The fake nodes' names (n1, n2) do not resolve; on a real cluster Lightning derives this itself.
               # (Lightning then takes the port from the job id, so concurrent jobs do not collide.)
               "MASTER_ADDR": "127.0.0.1"}
        yield env
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=120)


def _run(env: dict[str, str], *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """scontrol's fields of a job (kept 5 minutes after it ends: MinJobAge)."""
    text = _run(env, "scontrol", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(env: dict[str, str], job_id: str, until: callable, timeout_s: float, what: str) -> dict[str, str]:
    """Poll the job until `until(fields)`; a requeued job's 2-minute BeginTime hold is lifted at once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = _job(env, job_id)
        if until(fields):
            return fields
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
            _run(env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        time.sleep(1)
    raise AssertionError(f"job {job_id}: {what} did not happen within {timeout_s} s; last state {fields}")


def test_train_sbatch_on_two_nodes_is_preempted_requeued_and_resumes(cluster, tmp_path, digits_dir):
    """4 ranks (2 nodes x 2 tasks) train; SIGUSR1 (what --signal=SIGUSR1@90 sends before the time limit) makes
    all ranks agree on it at the next step, save `preempted_step_N.ckpt` and rank 0 requeues; the requeued job resumes
    from it and finishes. (Lightning's own handler saved inside the signal handler and hung here in mismatched
    collectives.)"""
    log_dir = tmp_path / "logs"
    out = tmp_path / "train-%j.out"
    job_id = _run(cluster, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0",
                  "--cpus-per-task=1", "--time=15", f"--output={out}", "slurm/train.sbatch", *TINY,
                  "data.batch_per_device=8",
                  "trainer.max_steps=60", "callbacks.model_checkpoint.every_n_train_steps=10",
                  "callbacks.model_checkpoint.every_n_epochs=null", "run_name=slurm_train",
                  f"paths.log_dir={log_dir}", f"paths.data_dir={digits_dir}").strip().split(";")[0]
    run_dir = log_dir / "slurm_train"
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("step_*.ckpt")):
        state = _job(cluster, job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, Path(str(out).replace("%j", job_id)).read_text())
        assert time.monotonic() < deadline, "no step checkpoint within 240 s"
        time.sleep(0.5)
    _run(cluster, "scancel", "--signal=USR1", job_id)  # to every task of the job's steps, as --signal does
    fields = _wait(cluster, job_id, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
                   "the requeued job finishing")
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, log[-4000:])
    assert {f"rank {r}/4" for r in range(4)} <= set(re.findall(r"rank \d/4", log)), log[-4000:]
    preempted = sorted((run_dir / "checkpoints").glob("preempted_step_*.ckpt"))
    assert len(preempted) == 1, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    resumed = re.findall(r"resuming from (/\S+?\.ckpt)", log)
    assert resumed and resumed[-1] == str(preempted[0]), log[-4000:]
    import torch

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    preempted_step = torch.load(preempted[0], map_location="cpu", weights_only=True)["global_step"]
    assert 10 <= preempted_step < 60 and last["global_step"] == 60


def test_a_submitit_sweep_runs_each_point_as_a_two_task_slurm_job(cluster, tmp_path, digits_dir):
    """`train.py -m hydra/launcher=slurm ...`: two sweep points, each a SLURM job of 2 tasks (2 ranks), each its
    own run dir; the sweep command waits for both. The override string (~420 characters) names the job folders
    through visgen's safe names (cut + hash, <= 255 bytes), which submitit resolves in the job itself."""
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         *TINY, "data.batch_per_device=16", "trainer.max_steps=4", f"paths.log_dir={tmp_path}",
         f"paths.data_dir={digits_dir}", "model.optimizer.lr=1e-3,2e-3"],
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    last = sorted(tmp_path.glob("**/checkpoints/last.ckpt"))
    assert len(last) == 2, sorted(str(p) for p in tmp_path.glob("**/*.ckpt"))
    logs = [p.read_text() for p in tmp_path.glob("**/.submitit/*/*_0_log.out")]
    assert len(logs) == 2 and all("rank 0/2" in text for text in logs), logs


def test_evaluate_sbatch_samples_a_trained_checkpoint(cluster, tmp_path, digits_dir):
    """slurm/evaluate.sbatch runs evaluate.py as a 2-task SLURM job on 2 nodes (srun: each rank samples its share
    of the chunks) and writes metrics.json once."""
    import torch

    train = subprocess.run([sys.executable, "train.py", *TINY, "data.batch_per_device=32", "trainer.max_steps=2",
                            "run_name=to_eval", f"paths.log_dir={tmp_path}", f"paths.data_dir={digits_dir}"],
                           cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "to_eval" / "checkpoints" / "last.ckpt"
    out_dir, out = tmp_path / "eval", tmp_path / "eval-%j.out"
    job_id = _run(cluster, "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                  "--cpus-per-task=1", "--time=10", f"--output={out}", "slurm/evaluate.sbatch", f"ckpt={ckpt}",
                  "num_samples=20", f"out_dir={out_dir}", f"paths.cache_dir={tmp_path / 'cache'}").strip()
    fields = _wait(cluster, job_id, lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
                   "the evaluation job finishing")
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    assert "evaluation rank 1 of 2" in log, log[-4000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["checkpoint_step"] == 2
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
