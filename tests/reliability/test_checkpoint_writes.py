"""Checkpoint writes: beside their final name and renamed (never staged in `$TMPDIR`, which may be another
filesystem), so a kill -9 at any moment or a full disk leaves the previous checkpoint complete under its name."""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from visgen.training.callbacks import AtomicCheckpointIO, CheckpointWriteError


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# Writes 8 MB checkpoints in a loop; each holds its index twice, so a file mixing two writes is detected.
WRITER = """
import sys, torch
from visgen.training.callbacks import AtomicCheckpointIO
io = AtomicCheckpointIO()
for i in range(10_000):
    io.save_checkpoint({"i": i, "w": torch.full((2_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_9_during_checkpoint_writes_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    scratch = tmp_path / "node_local_tmp"  # $TMPDIR elsewhere: must stay unused
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.getcwd()}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env, stdout=subprocess.PIPE)
    assert writer.stdout.readline()  # one checkpoint is complete
    time.sleep(0.13)  # then kill it at some point of a later write (each takes ~20-50 ms here)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    checkpoint = load(target)
    assert torch.equal(checkpoint["w"], torch.full((2_000_000,), float(checkpoint["i"])))
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == ["last.ckpt"]
    assert not list(scratch.iterdir())
    AtomicCheckpointIO().save_checkpoint({"i": -1}, target)  # the next save removes a killed write's temp file
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_checkpoints_are_written_beside_their_name_and_a_killed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "checkpoints" / "step_0000008.ckpt"
    io.save_checkpoint({"step": 8, "w": torch.ones(1000)}, target)
    before = target.read_bytes()

    staged = []
    original_save = torch.save

    def save_then_die(obj, file, *args, **kwargs):  # the process is killed after part of the bytes went out
        staged.extend(p.name for p in target.parent.iterdir() if p != target)
        original_save({"w": torch.zeros(10)}, file)
        raise KeyboardInterrupt("killed mid-write")

    scratch = tmp_path / "node_local_tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # $TMPDIR elsewhere: must not be used
    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 12, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()

    assert len(staged) == 1 and staged[0].startswith(".step_0000008.ckpt.tmp")  # staged next to the target
    assert target.read_bytes() == before and not list(scratch.iterdir())
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_0000008.ckpt"]  # temp file removed
    io.save_checkpoint({"step": 12}, target)
    assert load(target) == {"step": 12}


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 8}, target)
    real_fdopen = os.fdopen

    class FullDisk:  # a file on a filesystem with 100 bytes left
        def __init__(self, fd, mode):
            self.file, self.written = real_fdopen(fd, mode), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(CheckpointWriteError, match="no space left to write checkpoint .*last.ckpt .*ckpt_path=last"):
        io.save_checkpoint({"step": 12, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert load(target) == {"step": 8} and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
