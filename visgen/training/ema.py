"""Exponential moving average of a network's weights.

Hand-written rather than Lightning's `WeightAveraging` callback because that callback deep-copies
the whole LightningModule, does not support sharded (FSDP) models, and swaps the averaged weights
into the trained model at the end of fit. Here the EMA is a plain frozen copy of `net` held by the
LightningModule as `ema`, so it is sharded, checkpointed and moved with the module, and its
weights sit under the `ema.` prefix of the checkpoint's `state_dict` (evaluation reads them there).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["make_ema", "ema_update"]


def make_ema(net: nn.Module) -> nn.Module:
    """A frozen copy of `net`, in eval mode, starting from its current weights (as DiT)."""
    ema = copy.deepcopy(net)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, over every parameter (and floating buffer)."""
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    if len(ema_params) != len(net_params):
        raise RuntimeError("EMA and network have different parameter lists; rebuild the EMA from the net")
    torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers(), strict=True):
        if ema_buffer.dtype.is_floating_point:
            ema_buffer.lerp_(buffer, 1.0 - decay)
        else:
            ema_buffer.copy_(buffer)
