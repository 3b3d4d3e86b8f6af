"""Classifier-free guidance (Ho & Salimans, 2022), shared by every sampler (flow ODE/SDE, DDPM, DDIM).

The null label is `net.num_classes`. The conditional and unconditional halves run in ONE batched
forward on cat([y, null]); the guided output is out_u + s · (out_c − out_u) on the first
`guided_channels` channels (default: the C input channels, i.e. ε or v but never a learned-Σ half),
and every other output channel is taken from the conditional half, as DiT's `forward_with_cfg`.
DiT's and SiT's published numbers guide 3 of 4 latent channels; REPA and MAR guide all.

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") replaces the
unconditional half with a weaker model of the same task, e.g. an early checkpoint of the same run:
out_bad + w · (out_good − out_bad), both conditional. `Autoguided` wraps the two nets as one net, so every
sampler runs it unchanged; with cfg_scale > 1 as well, CFG applies on top of the autoguided outputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Autoguided", "draw_prior", "guided_output", "net_num_classes"]

Net = Callable[[Tensor, Tensor, Tensor], Tensor]


def net_num_classes(net: Net) -> int:
    """Return the int `net.num_classes` (0 = unconditional), with a clear error when it is missing."""
    value = getattr(net, "num_classes", None)
    try:
        if isinstance(value, bool):
            raise TypeError
        num_classes = operator.index(value)  # accepts int-like values (e.g. numpy ints), rejects floats/None
    except TypeError:
        raise AttributeError(
            f"net must have an int attribute `num_classes` (0 = unconditional), got {value!r}"
        ) from None
    if num_classes < 0:
        raise ValueError(f"net.num_classes must be >= 0, got {num_classes}")
    return num_classes


def guided_output(
    net: Net,
    x: Tensor,
    t: Tensor,
    y: Tensor,
    cfg_scale: float = 1.0,
    guide: Tensor | None = None,
    guided_channels: int | None = None,
) -> Tensor:
    """The full network output (B, C_out, ...) with CFG applied where `guide` (B,) bool is True.

    No guidance (one plain forward of size B) when the net is unconditional, the scale is 1, or no
    sample of the batch is inside its guidance interval.
    """
    num_classes = net_num_classes(net)
    channels = x.shape[1]
    guided_channels = channels if guided_channels is None else guided_channels
    if not 1 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be in [1, {channels}] for this input, got {guided_channels}")
    if num_classes == 0 or cfg_scale == 1.0 or (guide is not None and not bool(guide.any())):
        return net(x, t, y)  # (B, C_out, ...)

    batch = x.shape[0]
    null = torch.full_like(y, num_classes)  # (B,)
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C_out, ...)
    out_cond, out_uncond = out[:batch], out[batch:]  # (B, C_out, ...) each
    cond, uncond = out_cond[:, :guided_channels], out_uncond[:, :guided_channels]  # (B, G, ...) each
    head = uncond + cfg_scale * (cond - uncond)  # (B, G, ...)
    guided = torch.cat([head, out_cond[:, guided_channels:]], dim=1)  # (B, C_out, ...)
    if guide is None:
        return guided
    mask = guide.reshape(batch, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
    return torch.where(mask, guided, out_cond)  # (B, C_out, ...)


def draw_prior(
    net: Net,
    labels: Tensor,
    latent_shape: Sequence[int],
    guided_channels: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Check a sampler's labels and shapes, then draw x ~ N(0, I) (B, *latent_shape) with `generator`.

    Every sampler starts here: labels are 1-D int64 in [0, num_classes] (num_classes = the null class).
    """
    if labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    num_classes = net_num_classes(net)
    if num_classes > 0 and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null class), got [{lo}, {hi}]")
    shape = (labels.shape[0], *(int(s) for s in latent_shape))
    if len(shape) < 2:
        raise ValueError("latent_shape must have at least one (channel) dimension")
    if guided_channels is not None and guided_channels > shape[1]:
        raise ValueError(f"guided_channels={guided_channels} exceeds the {shape[1]} latent channels")
    return torch.randn(shape, generator=generator, device=labels.device, dtype=dtype)  # (B, *latent_shape)


class Autoguided(nn.Module):
    """A net whose output is guide + scale · (net − guide) on the first `guided_channels` channels.

    `guide` is the "bad version" (shorter-trained and/or smaller, same task and output layout); scale 1 is `net`
    alone. The remaining channels (a learned-Σ half) come from `net`, as with CFG.
    """

    def __init__(self, net: nn.Module, guide: nn.Module, scale: float, guided_channels: int | None = None) -> None:
        super().__init__()
        if net_num_classes(net) != net_num_classes(guide):
            raise ValueError(f"autoguidance: the net has {net_num_classes(net)} classes but the guide "
                             f"{net_num_classes(guide)}; guide with a model of the same task")
        if not (isinstance(scale, (int, float)) and scale >= 1.0):
            raise ValueError(f"autoguidance scale must be a number >= 1 (1 = no guidance), got {scale!r}")
        self.net, self.guide = net, guide
        self.scale = float(scale)
        self.guided_channels = guided_channels
        self.num_classes = net_num_classes(net)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = self.net(x, t, y)  # (B, C_out, ...)
        if self.scale == 1.0:
            return out
        bad = self.guide(x, t, y)  # (B, C_out', ...)
        g = x.shape[1] if self.guided_channels is None else self.guided_channels
        head = bad[:, :g] + self.scale * (out[:, :g] - bad[:, :g])  # (B, G, ...)
        return torch.cat([head, out[:, g:]], dim=1)  # (B, C_out, ...)
