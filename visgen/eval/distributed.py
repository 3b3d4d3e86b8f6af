"""Ranks for evaluation jobs without Lightning: torchrun, srun, or a process group that already exists.

    torchrun --nproc-per-node 8 evaluate.py ...     # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    srun --ntasks-per-node 8 python evaluate.py ... # SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID
    python evaluate.py ...                          # one process

torchrun's variables win over SLURM's (torchrun inside an sbatch script). SLURM's count only inside a job step
with several tasks: a batch script itself carries SLURM_PROCID=0 and SLURM_NTASKS=<the allocation's tasks> (checked
on slurm-wlm 22.05: no SLURM_STEP_NUM_TASKS there), so a plain `python evaluate.py` in it is one process, not a rank
waiting for tasks that were never started. Under srun, MASTER_ADDR defaults to the step's first node and
MASTER_PORT to 20000 + job id mod 20000 (set either to override). Inside a running Lightning job (the online FID
callback) the trainer's process group is reused.
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
    launcher: str = "single"  # torchrun, srun, lightning (a trainer's group) or single: recorded on the card

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
        # a time limit: a misconfigured SLURM_CONF makes scontrol retry for a minute before failing
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                             timeout=10)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]  # the first comma-separated group, brackets kept whole
    match = re.match(r"^(.*?)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number; the launcher (torchrun, srun) sets it, so unset "
                         "it when starting evaluate.py by hand") from None


def _from_env() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, launcher) from torchrun's or srun's variables, (0, 1, 0, "single") otherwise."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        if not ("RANK" in env and "WORLD_SIZE" in env):
            missing = "WORLD_SIZE" if "RANK" in env else "RANK"
            raise ValueError(f"RANK and WORLD_SIZE come together (torchrun sets both) but {missing} is not set; "
                             "launch with torchrun, or unset the other one for a single process")
        rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), int(env.get("LOCAL_RANK", 0))
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):
        # inside a job step (srun); SLURM_NTASKS only where an old SLURM does not set the step's own count
        count = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world_size = _env_int("SLURM_PROCID"), _env_int(count) if count in env else 1
        local_rank, launcher = int(env.get("SLURM_LOCALID", 0)), "srun"
        if world_size > 1:
            if "MASTER_ADDR" not in env:
                nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
                env["MASTER_ADDR"] = slurm_first_host(nodes)
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        return 0, 1, 0, "single"
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size} ({launcher}'s variables); every rank must "
                         "be started by the same launcher command")
    return rank, world_size, local_rank, launcher


def setup_ranks(device: str = "auto") -> Ranks:
    """Join (or create) the process group the launcher describes; pick this rank's device."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        owns, launcher = False, "lightning"
    else:
        rank, world_size, local_rank, launcher = _from_env()
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
        log.info("evaluation rank %d of %d (%s, local rank %d) on %s (%s, MASTER_ADDR %s:%s)", rank, world_size,
                 launcher, local_rank, chosen, backend, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return Ranks(rank, world_size, local_rank, chosen, owns, launcher)
