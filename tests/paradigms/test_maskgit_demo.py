"""demo_maskgit end to end: the preset composes, trains through train.py on the digits with a VQ tokenizer file,
lowers its loss, and samples digits through the tokenizer's decoder."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.tiny_run import CONF_DIR
from visgen.tokenizers.vq import save_vq_tokenizer
from visgen.training.train import train


def random_demo_vq(path: Path) -> Path:
    """A tokenizer file in demo_vq's layout (8x8 codes, 256 entries) with random weights: what `make demo-vq`
    exports, untrained; codes of a digit are still a fixed function of it, so a MaskGIT can learn them."""
    with initialize_config_dir(config_dir=str(CONF_DIR / "model" / "tokenizer" / "layout"), version_base="1.3"):
        layout = compose("demo_vq")
    torch.manual_seed(0)
    return save_vq_tokenizer(instantiate(layout).eval(), path, "demo_vq")


def test_demo_maskgit_trains_lowers_its_loss_and_samples(tmp_path: Path, digits_dir: Path) -> None:
    tokenizer = random_demo_vq(tmp_path / "tokenizer.safetensors")
    run = tmp_path / "run"
    overrides = [
        "experiment=demo_maskgit", "run_name=test", f"paths.run_dir={run}", f"paths.data_dir={digits_dir}",
        f"paths.cache_dir={digits_dir / 'cache'}", f"model.tokenizer.pretrained={tokenizer}",
        "trainer.precision=32-true", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
        "trainer.max_steps=40", "~callbacks.progress_bar", "data.num_train_samples=640", "data.batch_global=16",
        "data.batch_per_device=16", "data.num_workers=1", "data.shuffle_buffer=64",
        "model.net.hidden_size=32", "model.net.depth=1", "model.net.num_heads=2", "model.net.mlp_dim=64",
        "model.optimizer.lr=3e-3", "model.optimizer.warmup_steps=2",
        "sampling.num_steps=4", "callbacks.sample_grid.every_n_steps=40", "callbacks.sample_grid.num_images=10",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.model.net.codebook_size == 256 and cfg.model.net.input_size == 8  # demo_vq's 8x8 codes of 256
    train(cfg)
    rows = list(csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.5  # ~ln(257) for an untrained net over the codes and the mask column
    assert last < 0.8 * first, (first, last)
    assert (run / "samples" / "step_0000040.png").exists()  # the sampler decoded codes through the tokenizer
