"""Holding a frozen network that checkpoints must not carry: tokenizers' autoencoders, REPA's encoders.

The network lives in `__dict__`, not as a registered submodule: invisible to `state_dict()`, `parameters()`,
the optimizer and the EMA, because a frozen network copied into every generator checkpoint would be pure
waste: it is reloaded from its file, and the holder's `id` records which weights were used. `_apply` and
`train` forward `.to()` / `.float()` / `.eval()`, so it still follows its parent across devices and stays in
eval mode.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FrozenHolder"]


class FrozenHolder(nn.Module):
    """Mixin for a module around one frozen, unregistered network (see the module docstring)."""

    def _hold(self, net: nn.Module) -> nn.Module:
        """Keep `net` frozen, in eval mode and out of the module tree."""
        net = net.requires_grad_(False).eval()
        object.__setattr__(self, "_frozen_net", net)
        return net

    @property
    def frozen_net(self) -> nn.Module:
        """The held network."""
        return self._frozen_net

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        if recurse:
            self._frozen_net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenHolder:
        """The held network stays in eval mode whatever the parent does."""
        super().train(mode)
        self._frozen_net.eval()
        return self
