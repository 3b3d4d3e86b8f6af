"""DDP on 2 CPU processes against 1 process accumulating the same global batch (run as a script).

    python tests/distributed/ddp_equivalence.py OUT.pt 1            # one process, accumulation 2
    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 ... ddp_equivalence.py OUT.pt 2 [broken]

The two-process run is two simulated nodes (one torchrun agent each). Both runs see the same
8-sample global batches (1 process: two micro-batches of 4 per step; 2 processes: micro-batch r on
rank r) and draw each sample's noise from a generator seeded by the sample itself, so any difference in
the final weights comes from how gradients are reduced. The net, the module, the optimizer, the lr
schedule and the EMA are the real ones (visgen.paradigms.sit.SiT on visgen.nn.dit.DiT).
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from visgen.diffusion.interpolants import LinearInterpolant
from visgen.diffusion.samplers import ODESampler
from visgen.nn.dit import DiT
from visgen.paradigms.sit import SiT
from visgen.tokenizers.base import PixelTokenizer

GLOBAL_BATCH, STEPS, SIZE = 8, 4, 8


class SampleSeededSiT(SiT):
    """SiT whose noise and time depend only on the sample (its label and pixels), not on rank or RNG state."""

    def loss(self, net, batch, generator=None):
        losses = []
        for i in range(len(batch["labels"])):
            seed = int(batch["labels"][i]) * 1_000 + int((batch["latents"][i] * 127).round().abs().sum())
            one = {k: v[i : i + 1] for k, v in batch.items()}
            losses.append(super().loss(net, one, generator=torch.Generator().manual_seed(seed)))
        return torch.cat(losses)  # (B,)


class FixedBatches(Dataset):
    """Step s's global batch is samples 8s .. 8s+7; `part` selects which micro-batch this loader serves."""

    def __init__(self, world_size: int, rank: int, broken: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (STEPS * GLOBAL_BATCH, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
        self.labels = torch.arange(STEPS * GLOBAL_BATCH) % 10
        micro = GLOBAL_BATCH // 2
        order = []
        for step in range(STEPS):
            parts = [list(range(step * GLOBAL_BATCH + p * micro, step * GLOBAL_BATCH + (p + 1) * micro))
                     for p in range(2)]
            # broken: every rank reads micro-batch 0, so half of each global batch is never trained on
            order += parts[0 if broken else rank] if world_size == 2 else parts[0] + parts[1]
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.order[i]
        return {"image": self.images[j], "label": self.labels[j]}


class Data(L.LightningDataModule):
    def __init__(self, broken: bool) -> None:
        super().__init__()
        self.broken = broken

    def train_dataloader(self) -> DataLoader:
        dataset = FixedBatches(self.trainer.world_size, self.trainer.global_rank, self.broken)
        return DataLoader(dataset, batch_size=4)


def main(out: str, world_size: int, broken: bool = False) -> None:
    torch.manual_seed(0)
    net = DiT(input_size=SIZE, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
              class_dropout_prob=0.0, learn_sigma=False)
    module = SampleSeededSiT(interpolant=LinearInterpolant(), net=net, tokenizer=PixelTokenizer(),
                             sampler=ODESampler(num_steps=2), optimizer={"lr": 1e-3, "warmup_steps": 2},
                             image_size=SIZE, batch_global=GLOBAL_BATCH, ema_decay=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=world_size,
                        strategy="ddp" if world_size > 1 else "auto", precision="32-true", max_steps=STEPS,
                        accumulate_grad_batches=2 // world_size,
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=Data(broken))
    print(f"rank {trainer.global_rank} of {trainer.world_size} on node {trainer.node_rank}", flush=True)
    if trainer.is_global_zero:
        torch.save({"initial": initial, "final": {k: v.detach().clone() for k, v in module.state_dict().items()},
                    "world_size": trainer.world_size, "num_nodes": trainer.num_nodes}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), broken=len(sys.argv) > 3 and sys.argv[3] == "broken")
