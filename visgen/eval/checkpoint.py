"""Read a visgen checkpoint without importing training code: its config and its EMA network.

Checkpoint layout (a Lightning `.ckpt`, documented in the README):
    checkpoint["state_dict"]["net.<key>"]   trained weights
    checkpoint["state_dict"]["ema.<key>"]   EMA weights (what evaluation samples with)
    checkpoint["visgen"]                    {"config", "seed", "git_commit", "git_diff", "versions",
                                             "tokenizer_id", "ema_prefix", ...}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "checkpoint_config", "load_net", "net_state_dict"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a visgen `.ckpt` on the CPU with weights_only=True (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt=<run dir>/checkpoints/last.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "visgen" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a visgen training checkpoint (no 'visgen' metadata); official weights "
                         "load with visgen.load_official")
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any]) -> DictConfig:
    """The composed training config stored in the checkpoint."""
    return OmegaConf.create(checkpoint["visgen"]["config"])


def net_state_dict(checkpoint: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The net's weights (EMA by default) with the `ema.`/`net.` prefix removed."""
    prefix = checkpoint["visgen"].get("ema_prefix", "ema.") if use_ema else "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"checkpoint has no weights under '{prefix}'; keys start with "
                       f"{sorted({k.split('.')[0] for k in checkpoint['state_dict']})}")
    return state


def load_net(checkpoint: dict[str, Any], use_ema: bool = True) -> nn.Module:
    """Build `config.model.net` and load its weights strictly (every key used, shapes checked)."""
    net = instantiate(checkpoint_config(checkpoint).model.net)
    net.load_state_dict(net_state_dict(checkpoint, use_ema), strict=True)
    log.info("loaded %s weights (%s parameters)", "EMA" if use_ema else "raw",
             f"{sum(p.numel() for p in net.parameters()):,}")
    return net.eval()
