"""Lightning DataModules over WebDataset shards (images, or cached latents/codes): exact per-epoch sample
counts, reproducible order, and no silent data loss (visgen.data.loss: counted per epoch and rank, logged as
metrics by `DataLossMonitor`, the run stopped above data.max_lost_fraction)."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from visgen.data.cached import CachedStream, CacheMismatchError, check_tokenizer, read_cache_info
from visgen.data.loss import DataLossError, shard_counts
from visgen.data.stream import ShardStream, exact_epoch_counts, expand_shard_spec

log = logging.getLogger(__name__)


class ShardDataModule(pl.LightningDataModule):
    """Train (exact epochs or resampled, seeded per epoch/rank/worker) and val (each sample once) loaders over
    tar shards."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None,
        image_size: int,
        num_classes: int,
        num_train_samples: int | None,
        batch_global: int,
        batch_per_device: int,
        num_workers: int = 2,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_batch_per_device: int | None = None,
        resize: bool = False,
        max_lost_fraction: float = 0.001,
        train_stream: str = "resampled",
        counts_file: str | None = None,
    ) -> None:
        """Store plain config values (Hydra-friendly); shards are only opened when a loader is built.

        `train_stream`: `exact` reads every sample at most once per epoch (shards permuted per (seed, epoch),
        a counted tail of fewer than batch_global samples dropped, so every rank gets the same batches; needs
        per-shard counts: manifest.json, cache.json or _info.json beside the shards, or `counts_file`);
        `resampled` draws shards with replacement (webdataset's resampled mode; any shards, no counts).
        `num_train_samples`: samples per epoch; null with `exact` takes the shards' count (checked otherwise).
        `resize`: ADM-center-crop images of any size to image_size (else a size mismatch is an error).
        `max_lost_fraction`: stop when more than this fraction of a rank's epoch (train) or pass (val) could
        not be read (corrupt samples plus unreadable shard tails); 0 stops at the first loss.
        """
        super().__init__()
        if not 0.0 <= max_lost_fraction < 1.0:
            raise ValueError(f"data.max_lost_fraction={max_lost_fraction} must be in [0, 1)")
        if batch_per_device <= 0 or batch_global <= 0:
            raise ValueError(f"data.batch_global={batch_global} and data.batch_per_device={batch_per_device} "
                             "must both be positive")
        if batch_global % batch_per_device != 0:
            raise ValueError(f"data.batch_global={batch_global} is not a multiple of data.batch_per_device="
                             f"{batch_per_device}; set batch_global = batch_per_device x devices x "
                             "gradient accumulation")
        if train_stream not in ("exact", "resampled"):
            raise ValueError(f"data.train_stream={train_stream!r} must be exact (each sample once per epoch) or "
                             "resampled (shards drawn with replacement)")
        if num_train_samples is None and train_stream != "exact":
            raise ValueError("data.num_train_samples=null takes the count from the shards' manifest, which only "
                             "data.train_stream=exact reads; set data.num_train_samples or use exact epochs")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.num_classes = num_classes
        self.train_stream = train_stream
        self.counts_file = counts_file
        self._num_train_samples = num_train_samples
        self._checked_num_train_samples: int | None = None
        if num_train_samples is not None:
            self._check_epoch_has_a_step(num_train_samples, batch_global)
        self.batch_global = batch_global
        self.batch_per_device = batch_per_device
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_batch_per_device = val_batch_per_device or batch_per_device
        self.resize = resize
        self.max_lost_fraction = max_lost_fraction
        self.epoch = 0
        self.skip_batches = 0
        self._train_stream: ShardStream | None = None
        self._val_stream: ShardStream | None = None
        self._delivered = {"train": 0, "val": 0}  # samples handed to the model since the last loss report

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

    @staticmethod
    def _check_epoch_has_a_step(num_train_samples: int, batch_global: int) -> None:
        if num_train_samples < batch_global:
            raise ValueError(f"data.num_train_samples={num_train_samples} is smaller than data.batch_global="
                             f"{batch_global}, so an epoch has no optimizer step; lower batch_global")

    @property
    def num_train_samples(self) -> int:
        """Samples per epoch: data.num_train_samples, checked against (or, when null, taken from) the per-shard
        counts for exact epochs."""
        if self._checked_num_train_samples is None:
            self._checked_num_train_samples = self._resolve_num_train_samples()
        return self._checked_num_train_samples

    def _resolve_num_train_samples(self) -> int:
        configured = self._num_train_samples
        if self.train_stream != "exact":
            assert configured is not None
            return configured
        urls = expand_shard_spec(self.train_shards)
        total = sum(exact_epoch_counts(self.train_shards, urls, shard_counts(urls, self.counts_file),
                                       self.counts_file))
        if configured is not None and configured != total:
            raise ValueError(f"data.num_train_samples={configured} but the shards {self.train_shards!r} hold "
                             f"{total} samples (their per-shard counts); set data.num_train_samples=null to take "
                             "the shards' count, or point data.train_shards at the whole set")
        self._check_epoch_has_a_step(total, self.batch_global)
        return total

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: num_train_samples // batch_global (the remainder is not used)."""
        return self.num_train_samples // self.batch_global

    def samples_per_rank(self, world_size: int) -> int:
        """Samples each rank reads per epoch: steps x accumulation x batch_per_device."""
        return self.steps_per_epoch * self.accumulate_grad_batches(world_size) * self.batch_per_device

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (and this rank's already-consumed batches) for the next train iterator."""
        self.end_loss_period("train")  # the previous epoch's summary, if the DataLossMonitor did not end it
        self.end_loss_period("val")
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
        """Loader yielding exactly samples_per_rank samples per rank per epoch, in whole batches."""
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
        exact = self.train_stream == "exact"
        stream = self.make_stream(
            self.train_shards,
            resampled=not exact,
            exact=exact,
            counts_file=self.counts_file,
            random_flip=self.random_flip,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            samples_per_rank=self.steps_per_epoch * accumulation * self.batch_per_device,
            rank=rank,
            world_size=world_size,
            batch_size=self.batch_per_device,
        )
        stream.set_epoch(self.epoch, self.skip_batches)
        self._train_stream = stream
        if exact and rank == 0:
            log.info("exact epochs: %d samples in %d shards, %d steps x %d samples = %d read per epoch in an order "
                     "permuted per (seed, epoch); the %d after them are dropped (other samples every epoch)",
                     stream.num_samples_total, len(stream.urls), self.steps_per_epoch, self.batch_global,
                     self.steps_per_epoch * self.batch_global, stream.dropped_per_epoch)
        return self._loader(stream, self.batch_per_device, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Non-resampled loader reading every val sample exactly once across ranks and workers."""
        if not self.val_shards:
            return []
        world_size, rank = self._world()
        stream = self.make_val_stream(self.val_shards, seed=self.seed, rank=rank, world_size=world_size)
        num_workers = min(self.num_workers, len(stream.urls) // world_size)
        if num_workers < self.num_workers:
            log.info("val loader: %d shards over %d ranks allow only %d of data.num_workers=%d workers",
                     len(stream.urls), world_size, num_workers, self.num_workers)
        stream.worker_shards(0, max(num_workers, 1))  # fewer shards than ranks: fail here, naming the fix
        self._val_stream = stream
        return self._loader(stream, self.val_batch_per_device, num_workers)

    def make_stream(self, shards: str, **kwargs: Any) -> ShardStream:
        """The stream of the train loader (the cached-latent DataModule returns its own kind)."""
        return ShardStream(shards, image_size=self.image_size, num_classes=self.num_classes, resize=self.resize,
                           **kwargs)

    def make_val_stream(self, shards: str, **kwargs: Any) -> ShardStream:
        """The stream of the val loader: image shards, read once."""
        return ShardStream(shards, image_size=self.image_size, num_classes=self.num_classes, resize=self.resize,
                           resampled=False, **kwargs)

    # ----- data loss: counted per epoch and rank, stopped above max_lost_fraction ----------------------------
    def _stream(self, split: str) -> ShardStream | None:
        return self._train_stream if split == "train" else self._val_stream

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the delivered samples and stop when this rank lost more than max_lost_fraction of its epoch."""
        trainer = getattr(self, "trainer", None)
        split = "train" if trainer is None or trainer.training else "val"
        stream = self._stream(split)
        if stream is not None and isinstance(batch, dict) and "label" in batch:
            self._delivered[split] += len(batch["label"])
            self.check_loss(split)
        return batch

    def check_loss(self, split: str) -> None:
        """Raise DataLossError when the samples lost so far exceed max_lost_fraction of the epoch (train: this
        rank's quota; val: what the pass read so far or its shards hold, whichever is larger)."""
        stream = self._stream(split)
        lost = stream.loss.lost() if stream is not None else 0
        if not lost:
            return
        expected = stream.samples_per_rank if split == "train" else sum(
            stream.expected_counts.get(url, 0) for url in stream.urls) // max(stream.world_size, 1)
        denominator = max(expected or 0, self._delivered[split] + lost)
        if lost > self.max_lost_fraction * denominator:
            world_size, rank = self._world()
            raise DataLossError(
                f"rank {rank} lost {lost} {split} samples in epoch {self.epoch} ({lost / denominator:.2%} of "
                f"{denominator}), more than data.max_lost_fraction={self.max_lost_fraction}: "
                f"{stream.loss.describe()}. Check the shards with python -m visgen.data.verify '<spec>' and rewrite "
                "the broken ones (python -m visgen.data.writer resumes and rewrites only what is missing), or "
                "raise data.max_lost_fraction to train on what is readable")

    def loss_report(self, split: str) -> dict[str, int] | None:
        """This rank's counts since the last report: lost samples, corrupt samples, unreadable tails, delivered."""
        stream = self._stream(split)
        if stream is None:
            return None
        corrupt, tail_samples, tails = stream.loss.totals()
        return {"lost_samples": corrupt + tail_samples, "corrupt": corrupt, "tails": tails,
                "repeated": stream.loss.repeated(), "delivered": self._delivered[split]}

    def end_loss_period(self, split: str) -> None:
        """Log this rank's summary (shards and counts) if anything was lost, then start counting afresh."""
        stream = self._stream(split)
        if stream is None:
            return
        report = self.loss_report(split)
        if report and (report["lost_samples"] or report["tails"]):
            _, rank = self._world()
            repeated = f"; {report['repeated']} read twice to keep whole batches" if report["repeated"] else ""
            log.warning("rank %d %s epoch %d: lost %d samples (%d corrupt, %d unreadable shard tails) of %d read%s: "
                        "%s", rank, split, self.epoch, report["lost_samples"], report["corrupt"], report["tails"],
                        report["delivered"] + report["lost_samples"], repeated, stream.loss.describe())
        stream.loss.reset()
        self._delivered[split] = 0

    def teardown(self, stage: str) -> None:
        """The last epoch's loss summary."""
        self.end_loss_period("train")
        self.end_loss_period("val")

    @staticmethod
    def _loader(stream: ShardStream, batch_size: int, num_workers: int) -> DataLoader:
        """DataLoader of {"image": uint8 (B, 3, H, W), "label": int64 (B,)} batches; never touches the global RNG."""
        stream.loss.share(num_workers)  # workers add their losses where this process reads them
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


class CachedDataModule(ShardDataModule):
    """Train on a latent/code cache (no encoder in the step); validate on image shards (encoded on the fly)."""

    def __init__(self, cache_dir: str, image_size: int, num_classes: int, batch_global: int, batch_per_device: int,
                 val_shards: str | None = None, num_train_samples: int | None = None, crop: str = "adm_center",
                 keep_image: bool = False, **kwargs: Any) -> None:
        """`num_train_samples=None` takes the cache's count; `crop` must match how the cache was made."""
        self.cache = read_cache_info(cache_dir)
        if self.cache.image_size != image_size:
            raise CacheMismatchError(f"the cache {cache_dir} holds {self.cache.image_size}x{self.cache.image_size} "
                                     f"images but data.image_size={image_size}; use a cache of this size")
        if self.cache.crop != crop:
            raise CacheMismatchError(f"the cache {cache_dir} was made with crop {self.cache.crop!r} but data.crop="
                                     f"{crop!r}; set data.crop={self.cache.crop} or rebuild the cache")
        if self.cache.num_classes > num_classes:
            raise CacheMismatchError(f"the cache {cache_dir} has labels up to {self.cache.num_classes - 1} but "
                                     f"data.num_classes={num_classes}")
        super().__init__(train_shards=self.cache.spec, val_shards=val_shards, image_size=image_size,
                         num_classes=num_classes, num_train_samples=num_train_samples or self.cache.count,
                         batch_global=batch_global, batch_per_device=batch_per_device, **kwargs)
        self.crop = crop
        self.keep_image = keep_image

    def setup(self, stage: str) -> None:
        """Refuse a cache made with another tokenizer than the run's (both ids and weight hashes named)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if module is not None and hasattr(module, "tokenizer"):
            check_tokenizer(self.cache, module.tokenizer)

    def make_stream(self, shards: str, **kwargs: Any) -> CachedStream:
        return CachedStream(self.cache, keep_image=self.keep_image, num_classes=self.num_classes, **kwargs)



class DataLossMonitor(pl.Callback):
    """Logs every rank's data loss of each train and validation epoch as metrics (sums over ranks)."""

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "loss_report"):
            return
        report = datamodule.loss_report(split)
        if report is None:
            return
        values = torch.tensor([report["lost_samples"], report["delivered"], report["tails"], report["repeated"]],
                              dtype=torch.float64, device=pl_module.device)
        gathered = pl_module.all_gather(values).reshape(-1, 4)  # (world, 4)
        lost, delivered, tails, repeated = gathered.sum(dim=0).tolist()
        metrics = {f"data/{split}_lost_samples": lost, f"data/{split}_lost_tails": tails,
                   f"data/{split}_lost_fraction": lost / max(lost + delivered, 1.0),
                   f"data/{split}_repeated_samples": repeated}
        if gathered.shape[0] > 1:
            metrics.update({f"data/{split}_lost_samples_rank{r}": float(v) for r, v in enumerate(gathered[:, 0])})
        pl_module.log_dict(metrics, rank_zero_only=True)
        datamodule.end_loss_period(split)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")


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
