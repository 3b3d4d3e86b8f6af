"""Ranks for evaluation jobs without Lightning: torchrun, srun, or a process group that already exists.

    torchrun --nproc-per-node 8 evaluate.py ...     # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    srun --ntasks-per-node 8 python evaluate.py ... # SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID
    python evaluate.py ...                          # one process

Inside a running Lightning job (the online FID callback) the trainer's process group is reused.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["Ranks", "setup_ranks", "slurm_first_host"]

#: Long: ranks wait at the end for the slowest one to finish its last chunk (minutes at ImageNet scale).
BARRIER_TIMEOUT = datetime.timedelta(hours=4)


@dataclass
class Ranks:
    """This process's place among the evaluation processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this object created the process group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.world_size > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks (returns a new tensor on `tensor`'s device)."""
        if self.world_size == 1:
            return tensor.clone()
        work = tensor.to(self.device if dist.get_backend() == "nccl" else "cpu").clone()
        dist.all_reduce(work)
        return work.to(tensor.device)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM node list ('gpu[012-015,020],cpu1' -> 'gpu012'), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]  # the first comma-separated group, brackets kept whole
    match = re.match(r"^(.*?)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def _from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or srun's variables, (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    # srun sets SLURM_STEP_NUM_TASKS for the processes of its step; a plain sbatch script (one process) does not
    # run in a step with several tasks, so SLURM_NTASKS alone would make a lone process wait for absent ranks.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = slurm_first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def setup_ranks(device: str = "auto") -> Ranks:
    """Join (or create) the process group the launcher describes; pick this rank's device."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        owns = False
    else:
        rank, world_size, local_rank = _from_env()
        owns = world_size > 1
    if device == "auto":
        chosen = torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else (
            torch.device("cpu"))
    else:
        chosen = torch.device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if owns:
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=BARRIER_TIMEOUT)
        log.info("evaluation rank %d of %d on %s (%s)", rank, world_size, chosen, backend)
    return Ranks(rank, world_size, local_rank, chosen, owns)
