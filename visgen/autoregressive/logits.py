"""Turning logits into tokens: classifier-free guidance on logits, temperature, top-k / top-p, a categorical draw.

Shared by every paradigm that samples codes (LlamaGen's AR decoding, MaskGIT's parallel decoding).
The order is LlamaGen's (autoregressive/models/generate.py): guidance on the raw logits
`u + s * (c - u)`, then temperature, then top-k, then top-p (nucleus; Holtzman et al., 2020) on the
tempered logits, then softmax and one multinomial draw. Draws take an explicit `torch.Generator`, so
sampling never touches the global RNG (exact resume) and equal seeds give equal tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["guide_logits", "filter_top_k_top_p", "sample_from_logits"]


def guide_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: u + s * (c - u) (s = 1: the conditional logits)."""
    return uncond + (cond - uncond) * scale


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits (B, V) with every token outside the top-k and outside the top-p nucleus set to -inf.

    top_k = 0 and top_p = 1 keep everything. Top-k keeps ties with the k-th value; top-p keeps the
    smallest prefix of the sorted distribution whose mass reaches top_p (the token that crosses it
    included, so at least one token always survives).
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 (0: off) and top_p in (0, 1] (1: off); got top_k={top_k}, "
                         f"top_p={top_p} (sampling.top_k / sampling.top_p)")
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        mass_before = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)  # (B, V) mass up to and incl. j
        remove_sorted = mass_before > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()  # keep the token that crosses top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_from_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits (B, V) -> (B,) int64: temperature, top-k / top-p, softmax, multinomial.

    temperature 0 is greedy (argmax) and draws nothing; LlamaGen divides by max(temperature, 1e-5).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature} (sampling.temperature)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)
