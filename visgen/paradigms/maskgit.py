"""MaskGIT: Masked Generative Image Transformer (Chang et al., CVPR 2022), class-conditional.

Method (Sec. 3.1 and 3.2, as the valeoai/Maskgit-pytorch v1 reproduction trains it):
    y      the VQ codes (h·w tokens) of an image, c its class (replaced by the null class with probability 0.1)
    r ~ U[0, 1),  m_i ~ Bernoulli(γ(r)) independently per token      (γ: the mask schedule, arccos by default)
    ȳ      y with every masked token replaced by the [MASK] id (the codebook size)
    L = CE(f_θ(ȳ, c), y)      over the masked tokens (the paper) or over all tokens with label smoothing 0.1
                              (v1: `nn.CrossEntropyLoss(label_smoothing=0.1)` on all h·w positions)
A per-sample loss (B,) whose batch mean is the token mean: for `loss_on: masked` each sample carries its
masked tokens' summed CE over the batch's mean number of masked tokens.

Sampling is parallel decoding from all-[MASK] codes (`visgen.paradigms.maskgit_sampler.MaskGITSampler`):
in K steps, keep the most confident of the sampled tokens (Gumbel-randomised) or follow a Halton order.
Networks: `visgen.nn.maskgit.MaskTransformer` (v1) and `visgen.nn.halton_maskgit.HaltonTransformer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.paradigms.maskgit_sampler import SCHEDULES, random_mask
from visgen.training.module import Batch, GenerativeModule

__all__ = ["MaskGIT", "drop_labels", "maskgit_loss"]


def drop_labels(labels: Tensor, num_classes: int, drop_prob: float,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace labels by the null class `num_classes` with probability drop_prob (all of them when the net is
    unconditional, num_classes = 0), for classifier-free guidance. Draws (B,) uniforms from `generator`."""
    if num_classes == 0:
        return torch.zeros_like(labels)
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < drop_prob  # (B,)
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def maskgit_loss(net: nn.Module, codes: Tensor, labels: Tensor, *, schedule: str = "arccos", loss_on: str = "all",
                 label_smoothing: float = 0.1, label_drop_prob: float = 0.1,
                 generator: torch.Generator | None = None) -> Tensor:
    """MaskGIT's per-sample cross-entropy (B,) for codes (B, h, w) int64 and labels (B,) (module docstring).

    Draws the label drop, then r, then the token mask from `generator`, in the order of the official trainers.
    """
    if codes.dtype != torch.long or codes.dim() != 3:
        raise ValueError(f"MaskGIT trains on int64 codes (B, h, w), got {codes.dtype} {tuple(codes.shape)}; "
                         "use a VQ tokenizer (model/tokenizer=maskgit_vqgan or a visgen VQ)")
    if loss_on not in ("all", "masked"):
        raise ValueError(f"model.loss_on={loss_on!r}: use 'all' (v1: every token) or 'masked' (the paper)")
    batch_size = codes.shape[0]
    labels = drop_labels(labels, net.num_classes, label_drop_prob, generator)
    mask = random_mask(codes, schedule, generator)  # (B, h, w) bool
    logits = net(codes.masked_fill(mask, net.mask_token_id), labels)  # (B, N, V+1)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none",
                         label_smoothing=label_smoothing).view(batch_size, -1)  # (B, N)
    if loss_on == "all":
        return ce.mean(dim=1)
    weight = mask.view(batch_size, -1).float()  # (B, N)
    return (ce * weight).sum(dim=1) * batch_size / weight.sum().clamp(min=1.0)


class MaskGIT(GenerativeModule):
    """Masked token modelling on VQ codes; `batch["latents"]` holds int64 codes (B, h, w)."""

    def __init__(self, *, schedule: str = "arccos", loss_on: str = "all", label_smoothing: float = 0.1,
                 label_drop_prob: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r} is not one of {SCHEDULES}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"model.loss_on={loss_on!r}: use 'all' (v1: every token) or 'masked' (the paper)")
        vocab, codebook = getattr(self.tokenizer, "vocab_size", None), self.net.codebook_size
        if vocab != codebook:
            raise ValueError(f"MaskGIT models the codes of a VQ tokenizer, but model.tokenizer has vocab_size={vocab} "
                             f"and model.net.codebook_size={codebook}; choose a VQ model/tokenizer and set "
                             "model.net.codebook_size to its codebook size")
        self.schedule = schedule
        self.loss_on = loss_on
        self.label_smoothing = label_smoothing
        self.label_drop_prob = label_drop_prob

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample cross-entropy (B,) of `maskgit_loss` with this module's settings."""
        return maskgit_loss(net, batch["latents"], batch["labels"], schedule=self.schedule, loss_on=self.loss_on,
                            label_smoothing=self.label_smoothing, label_drop_prob=self.label_drop_prob,
                            generator=generator)
