"""Tokenizer-training step throughput (images/s): the generator step (reconstruction, LPIPS, GAN) plus the
discriminator step of visgen.paradigms.autoencoder, fp32 vs bf16 autocast.

    python bench/tokenizer_step.py                                  # demo_vq on 32x32 digits-sized inputs
    python bench/tokenizer_step.py --experiment vq_f16 --batch 8    # LlamaGen VQ-16 at 256 px, LPIPS + GAN on

The nets and loss weights come from the experiment's config; LPIPS gets random weights in its file layout
(speed does not depend on the values) and the GAN is switched on from step 0. Prints a table; no assertions.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table
from timing import sync  # bench/timing.py

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build(experiment: str, device: torch.device):
    """The experiment's AutoencoderTraining (random LPIPS if it uses one), GAN active from step 0."""
    overrides = [f"experiment={experiment}", f"run_name={experiment}", "model.loss.disc_start=0"]  # no Hydra run
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if cfg.model.get("perceptual") is not None:
        cfg.model.perceptual.weights, cfg.model.perceptual.vgg_weights = None, None  # random, same layout
    module = instantiate(cfg.model).to(device)
    return module, cfg.data.image_size


def bench(module, image_size: int, batch: int, steps: int, bf16: bool, device: torch.device) -> float:
    """Generator + discriminator steps per second x batch, through the module's own loss methods."""
    net, disc = module.net, module.discriminator
    opt_g = torch.optim.AdamW(net.parameters(), lr=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4) if disc is not None else None
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        if disc is not None:
            disc.requires_grad_(False)  # as training_step's toggle: D is not trained by the generator loss
        with autocast:
            total, recon, _, _ = module.generator_loss(images, step=0)
        total.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if disc is not None:
            disc.requires_grad_(True)
            with autocast:
                d_loss, _ = module.discriminator_loss(images, recon)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="demo_vq")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    module, image_size = build(args.experiment, device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    title = f"{args.experiment}: tokenizer train step, {image_size} px, batch {args.batch}, {device}{threads}"
    table = Table(title=title)
    for column in ("precision", "img/s", "parameters (autoencoder)", "LPIPS", "GAN"):
        table.add_column(column)
    params = f"{sum(p.numel() for p in module.net.parameters()):,}"
    for bf16 in (False, True):
        rate = bench(module, image_size, args.batch, args.steps, bf16, device)
        table.add_row("bf16" if bf16 else "fp32", f"{rate:.2f}", params, str(module.perceptual is not None),
                      str(module.discriminator is not None))
    Console().print(table)


if __name__ == "__main__":
    main()
