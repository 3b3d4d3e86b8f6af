"""Train-step and sampling throughput of SiT and DiT nets, fp32 vs bf16 autocast, optionally compiled.

    python bench/train_step.py                                   # SiT demo net on 32x32 pixels
    python bench/train_step.py --net B/2 --batch 16 --paradigm dit   # DiT-B/2 on 32x32x4 latents
    python bench/train_step.py --net B/2 --batch 16 --paradigm sit --compile

Prints a table (images/s); no assertions: speed is measured here, not in tests.
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

from visgen.diffusion.gaussian import GaussianDiffusion
from visgen.diffusion.gaussian_samplers import DDPMSampler
from visgen.diffusion.interpolants import LinearInterpolant
from visgen.diffusion.samplers import ODESampler
from visgen.nn.dit import DIT_SIZES, DiT

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build(net_name: str, num_classes: int) -> tuple[DiT, tuple[int, int, int]]:
    if net_name == "demo":  # exactly the net `make demo` trains, from the config tree
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=demo_sit"])
        return instantiate(cfg.model.net), (3, cfg.data.image_size, cfg.data.image_size)
    size, patch = net_name.split("/")
    return DiT(**DIT_SIZES[size], patch_size=int(patch), input_size=32, in_channels=4, num_classes=num_classes,
               learn_sigma=True), (4, 32, 32)


def bench_train(net, shape, batch, steps, bf16, device, paradigm: str) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    if paradigm == "dit":
        diffusion = GaussianDiffusion(learn_sigma=net.out_channels != net.in_channels)

        def loss_fn(net, x, y):
            return diffusion.training_losses(net, x, y)["loss"]
    else:
        loss_fn = LinearInterpolant().training_loss
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 1000, (batch,), device=device) % net.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            loss = loss_fn(net, x, y).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


@torch.no_grad()
def bench_sample(net, shape, batch, bf16, device, paradigm: str, num_steps=20) -> float:
    if paradigm == "dit":
        sampler = DDPMSampler(num_steps=num_steps, cfg_scale=1.5, learn_sigma=net.out_channels != net.in_channels)
    else:
        sampler = ODESampler(method="euler", num_steps=num_steps, cfg_scale=1.5)
    y = torch.arange(batch, device=device) % net.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        sampler(net.eval(), y, shape)
        sync(device)
        start = time.perf_counter()
        sampler(net, y, shape)
        sync(device)
    net.train()
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="demo", help="demo | S/2 | B/2 | L/2 | XL/2 ...")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--paradigm", default="sit", choices=["sit", "dit"], help="flow loss or DiT's diffusion")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: --batch)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    num_classes = 10 if args.net == "demo" else 1000

    name = {"sit": "SiT", "dit": "DiT"}[args.paradigm]
    sampler_name = "DDPM" if args.paradigm == "dit" else "Euler"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    table = Table(title=f"{name} {args.net}, batch {args.batch}, {device_name}")
    for column in ("precision", "compiled", "train img/s", f"sample img/s (20 {sampler_name} steps, CFG 1.5)"):
        table.add_column(column, justify="right")
    for compiled in ([False, True] if args.compile else [False]):
        for bf16 in (False, True):
            torch.manual_seed(0)
            net, shape = build(args.net, num_classes)
            net = net.to(device)
            if compiled:
                net.compile()
            train_ips = bench_train(net, shape, args.batch, args.steps, bf16, device, args.paradigm)
            sample_ips = bench_sample(net, shape, args.sample_batch or args.batch, bf16, device, args.paradigm)
            table.add_row("bf16-mixed" if bf16 else "fp32", str(compiled), f"{train_ips:.2f}", f"{sample_ips:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
