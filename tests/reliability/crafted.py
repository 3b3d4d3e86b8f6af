"""Checkpoints written by hand for the reliability tests: a real tiny config and net, with parts replaced."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.tiny_run import compose_train


def payload(target_file: Path) -> dict[str, Any]:
    """A config node that, if instantiated, writes `target_file` (a `.pth` in site-packages runs at start-up)."""
    return {"_target_": "numpy.savetxt", "fname": str(target_file), "X": [[1.0]]}


def write_checkpoint(path: Path, data_dir: Path, edit: Callable[[dict[str, Any]], None] | None = None,
                     *overrides: str, experiment: str = "demo_sit") -> Path:
    """A visgen-layout checkpoint of the tiny run's untrained net; `edit` changes its stored config in place."""
    cfg = compose_train(path.parent / "crafted_run", data_dir, *overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    net = instantiate(cfg.model.net)
    state = {f"{prefix}{k}": v for prefix in ("net.", "ema.") for k, v in net.state_dict().items()}
    if edit is not None:
        edit(config)
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0,
                "visgen": {"config": config, "experiment": experiment, "ema_prefix": "ema.", "tokenizer_id": "pixel",
                           "seed": 0}}, path)
    return path
