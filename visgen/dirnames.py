"""Folder names made from settings (sweep jobs, evaluation folders): always one path component that every
filesystem accepts, and still readable.

Hydra names a sweep job by its overrides (`model.optimizer.lr=0.0001,trainer.max_steps=2`). With a few long
values that string passes the 255-byte limit of a file name on ext4, XFS, Lustre and GPFS and the job dies with
`OSError: File name too long`; a value holding a `/` (a path) would nest folders. Light on imports: the sweep
resolver runs in Hydra's launcher before anything else is loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["MAX_NAME_BYTES", "safe_dir_name", "sweep_dir", "register_resolvers"]

#: The longest file or folder name of common Linux filesystems (ext4, XFS, Lustre, GPFS), in bytes.
MAX_NAME_BYTES = 255
_HASH_CHARS = 12


def safe_dir_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """`name` as one folder name of at most `max_bytes` UTF-8 bytes: `/` becomes `_`, and a name that is too long
    (or changed) keeps its readable start and ends in `~<12 hex of sha256(name)>`, so distinct names stay distinct.
    A name that needs neither comes back unchanged."""
    cleaned = name.replace("/", "_").replace("\0", "_")
    if cleaned == name and len(name.encode()) <= max_bytes and name not in (".", ".."):
        return name
    suffix = "~" + hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    head = cleaned.encode()[: max_bytes - len(suffix)].decode(errors="ignore")  # never half a character
    return head + suffix


def sweep_dir(log_dir: str, experiment: str, task_overrides: Sequence[str]) -> str:
    """The folder of a `-m` sweep: `<log_dir>/<run_name>` when the command sets `run_name=`, else
    `<log_dir>/<experiment>_sweep`, so sweep jobs never land inside the preset's own run dir."""
    name = f"{experiment}_sweep"
    for override in task_overrides:
        key, _, value = str(override).lstrip("+").partition("=")
        if key == "run_name" and value and "," not in value:  # a swept run_name names jobs, not the sweep
            name = value
    return f"{log_dir}/{safe_dir_name(name)}"


def register_resolvers() -> None:
    """`${visgen.sweep_dir:...}` and `${visgen.dir_name:...}` for conf/hydra/default.yaml (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("visgen.sweep_dir", sweep_dir, replace=True)
    OmegaConf.register_new_resolver("visgen.dir_name", safe_dir_name, replace=True)
