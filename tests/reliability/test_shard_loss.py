"""Issue 11.3, no silent data loss from shards: a cut shard is counted exactly (once, not once per member),
per epoch and rank, logged as metrics, and stops the run above data.max_lost_fraction; labels outside
[0, num_classes) and images of the wrong size stop the run naming the shard."""

from __future__ import annotations

import csv
import logging
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from tests.data.imagefolder import image_files, write_folder
from visgen.data.datamodule import DataLossMonitor, ShardDataModule
from visgen.data.loss import DataLossError
from visgen.data.stream import ShardDataError, ShardStream
from visgen.data.writer import WriteOptions, write_dataset

SIZE = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images of 3 classes at 8x8 in 4 shards of 15, with the writer's manifest.json (per-shard counts)."""
    root = tmp_path_factory.mktemp("loss")
    write_dataset(write_folder(root / "src", image_files(per_class=20)), root / "train",
                  WriteOptions(samples_per_shard=15, resize=SIZE), progress=False)
    return root / "train"


def _cut(folder: Path, names: list[str], member: int, inside_header: bool, out: Path) -> str:
    """Copy the shards to `out`, cutting those in `names` inside the header (or data) of their member `member`."""
    out.mkdir(exist_ok=True)
    for path in folder.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    for name in names:
        with tarfile.open(folder / name) as tar:
            info = tar.getmembers()[member]
        cut = info.offset + 100 if inside_header else info.offset_data + 10
        (out / name).write_bytes((folder / name).read_bytes()[:cut])
    return str(out / "train-{000000..000003}.tar")


def test_a_cut_shard_is_counted_exactly_once(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Member 21 is the first member (cls) of sample 7 of 15. A cut inside its header cannot tell whether sample 6
    # was complete, so 6 is lost too (9 lost); a cut inside its data comes after sample 6 is known whole (8 lost).
    for inside_header, lost in ((True, 9), (False, 8)):
        spec = _cut(shards, ["train-000001.tar"], 21, inside_header, tmp_path / f"cut{inside_header}")
        stream = ShardStream(spec, SIZE, resampled=False, num_classes=3)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            items = list(stream)
        assert len(items) == 60 - lost
        assert stream.loss.totals() == (0, lost, 1)  # exact: the manifest says the shard holds 15
        assert stream.loss.describe() == f"train-000001.tar: {lost} samples in 1 unreadable tail"
        cut_warnings = [r for r in caplog.records if "train-000001.tar is unreadable" in r.getMessage()]
        assert len(cut_warnings) == 1 and f"{lost} samples lost (of its 15)" in cut_warnings[0].getMessage()


class _Tiny(L.LightningModule):
    """The smallest module that trains on image batches (the data path is what is under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Linear(1, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.weight(batch["image"].float().mean(dim=(1, 2, 3))[:, None]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(spec: str, tmp_path: Path, max_lost_fraction: float) -> Path:
    """Two epochs of 48 samples from the shards, 2 worker processes; returns the metrics CSV."""
    data = ShardDataModule(spec, None, SIZE, num_classes=3, num_train_samples=48, batch_global=8,
                           batch_per_device=8, num_workers=2, shuffle_buffer=8, max_lost_fraction=max_lost_fraction)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, callbacks=[DataLossMonitor()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(_Tiny(), datamodule=data)
    return Path(logger.log_dir) / "metrics.csv"


def test_losses_are_logged_per_epoch_and_stop_the_run_above_the_fraction(shards: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Every shard cut inside sample 2's header: each read of a shard gives 1 sample and loses 14, so every
    # resampled draw meets a loss (a single cut shard of 4 might not be drawn in an epoch of 48 samples).
    names = [f"train-00000{i}.tar" for i in range(4)]
    spec = _cut(shards, names, 6, True, tmp_path / "cut")
    with caplog.at_level(logging.WARNING, logger="visgen.data.datamodule"):
        metrics = _fit(spec, tmp_path, max_lost_fraction=0.99)
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("data/train_lost_samples")]
    assert len(rows) == 2  # one row per epoch
    assert all(float(row["data/train_lost_samples"]) >= 14 and float(row["data/train_lost_tails"]) >= 1
               for row in rows)  # counted in the worker processes, read in the main one
    summaries = [r.getMessage() for r in caplog.records if "rank 0 train epoch" in r.getMessage()]
    assert summaries and "train-00000" in summaries[0] and "samples in " in summaries[0]

    with pytest.raises(DataLossError, match=r"rank 0 lost \d+ train samples in epoch 0 .*more than "
                                            r"data.max_lost_fraction=0.05: train-00000\d.tar: \d+ samples"):
        _fit(spec, tmp_path / "strict", max_lost_fraction=0.05)


def test_labels_outside_num_classes_stop_the_run_naming_the_shard(shards: Path) -> None:
    stream = ShardStream(str(shards / "train-{000000..000003}.tar"), SIZE, resampled=False, num_classes=2)
    with pytest.raises(ShardDataError, match=r"shard .*train-00000\d.tar key '\w+': label 2 is outside "
                                             r"\[0, data.num_classes=2\)"):
        list(stream)


def test_images_of_another_size_are_an_error_unless_resize_is_asked(shards: Path) -> None:
    spec = str(shards / "train-{000000..000003}.tar")
    with pytest.raises(ShardDataError, match=r"train-000000.tar key '\w+': image is 8x8 but data.image_size=16; "
                                             r"set data.resize=true"):
        list(ShardStream(spec, 16, resampled=False, num_classes=3))
    resized = list(ShardStream(spec, 16, resampled=False, num_classes=3, resize=True))
    assert len(resized) == 60 and resized[0]["image"].shape == (3, 16, 16)
