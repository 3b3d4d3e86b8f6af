"""Train-step and sampling throughput of SiT nets, fp32 vs bf16 autocast, optionally compiled.

    python bench/train_step.py                          # demo net on 32x32 pixels, CPU or GPU
    python bench/train_step.py --net B/2 --batch 32     # DiT-B/2 backbone on 32x32x4 latents

Prints a table (images/s); no assertions: speed is measured here, not in tests.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from rich.console import Console
from rich.table import Table

from visgen.diffusion.interpolants import LinearInterpolant
from visgen.diffusion.samplers import ODESampler
from visgen.nn.dit import DIT_SIZES, DiT


def build(net_name: str, num_classes: int) -> tuple[DiT, tuple[int, int, int]]:
    if net_name == "demo":  # conf/experiment/demo_sit.yaml
        return DiT(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=4, num_heads=4,
                   num_classes=num_classes, learn_sigma=False), (3, 32, 32)
    size, patch = net_name.split("/")
    return DiT(**DIT_SIZES[size], patch_size=int(patch), input_size=32, in_channels=4, num_classes=num_classes,
               learn_sigma=True), (4, 32, 32)


def bench_train(net, shape, batch, steps, bf16, device) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    interpolant = LinearInterpolant()
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 1000, (batch,), device=device) % net.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            loss = interpolant.training_loss(net, x, y).mean()
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
def bench_sample(net, shape, batch, bf16, device, num_steps=20) -> float:
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="demo", help="demo | S/2 | B/2 | L/2 | XL/2 ...")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    num_classes = 10 if args.net == "demo" else 1000

    table = Table(title=f"SiT {args.net}, batch {args.batch}, {device} ({torch.get_num_threads()} threads)")
    for column in ("precision", "compiled", "train img/s", "sample img/s (20 Euler steps, CFG)"):
        table.add_column(column, justify="right")
    for compiled in ([False, True] if args.compile else [False]):
        for bf16 in (False, True):
            torch.manual_seed(0)
            net, shape = build(args.net, num_classes)
            net = net.to(device)
            if compiled:
                net.compile()
            train_ips = bench_train(net, shape, args.batch, args.steps, bf16, device)
            sample_ips = bench_sample(net, shape, args.batch, bf16, device)
            table.add_row("bf16-mixed" if bf16 else "fp32", str(compiled), f"{train_ips:.1f}", f"{sample_ips:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
