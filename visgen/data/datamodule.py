"""Lightning DataModule over WebDataset shards: exact per-epoch sample counts and reproducible order."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from visgen.data.stream import ShardStream

log = logging.getLogger(__name__)


class ShardDataModule(pl.LightningDataModule):
    """Train (resampled, seeded per epoch/rank/worker) and val (each sample once) loaders over tar shards."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None,
        image_size: int,
        num_classes: int,
        num_train_samples: int,
        batch_global: int,
        batch_per_device: int,
        num_workers: int = 2,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_batch_per_device: int | None = None,
    ) -> None:
        """Store plain config values (Hydra-friendly); shards are only opened when a loader is built."""
        super().__init__()
        if batch_per_device <= 0 or batch_global <= 0:
            raise ValueError(f"data.batch_global={batch_global} and data.batch_per_device={batch_per_device} "
                             "must both be positive")
        if batch_global % batch_per_device != 0:
            raise ValueError(f"data.batch_global={batch_global} is not a multiple of data.batch_per_device="
                             f"{batch_per_device}; set batch_global = batch_per_device x devices x "
                             "gradient accumulation")
        if num_train_samples < batch_global:
            raise ValueError(f"data.num_train_samples={num_train_samples} is smaller than data.batch_global="
                             f"{batch_global}, so an epoch has no optimizer step; lower batch_global")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_train_samples = num_train_samples
        self.batch_global = batch_global
        self.batch_per_device = batch_per_device
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_batch_per_device = val_batch_per_device or batch_per_device
        self.epoch = 0
        self.skip_batches = 0
        self._train_stream: ShardStream | None = None

    def accumulate_grad_batches(self, world_size: int) -> int:
        """Micro-batches per optimizer step: batch_global / (batch_per_device x world_size), whole."""
        per_step = self.batch_per_device * world_size
        if world_size <= 0 or self.batch_global % per_step != 0:
            raise ValueError(f"data.batch_global={self.batch_global} is not divisible by "
                             f"data.batch_per_device={self.batch_per_device} x world_size={world_size} "
                             f"(= {per_step}); change "
                             "batch_global or batch_per_device so that batch_global is a multiple of "
                             "batch_per_device x number of devices")
        return self.batch_global // per_step

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: num_train_samples // batch_global (the remainder is not used)."""
        return self.num_train_samples // self.batch_global

    def samples_per_rank(self, world_size: int) -> int:
        """Samples each rank reads per epoch: steps x accumulation x batch_per_device."""
        return self.steps_per_epoch * self.accumulate_grad_batches(world_size) * self.batch_per_device

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (and this rank's already-consumed batches) for the next train iterator."""
        self.epoch = epoch
        self.skip_batches = skip_batches
        if self._train_stream is not None:
            # Workers are not persistent: each epoch's iterator copies the stream, so workers see the epoch.
            self._train_stream.set_epoch(epoch, skip_batches)

    def _world(self) -> tuple[int, int]:
        """(world_size, global_rank) from the attached trainer, or (1, 0) when used on its own."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        """Resampled loader yielding exactly samples_per_rank samples per rank per epoch, in whole batches."""
        world_size, rank = self._world()
        accumulation = self.accumulate_grad_batches(world_size)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Lightning creates a fit's first iterator right after this call, before on_train_epoch_start
            # (which a resumed half-done epoch never gets), so take the position from its restored loops.
            self.epoch, self.skip_batches = _loop_position(trainer, self.steps_per_epoch * accumulation)
            trainer_accumulation = getattr(trainer, "accumulate_grad_batches", accumulation)
            if trainer_accumulation != accumulation:
                log.warning("trainer.accumulate_grad_batches=%s but data.batch_global=%d / "
                            "(batch_per_device=%d x world_size=%d) needs %d; set it from "
                            "datamodule.accumulate_grad_batches(world_size)",
                            trainer_accumulation, self.batch_global, self.batch_per_device, world_size,
                            accumulation)
        stream = ShardStream(
            self.train_shards,
            image_size=self.image_size,
            resampled=True,
            random_flip=self.random_flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            samples_per_rank=self.steps_per_epoch * accumulation * self.batch_per_device,
            rank=rank,
            world_size=world_size,
            batch_size=self.batch_per_device,
            num_classes=self.num_classes,
        )
        stream.set_epoch(self.epoch, self.skip_batches)
        self._train_stream = stream
        return self._loader(stream, self.batch_per_device, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Non-resampled loader reading every val sample exactly once across ranks and workers."""
        if not self.val_shards:
            return []
        world_size, rank = self._world()
        stream = ShardStream(
            self.val_shards,
            image_size=self.image_size,
            resampled=False,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            num_classes=self.num_classes,
        )
        num_workers = min(self.num_workers, len(stream.urls) // world_size)
        if num_workers < self.num_workers:
            log.info("val loader: %d shards over %d ranks allow only %d of data.num_workers=%d workers",
                     len(stream.urls), world_size, num_workers, self.num_workers)
        stream.worker_shards(0, max(num_workers, 1))  # fewer shards than ranks: fail here, naming the fix
        return self._loader(stream, self.val_batch_per_device, num_workers)

    @staticmethod
    def _loader(stream: ShardStream, batch_size: int, num_workers: int) -> DataLoader:
        """DataLoader of {"image": uint8 (B, 3, H, W), "label": int64 (B,)} batches; never touches the global RNG."""
        return DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,  # fresh workers per epoch pick up the stream's current epoch
            # An explicit generator: creating an iterator draws worker base seeds from it instead of the
            # global torch RNG, so model-side randomness is identical with or without a resume.
            generator=torch.Generator(),
        )


def _loop_position(trainer: pl.Trainer, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches this rank already consumed in it) from the trainer's restored fit-loop progress."""
    try:
        epoch_progress = trainer.fit_loop.epoch_progress.current
        # `processed` is the epoch Lightning itself hands to samplers' set_epoch; `current_epoch` lags it by
        # one when resuming from a checkpoint written in on_train_epoch_end.
        epoch = int(epoch_progress.processed)
        # An epoch started but not processed was cut short: its `ready` batches were already trained on.
        # Otherwise the batch counter still holds the previous, finished epoch and the new one starts at 0.
        in_progress = int(epoch_progress.started) > epoch
        consumed_batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready) if in_progress else 0
    except (AttributeError, TypeError):
        log.warning("could not read the fit-loop progress of this Lightning version; a resumed run restarts "
                    "the data stream at the start of epoch %d", trainer.current_epoch)
        return trainer.current_epoch, 0
    if consumed_batches >= batches_per_epoch:
        # A checkpoint from the last batch of an epoch: Lightning finishes that epoch without fetching and
        # trains the next one on this same first iterator, so it must already be the next epoch's stream.
        return epoch + 1, 0
    return epoch, consumed_batches
