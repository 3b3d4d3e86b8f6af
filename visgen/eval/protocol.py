"""The protocol card: everything a reviewer needs to know about how an evaluation number was made.

Saved as `metrics.json["protocol"]` and printed next to the numbers by every evaluation: the model and checkpoint
(path, sha256, step, EMA or not), the sampler and every setting it was built with (steps, CFG scale, guided
channels and interval, temperature / top-k / top-p where the sampler has them), the label protocol, quantisation
and resize, sample count, seed, per-device batch, world size, sampling dtype and TF32, the tokenizer id, the
reference file and its sha256, the feature extractors and their weights' hashes, the metric settings, and the
software (visgen commit, library versions, device).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

__all__ = ["software_versions", "git_state", "sampler_summary", "print_card", "SAMPLER_HIGHLIGHTS"]

#: Sampler settings shown first on the card when the sampler has them (all of its settings are recorded).
SAMPLER_HIGHLIGHTS = ("num_steps", "method", "cfg_scale", "guided_channels", "guidance_interval", "cfg_schedule",
                      "temperature", "top_k", "top_p", "respacing", "time_shift")


def git_state() -> dict[str, Any]:
    """visgen's commit and whether the working tree differs from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def software_versions(device: torch.device) -> dict[str, Any]:
    """Library versions and the device that computed the samples and features."""
    import numpy
    import timm
    import torch_fidelity

    info: dict[str, Any] = {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
                            "timm": timm.__version__, "numpy": numpy.__version__, **git_state()}
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def sampler_summary(sampling: dict[str, Any]) -> dict[str, Any]:
    """The sampler's class and settings: highlighted keys first, the model-bound process summarised."""
    target = str(sampling.get("_target_", "?"))
    summary: dict[str, Any] = {"class": target.rsplit(".", 1)[-1], "target": target}
    for key in SAMPLER_HIGHLIGHTS:
        if key in sampling:
            summary[key] = sampling[key]
    for key, value in sampling.items():
        if key in summary or key == "_target_":
            continue
        if isinstance(value, dict):  # the model's diffusion / interpolant: recorded without its class path
            value = {k: v for k, v in value.items() if k != "_target_"}
        summary[key] = value
    return summary


def _lines(prefix: str, node: Any) -> list[tuple[str, str]]:
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out += _lines(f"{prefix}.{key}" if prefix else str(key), value)
        return out
    return [(prefix, str(node))]


def print_card(protocol: dict[str, Any], metrics: dict[str, Any], out_dir: Path) -> None:
    """Print the numbers and, below them, how they were made."""
    console = Console()
    numbers = Table(title=f"visgen evaluate: {out_dir}")
    numbers.add_column("metric")
    numbers.add_column("value", justify="right")
    for name, value in metrics.items():
        if name != "protocol" and not isinstance(value, (dict, list)):
            numbers.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(numbers)
    card = Table(title="protocol", show_header=False)
    card.add_column("key", style="dim")
    card.add_column("value", overflow="fold")
    for key, value in _lines("", protocol):
        card.add_row(key, value)
    console.print(card)
