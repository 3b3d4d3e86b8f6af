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

from visgen.errors import ConfigValueError, MissingInputError, UserError
from visgen.eval.sharded import is_sharded_checkpoint

__all__ = ["RunDirOccupiedError", "ResumeMismatchError", "resolve_resume", "check_resume_compatible",
           "collect_provenance", "write_run_files", "PACKAGES"]

#: Packages whose versions go into every run dir and checkpoint.
PACKAGES = ("torch", "lightning", "hydra-core", "webdataset", "timm", "diffusers", "torchmetrics", "numpy", "visgen")
RUN_MARKER = "run.json"


#: What must agree between a checkpoint and the run resuming it (README: "A checkpoint of another run").
RESUME_MUST_MATCH = ("model._target_", "model.net", "model.tokenizer", "data.image_size", "data.num_classes")


class RunDirOccupiedError(UserError, RuntimeError):
    """A fresh run was pointed at a directory that already holds one."""


class ResumeMismatchError(ConfigValueError):
    """`ckpt_path` names a checkpoint of another experiment, paradigm or net."""


def _checkpoints(run_dir: Path) -> list[Path]:
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("*.ckpt") if (p.is_file() or is_sharded_checkpoint(p))
                  and not p.name.startswith("."))


#: Checkpoint names that carry their step: `step_N` (ModelCheckpoint; `step=N` before the rename) and
#: `preempted_step_N` (PreemptionCheckpoint, on SIGTERM / SIGUSR1).
_STEP_NAME = re.compile(r"(?:preempted_)?step[_=](\d+)")


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint with the highest step, whichever wrote it (step, epoch end, preemption); on a tie the
    regular one. `last.ckpt` (a link to ModelCheckpoint's newest) only when no file carries its step in its name.
    """
    stepped = [(int(match.group(1)), p.name.startswith("preempted_"), p) for p in _checkpoints(run_dir)
               if (match := _STEP_NAME.fullmatch(p.stem))]
    if stepped:
        return max(stepped, key=lambda entry: (entry[0], not entry[1]))[2]
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.exists() else None


def resolve_resume(run_dir: Path, ckpt_path: str | None, refuse_occupied: bool = True) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; refuses to start over an old run."""
    if ckpt_path == "last":
        return newest_checkpoint(run_dir)
    if ckpt_path:
        path = Path(ckpt_path)
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise MissingInputError(f"ckpt_path={ckpt_path!r} is neither a .ckpt file nor a sharded checkpoint "
                                    "folder; pass one, or ckpt_path=last")
        return path
    if refuse_occupied and ((run_dir / RUN_MARKER).exists() or _checkpoints(run_dir)):
        raise RunDirOccupiedError(
            f"run dir {run_dir} already holds a run (run.json/checkpoints); refusing to overwrite it. "
            "Resume it with ckpt_path=last, or start a new run with run_name=<new name>."
        )
    return None


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts -> {"prefix.key.sub": leaf}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat


def _select(config: Any, dotted: str) -> Any:
    """`config["a"]["b"]` for "a.b" in plain nested dicts, "<absent>" where a key is missing."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return "<absent>"
        config = config[part]
    return config


def check_resume_compatible(checkpoint: dict[str, Any], source: str, config: dict[str, Any],
                            experiment: str | None) -> None:
    """Refuse to resume a checkpoint whose experiment, paradigm, net, tokenizer or data shape differ from this
    run's (`config` resolved); the error names both sides of up to 5 differences."""
    stored_config, stored_experiment = checkpoint["visgen"]["config"], checkpoint["visgen"].get("experiment")
    differences = []
    if stored_experiment and experiment and stored_experiment != experiment:
        differences.append(f"experiment: checkpoint {stored_experiment}, this run {experiment}")
    for key in RESUME_MUST_MATCH:
        theirs, mine = _flatten(_select(stored_config, key), key), _flatten(_select(config, key), key)
        for k in sorted(set(mine) | set(theirs)):
            ours, stored = mine.get(k, "<absent>"), theirs.get(k, "<absent>")
            if ours != stored:
                differences.append(f"{k}: checkpoint {stored!r}, this run {ours!r}")
    if differences:
        more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
        raise ResumeMismatchError(
            f"{source} is a checkpoint of another run: {'; '.join(differences[:5])}{more}. Resume it with the "
            "config it was trained with, start from its weights with model.init_from=<file> (fresh optimizer), "
            "or set resume_from_other_run=true if restoring its weights and optimizer here is intended")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def experiment_name() -> str | None:
    """The `experiment=` choice of the running Hydra app (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None


def collect_provenance(cfg: DictConfig) -> dict[str, Any]:
    """Config, experiment, seed, git commit and diff, package versions, command line: what reproduces a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "experiment": experiment_name(),
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
