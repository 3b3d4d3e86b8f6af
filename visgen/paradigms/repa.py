"""REPA: Representation Alignment for Generation (Yu et al., ICLR 2025), SiT plus alignment to a frozen encoder.

Method (REPA Sec. 3, code sihyun-yu/REPA `loss.py` and `train.py`). SiT's flow-matching loss, plus an alignment
of the net's hidden tokens h_t (after block `encoder_depth` = 8, on the noisy input) with a frozen
self-supervised encoder's patch features y* = f(x) of the clean image (DINOv2-B), through a trainable MLP h_φ:

    L = E ‖v_θ(x_t, t, y) − v‖²  +  λ · E[ (1/K) Σ_k (1/N) Σ_n −cos(h_φ,k(h_t)[n], y*_k[n]) ],   λ = 0.5 (proj_coeff)

with K encoders and N patch tokens. REPA writes the flow in its own time (t = 1 noise, x_t = (1 − t) x + t ε,
v = ε − x, t ~ U[0, 1]); substituting t -> 1 − t gives exactly visgen's linear interpolant (x_t = t x + (1 − t) ε,
v = x − ε, t ~ U[0, 1]) with the same MSE, so the flow term is `Interpolant.training_loss` unchanged, and the net
(`visgen.nn.repa.REPASiT`, `time_convention="repa"`) converts time and sign at its edge. REPA's other options map
the same way: `--path-type cosine` is `GVPInterpolant`, `--weighting lognormal` (t = σ / (1 + σ), log σ ~ N(0, 1))
is `time_sampling: logit_normal` with mean 0, std 1 on the linear path.

The encoders (`visgen.encoders`) run on the batch's clean pixels (`batch["images"]`, README convention 7) each
step, under the trainer's autocast and without autograd; they are frozen, in eval mode, outside the optimizer,
the EMA and the checkpoints, which record their ids (name and weights hash) instead. Sampling is SiT's: REPA's
published sampler is the Euler–Maruyama SDE with its last mean step, CFG 1.8 inside the guidance interval
(`conf/sampling/repa_sde.yaml`), and its ODE (`conf/sampling/repa_ode.yaml`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.diffusion.interpolants import Interpolant, LinearInterpolant
from visgen.encoders.base import AlignmentEncoder
from visgen.training.module import Batch, GenerativeModule

__all__ = ["REPA", "alignment_loss"]


def alignment_loss(projections: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
    """Per-sample REPA loss (B,): the mean over encoders and tokens of −cos(projection, feature).

    `projections[k]` and `features[k]` are (B, N, D_k): the projected net tokens and encoder k's patch features.
    """
    if len(projections) != len(features) or not features:
        raise ValueError(f"alignment_loss: {len(projections)} projections for {len(features)} encoders; the net "
                         "needs one projector per encoder (model.net.z_dims)")
    total = 0.0
    for k, (z_tilde, z) in enumerate(zip(projections, features, strict=True)):
        if z_tilde.shape != z.shape:
            raise ValueError(f"alignment_loss: encoder {k} gives features {tuple(z.shape)} but its projector "
                             f"{tuple(z_tilde.shape)}; token grids and z_dims must agree")
        cosine = (F.normalize(z_tilde.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(dim=-1)  # (B, N)
        total = total - cosine.mean(dim=1)  # (B,)
    return total / len(features)  # (B,)


class REPA(GenerativeModule):
    """SiT's flow loss plus λ times REPA's patch-wise alignment to frozen encoders' features of the clean image."""

    def __init__(
        self,
        *,
        encoders: Sequence[AlignmentEncoder],
        interpolant: Interpolant | None = None,
        proj_coeff: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """`encoders`: one frozen `AlignmentEncoder` per projector of `net`; `proj_coeff`: REPA's λ."""
        super().__init__(**kwargs)
        self.interpolant = interpolant or LinearInterpolant()
        self.proj_coeff = float(proj_coeff)
        self.encoders = nn.ModuleList(encoders)  # parameter-free wrappers: nothing reaches the optimizer
        self._check_net_and_encoders()

    def _check_net_and_encoders(self) -> None:
        """Refuse a net and encoders that do not fit together, naming the setting to change."""
        z_dims = getattr(self.net, "z_dims", None)
        if z_dims is None:
            raise TypeError(f"REPA needs a net with projectors (visgen.nn.repa.REPASiT), got {type(self.net).__name__}")
        if not self.encoders or [e.embed_dim for e in self.encoders] != list(z_dims):
            raise ValueError(f"model.net.z_dims={list(z_dims)} but the encoders give features of width "
                             f"{[e.embed_dim for e in self.encoders]}; set z_dims to one entry per encoder")
        for encoder in self.encoders:
            if not isinstance(encoder, AlignmentEncoder):
                raise TypeError(f"model.encoders holds a {type(encoder).__name__}; use visgen.encoders classes")
            if encoder.token_grid != self.net.grid_size:
                raise ValueError(f"encoder {encoder.id} gives a {encoder.token_grid}x{encoder.token_grid} token grid, "
                                 f"the net {self.net.grid_size}x{self.net.grid_size}; REPA aligns token by token")
            if encoder.image_size != self.image_size:
                raise ValueError(f"encoder {encoder.id} expects {encoder.image_size} px images but data.image_size="
                                 f"{self.image_size}; set the encoder's image_size to ${{data.image_size}}")
        if getattr(self.net, "time_convention", None) == "repa" and self.interpolant.prediction != "velocity":
            raise ValueError(f"model.net.time_convention=repa converts REPA's velocity ε − x; a "
                             f"{self.interpolant.prediction!r} prediction needs model.net.time_convention=visgen")
        if not self.proj_coeff >= 0:
            raise ValueError(f"model.proj_coeff={self.proj_coeff}; REPA's λ must be >= 0 (paper: 0.5)")

    def encoder_features(self, images: Tensor) -> list[Tensor]:
        """Each encoder's patch features (B, N, D_k) of the clean images (B, 3, H, W) in [-1, 1], no autograd."""
        return [encoder(images) for encoder in self.encoders]

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample flow MSE + λ · alignment (B,); t then ε come from `generator` when given."""
        if "images" not in batch:
            raise KeyError("REPA aligns with features of the clean image but the batch has no 'images': train from "
                           "image shards, or from a latent cache written with keep_image=true")
        features = self.encoder_features(batch["images"])  # K x (B, N, D_k)
        projections: list[Tensor] = []

        def velocity_net(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
            out, projected = net(x_t, t, y, project=True)  # (B, C, H, W), K x (B, N, D_k)
            projections.extend(projected)
            return out

        flow = self.interpolant.training_loss(velocity_net, batch["latents"], batch["labels"], generator)  # (B,)
        align = alignment_loss(projections, features)  # (B,)
        if self._trainer is not None and self.training:
            self.log("train/flow_loss", flow.mean())
            self.log("train/proj_loss", align.mean())
        return flow + self.proj_coeff * align  # (B,)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which frozen encoders (name and weights hash) the run aligned to; their weights stay out."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["visgen"]["alignment_encoders"] = [encoder.id for encoder in self.encoders]
