"""Checkpoint writes are atomic: a write that dies half-way leaves the previous file intact."""

import fsspec.implementations.local as fs_local
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def test_a_checkpoint_write_killed_mid_way_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = TorchCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    original_write = fs_local.LocalFileOpener.write

    def write_half_then_die(self, data):
        original_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(fs_local.LocalFileOpener, "write", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
