"""Training callbacks: the module's step bookkeeping before every other hook, run records once training starts, one
lr row per step, checkpoints that never rewrite the step a run resumed from and are written beside their final name,
sample grids."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from visgen.errors import ConfigValueError, UserError
from visgen.sampling import balanced_labels, save_grid

log = logging.getLogger(__name__)

__all__ = ["ModuleBookkeeping", "RunRecord", "StepLearningRateMonitor", "RunCheckpoint", "AtomicCheckpointIO",
           "CheckpointWriteError", "EveryNSteps", "SampleGrid", "LogLines", "RunProgressBar", "progress_bar"]


class ModuleBookkeeping(L.Callback):
    """The module's per-step bookkeeping, done before any other callback looks (train.py puts this one first):
    the EMA update at batch end, at the first batch after a resume the step metrics are logged under, and the
    last step's metrics always logged.

    Lightning calls every callback's batch hooks before the module's own, so an EMA updated in the module's hook
    was one step behind in step checkpoints (a resume then skipped that update for good) and in sample grids, and
    the lr monitor logged the first resumed step under a wrong step."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        restore = getattr(pl_module, "restore_log_step", None)
        if restore is not None:
            restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        update = getattr(pl_module, "update_ema", None)
        if update is not None:
            update()
        connector = trainer._logger_connector
        if 0 < trainer.max_steps <= trainer.global_step and not connector.should_update_logs:
            # The last step: Lightning logs a step only every log_every_n_steps, so a run shorter than that interval
            # (or ending between two) lost its final metrics. Logged here as Lightning would (same step, same
            # values); not via should_stop, which would also add a validation pass.
            connector.log_metrics(connector.metrics["log"])


class RunRecord(L.Callback):
    """Writes the run's records (config.yaml, git.diff, run.json; run.resumeN.json on a resume) once this start
    has trained: at its first completed optimizer step, after data, model, tokenizer and checkpoint proved usable.
    A start that failed before (a missing shard, a bad label or image size in the first batch, a crash in the
    first step) or did not train at all (a finished run resumed) leaves nothing that marks the run dir as
    occupied, so the corrected command runs as typed."""

    def __init__(self, write: Any) -> None:
        self.write = write  # called once on rank 0, with no arguments
        self.started = False
        self._start_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.started or self._start_step is None or trainer.global_step <= self._start_step:
            return
        self.started = True
        if trainer.is_global_zero:
            self.write()


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging once per optimizer step: the stock one logs at every micro-batch's
    start, so under gradient accumulation each step's lr appeared in as many rows as micro-batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_step = -1

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step == self._logged_step:
            return
        self._logged_step = step
        super().on_train_batch_start(trainer, *args, **kwargs)


def _out_of_space(err: BaseException | None) -> bool:
    """Whether `err` is, or was raised while handling, a full disk or quota (torch.save reports ENOSPC as a
    RuntimeError "enforce fail ... unexpected pos" whose context holds the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written for want of space: the run stops, earlier checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden temp file beside its final name, fsyncs it and renames it into place.

    Lightning's own save goes through fsspec, which stages the file in `$TMPDIR` and *moves* it: where `$TMPDIR`
    is another filesystem (node-local scratch, shared run dirs) that move is a copy, and a kill during it left a
    truncated `step_N.ckpt` under its final name. A rename within one directory is atomic on POSIX filesystems, so
    the final name holds the old or the new complete file, never a part; a killed write leaves only a hidden
    `.<name>.tmp*` file, which `ckpt_path=last` ignores and the next save removes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(".*.ckpt.tmp*"):  # left by a write killed with SIGKILL (nothing ran then)
            if stale.is_file():
                stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_name, target)
        except BaseException as err:
            Path(tmp_name).unlink(missing_ok=True)
            if _out_of_space(err):
                raise CheckpointWriteError(
                    f"no space left to write checkpoint {target} (disk full or quota reached); the run stopped and "
                    f"the earlier checkpoints in {target.parent} are intact. Free space (or raise the quota), then "
                    "resume with ckpt_path=last") from err
            raise
        try:  # make the rename itself durable (a crash of the node right after it)
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, minus one rewrite and one false warning: a run resumed from an epoch-boundary
    checkpoint replays that epoch's end hooks, and the stock callback then saves the same step again
    over the file it resumed from. Marking the resumed step as saved keeps that file untouched."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:
        """No "Checkpoint directory ... exists and is not empty" warning: train.py refuses a fresh start into an
        occupied run dir, so a non-empty checkpoint dir here is always this run's own resume."""


class EveryNSteps(L.Callback):
    """Calls `self.run(trainer, pl_module, step)` once at every `every_n_steps`-th optimizer step (0: never)."""

    every_n_steps: int = 0
    _last_step: int = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.run(trainer, pl_module, step)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Any:
        raise NotImplementedError


class SampleGrid(EveryNSteps):
    """Every `every_n_steps` optimizer steps, sample a class-balanced grid with the EMA net.

    The noise comes from a fixed-seed generator, so successive grids show the same draws improving
    and sampling never touches the global RNG (which would break exact resume). Every rank samples
    (sharded nets need all ranks in the forward pass); rank 0 writes `samples/step_XXXXXXX.png` in
    the run dir and sends the grid to image-capable loggers (W&B).
    """

    def __init__(self, every_n_steps: int = 5000, num_images: int = 64, seed: int = 0):
        if every_n_steps < 0 or num_images < 1:
            raise ConfigValueError(f"callbacks.sample_grid: every_n_steps={every_n_steps} must be >= 0 (0: only at the "
                                   f"end) and num_images={num_images} >= 1; to drop grids, ~callbacks.sample_grid")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path | None:
        return self.write_grid(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0:
            self.write_grid(trainer, pl_module, trainer.global_step)

    def write_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path | None:
        """Sample, then (rank 0) write the PNG and log it."""
        num_classes = getattr(pl_module.ema, "num_classes", 0)
        labels = balanced_labels(self.num_images, num_classes, pl_module.device)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(labels, generator=generator)  # (N, 3, H, W) uint8
        if not trainer.is_global_zero:
            return None
        nrow = num_classes if 0 < num_classes <= 16 else None
        path = save_grid(images, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png", nrow=nrow)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=step)
        return path


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class LogLines(ProgressBar):
    """Progress as plain log lines for output that is not a terminal (`| tee`, nohup, every SLURM job), where a bar
    shows nothing until its final redraw. Every `every_n_steps` optimizer steps rank 0 logs one line (step, epoch,
    loss, grad norm, lr, img/s, elapsed, ETA) through `logging`, so it reaches stdout and the run's `train.log`;
    after each validation one line with the val metrics, and a last line when training ends."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start: tuple[float, int] = (0.0, 0)
        self._last: tuple[float, int] = (0.0, 0)  # (time, step) of the previous line: img/s and ETA over it
        self._batch_end: tuple[float, int] = (0.0, 0)  # (time, epoch) of the latest batch end

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self._batch_end = (time.monotonic(), trainer.current_epoch)
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > self._last[1]:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > self._last[1]:
            self._write(trainer, pl_module)  # timed at the last batch, not after end-of-training grids

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking and metrics:
            values = " | ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()))
            log.info("validation at step %d (epoch %d): %s", trainer.global_step, trainer.current_epoch, values)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (now, epoch), step = self._batch_end, trainer.global_step
        last_time, last_step = self._last
        self._last = (now, step)
        if not self._enabled or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else None
        parts = [f"step {step:,}" + (f"/{total:,}" if total else "") + f" (epoch {epoch})"]
        metrics = trainer.callback_metrics
        for key, name in (("train/loss", "loss"), ("train/grad_norm", "grad_norm")):
            if key in metrics:
                parts.append(f"{name} {float(metrics[key]):.4g}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        seconds_per_step = (now - last_time) / max(step - last_step, 1)
        batch = getattr(pl_module, "batch_global", None)
        if batch and seconds_per_step > 0:
            parts.append(f"{batch / seconds_per_step:,.0f} img/s")
        parts.append(f"elapsed {_duration(now - self._start[0])}")
        if total and step < total:
            parts.append(f"ETA {_duration((total - step) * seconds_per_step)}")
        log.info(" | ".join(parts))


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar without `Epoch 23/-2` (step-bounded runs have max_epochs=-1: the epoch alone is shown)
    and without `v_num` (the CSV logger's version, which is not a metric)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def progress_bar(mode: str = "auto", every_n_steps: int = 50) -> ProgressBar:
    """The progress display: `bar` (Rich, for terminals), `lines` (LogLines) or `auto`: the bar when stdout is a
    terminal, log lines every `every_n_steps` steps when it is not."""
    if mode not in ("auto", "bar", "lines"):
        raise ConfigValueError(f"callbacks.progress_bar.mode={mode!r} must be auto, bar or lines")
    if mode == "bar" or (mode == "auto" and sys.stdout.isatty()):
        return RunProgressBar()
    return LogLines(every_n_steps)
