"""Every missing input of a run, found at once before anything is built or written (issue 12.3).

Building the model and data one after another stopped at the first missing piece, after the slowest checks: a
run with no shards and no local SD-VAE retried the hub five times (~25 s) and then named only the VAE. Here the
cheap file checks come first (shards, data cache, weights files), then the hub, which is asked only when a hub
name is neither a local directory nor in the local Hugging Face cache, and only with one quick connection try.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from visgen.errors import ConfigValueError, MissingInputError

log = logging.getLogger(__name__)

__all__ = ["missing_inputs", "check_inputs", "check_trainer_keys", "HUB_HOST"]

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0


def _value(node: Any, key: str) -> Any:
    """node[key], None when absent or `???` (a mandatory value Hydra reports by itself)."""
    if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
        return None
    return node[key]


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.isabs(name) or name.count("/") != 1


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str, subfolder: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo_id, name if not subfolder else f"{subfolder}/{name}"), str):
            return True
    return False


def _hub_reachable() -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _weight_files(node: Any, where: str) -> list[tuple[str, str]]:
    """(config key, path) of every `weights:` file below `node` (REPA's encoders, online FID's Inception)."""
    found: list[tuple[str, str]] = []
    if isinstance(node, DictConfig):
        for key in node:
            if OmegaConf.is_missing(node, key):
                continue
            child = node[key]
            if key in ("weights", "inception_weights") and isinstance(child, str):
                found.append((f"{where}.{key}", child))
            else:
                found += _weight_files(child, f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for index, child in enumerate(node):
            found += _weight_files(child, f"{where}[{index}]")
    return found


def missing_inputs(cfg: DictConfig) -> list[str]:
    """One line per input the run names but cannot have, cheapest checks first; empty when all are there."""
    from visgen.data.stream import expand_shard_spec

    problems: list[str] = []
    data = cfg.get("data")
    for key in ("train_shards", "val_shards"):
        spec = _value(data, key)
        if spec:
            try:
                expand_shard_spec(spec)
            except (FileNotFoundError, ValueError) as err:
                problems.append(f"data.{key}: {str(err).split('; ')[0]}")
    cache_dir = _value(data, "cache_dir")
    if cache_dir and not (Path(cache_dir) / "cache.json").is_file():
        problems.append(f"data.cache_dir: no cache.json in {cache_dir} (write the cache first: python -m "
                        "visgen.data.cache, README 'ImageNet: shards, verification, cached latents')")
    model = cfg.get("model")
    init_from = _value(model, "init_from")
    if init_from and not Path(init_from).expanduser().exists():
        problems.append(f"model.init_from: no file {init_from}")
    for key, path in _weight_files(model, "model") + _weight_files(cfg.get("callbacks"), "callbacks"):
        if not Path(path).expanduser().exists():
            problems.append(f"{key}: no file {path}")
    tokenizer = _value(model, "tokenizer")
    pretrained = _value(tokenizer, "pretrained")
    if isinstance(pretrained, str) and pretrained:
        if Path(pretrained).expanduser().exists():
            pass
        elif _looks_like_path(pretrained):
            problems.append(f"model.tokenizer.pretrained: no file or directory {pretrained}")
        elif _in_hub_cache(pretrained, _value(tokenizer, "subfolder")):
            if not _hub_offline() and not _hub_reachable():
                # diffusers would ask the unreachable hub for updates first, retrying for ~25 s
                os.environ["HF_HUB_OFFLINE"] = "1"
                log.warning("%s cannot be reached: %s is loaded from the local Hugging Face cache only "
                            "(HF_HUB_OFFLINE=1 for this run)", HUB_HOST[0], pretrained)
        else:
            if _hub_offline():
                problems.append(f"model.tokenizer.pretrained: {pretrained} is not in the local Hugging Face cache and "
                                "HF_HUB_OFFLINE is set; download it where there is internet (`hf download "
                                f"{pretrained} --local-dir <dir>`) and set model.tokenizer.pretrained=<dir>")
            elif not _hub_reachable():
                problems.append(f"model.tokenizer.pretrained: {pretrained} is not in the local Hugging Face cache and "
                                f"{HUB_HOST[0]} cannot be reached; download it where there is internet (`hf download "
                                f"{pretrained} --local-dir <dir>`) and set model.tokenizer.pretrained=<dir>")
    return problems


def check_inputs(cfg: DictConfig) -> None:
    """Raise one MissingInputError naming every missing input of the run (nothing is built or written before)."""
    problems = missing_inputs(cfg)
    if problems:
        raise MissingInputError(f"{len(problems)} input(s) of this run are missing: " + " | ".join(problems))


def check_trainer_keys(trainer_cfg: DictConfig) -> None:
    """Refuse a `trainer.<key>` that Lightning's Trainer does not take, with close matches. Hydra's own hint for a
    typo (`+trainer.max_stepz=5` "to append") leads past struct mode to a late TypeError in Trainer.__init__."""
    import difflib
    import inspect

    import lightning as L

    if trainer_cfg.get("_target_") not in ("lightning.pytorch.Trainer", "lightning.Trainer"):
        return
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in trainer_cfg:
        if str(key).startswith("_") or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), sorted(accepted), n=3)
        hint = f"did you mean {', '.join('trainer.' + c for c in close)}?" if close else "see Lightning's Trainer"
        raise ConfigValueError(f"trainer.{key} is not a setting of Lightning's Trainer; {hint}")
