"""Build everything from the composed config and fit: the body of `train.py`."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from visgen.errors import user_error_cause
from visgen.eval.checkpoint import load_checkpoint
from visgen.hardware import slow_cpu_bf16_note
from visgen.training.callbacks import AtomicCheckpointIO, ModuleBookkeeping, RunRecord
from visgen.training.launch import (
    check_global_batch,
    fill_devices_from_slurm,
    refuse_local_multirun_with_subprocesses,
    release_submitit_sigusr1,
    slurm_restart_count,
)
from visgen.training.preemption import Preempted, PreemptionCheckpoint
from visgen.training.preflight import check_inputs, check_trainer_keys
from visgen.training.run import (
    check_resume_compatible,
    collect_provenance,
    experiment_name,
    resolve_resume,
    write_run_files,
)

log = logging.getLogger(__name__)

__all__ = ["train"]


def _build(node: Any, **kwargs: Any) -> Any:
    """`instantiate`, but a constructor's UserError (a bad value, a missing file) comes out as itself, not wrapped
    in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = user_error_cause(err)
        if cause is None:
            raise
        raise cause from None


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group dict (callbacks, loggers)."""
    return [_build(v) for v in (node or {}).values() if isinstance(v, DictConfig) and "_target_" in v]


def _new_log_dirs(loggers: list[Any]) -> list[Path]:
    """The log folders this start will create (a CSV logger's next `csv/version_N`), not ones that exist."""
    dirs = [getattr(logger, "log_dir", None) for logger in loggers]
    return [Path(d) for d in dirs if isinstance(d, str) and not Path(d).exists()]


def _drop_log_dirs(dirs: list[Path]) -> None:
    """Remove the log folders of a start that never trained (it failed before its first step, or a finished run
    was resumed), so the run dir does not look as if it had; then their parent (`csv/`) when left empty."""
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def _lightning_logs_once() -> None:
    """Lightning gives its `lightning` logger a stderr handler of its own ("INFO: ...") and lets it propagate too, so
    under Hydra, whose root handlers write stdout and train.log, every Lightning line was printed twice. Keep the
    root's handlers only: each line once, and in train.log."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    # and without Lightning's advertisement for its cloud logger, printed at every start
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropTips())


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


def _silence_warnings_that_do_not_apply() -> None:
    """Lightning warnings that every visgen run would print although nothing is wrong (issue 12.7); each says why."""
    for message in (
        # Lightning 2.6's own pytree helper against torch's newer API: nothing a run can change.
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        # The shard stream defines __len__ on purpose (Lightning's epoch length) and splits itself over ranks and
        # workers (visgen.data.stream), so every worker's length is exact.
        r"Your `IterableDataset` has `__len__` defined",
        # The EMA copy and the frozen tokenizer are in eval mode by design; the trained net is in train mode.
        r"Found \d+ module\(s\) in eval mode at the start of training",
        # The shard stream resumes mid-epoch itself (it skips the batches already used; README convention 9).
        r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    ):
        warnings.filterwarnings("ignore", message=message)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit `cfg.model` on `cfg.data` with `cfg.trainer`; return the final logged metrics."""
    _lightning_logs_once()
    _silence_warnings_that_do_not_apply()
    check_trainer_keys(cfg.trainer)
    check_inputs(cfg)  # every missing shard, cache or weights file at once, before anything is built or written
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=False)  # data workers seed themselves (seed, epoch, rank, worker)
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path = cfg.ckpt_path
    if ckpt_path is None and slurm_restart_count() > 0:
        # A requeued SLURM job (preemption, time limit) continues its own run, whatever its command line says.
        log.info("SLURM requeue %d of this job: resuming from the run dir's newest checkpoint", slurm_restart_count())
        ckpt_path = "last"
    # Only rank 0 judges whether the run dir is occupied: other ranks may start after it wrote run.json.
    resume_from = resolve_resume(run_dir, ckpt_path, refuse_occupied=rank_zero_only.rank == 0)
    with open_dict(cfg):
        filled = fill_devices_from_slurm(cfg.trainer)
    if filled:
        log.info(filled)
    provenance = collect_provenance(cfg)
    if resume_from is not None:
        # Read weights-only (memory-mapped: no copy of a large file) and refuse a checkpoint of another run
        # before Lightning restores weights and optimizer from it.
        checkpoint = load_checkpoint(resume_from, "ckpt_path=", mmap=True, weights=False)
        if not cfg.resume_from_other_run:
            check_resume_compatible(checkpoint, f"ckpt_path={resume_from}", provenance["config"],
                                    provenance["experiment"])
        del checkpoint

    datamodule = _build(cfg.data)
    model = _build(cfg.model)
    if model.init_from and resume_from is None:
        # Fine-tuning start (e.g. DiT 256 -> 512): weights only, strict, with a fresh optimizer. A resume
        # takes everything from its checkpoint instead.
        from visgen.official import init_net_from

        log.info(init_net_from(model.net, model.ema, model.init_from, experiment_name()))
    model.run_info = {k: v for k, v in provenance.items() if k != "argv"}

    loggers = _instantiate_all(cfg.get("logger"))
    # ModuleBookkeeping first: every later batch hook (checkpoints, sample grids, online FID, the lr monitor) sees
    # this step's EMA and logging step. RunRecord writes run.json & co. only once the first step trained.
    # PreemptionCheckpoint is not a config choice: no run may lose more than a step to SIGTERM / SIGUSR1.
    record = RunRecord(lambda: write_run_files(run_dir, provenance, resume_from))
    callbacks = [ModuleBookkeeping(), record, *_instantiate_all(cfg.get("callbacks")), PreemptionCheckpoint()]
    trainer: L.Trainer = _build(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                plugins=[AtomicCheckpointIO()])
    accumulation = datamodule.accumulate_grad_batches(trainer.world_size)
    if model.automatic_optimization:
        trainer.accumulate_grad_batches = accumulation
    else:  # manual optimisation (two-optimizer modules) accumulates itself; Lightning refuses it on the Trainer
        model.accumulate_grad_batches = accumulation
    batch_line = check_global_batch(trainer, datamodule.batch_per_device, datamodule.batch_global, accumulation)
    # Every rank says who it is, so a multi-node job's log shows that all ranks started (and where).
    log.info("rank %d/%d (node %d, local rank %d)", trainer.global_rank, trainer.world_size, trainer.node_rank,
             trainer.local_rank)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        refuse_local_multirun_with_subprocesses(trainer, hydra_cfg.mode, hydra_cfg.launcher.get("_target_"))
    release_submitit_sigusr1()
    if trainer.is_global_zero:
        log.info("run dir: %s (%s)", run_dir, f"resuming from {resume_from}" if resume_from else "fresh start")
        log.info("net parameters: %s; %s", f"{sum(p.numel() for p in model.net.parameters()):,}", batch_line)
        bf16_note = slow_cpu_bf16_note(trainer.strategy.root_device.type, "bf16" in str(trainer.precision))
        if bf16_note:
            log.warning(bf16_note)
    new_log_dirs = _new_log_dirs(loggers) if trainer.is_global_zero else []
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
    except Preempted as preempted:
        log.warning("preempted at step %d: %s", trainer.global_step, preempted)
        raise SystemExit(preempted.exit_code) from None
    finally:
        if not record.started:
            _drop_log_dirs(new_log_dirs)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
