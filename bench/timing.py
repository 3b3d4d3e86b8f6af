"""What every bench shares: wait for the device before reading the clock (CUDA runs asynchronously).

Benches run as scripts (`python bench/<name>.py`), so this folder is on `sys.path` and they `from timing import
sync`.
"""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Block until `device` has finished its queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
