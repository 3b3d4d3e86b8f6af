"""LlamaGen GPT throughput: train-step tokens/s and decoding tokens/s with and without the KV cache, fp32 vs bf16.

    python bench/gpt.py                                  # GPT-B, 16x16 codes (LlamaGen's 256 px setting)
    python bench/gpt.py --net demo                       # the demo_gpt net on the digits' 8x8 codes
    python bench/gpt.py --net B --batch 8 --sample-batch 8 --compile   # + torch.compile rows (GPU)

Train: next-code cross-entropy, backward, fused AdamW; tokens/s counts predicted codes (batch x grid²).
Sampling: `ARSampler` with CFG (the doubled batch counts once: tokens/s is codes of finished images per
second). "no cache" recomputes the whole prefix for every code (what a sampler without a KV cache does,
O(N²) positions); "KV cache" is visgen's static cache (prefill, then one position per step). Prints a
table; no assertions: speed is measured here, not in tests.
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
from torch import Tensor

from visgen.autoregressive.logits import guide_logits, sample_from_logits
from visgen.autoregressive.sampler import ARSampler
from visgen.nn.gpt import GPT, GPT_SIZES
from visgen.paradigms.llamagen import next_token_loss

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build(name: str, grid: int) -> GPT:
    """A GPT size from LlamaGen (B, L, XL, ...) with VQ-16's 16,384 codes, or the demo_gpt net from its config."""
    if name == "demo":
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=demo_gpt"])
        return instantiate(cfg.model.net)
    return GPT(**GPT_SIZES[name], grid_size=grid)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench_train(net: GPT, batch: int, steps: int, bf16: bool, device: torch.device) -> float:
    """Predicted codes per second of full training steps (forward, backward, AdamW)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))
    codes = torch.randint(0, net.vocab_size, (batch, net.seq_len), device=device)  # (B, N)
    labels = torch.randint(0, net.num_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    net.train()

    def step() -> None:
        with autocast:
            loss = next_token_loss(net, codes, labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed(step, device, 1)  # one more warm-up (AdamW state, compile)
    return batch * net.seq_len / timed(step, device, steps)


@torch.no_grad()
def sample_without_cache(net: GPT, labels: Tensor, cfg_scale: float, generator: torch.Generator | None) -> Tensor:
    """The reference the cache replaces: every code recomputes the whole prefix with `net.forward`."""
    batch = labels.shape[0]
    cond = torch.cat([labels, torch.full_like(labels, net.num_classes)])  # (2B,)
    codes = torch.empty(batch, 0, dtype=torch.long, device=labels.device)
    for _ in range(net.seq_len):
        logits = net(torch.cat([codes, codes]), cond)[:, -1]  # (2B, V)
        guided = guide_logits(logits[:batch], logits[batch:], cfg_scale)
        codes = torch.cat([codes, sample_from_logits(guided, generator=generator)[:, None]], dim=1)
    return codes


def bench_sample(net: GPT, batch: int, bf16: bool, device: torch.device, cache: bool, compiled: bool,
                 repeats: int) -> float:
    """Sampled codes per second (images x grid²) at CFG 2.0, temperature 1, no top-k / top-p."""
    labels = torch.arange(batch, device=device) % net.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    sampler = ARSampler(cfg_scale=2.0, compile=compiled)
    net.eval()

    def run() -> None:
        with autocast:
            if cache:
                sampler(net, labels, (net.grid_size, net.grid_size), torch.Generator(device).manual_seed(0))
            else:
                sample_without_cache(net, labels, 2.0, torch.Generator(device).manual_seed(0))

    return batch * net.seq_len / timed(run, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="B", help="demo | B | L | XL | XXL | 3B")
    parser.add_argument("--grid", type=int, default=16, help="code grid side (16: 256 px with VQ-16; 24: 384 px)")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per sampling call (x2 with CFG)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling calls")
    parser.add_argument("--no-uncached", action="store_true", help="skip the (slow, O(N²)) no-cache rows")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (net and decode step)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    torch.manual_seed(0)
    net = build(args.net, args.grid).to(device)
    params = sum(p.numel() for p in net.parameters())
    table = Table(title=f"GPT-{args.net} ({params:,} parameters), {net.grid_size}x{net.grid_size} codes, train batch "
                        f"{args.batch}, sampling batch {args.sample_batch} (CFG 2.0), {device_name}")
    for column in ("precision", "compiled", "train tokens/s (img/s)", "sample tokens/s (img/s), KV cache",
                   "sample tokens/s (img/s), no cache", "KV-cache speed-up"):
        table.add_column(column, justify="right")
    seq = net.seq_len
    for compiled in [False, True] if args.compile else [False]:
        for bf16 in (False, True):
            torch.manual_seed(0)
            net = build(args.net, args.grid).to(device)
            train_net = torch.compile(net) if compiled else net
            train_tps = bench_train(train_net, args.batch, args.steps, bf16, device)
            cached = bench_sample(net, args.sample_batch, bf16, device, True, compiled, args.repeats)
            uncached = None
            if not (args.no_uncached or compiled):
                uncached = bench_sample(net, args.sample_batch, bf16, device, False, False, args.repeats)
            precision = "bf16" if bf16 else "fp32"
            print(f"{precision} compiled={compiled}: train {train_tps:,.0f} tokens/s, sample {cached:,.0f} tokens/s "
                  f"with the KV cache, {uncached or 0:,.0f} without", flush=True)  # survives a timeout
            table.add_row("bf16-mixed" if bf16 else "fp32", str(compiled), f"{train_tps:,.0f} ({train_tps / seq:,.1f})",
                          f"{cached:,.0f} ({cached / seq:,.2f})",
                          "-" if uncached is None else f"{uncached:,.0f} ({uncached / seq:,.2f})",
                          "-" if uncached is None else f"{cached / uncached:.1f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
