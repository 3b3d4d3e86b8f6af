"""MaskGIT throughput: train-step tokens/s and parallel-decoding images/s at 8 and 32 steps, fp32 vs bf16.

    python bench/maskgit.py                          # the demo_maskgit net (8x8 codes, 256 entries)
    python bench/maskgit.py --net maskgit_b --batch 64 --sample-batch 64    # v1 base at 256 px (GPU)
    python bench/maskgit.py --net halton_maskgit_l_384 --batch 32           # Halton-MaskGIT large (GPU)

The nets are built from the presets (conf/experiment/<net>.yaml), with random weights; sampling uses the
preset's sampler (CFG on: a conditional and a null half per guided step). Prints a table; no assertions.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from timing import sync  # bench/timing.py

from visgen.paradigms.maskgit import maskgit_loss

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRESETS = {"demo": "demo_maskgit", "maskgit_b": "maskgit_b", "maskgit_b_512": "maskgit_b_512",
           "halton_maskgit_l_384": "halton_maskgit_l_384"}


def preset(name: str) -> DictConfig:
    """The composed training config of a MaskGIT preset."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"experiment={PRESETS[name]}"])


def bench_train(net: torch.nn.Module, cfg: DictConfig, batch: int, steps: int, bf16: bool,
                device: torch.device) -> float:
    """Tokens per second of forward + backward + AdamW step on random codes."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    side = net.input_size
    codes = torch.randint(0, net.codebook_size, (batch, side, side), device=device)  # (B, h, w)
    labels = torch.randint(0, net.num_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    m = cfg.model

    def step() -> None:
        with autocast:
            loss = maskgit_loss(net, codes, labels, schedule=m.schedule, loss_on=m.loss_on,
                                label_smoothing=m.label_smoothing, label_drop_prob=m.label_drop_prob).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    net.train()
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * side * side * steps / (time.perf_counter() - start)


@torch.no_grad()
def bench_sample(net: torch.nn.Module, cfg: DictConfig, batch: int, num_steps: int, bf16: bool,
                 device: torch.device) -> float:
    """Images (code grids) per second of the preset's sampler at `num_steps` (the tokenizer's decoder excluded)."""
    sampler = instantiate(cfg.sampling, num_steps=num_steps)
    labels = torch.arange(batch, device=device) % net.num_classes
    side = net.input_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    net.eval()
    with autocast:
        sampler(net, labels[: min(batch, 4)], (side, side))  # warm-up
        sync(device)
        start = time.perf_counter()
        sampler(net, labels, (side, side))
        sync(device)
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--sample-batch", type=int, default=250, help="sampling batch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    cfg = preset(args.net)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    s = cfg.sampling
    table = Table(title=f"MaskGIT {args.net}, train batch {args.batch}, sample batch {args.sample_batch}, "
                        f"{device_name}; CFG {s.cfg_scale} ({s.cfg_schedule}), order {s.order}")
    for column in ("precision", "train tokens/s", "sample img/s, 8 steps", "sample img/s, 32 steps"):
        table.add_column(column, justify="right")
    for bf16 in (False, True):
        torch.manual_seed(0)
        net = instantiate(cfg.model.net).to(device)
        tokens = bench_train(net, cfg, args.batch, args.steps, bf16, device)
        rates = [bench_sample(net, cfg, args.sample_batch, k, bf16, device) for k in (8, 32)]
        table.add_row("bf16-mixed" if bf16 else "fp32", f"{tokens:,.0f}", *(f"{r:.1f}" for r in rates))
    Console().print(table)


if __name__ == "__main__":
    main()
