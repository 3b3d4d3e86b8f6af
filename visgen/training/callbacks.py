"""Training callbacks: checkpoints that never rewrite the step a run resumed from, sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from visgen.sampling import balanced_labels, save_grid

__all__ = ["RunCheckpoint", "EveryNSteps", "SampleGrid"]


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, minus one rewrite: a run resumed from an epoch-boundary
    checkpoint replays that epoch's end hooks, and the stock callback then saves the same step again
    over the file it resumed from. Marking the resumed step as saved keeps that file untouched."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step


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
