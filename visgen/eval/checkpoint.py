"""Read a visgen checkpoint without importing training code: its config and its EMA network.

Checkpoint layout (a Lightning `.ckpt`, documented in the README):
    checkpoint["state_dict"]["net.<key>"]   trained weights
    checkpoint["state_dict"]["ema.<key>"]   EMA weights (what evaluation samples with)
    checkpoint["visgen"]                    {"config", "seed", "git_commit", "git_diff", "versions",
                                             "tokenizer_id", "ema_prefix", ...}

A checkpoint may come from anyone: it is read weights-only, and the nets, tokenizers and samplers its
config names are built only through `visgen.untrusted` (visgen classes of the right kind, nothing else).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from visgen.data.cached import file_sha256
from visgen.errors import MissingInputError
from visgen.eval.sharded import UnsafeCheckpointError, is_sharded_checkpoint, load_sharded_checkpoint
from visgen.tokenizers.base import Tokenizer
from visgen.untrusted import UntrustedFileError, instantiate_untrusted, load_torch_file

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_LAYOUT", "load_checkpoint", "checkpoint_config", "load_net", "load_tokenizer",
           "net_state_dict", "checkpoint_sha256"]

#: What a visgen checkpoint looks like, for error messages.
CHECKPOINT_LAYOUT = ("a visgen training checkpoint: the .ckpt file train.py writes into <run dir>/checkpoints/ "
                     "(e.g. last.ckpt), a torch zip holding 'state_dict' and 'visgen' entries")


def checkpoint_sha256(path: str | Path, what: str = "ckpt=") -> str:
    """SHA-256 of what `path` holds: a file's bytes, or for a sharded checkpoint (a folder) the SHA-256 of its
    sorted `<relative path> <file sha256>` lines, so renaming, adding or changing any file changes it.

    Names evaluation folders and goes on the protocol card; remembered per (path, inode, size, mtime, ctime)
    within a process, so a 10 GB checkpoint is read once, not once per use."""
    if not Path(path).exists():
        raise MissingInputError(f"{what}{path}: no such file or folder")
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = tuple((str(p), *_stat(p)) for p in files)
    return _sha256_of(str(path), path.is_dir(), stamp)


def _stat(path: Path) -> tuple[int, int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, is_dir: bool, stamp: tuple[tuple[Any, ...], ...]) -> str:
    if not is_dir:
        return file_sha256(path)
    lines = "".join(f"{Path(entry[0]).relative_to(path).as_posix()} {file_sha256(entry[0])}\n" for entry in stamp)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_checkpoint(path: str | Path, what: str = "ckpt=", mmap: bool = False, weights: bool = True) -> dict[str, Any]:
    """Load a visgen `.ckpt` file or sharded (DCP) checkpoint folder on the CPU without running pickled code;
    anything else is an `UntrustedFileError` naming the file (`what` is the option that named it, e.g.
    "guide_ckpt="). `weights=False` lets a sharded checkpoint skip its tensors (config and step only)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        try:
            checkpoint = load_sharded_checkpoint(path, ("state_dict.",) if weights else ())
        except UnsafeCheckpointError as err:
            raise UntrustedFileError(f"{what}{path}: {err}") from err
    else:
        checkpoint = load_torch_file(path, what, CHECKPOINT_LAYOUT, mmap=mmap)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("visgen"), dict) or not isinstance(
            checkpoint.get("state_dict"), dict) or not isinstance(checkpoint["visgen"].get("config"), dict):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UntrustedFileError(f"{what}{path} is not {CHECKPOINT_LAYOUT}; it holds {found}. Official weights "
                                 "load with visgen.load_official or start a run with model.init_from=<file>")
    checkpoint["visgen"]["source"] = f"{what}{path}"  # names the file in later errors (not saved anywhere)
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


def _source(checkpoint: dict[str, Any]) -> str:
    return checkpoint["visgen"].get("source", "checkpoint")


def load_net(checkpoint: dict[str, Any], use_ema: bool = True) -> nn.Module:
    """Build `config.model.net` (visgen nn.Modules only) and load its weights strictly (every key used,
    shapes checked)."""
    net = instantiate_untrusted(checkpoint_config(checkpoint).model.net, "net", _source(checkpoint), "model.net")
    net.load_state_dict(net_state_dict(checkpoint, use_ema), strict=True)
    log.info("loaded %s weights (%s parameters)", "EMA" if use_ema else "raw",
             f"{sum(p.numel() for p in net.parameters()):,}")
    return net.eval()


def load_tokenizer(checkpoint: dict[str, Any]) -> Tokenizer:
    """Build `config.model.tokenizer` (visgen Tokenizers only); frozen weights load from its own source."""
    return instantiate_untrusted(checkpoint_config(checkpoint).model.tokenizer, "tokenizer", _source(checkpoint),
                                 "model.tokenizer")
