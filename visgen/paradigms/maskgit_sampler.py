"""MaskGIT's mask schedules and its parallel decoder (Chang et al., CVPR 2022, Sec. 3.2 and 3.3).

Schedules. γ(t) is the fraction of tokens still masked at decoding progress t ∈ [0, 1] (γ(0) = 1, γ(1) = 0).
Training masks each token independently with probability γ(r), r ~ U[0, 1): the same function serves training
and decoding, as in the paper and both valeoai reproductions (their `arccos`/`cosine` training rates are γ(r)
exactly; v1's `linear` uses r where visgen and Halton-MaskGIT use 1 − r: the same distribution of rates).

    arccos  γ(t) = arccos(t) / (π/2)     the reproductions' default
    cosine  γ(t) = cos(π t / 2)          the paper's choice
    linear  γ(t) = 1 − t
    root    γ(t) = 1 − √t                (square root)
    square  γ(t) = 1 − t²

Decoding. Start from all-masked codes; at step k of K, predict every position, sample a code per position
(softmax at `temperature`), and keep `n_k` of them; the `n_k` add up to the h·w tokens and are each ≥ 1:
* spacing `v1` (valeoai v1 `adap_sche`): n_k ∝ γ(1 − k/(K−1)), rounded, zeros raised to 1, the rounding
  error put on the last step; `cumulative` (the paper; Halton-MaskGIT): after step k, ⌊(1 − γ((k+1)/K))·N⌋
  tokens are known. Where a rule would give a step no token (K close to N), counts are repaired minimally.
* order `confidence` (MaskGIT): keep the masked positions of highest log p(sampled code) + g_k·Gumbel noise,
  g_k = r_temp·(1 − k/(K−1)); order `halton` (Halton-MaskGIT): keep the next n_k positions of a fixed
  2-D Halton sequence over the grid, whatever the confidences (optionally rolled per sample).
Classifier-free guidance batches the conditional and the null-label halves in one forward pass and combines
logits as (1 + w_k)·c − w_k·u, with w_k = w·k/(K−1) (v1's linear ramp) or w (Halton-MaskGIT's constant).

The reproductions multiply logits by their `sm_temp`; here `temperature` divides them (sm_temp = 1/temperature).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor, nn

from visgen.sampling import Sampler

__all__ = ["SCHEDULES", "mask_rate", "random_mask", "reveal_counts", "halton_order", "confidence_reveal",
           "MaskGITSampler"]

SCHEDULES = ("arccos", "cosine", "linear", "root", "square")
SPACINGS = ("v1", "cumulative")
ORDERS = ("confidence", "halton")
CFG_SCHEDULES = ("linear", "constant")


def _check(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)} ({name} of the MaskGIT config)")


def mask_rate(t: Tensor, schedule: str = "arccos") -> Tensor:
    """γ(t): the fraction of tokens masked at progress t ∈ [0, 1]; 1 at t = 0, 0 at t = 1."""
    _check(schedule, SCHEDULES, "schedule")
    if schedule == "arccos":
        return torch.arccos(t) / (math.pi * 0.5)
    if schedule == "cosine":
        return torch.cos(t * math.pi * 0.5)
    if schedule == "linear":
        return 1 - t
    if schedule == "root":
        return 1 - t**0.5
    return 1 - t**2


def random_mask(codes: Tensor, schedule: str = "arccos", generator: torch.Generator | None = None,
                rate_draws: Tensor | None = None, token_draws: Tensor | None = None) -> Tensor:
    """MaskGIT's training mask (B, h, w) bool: r ~ U[0, 1) per sample, each token masked with probability γ(r).

    Draws r (B,) then u (B, h, w) from `generator` in that order (as v1: `torch.rand(B)`, then
    `torch.rand(code.size())`); pass them in to reproduce a given masking.
    """
    batch = codes.shape[0]
    r = torch.rand(batch, generator=generator, device=codes.device) if rate_draws is None else rate_draws
    u = torch.rand(codes.shape, generator=generator, device=codes.device) if token_draws is None else token_draws
    rate = mask_rate(r, schedule)  # (B,)
    return u < rate.view(batch, *([1] * (codes.dim() - 1)))  # (B, h, w)


def _repair(counts: Tensor, seq_len: int) -> Tensor:
    """Counts (K,) summing to seq_len with every step ≥ 1, changing as little as needed: raise zeros to 1, then
    take the excess from the largest steps (latest first among equals)."""
    counts = counts.clamp(min=1)
    while int(counts.sum()) > seq_len:
        largest = int(counts.size(0) - 1 - torch.argmax(counts.flip(0)))
        counts[largest] -= 1
    return counts


def reveal_counts(num_steps: int, seq_len: int, schedule: str = "arccos", spacing: str = "v1") -> Tensor:
    """Tokens revealed at each of `num_steps` decoding steps: (K,) int64, each ≥ 1, summing to `seq_len`."""
    _check(spacing, SPACINGS, "spacing")
    if not 1 <= num_steps <= seq_len:
        raise ValueError(f"sampling.num_steps={num_steps} must be between 1 and the {seq_len} tokens of a code grid "
                         "(each step reveals at least one token)")
    if num_steps == 1:
        return torch.tensor([seq_len])
    if spacing == "v1":
        # valeoai v1 Trainer/vit.py adap_sche, in float32 as there: weights γ(r), r = linspace(1, 0, K).
        weights = mask_rate(torch.linspace(1, 0, num_steps), schedule)  # (K,) from γ(1) = 0 to γ(0) = 1
        counts = (weights / weights.sum() * seq_len).round()
        counts[counts == 0] = 1
        counts[-1] += seq_len - counts.sum()
        return _repair(counts.long(), seq_len)
    # Halton-MaskGIT Sampler/halton_sampler.py, in float32 as there: ⌊(1 − γ((k+1)/K)) · N⌋ known after step k.
    progress = torch.arange(1, num_steps + 1, dtype=torch.float32) / num_steps
    known = ((1 - mask_rate(progress, schedule)) * seq_len).long().tolist()
    known[-1] = seq_len
    for k in range(num_steps):  # at least one new token per step, and one left for each later step
        low = known[k - 1] + 1 if k > 0 else 1
        known[k] = min(max(known[k], low), seq_len - (num_steps - 1 - k))
    return torch.diff(torch.tensor(known), prepend=torch.zeros(1, dtype=torch.long))


def _radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse of `index` in `base` (1 -> 1/b, 2 -> 2/b or 1/b², ...)."""
    result, scale = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


@cache
def halton_order(input_size: int) -> Tensor:
    """Flat positions (N,) of an input_size² grid in the order of the 2-D Halton sequence (bases 2 and 3 for row
    and column, indices 1, 2, ...), duplicates after their first occurrence dropped (Halton-MaskGIT)."""
    seen: dict[int, None] = {}
    index = 1
    while len(seen) < input_size * input_size:
        row = math.floor(_radical_inverse(index, 2) * input_size)
        col = math.floor(_radical_inverse(index, 3) * input_size)
        seen.setdefault(row * input_size + col, None)
        index += 1
    return torch.tensor(list(seen), dtype=torch.long)


def confidence_reveal(masked: Tensor, log_conf: Tensor, gumbel: Tensor, gumbel_scale: float,
                      num_reveal: int) -> Tensor:
    """The `num_reveal` masked positions of highest log-confidence + gumbel_scale · noise: (B, N) bool.

    masked (B, N) bool, log_conf (B, N) log p of each position's sampled code, gumbel (B, N) standard Gumbel.
    """
    score = log_conf.float() + gumbel_scale * gumbel  # (B, N)
    score = score.masked_fill(~masked, -math.inf)  # already known positions are never chosen again
    chosen = torch.topk(score, num_reveal, dim=-1).indices  # (B, n)
    return torch.zeros_like(masked).scatter_(1, chosen, True)  # (B, N)


class MaskGITSampler(Sampler):
    """Parallel decoding of VQ codes (module docstring); returns int64 codes (B, h, w)."""

    def __init__(
        self,
        num_steps: int = 8,
        schedule: str = "arccos",
        spacing: str = "v1",
        order: str = "confidence",
        temperature: float = 1.0,
        temperature_end: float | None = None,
        gumbel_temperature: float = 4.5,
        cfg_scale: float = 0.0,
        cfg_schedule: str = "linear",
        halton_roll: bool = False,
    ):
        for value, allowed, name in ((schedule, SCHEDULES, "schedule"), (spacing, SPACINGS, "spacing"),
                                     (order, ORDERS, "order"), (cfg_schedule, CFG_SCHEDULES, "cfg_schedule")):
            _check(value, allowed, name)
        if temperature <= 0 or (temperature_end is not None and temperature_end <= 0):
            raise ValueError(f"sampling.temperature={temperature} and temperature_end={temperature_end} must be > 0")
        self.num_steps = num_steps
        self.schedule = schedule
        self.spacing = spacing
        self.order = order
        self.temperature = temperature
        self.temperature_end = temperature_end  # None: constant; else 1/temperature ramps linearly (Halton's sm_temp)
        self.gumbel_temperature = gumbel_temperature
        self.cfg_scale = cfg_scale
        self.cfg_schedule = cfg_schedule
        self.halton_roll = halton_roll

    def progress(self, step: int) -> float:
        """k / (K − 1): 0 at the first step, 1 at the last (0 when K = 1)."""
        return step / (self.num_steps - 1) if self.num_steps > 1 else 0.0

    def guidance_weight(self, step: int) -> float:
        """w_k: w · k/(K − 1) (v1's linear ramp from 0) or w (constant)."""
        return self.cfg_scale * (self.progress(step) if self.cfg_schedule == "linear" else 1.0)

    def logit_scale(self, step: int) -> float:
        """1 / temperature at step k (Halton-MaskGIT ramps this multiplier linearly from start to end)."""
        start = 1.0 / self.temperature
        end = start if self.temperature_end is None else 1.0 / self.temperature_end
        return start + (end - start) * self.progress(step)

    def guided_logits(self, net: nn.Module, codes: Tensor, labels: Tensor, step: int) -> Tensor:
        """Logits (B, N, V) over the codebook (the mask column dropped), guided when w_k ≠ 0.

        A step with w_k = 0 (guidance off, or the first step of v1's ramp) runs the conditional half alone:
        (1 + 0)·c − 0·u = c, so the null pass would cost a forward for nothing (v1 and Halton-MaskGIT run it)."""
        vocab = net.codebook_size
        w = self.guidance_weight(step)
        if w == 0:
            return net(codes, labels)[..., :vocab].float()
        null = torch.full_like(labels, net.num_classes)
        cond, uncond = net(torch.cat([codes, codes]), torch.cat([labels, null]))[..., :vocab].float().chunk(2)
        return (1 + w) * cond - w * uncond  # (B, N, V)

    def gumbel_noise(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard Gumbel noise shaped like `like` (-log of an Exp(1) draw); override to inject given noise."""
        return -torch.empty_like(like, dtype=torch.float32).exponential_(generator=generator).log()

    @torch.no_grad()
    def __call__(self, net: nn.Module, labels: Tensor, latent_shape: tuple[int, ...],
                 generator: torch.Generator | None = None) -> Tensor:
        """Decode codes (B, h, w) for `labels` (B,) in `num_steps` parallel steps."""
        if len(latent_shape) != 2:
            raise ValueError(f"MaskGIT samples a (h, w) code grid, got latent_shape {tuple(latent_shape)}: the "
                             "tokenizer must be a VQ tokenizer (model/tokenizer=maskgit_vqgan or a visgen VQ)")
        batch, (h, w), device = labels.shape[0], latent_shape, labels.device
        seq_len = h * w
        counts = reveal_counts(self.num_steps, seq_len, self.schedule, self.spacing).tolist()
        codes = torch.full((batch, seq_len), net.mask_token_id, dtype=torch.long, device=device)  # (B, N)
        masked = torch.ones(batch, seq_len, dtype=torch.bool, device=device)  # (B, N)
        if self.order == "halton":
            if h != w:
                raise ValueError(f"the Halton order is defined on square grids, got {h}x{w}")
            order = halton_order(h).to(device).expand(batch, -1)  # (B, N)
            if self.halton_roll:  # Halton-MaskGIT --randomize: the sequence rolled by a random offset per sample
                shift = torch.randint(seq_len, (batch, 1), generator=generator, device=device)
                order = order.gather(1, (torch.arange(seq_len, device=device) - shift) % seq_len)
            done = 0
        for step, num_reveal in enumerate(counts):
            logits = self.guided_logits(net, codes.view(batch, h, w), labels, step) * self.logit_scale(step)
            probs = logits.softmax(-1)  # (B, N, V)
            sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, replacement=True, generator=generator)
            sampled = sampled.view(batch, seq_len)  # (B, N): a code drawn at every position
            if self.order == "halton":
                reveal = torch.zeros_like(masked).scatter_(1, order[:, done: done + num_reveal], True)
                done += num_reveal
            else:
                log_conf = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).log()  # (B, N)
                gumbel = self.gumbel_noise(log_conf, generator)
                scale = self.gumbel_temperature * (1 - self.progress(step))
                reveal = confidence_reveal(masked, log_conf, gumbel, scale, num_reveal)
            codes = torch.where(reveal, sampled, codes)
            masked = masked & ~reveal
        return codes.view(batch, h, w)
