"""Shared fixtures. Nothing in the tests reaches the network."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A data dir holding the built-in digit shards (`<dir>/digits/`), written once per session."""
    from visgen.data.builtin import write_builtin_shards

    root = tmp_path_factory.mktemp("data")
    write_builtin_shards(root / "digits")
    return root
