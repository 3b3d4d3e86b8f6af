"""MAR's sampler (Li et al. 2024, Sec. 3.4 and the official `MAR.sample_tokens`): masked autoregression in
`num_iter` steps, each drawing the newly revealed continuous tokens with the DiffLoss sampler.

Step k = 0, ..., K − 1 (K = `num_iter`), all tokens unknown at the start, one random order per image:
    z          = MAE decoder(MAE encoder(known tokens, class)) at every position
    n_k        = max(1, min(#unknown − 1, ⌊L cos(π/2 · (k + 1) / K)⌋))    tokens still unknown after the step
                 (the cosine schedule of MaskGIT; at least one token revealed per step)
    reveal     the unknown positions outside the first n_k of the order (all remaining ones at the last step)
    x_i        ~ DiffLoss sampler(z_i): ancestral DDPM over the cosine process respaced to `num_sampling_steps`
                 (100), per-step noise scaled by the temperature τ
CFG: the unconditional half holds the fake latent in all buffer slots and shares tokens, mask, order and the
initial noise with the conditional half; ε = ε_u + w_k (ε_c − ε_u) on all channels with
    w_k = 1 + (w − 1) · (L − n_k) / L     (`cfg_schedule: linear`, Muse's)  or  w_k = w  (`constant`).
The official code counts the tokens known AFTER step k (L − n_k), and n_k ≥ 1, so its last step reaches
1 + (w − 1) · 255/256, not w: visgen matches it (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from visgen.diffusion.guidance import net_num_classes
from visgen.nn.mar import mask_by_order
from visgen.sampling import Sampler

__all__ = ["MARSampler", "official_mask_lens", "mask_schedule", "cfg_schedule_values"]

CFG_SCHEDULES = ("linear", "constant")


def official_mask_lens(seq_len: int, num_iter: int) -> list[int]:
    """The official `mask_len` of each step: max(1, min(#unknown − 1, ⌊L cos(π/2 · (k + 1) / K)⌋)), ≥ 1 even at
    the last step (which then reveals every remaining token anyway)."""
    remaining, lens = seq_len, []
    for step in range(num_iter):
        target = math.floor(seq_len * float(np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
        remaining = max(1, min(remaining - 1, target))
        lens.append(remaining)
    return lens


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """n_k, the number of tokens still unknown after each step k (the last is 0: everything revealed)."""
    return [*official_mask_lens(seq_len, num_iter)[:-1], 0]


def cfg_schedule_values(cfg: float, seq_len: int, num_iter: int, schedule: str = "linear") -> list[float]:
    """w_k per step: 1 + (w − 1)(L − n_k)/L with the official n_k (≥ 1 even at the last step), or constant w."""
    if schedule == "constant":
        return [float(cfg)] * num_iter
    return [1.0 + (cfg - 1.0) * (seq_len - n) / seq_len for n in official_mask_lens(seq_len, num_iter)]


def check_labels(net: nn.Module, labels: Tensor) -> None:
    """Labels must be 1-D int64 in [0, num_classes] (num_classes = the null class), as every sampler's."""
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    num_classes = net_num_classes(net)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null class), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


class MARSampler(Sampler):
    """Masked-autoregressive sampling of continuous tokens with the DiffLoss sampler, batched, with CFG."""

    def __init__(self, num_iter: int = 64, cfg_scale: float = 1.0, cfg_schedule: str = "linear",
                 temperature: float = 1.0, num_sampling_steps: int | None = None, clip_denoised: bool = False) -> None:
        """`num_iter` AR steps (official default 64; 256 for the paper's FIDs); `num_sampling_steps` None: the
        net's DiffLoss setting (100); `clip_denoised` clamps DiffLoss's x̂_0 to [-1, 1] (pixel tokens only)."""
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
            raise ValueError(f"sampling.num_iter must be a positive int, got {num_iter!r}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sampling.cfg_schedule={cfg_schedule!r}; use one of {CFG_SCHEDULES}")
        if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
            raise ValueError(f"sampling.cfg_scale must be a finite number >= 0, got {cfg_scale}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"sampling.temperature must be a finite number >= 0, got {temperature}")
        self.num_iter = num_iter
        self.cfg_scale = float(cfg_scale)
        self.cfg_schedule = cfg_schedule
        self.temperature = float(temperature)
        self.num_sampling_steps = num_sampling_steps
        self.clip_denoised = bool(clip_denoised)

    def __repr__(self) -> str:
        """Readable summary for logs and protocol cards."""
        return (f"MARSampler(num_iter={self.num_iter}, cfg_scale={self.cfg_scale}, cfg_schedule={self.cfg_schedule!r}, "
                f"temperature={self.temperature}, num_sampling_steps={self.num_sampling_steps}, "
                f"clip_denoised={self.clip_denoised})")

    @torch.no_grad()
    def __call__(self, net: nn.Module, labels: Tensor, latent_shape: Sequence[int],
                 generator: torch.Generator | None = None, orders: Tensor | None = None) -> Tensor:
        """Latents (B, *latent_shape) for `labels` (B,); orders, then every DiffLoss draw, from `generator`."""
        check_labels(net, labels)
        if tuple(latent_shape) != (net.in_channels, net.input_size, net.input_size):
            raise ValueError(f"MAR net builds latents ({net.in_channels}, {net.input_size}, {net.input_size}), "
                             f"the tokenizer wants {tuple(latent_shape)}; set model.net.in_channels / input_size")
        bsz, seq_len, device = labels.shape[0], net.seq_len, labels.device
        dtype = net.fake_latent.dtype
        guided = self.cfg_scale != 1.0 and net.num_classes > 0
        mask = torch.ones(bsz, seq_len, device=device, dtype=dtype)  # (B, L) 1 = unknown
        tokens = torch.zeros(bsz, seq_len, net.token_embed_dim, device=device, dtype=dtype)  # (B, L, D)
        if orders is None:
            orders = net.sample_orders(bsz, generator, device)  # (B, L)
        mask_lens = official_mask_lens(seq_len, self.num_iter)
        cfg_values = cfg_schedule_values(self.cfg_scale, seq_len, self.num_iter, self.cfg_schedule)
        class_labels = labels
        if guided:
            class_labels = torch.cat([labels, torch.full_like(labels, net.num_classes)])  # (2B,)
        for step in range(self.num_iter):
            enc_tokens, enc_mask = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = net.forward_mae_decoder(net.forward_mae_encoder(enc_tokens, enc_mask, class_labels), enc_mask)
            mask_next = mask_by_order(mask_lens[step], orders)  # (B, L) bool
            if step == self.num_iter - 1:
                to_pred = mask.bool()  # (B, L): every remaining token
            else:
                to_pred = mask.bool() & ~mask_next  # (B, L)
            mask = mask_next.to(dtype)
            rows = to_pred.nonzero(as_tuple=True)
            z_pred = torch.cat([z[:bsz][rows], z[bsz:][rows]]) if guided else z[rows]  # (N or 2N, D_dec)
            sampled = net.diffloss.sample(z_pred, self.temperature, cfg_values[step] if guided else 1.0, generator,
                                          self.num_sampling_steps, clip_denoised=self.clip_denoised)  # (N, D)
            tokens = tokens.clone()
            tokens[rows] = sampled.to(dtype)
        return net.unpatchify(tokens)  # (B, C, H, W)
