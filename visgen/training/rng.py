"""Per-rank RNG state capture and restore, so a resumed run draws the same noise as a straight one."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["capture_rng_states", "restore_rng_state"]


def _numpy_state_to_safe(state: tuple) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _local_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state as plain types and a tensor, so checkpoints load with weights_only=True
        "numpy": _numpy_state_to_safe(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def capture_rng_states() -> list[dict[str, Any]]:
    """RNG states of every rank, indexed by global rank (a collective call under DDP/FSDP)."""
    local = _local_state()
    if dist.is_available() and dist.is_initialized():
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, local)
        return states
    return [local]


def restore_rng_state(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's python, numpy, torch (and CUDA) generators from `states[rank]`."""
    if rank >= len(states):
        raise RuntimeError(
            f"checkpoint holds RNG states of {len(states)} ranks, this is rank {rank}; resuming on more "
            "ranks than the run was saved with is statistically equivalent but not bitwise exact"
        )
    state = states[rank]
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
