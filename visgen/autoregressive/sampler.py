"""Autoregressive sampling of VQ codes with a static KV cache (LlamaGen's generate.py, gpt-fast's scheme).

Prefill writes the class token into a preallocated cache and gives the logits of code 0; each later
step feeds one code at its position and reads the logits of the next, so a whole image costs one
forward per code over a single new position. The logits equal those of recomputing the full
sequence (tested). With classifier-free guidance the batch is [labels, null class]; the guided
logits `u + s * (c - u)` are formed before temperature / top-k / top-p, and the code drawn from them
is fed to both halves. Guidance is constant or limited to a range of code indices (`cfg_interval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from visgen.autoregressive.logits import guide_logits, sample_from_logits
from visgen.sampling import Sampler

__all__ = ["ARSampler"]


def _cache_dtype(net: nn.Module, device: torch.device) -> torch.dtype:
    """What keys/values will be computed in: the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(net.parameters()).dtype


class ARSampler(Sampler):
    """Raster-order code sampler for `visgen.nn.gpt.GPT`: `sampler(net, labels, (h, w), generator)` -> (B, h, w).

    cfg_scale: guidance scale s (1 disables guidance and halves the batch; LlamaGen's FID settings use
    2.0 / 2.0 / 1.75 / 1.75 / 1.65 for B / L / XL / XXL / 3B). cfg_interval: null (guide every code) or
    [start, end): guide codes start <= i < end only, the others take the conditional logits
    (LlamaGen's `--cfg-interval c` is [0, c + 2)). temperature, top_k (0: off), top_p (1: off): applied
    after guidance. compile: torch.compile the one-code decoding step (fixed shapes: one graph).
    """

    def __init__(self, cfg_scale: float = 1.0, cfg_interval: Sequence[int] | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, compile: bool = False):
        if cfg_interval is not None and (len(cfg_interval) != 2 or cfg_interval[0] > cfg_interval[1]):
            raise ValueError(f"sampling.cfg_interval must be null or [start, end) code indices with start <= end, "
                             f"got {cfg_interval}")
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = tuple(int(i) for i in cfg_interval) if cfg_interval is not None else None
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.compile = compile
        self._compiled: dict[int, Callable[..., Tensor]] = {}

    def guided_at(self, index: int) -> bool:
        """Whether code `index` is drawn from guided logits."""
        if self.cfg_scale == 1.0:
            return False
        return self.cfg_interval is None or self.cfg_interval[0] <= index < self.cfg_interval[1]

    def _decode_fn(self, net: nn.Module) -> Callable[..., Tensor]:
        if not self.compile:
            return net.decode
        if id(net) not in self._compiled:
            self._compiled[id(net)] = torch.compile(net.decode, dynamic=False)
        return self._compiled[id(net)]

    def _draw(self, logits: Tensor, index: int, batch: int, generator: torch.Generator | None) -> Tensor:
        """Logits of the doubled (or plain) batch -> one code per sample (B,)."""
        if self.cfg_scale != 1.0:
            cond, uncond = logits[:batch], logits[batch:]  # (B, V) each
            logits = guide_logits(cond, uncond, self.cfg_scale) if self.guided_at(index) else cond
        return sample_from_logits(logits, self.temperature, self.top_k, self.top_p, generator)

    @torch.no_grad()
    def __call__(self, net: nn.Module, labels: Tensor, latent_shape: Sequence[int],
                 generator: torch.Generator | None = None) -> Tensor:
        """Labels (B,) -> int64 codes (B, h, w) in raster order."""
        if len(latent_shape) != 2 or latent_shape[0] != net.grid_size or latent_shape[1] != net.grid_size:
            raise ValueError(f"the tokenizer's code grid {tuple(latent_shape)} does not match the GPT's "
                             f"grid_size={net.grid_size} (model.net.grid_size must be image_size / the tokenizer's "
                             "downsampling factor, and the tokenizer must give codes (h, w))")
        if self.cfg_scale != 1.0 and net.num_classes == 0:
            raise ValueError(f"sampling.cfg_scale={self.cfg_scale} needs a class-conditional net; this one is "
                             "unconditional (num_classes=0): set sampling.cfg_scale=1")
        height, width = latent_shape
        batch, device = labels.shape[0], labels.device
        num_codes = height * width
        cond = labels
        if self.cfg_scale != 1.0:
            cond = torch.cat([labels, torch.full_like(labels, net.num_classes)])  # (2B,): [cond, null]
        was_training = net.training
        net.eval()
        try:
            cache = net.new_cache(cond.shape[0], _cache_dtype(net, device), device)
            decode = self._decode_fn(net)
            codes = torch.empty(batch, num_codes, dtype=torch.long, device=device)  # (B, N)
            logits = net.prefill(cond, cache)  # (2B or B, V): code 0
            codes[:, 0] = self._draw(logits, 0, batch, generator)
            for i in range(1, num_codes):
                previous = codes[:, i - 1]
                if self.cfg_scale != 1.0:
                    previous = torch.cat([previous, previous])  # the same code to both halves
                position = torch.tensor([i], device=device)  # code i-1 sits at position i (after the class token)
                logits = decode(previous, position, cache)  # (2B or B, V): code i
                codes[:, i] = self._draw(logits, i, batch, generator)
        finally:
            net.train(was_training)
        return codes.view(batch, height, width)
