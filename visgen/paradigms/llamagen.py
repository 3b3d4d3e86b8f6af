"""LlamaGen: class-conditional image generation by next-token prediction on VQ codes (Sun et al., 2024,
"Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation").

Method (LlamaGen Sec. 2 and 3): an image becomes N = h * w codes q_1 .. q_N of a VQ tokenizer in
raster order; a Llama decoder (`visgen.nn.gpt.GPT`) models
    p(q | c) = prod_i p(q_i | c, q_<i),        L = -(1 / N) sum_i log p_theta(q_i | c, q_<i)
with the class c as a prefix token, dropped to a null class with probability 0.1 for classifier-free
guidance. Sampling draws the codes one at a time with a KV cache (`visgen.autoregressive.sampler`),
guiding the logits: l = l_u + s (l_c - l_u) (Sec. 3.3), then decodes them with the VQ decoder.
The recipe (conf/experiment/gpt_*.yaml): AdamW (0.9, 0.95), lr 1e-4 constant, weight decay 0.05,
gradient clipping 1.0, batch 256, 300 epochs, no EMA (the released weights are the raw model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.training.module import Batch, GenerativeModule

__all__ = ["LlamaGen", "next_token_loss"]


def next_token_loss(net: nn.Module, codes: Tensor, labels: Tensor) -> Tensor:
    """Per-sample mean next-code cross-entropy (B,) of codes (B, h, w) or (B, N) given labels (B,)."""
    codes = codes.flatten(1)  # (B, N)
    logits = net(codes[:, :-1], labels)  # (B, N, V): row i predicts code i
    return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").mean(dim=1)  # (B,)


class LlamaGen(GenerativeModule):
    """Next-token prediction on the tokenizer's codes with a class-prefix GPT."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is None:
            raise ValueError(f"LlamaGen models discrete codes, but model.tokenizer ({type(self.tokenizer).__name__}, "
                             f"id {self.tokenizer.id!r}) is continuous; choose a VQ tokenizer "
                             "(model/tokenizer=llamagen_vq16, or a trained demo_vq)")
        grid = tuple(self.tokenizer.latent_shape(self.image_size))
        if vocab != self.net.vocab_size or grid != (self.net.grid_size, self.net.grid_size):
            raise ValueError(f"the tokenizer {self.tokenizer.id!r} gives {vocab} codes on a {grid} grid at "
                             f"image_size={self.image_size}, but the GPT has vocab_size={self.net.vocab_size} and "
                             f"grid_size={self.net.grid_size}; set model.net.vocab_size={vocab} and "
                             f"model.net.grid_size={grid[0]}")

    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample next-code cross-entropy (B,); `batch["latents"]` holds int64 codes (B, h, w)."""
        codes = batch["latents"]
        if codes.is_floating_point():
            raise TypeError(f"LlamaGen's loss needs integer codes (B, h, w), got {codes.dtype} latents "
                            f"{tuple(codes.shape)}; the tokenizer must be a VQ tokenizer")
        return next_token_loss(net, codes, batch["labels"])
