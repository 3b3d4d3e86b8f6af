"""Preemption without lost work: SIGTERM and SIGUSR1 save a checkpoint at the next optimizer step, on every rank
at the same step, then the job exits non-zero (and requeues itself under SLURM on SIGUSR1).

Why not Lightning's own handlers: they save the checkpoint (and broadcast SIGTERM) inside the signal handler, i.e.
a collective at whatever point each rank happens to be. Ranks that get the signal at different moments (one inside
the gradient all-reduce, another in Python) then meet in mismatched collectives and hang until the time limit
(seen on a real 2-node SLURM job: the requeued job never came back). Here the handler only records the signal;
at each optimizer-step boundary all ranks agree on it with one 4-byte all-reduce (max) and, when any rank got one,
all of them save the same step, rank 0 requeues under SLURM, and every rank leaves `trainer.fit` with
`Preempted`, which `train()` turns into the exit code 128 + signal number (143 for SIGTERM, 138 for SIGUSR1).

The checkpoint is `checkpoints/preempted_step_<N>.ckpt` (a folder for sharded FSDP2 runs); `ckpt_path=last`
resumes from the newest checkpoint of the run by step, whichever kind (README: "What survives what"). Only the
newest preempted checkpoint is kept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)

__all__ = ["PreemptionCheckpoint", "Preempted", "PREEMPTED_PREFIX", "slurm_job_id", "requeue_slurm_job"]

PREEMPTED_PREFIX = "preempted_step_"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """Raised on every rank after the preemption checkpoint is written; `train()` exits with `exit_code`.

    A BaseException, so that no `except Exception` between Lightning's loop and `train()` swallows it.
    """

    def __init__(self, signum: int, checkpoint: Path, requeued: bool) -> None:
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        self.exit_code = 128 + signum
        what = "requeued the SLURM job" if requeued else "not requeued"
        super().__init__(f"{signal.Signals(signum).name}: saved {checkpoint}; {what}; exit code {self.exit_code}")


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for array jobs, else SLURM_JOB_ID (None outside)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    return job_id if job_id and re.fullmatch(r"[0-9_]+", job_id) else None


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; logs and returns whether SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        log.error("could not requeue SLURM job %s: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class PreemptionCheckpoint(L.Callback):
    """Turns SIGTERM / SIGUSR1 into a checkpoint at the next optimizer step on all ranks, then a clean exit.

    `requeue_on`: the signals after which rank 0 requeues a SLURM job (SIGUSR1: what `--signal=SIGUSR1@90` sends
    before the time limit; a SIGTERM is `scancel` or SLURM's own preemption, which requeues by itself).
    """

    def __init__(self, requeue_on: tuple[int, ...] = (signal.SIGUSR1,)) -> None:
        self.requeue_on = tuple(int(s) for s in requeue_on)
        self.received = 0  # the signal number this rank got (0: none)
        self._previous: dict[int, Any] = {}

    # -- the handler: record only; no I/O, no collectives (a signal interrupts arbitrary code) ----------------------
    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = max(self.received, signum)
        os.write(2, f"visgen: got {signal.Signals(signum).name}; saving at the next optimizer step\n".encode())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # Lightning's in-handler save + requeue is what this callback replaces

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning registered its SIGTERM handler (which broadcasts inside the handler).
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- agreement and save at an optimizer-step boundary -----------------------------------------------------------
    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The largest signal number any rank received (0: none); one all-reduce, same call on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=trainer.strategy.root_device)  # [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        accumulation = int(getattr(pl_module, "accumulate_grad_batches", 0) or trainer.accumulate_grad_batches)
        if (batch_idx + 1) % max(accumulation, 1) != 0:
            return  # mid-accumulation: the gradients of this step would be lost
        signum = self._agreed_signal(trainer)
        if signum:
            self._save_and_stop(trainer, signum)

    def _save_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        checkpoint_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else Path(
            trainer.default_root_dir) / "checkpoints"
        path = checkpoint_dir / f"{PREEMPTED_PREFIX}{trainer.global_step:07d}.ckpt"
        log.info("%s on some rank: saving %s (step %d)", signal.Signals(signum).name, path, trainer.global_step)
        trainer.save_checkpoint(path)  # a collective where the strategy needs one (FSDP2's DCP save)
        requeued = False
        if trainer.is_global_zero:
            for older in checkpoint_dir.glob(f"{PREEMPTED_PREFIX}*.ckpt"):
                if older != path:
                    shutil.rmtree(older) if older.is_dir() else older.unlink()
            job_id = slurm_job_id()
            if job_id and signum in self.requeue_on:
                requeued = requeue_slurm_job(job_id)
        raise Preempted(signum, path, requeued)
