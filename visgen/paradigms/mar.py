"""MAR: Autoregressive Image Generation without Vector Quantization (Li, Tian, Li, Deng, He; NeurIPS 2024).

Method (Sec. 3, as the official LTH14/mar trains it):
    x      the continuous tokens of an image (KL-16 latents, patch 1: 256 tokens of dim 16), c its class
           (replaced by the null class, the learned fake latent, with probability 0.1)
    π      a random order of the L positions; r ~ N(1, 0.25²) truncated to [0.7, 1] once per batch;
           the first ⌈L r⌉ positions of π are masked (unknown)
    z      = MAE decoder(MAE encoder(known tokens, c)) at every position              (Sec. 3.4)
    L      = mean over masked tokens of L_diff(z_i, x_i), each token repeated 4 times with its own t and ε
           (`diffusion_batch_mul`), L_diff the ε-MSE + L_vb hybrid of a cosine-schedule Gaussian diffusion
           with learned Σ (Sec. 3.2, Eq. 2; `visgen.nn.diffloss.DiffLoss`)
Sampling: `num_iter` masked-AR steps on the cosine mask schedule, each drawing the newly revealed tokens with the
DiffLoss sampler (temperature τ, CFG on ε with a linear schedule): `visgen.paradigms.mar_sampler.MARSampler`.
Networks: `visgen.nn.mar.MAR` (official names: released checkpoints load strictly through `visgen.load_official`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visgen.training.module import Batch, GenerativeModule

__all__ = ["MARModule"]


class MARModule(GenerativeModule):
    """Masked autoregression with the per-token diffusion loss; `batch["latents"]` holds latents (B, C, h, w)."""

    def __init__(self, *, label_drop_prob: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= label_drop_prob < 1.0:
            raise ValueError(f"model.label_drop_prob must be in [0, 1), got {label_drop_prob}")
        self.label_drop_prob = label_drop_prob

    def drop_labels(self, labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
        """Labels with probability `label_drop_prob` replaced by the null class `num_classes` (the fake latent)."""
        drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < self.label_drop_prob  # (B,)
        return torch.where(drop, torch.full_like(labels, num_classes), labels)  # (B,)

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss (B,); draws label drop, orders, mask ratio, then t and ε, from `generator` in turn."""
        latents = batch["latents"]  # (B, C, h, w)
        if not latents.is_floating_point() or latents.dim() != 4:
            raise ValueError(f"MAR trains on continuous latents (B, C, h, w), got {latents.dtype} "
                             f"{tuple(latents.shape)}; use a KL or pixel tokenizer (model/tokenizer=mar_kl16)")
        tokens = net.patchify(latents)  # (B, L, D)
        labels = self.drop_labels(batch["labels"], net.num_classes, generator)  # (B,)
        orders = net.sample_orders(tokens.shape[0], generator, tokens.device)  # (B, L)
        mask = net.random_masking(tokens, orders, generator)  # (B, L)
        return net(tokens, labels, mask, generator)  # (B,)
