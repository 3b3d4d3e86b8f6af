"""Tiny end-to-end training runs on the built-in digits, composed from the real config tree."""

import csv
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# What torchrun-style launchers set; tests that start ranks must neither inherit nor leak them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# A 2-block, 32-wide SiT; 256 samples per epoch, global batch 32 as 2 micro-batches of 16:
# 8 optimizer steps per epoch, fp32 so that resume can be compared bitwise.
TINY = [
    "experiment=demo_sit",
    "run_name=test",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=2",
    "~callbacks.progress_bar",
    "data.num_train_samples=256",
    "data.batch_global=32",
    "data.batch_per_device=16",
    "data.num_workers=1",
    "data.shuffle_buffer=64",
    "model.net.hidden_size=32",
    "model.net.depth=2",
    "model.net.num_heads=2",
    "model.optimizer.warmup_steps=2",
    "sampling.num_steps=4",
    "callbacks.sample_grid.every_n_steps=4",
    "callbacks.sample_grid.num_images=10",
]


def compose_train(run_dir: Path, data_dir: Path, *overrides: str) -> DictConfig:
    """The train config of a tiny run in `run_dir`, with extra overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.run_dir={run_dir}", f"paths.data_dir={data_dir}",
                                           f"paths.cache_dir={data_dir / 'cache'}", *overrides])


class StopAfterSteps(L.Callback):
    """Stops training after `steps` optimizer steps without touching max_steps: an interrupted job, whose lr
    schedule (a function of step and max_steps) stays the one the uninterrupted run follows."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


STOP_AFTER_8_STEPS = ["+callbacks.stop._target_=tests.tiny_run.StopAfterSteps", "+callbacks.stop.steps=8"]


def metric_rows(run_dir: Path, min_step: int = 0) -> list[dict[str, str]]:
    """Every row the CSV logger wrote in `run_dir`, over all its starts (csv/version_*), without empty cells:
    what a resumed run's logs must equal, step for step, to an uninterrupted run's."""
    rows = []
    for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv", newline="") as file:
            rows += [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
    return [row for row in rows if int(row["step"]) >= min_step]
