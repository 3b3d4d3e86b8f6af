"""Scale plan on paper: memory per GPU under DDP and FSDP2, and step time from FLOPs, for the largest presets.

    python bench/scale_plan.py            # markdown table (README "Scale plan")

Parameters are counted on the presets' nets (built on the meta device); everything else is an ESTIMATE from
the formulas below, not a measurement (no GPU was available to this project when it was written):
- weights, gradients, Adam moments and the EMA in fp32: 4 + 4 + 8 + 4 = 20 bytes per parameter; DDP keeps
  all of it on every GPU plus its gradient buckets (4 bytes per parameter); FSDP2 divides the 20 bytes by the
  number of GPUs and adds the bf16 copy of the two largest blocks it gathers at a time (prefetch).
- activations per sample in bf16 with SDPA/flash attention and no recomputation: 34 * T * D bytes per
  transformer block of T tokens and width D (Korthikanti et al. 2022, Sec. 4.1, without the attention-score
  term that flash attention does not store), 18 * T * D for an MLP block (MAR's DiffLoss: ~9 saved tensors of
  width D); with activation checkpointing only each block's input (2 * T * D bytes) is kept, plus one block's
  full activations during its recomputation. Micro-batch per GPU: the preset's data.batch_per_device (the
  rest of the global batch is gradient accumulation).
- training FLOPs per sample: 3 x forward; forward = 2 x (the stack's matmul parameters, counted on the net) x T
  per stack (x 1 for weights applied once per sample, as DiT's adaLN) + 4 x depth x T^2 x D for attention
  (DiT-XL/2: 237 GFLOP = 118.5 GMAC, the paper's 118.6 "Gflops" are multiply-adds); the net's other matmul
  weights (heads, embeddings) are counted on the largest stack's tokens.
- step time = FLOPs per step / (GPUs x 312 TFLOP/s (A100 bf16 dense) x MFU), MFU assumed 0.40.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

A100_BF16_FLOPS = 312e12
A100_MEMORY_GB = 80
MFU = 0.40
GB = 1e9


@dataclass
class Stack:
    """One sequence of identical blocks: how many, how wide, how many tokens per sample."""

    depth: int
    width: int
    tokens: float
    prefix: str  # the net's parameter-name prefix of these blocks
    attention: bool = True
    per_sample: str | None = None  # name part of weights applied once per sample, not per token (DiT's adaLN)


@dataclass
class Plan:
    experiment: str
    batch_global: int
    stacks: list[Stack]
    strategy: str
    why: str


def _meta_net(experiment: str):
    import torch

    from visgen.official import compose_experiment

    cfg = compose_experiment(experiment)
    from hydra.utils import instantiate

    with torch.device("meta"):
        return cfg, instantiate(cfg.model.net)


def _plans() -> list[Plan]:
    # Token counts: DiT-XL/2 on 32x32x4 latents with patch 2 -> 256 tokens. MAR-H: 64 buffer tokens; the
    # encoder sees the unmasked tokens (mask ratio from a truncated normal on [0.7, 1], mean ~0.86 -> ~36 of 256),
    # the decoder all 320; DiffLoss runs its 12 x 1536 MLP on 256 tokens x diffusion_batch_mul 4 (counted as
    # blocks with T = 1024; an MLP block stores fewer activations than 34 T D, so this is an upper bound).
    # GPT-3B at its recipe's 384 px: 24 x 24 codes; the class token + the first 575 codes -> 576 positions.
    return [
        Plan("dit_xl_2", 256, [Stack(28, 1152, 256, "blocks.", per_sample="adaLN_modulation")], "ddp",
             "fits every GPU with DDP; FSDP would add communication for nothing"),
        Plan("mar_h", 2048, [Stack(20, 1280, 100, "encoder_blocks."), Stack(20, 1280, 320, "decoder_blocks."),
                             Stack(12, 1536, 1024, "diffloss.", attention=False)], "fsdp",
             "DDP fits, but FSDP frees ~15 GB per GPU for a larger micro-batch (less accumulation)"),
        Plan("gpt_3b", 256, [Stack(24, 3200, 576, "blocks.")], "fsdp",
             "62 GB of fp32 weights, gradients, Adam and EMA per GPU under DDP leave no room for activations"),
    ]


def estimate(plan: Plan, gpus: int, activation_checkpointing: bool = False) -> dict[str, float]:
    """Per-GPU memory (GB) under DDP and FSDP2 and the step time (s) on `gpus` A100s."""
    cfg, net = _meta_net(plan.experiment)
    params = sum(p.numel() for p in net.parameters())
    matmul = {name: p.numel() for name, p in net.named_parameters() if p.ndim >= 2}
    per_gpu = min(plan.batch_global // gpus, int(cfg.data.batch_per_device))
    accumulation = plan.batch_global // (gpus * per_gpu)

    def saved_bytes(s: Stack) -> float:
        return (34 if s.attention else 18) * s.tokens * s.width

    if activation_checkpointing:
        act = sum(2 * s.tokens * s.width * s.depth for s in plan.stacks) + max(saved_bytes(s) for s in plan.stacks)
    else:
        act = sum(saved_bytes(s) * s.depth for s in plan.stacks)
    activations = act * per_gpu  # bytes, bf16
    largest_block = max(12 * s.width ** 2 for s in plan.stacks)  # ~12 D^2 weights in a transformer block
    ddp = 24 * params + activations
    fsdp = 20 * params / gpus + 2 * 2 * largest_block + activations
    in_stacks = {name for name in matmul for s in plan.stacks if name.startswith(s.prefix)}
    other = sum(n for name, n in matmul.items() if name not in in_stacks)
    forward = sum(2 * sum(n * (1 if s.per_sample and s.per_sample in name else s.tokens)
                          for name, n in matmul.items() if name.startswith(s.prefix))
                  + (4 * s.depth * s.tokens ** 2 * s.width if s.attention else 0) for s in plan.stacks)
    forward += 2 * other * max(s.tokens for s in plan.stacks)
    flops_step = 3 * forward * plan.batch_global
    step_s = flops_step / (gpus * A100_BF16_FLOPS * MFU)
    return {"params": params, "per_gpu": per_gpu, "accumulation": accumulation, "gflops_forward": forward / 1e9,
            "state_gb": 20 * params / GB, "act_gb": activations / GB,
            "ddp_gb": ddp / GB, "fsdp_gb": fsdp / GB, "tflops_step": flops_step / 1e12, "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()
    print("| preset | params | GPUs | micro-batch x accumulation | fwd GFLOP/sample | fp32 state (GB) "
          "| activations/GPU (GB) | DDP GB/GPU | FSDP2 GB/GPU | TFLOP/step | step s (40% MFU) | visgen uses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    from visgen.official import CONF_DIR

    plans = [plan for plan in _plans() if (CONF_DIR / "experiment" / f"{plan.experiment}.yaml").exists()]
    for plan in plans:
        for gpus, where in ((8, "8 x A100-80GB"), (32, "4 nodes x 8")):
            e = estimate(plan, gpus, args.activation_checkpointing)
            ddp = f"{e['ddp_gb']:.0f}" + (" (over 80)" if e["ddp_gb"] > A100_MEMORY_GB else "")
            fsdp = f"{e['fsdp_gb']:.0f}" + (" (over 80)" if e["fsdp_gb"] > A100_MEMORY_GB else "")
            print(f"| {plan.experiment} | {e['params'] / 1e6:,.0f}M | {where} | {e['per_gpu']} x {e['accumulation']} "
                  f"| {e['gflops_forward']:.0f} | {e['state_gb']:.1f} "
                  f"| {e['act_gb']:.1f} | {ddp} | {fsdp} | {e['tflops_step']:.0f} | {e['step_s']:.2f} "
                  f"| {plan.strategy} |")
    print()
    for plan in plans:
        print(f"- {plan.experiment}: trainer={plan.strategy}: {plan.why}")


if __name__ == "__main__":
    main()
