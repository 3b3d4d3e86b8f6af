"""MAR throughput: train step (loss + backward + AdamW) and sampling img/s, fp32 vs bf16 autocast.

    python bench/mar.py                                     # MAR-B (experiment=mar_b), batch 8, 64 AR x 100 steps, CFG
    python bench/mar.py --experiment demo_mar --batch 32    # the digits demo net
    python bench/mar.py --num-iter 4 --sampling-steps 10    # a short CPU run (report the settings with the numbers)

Sampling is the issue's setting by default: 64 AR steps x 100 DiffLoss steps with CFG (2.9, linear). Prints a table
(images/s); no assertions: speed is measured here, not in tests. On a shared CPU, run it under `flock`.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table
from timing import sync  # bench/timing.py

from visgen.official import compose_experiment
from visgen.paradigms.mar import MARModule
from visgen.paradigms.mar_sampler import MARSampler


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device`, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def train_rate(net: torch.nn.Module, batch: dict, device: torch.device, bf16: bool, steps: int) -> float:
    """Images/s of loss + backward + AdamW steps (after one warm-up step)."""
    module = MARModule.__new__(MARModule)  # only `loss` is used: no trainer, tokenizer or data
    torch.nn.Module.__init__(module)
    module.label_drop_prob = 0.1
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    net.train()
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            start = time.perf_counter()
        with autocast(device, bf16):
            loss = module.loss(net, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return steps * batch["labels"].shape[0] / (time.perf_counter() - start)


def sample_rate(net: torch.nn.Module, sampler: MARSampler, labels: torch.Tensor, shape: tuple[int, ...],
                device: torch.device, bf16: bool) -> float:
    """Images/s of one sampling call (batched)."""
    net.eval()
    sync(device)
    start = time.perf_counter()
    with autocast(device, bf16):
        sampler(net, labels, shape, torch.Generator(device).manual_seed(0))
    sync(device)
    return labels.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="mar_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--sampling-steps", type=int, default=100)
    parser.add_argument("--cfg", type=float, default=2.9)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = compose_experiment(args.experiment)
    torch.manual_seed(0)
    net = instantiate(cfg.model.net).to(device)
    shape = (net.in_channels, net.input_size, net.input_size)
    batch = {"latents": torch.randn(args.batch, *shape, device=device),
             "labels": torch.randint(0, net.num_classes, (args.batch,), device=device)}
    sampler = MARSampler(num_iter=args.num_iter, cfg_scale=args.cfg, num_sampling_steps=args.sampling_steps)
    table = Table(title=f"{args.experiment} on {device.type} ({torch.get_num_threads()} threads), batch {args.batch}; "
                        f"sampling {args.num_iter} AR x {args.sampling_steps} DiffLoss steps, CFG {args.cfg}")
    for col in ("precision", "train img/s", "sampling img/s"):
        table.add_column(col)
    for bf16 in (False, True):
        train = train_rate(net, batch, device, bf16, args.train_steps)
        sample = sample_rate(net, sampler, batch["labels"], shape, device, bf16)
        table.add_row("bf16 autocast" if bf16 else "fp32", f"{train:.2f}", f"{sample:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
