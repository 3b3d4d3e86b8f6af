"""The run directory: refusal of an occupied dir, resume resolution, and the run's provenance.

Convention: one run = one directory `${paths.log_dir}/${run_name}`, the same on every rank and
across SLURM requeues. A fresh start into a directory that already holds a run is refused;
`ckpt_path=last` resumes from its newest checkpoint (or starts fresh when it has none), so one
sbatch line serves both the first start and every requeue.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["RunDirOccupiedError", "resolve_resume", "collect_provenance", "write_run_files", "PACKAGES"]

#: Packages whose versions go into every run dir and checkpoint.
PACKAGES = ("torch", "lightning", "hydra-core", "webdataset", "timm", "diffusers", "torchmetrics", "numpy", "visgen")
RUN_MARKER = "run.json"


class RunDirOccupiedError(RuntimeError):
    """A fresh run was pointed at a directory that already holds one."""


def _checkpoints(run_dir: Path) -> list[Path]:
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """`last.ckpt` when present (a link to the newest), else the newest `step_*.ckpt` by step.

    Runs written before the rename carry `step=*.ckpt` names; they still resume.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    steps = [p for p in _checkpoints(run_dir) if re.fullmatch(r"step[_=]\d+", p.stem)]
    return max(steps, key=lambda p: int(p.stem[len("step_"):]), default=None)


def resolve_resume(run_dir: Path, ckpt_path: str | None, refuse_occupied: bool = True) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to start over an old run."""
    if ckpt_path == "last":
        return newest_checkpoint(run_dir)
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; pass a .ckpt file or ckpt_path=last")
        return path
    if refuse_occupied and ((run_dir / RUN_MARKER).exists() or _checkpoints(run_dir)):
        raise RunDirOccupiedError(
            f"run dir {run_dir} already holds a run (run.json/checkpoints); refusing to overwrite it. "
            "Resume it with ckpt_path=last, or start a new run with run_name=<new name>."
        )
    return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def collect_provenance(cfg: DictConfig) -> dict[str, Any]:
    """Config, seed, git commit and diff, package versions, command line: what reproduces a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": int(cfg.seed),
        "git_commit": _git("rev-parse", "HEAD").strip() or None,
        "git_diff": _git("diff", "HEAD"),
        "versions": versions,
        "python": platform.python_version(),
        "argv": list(sys.argv),
    }


def write_run_files(run_dir: Path, provenance: dict[str, Any], resumed_from: Path | None) -> None:
    """Rank 0 only: write config.yaml, git.diff and run.json; on resume keep the originals and add a
    numbered copy of any config that differs, so nothing of the first start is overwritten."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(provenance["config"]))
    meta = {k: v for k, v in provenance.items() if k not in ("config", "git_diff")}
    if resumed_from is None or not (run_dir / RUN_MARKER).exists():
        (run_dir / "config.yaml").write_text(config_yaml)
        (run_dir / "git.diff").write_text(provenance["git_diff"])
        (run_dir / RUN_MARKER).write_text(json.dumps({**meta, "starts": [str(resumed_from or "fresh")]}, indent=2))
        return
    starts = len(list(run_dir.glob("run.resume*.json"))) + 1
    if (run_dir / "config.yaml").read_text() != config_yaml:
        (run_dir / f"config.resume{starts}.yaml").write_text(config_yaml)
    (run_dir / f"run.resume{starts}.json").write_text(json.dumps({**meta, "resumed_from": str(resumed_from)},
                                                                   indent=2))
