"""Preemption loses at most the step in flight (issue 11.2): real SIGTERM / SIGUSR1 during a tiny run save
`preempted_step_N.ckpt` and exit 128 + signal; under a simulated SLURM job SIGUSR1 also requeues (a stub `scontrol`
records the call) and the requeued start resumes from that checkpoint, equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.tiny_run import compose_train
from visgen.training.run import newest_checkpoint
from visgen.training.train import train


class SendSignal(L.Callback):
    """Sends `signum` to this very process when the batch of optimizer step `at_step` starts (a real signal,
    delivered while the step runs, as SLURM's would be)."""

    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step, self.sent = int(signum), at_step, False

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _signal_at(signum: int, step: int) -> list[str]:
    return ["+callbacks.signal._target_=tests.reliability.test_preemption.SendSignal",
            f"+callbacks.signal.signum={int(signum)}", f"+callbacks.signal.at_step={step}"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """SLURM_JOB_ID set and a `scontrol` on PATH that appends its arguments to a file."""
    calls = tmp_path / "scontrol_calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return calls


def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_start_resumes_exactly(tmp_path, digits_dir,
                                                                                  fake_slurm, monkeypatch):
    straight = tmp_path / "straight"
    train(compose_train(straight, digits_dir, "trainer.max_steps=8"))

    run = tmp_path / "preempted"
    # Checkpoints only at the end of the epoch (step 8): without the preemption checkpoint all would be lost.
    with pytest.raises(SystemExit) as exited:
        train(compose_train(run, digits_dir, "trainer.max_steps=8", *_signal_at(signal.SIGUSR1, 5)))
    assert exited.value.code == 128 + signal.SIGUSR1
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["preempted_step_0000006.ckpt"]
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handlers restored after the run

    # The requeued job: same command line (no ckpt_path), SLURM_RESTART_COUNT=1 -> resume from the newest.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_train(run, digits_dir, "trainer.max_steps=8"))
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # net and EMA
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_sigterm_saves_and_exits_non_zero_without_requeueing(tmp_path, digits_dir, fake_slurm):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        train(compose_train(run, digits_dir, "trainer.max_steps=8", *_signal_at(signal.SIGTERM, 2)))
    assert exited.value.code == 128 + signal.SIGTERM
    assert not fake_slurm.exists()  # scancel / SLURM's own preemption: no requeue from visgen
    saved = load(run / "checkpoints" / "preempted_step_0000003.ckpt")
    assert saved["global_step"] == 3
    assert newest_checkpoint(run).name == "preempted_step_0000003.ckpt"


def test_a_broken_handler_that_only_exits_loses_the_steps(tmp_path, digits_dir, monkeypatch):
    """The broken variant: without the preemption checkpoint (Lightning's plain SIGTERM handling), the same
    signal leaves nothing to resume from."""
    from visgen.training import preemption

    monkeypatch.setattr(preemption.PreemptionCheckpoint, "on_train_start", lambda *args: None)
    run = tmp_path / "run"
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with pytest.raises(SIGTERMException):  # Lightning's own SIGTERM path: it stops, and saves nothing
        train(compose_train(run, digits_dir, "trainer.max_steps=8", *_signal_at(signal.SIGTERM, 2)))
    assert newest_checkpoint(run) is None
