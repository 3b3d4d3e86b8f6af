"""How a training job was launched (one process, DDP/FSDP under SLURM or torchrun, a Hydra sweep) and the
checks that must pass before any GPU time is spent."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import lightning as L

from visgen.errors import ConfigValueError

log = logging.getLogger(__name__)

__all__ = ["slurm_restart_count", "check_global_batch", "refuse_local_multirun_with_subprocesses",
           "release_submitit_sigusr1"]


def slurm_restart_count() -> int:
    """How often SLURM has requeued this job (0 outside SLURM or on the first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def check_global_batch(trainer: L.Trainer, batch_per_device: int, batch_global: int, accumulation: int) -> str:
    """The effective global batch (per device x devices x nodes x accumulation), checked against
    data.batch_global; returns the line the run logs."""
    devices, nodes = trainer.num_devices, trainer.num_nodes
    effective = batch_per_device * devices * nodes * accumulation
    if effective != batch_global or devices * nodes != trainer.world_size:
        raise ConfigValueError(
            f"effective global batch {batch_per_device} per device x {devices} devices x {nodes} nodes x "
            f"{accumulation} accumulation = {effective} differs from data.batch_global={batch_global} (world size "
            f"{trainer.world_size}); set trainer.devices/trainer.num_nodes to the processes the job really has "
            "(SLURM: --ntasks-per-node and --nodes)")
    return (f"global batch {effective} = {batch_per_device} per device x {devices} devices x {nodes} nodes x "
            f"{accumulation} accumulation")


def refuse_local_multirun_with_subprocesses(trainer: L.Trainer, hydra_mode: Any, launcher_target: str | None) -> None:
    """A local `-m` sweep cannot run multi-process jobs: Lightning would start each job's other ranks by
    re-running the whole command line, i.e. the whole sweep, in every child. Refuse before training."""
    from hydra.types import RunMode

    if hydra_mode != RunMode.MULTIRUN or trainer.world_size <= 1:
        return
    if trainer.strategy.cluster_environment.creates_processes_externally:
        return  # submitit / srun / torchrun started every rank itself
    raise ConfigValueError(
        f"a local Hydra multirun (launcher {launcher_target}) cannot start {trainer.world_size}-process jobs: "
        "Lightning would relaunch the whole sweep in each child process. Sweep on SLURM with "
        "hydra/launcher=slurm (one multi-GPU job per sweep point), or run each point as its own "
        "`srun`/`torchrun` command, or sweep single-device jobs (trainer.devices=1)."
    )


def release_submitit_sigusr1() -> None:
    """Under submitit (Hydra's SLURM launcher) remove submitit's SIGUSR1 handler, so that visgen's
    PreemptionCheckpoint handles it: it saves a checkpoint before requeueing, where submitit's would requeue
    without one."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and signal.getsignal(signal.SIGUSR1) not in (
            signal.SIG_DFL, signal.SIG_IGN, None):
        log.info("submitit job: visgen's SIGUSR1 handling (checkpoint + requeue) replaces submitit's")
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def fill_devices_from_slurm(trainer_cfg: Any) -> str | None:
    """Inside a SLURM job step with several tasks (srun, submitit), `trainer.devices=auto` and `num_nodes=1`
    mean "what SLURM gave": one device per task on each node. Returns a log line when it filled them in."""
    tasks_per_node, nodes = os.environ.get("SLURM_NTASKS_PER_NODE"), os.environ.get("SLURM_JOB_NUM_NODES")
    if "SLURM_STEP_ID" not in os.environ or not tasks_per_node or not nodes:
        return None
    try:
        tasks_per_node_n, nodes_n = int(tasks_per_node.split("(")[0]), int(nodes)
    except ValueError:
        return None
    if tasks_per_node_n * nodes_n <= 1 or trainer_cfg.get("devices") != "auto" or trainer_cfg.get("num_nodes") != 1:
        return None
    trainer_cfg.devices, trainer_cfg.num_nodes = tasks_per_node_n, nodes_n
    return f"SLURM job step: trainer.devices={tasks_per_node_n} (tasks per node), trainer.num_nodes={nodes_n}"
