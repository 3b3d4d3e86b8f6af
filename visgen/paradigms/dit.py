"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), trained as improved DDPM.

Method (DiT Sec. 3.1, following Nichol & Dhariwal 2021; DDPM conventions: integer steps t, t = 0 the data):
    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,           ε ~ N(0, I), t ~ U{0, ..., T − 1}, T = 1000, linear β
    L   = ‖ε_θ(x_t, t, y) − ε‖² + L_vb          (ε prediction; L_vb trains the learned Σ_θ only)
with Σ_θ = exp(frac · log β_t + (1 − frac) · log β̃_t), frac = (v + 1) / 2 and v the net's second C output
channels (improved DDPM Eq. 15), and L_vb the KL of the true posterior to p_θ (decoder NLL at t = 0) in
bits/dim with μ_θ stop-gradiented (improved DDPM Sec. 3.1).
Sampling is ancestral DDPM over 250 respaced steps with classifier-free guidance on 3 of the 4 latent channels
(DiT's sample.py); the sampler comes from the `sampling` config (`ddpm` or `ddim`). The network is the DiT
backbone (`visgen.nn.dit.DiT`, `learn_sigma=True`), fed the original step index t ∈ {0, ..., 999}.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visgen.diffusion.gaussian import GaussianDiffusion
from visgen.training.module import Batch, GenerativeModule

__all__ = ["DiTDiffusion"]


class DiTDiffusion(GenerativeModule):
    """Gaussian diffusion with ε prediction, learned Σ and the hybrid loss (L_simple + L_vb)."""

    def __init__(self, *, diffusion: GaussianDiffusion | None = None, **kwargs):
        super().__init__(**kwargs)
        self.diffusion = diffusion or GaussianDiffusion()

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample hybrid loss (B,) at a uniformly drawn step; t then ε come from `generator` when given."""
        return self.diffusion.training_losses(net, batch["latents"], batch["labels"], generator=generator)["loss"]
