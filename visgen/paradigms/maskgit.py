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

__all__ = ["MaskGIT"]


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

    def drop_labels(self, labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
        """Replace labels by the null class `num_classes` with probability label_drop_prob (all of them when the
        net is unconditional), for classifier-free guidance."""
        if num_classes == 0:
            return torch.zeros_like(labels)
        drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < self.label_drop_prob  # (B,)
        return torch.where(drop, torch.full_like(labels, num_classes), labels)

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample cross-entropy (B,); draws (label drop, then r, then the token mask) from `generator`."""
        codes = batch["latents"]  # (B, h, w) int64
        if codes.dtype != torch.long or codes.dim() != 3:
            raise ValueError(f"MaskGIT trains on int64 codes (B, h, w), got {codes.dtype} {tuple(codes.shape)}; "
                             "use a VQ tokenizer (model/tokenizer=maskgit_vqgan or a visgen VQ)")
        batch_size = codes.shape[0]
        labels = self.drop_labels(batch["labels"], net.num_classes, generator)
        mask = random_mask(codes, self.schedule, generator)  # (B, h, w) bool
        logits = net(codes.masked_fill(mask, net.mask_token_id), labels)  # (B, N, V+1)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none",
                             label_smoothing=self.label_smoothing).view(batch_size, -1)  # (B, N)
        if self.loss_on == "all":
            return ce.mean(dim=1)
        weight = mask.view(batch_size, -1).float()  # (B, N)
        return (ce * weight).sum(dim=1) * batch_size / weight.sum().clamp(min=1.0)
