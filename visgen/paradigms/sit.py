"""SiT: Scalable Interpolant Transformers (Ma et al., 2024), the linear-interpolant flow model.

Method (SiT Sec. 2, with its conventions: t ∈ [0, 1], t = 1 the data):
    x_t = t · x + (1 − t) · ε,            ε ~ N(0, I), t ~ U[0, 1]
    L   = E ‖v_θ(x_t, t, y) − (x − ε)‖²    (velocity prediction)
Sampling integrates dx/dt = v_θ(x, t, y) from t = 0 (noise) to t = 1 with an ODE (Euler/Heun) or
SDE solver, with classifier-free guidance; the sampler comes from the `sampling` config.
The network is the DiT backbone (`visgen.nn.dit.DiT`); the released SiT checkpoints keep DiT's
learned-Σ output channels, which SiT never reads (the interpolant uses the first C channels).
The interpolant (`model.interpolant`) also offers SiT's GVP/VP paths and noise/score predictions, and JiT's
variant (Li & He, 2025): the net predicts the data x, trained with the velocity loss it implies and
logit-normal times (`prediction: data`, `loss_weight: velocity`, `time_sampling: logit_normal`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visgen.diffusion.interpolants import Interpolant, LinearInterpolant
from visgen.training.module import Batch, GenerativeModule

__all__ = ["SiT"]


class SiT(GenerativeModule):
    """Flow matching with a linear interpolant and velocity prediction."""

    def __init__(self, *, interpolant: Interpolant | None = None, **kwargs):
        super().__init__(**kwargs)
        self.interpolant = interpolant or LinearInterpolant()

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample velocity MSE (B,) at a uniformly drawn time."""
        return self.interpolant.training_loss(net, batch["latents"], batch["labels"], generator=generator)
