"""Online FID: logged at the configured step of a tiny run, from the EMA net, without touching the global RNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval.fakes import write_random_inception_weights
from tests.tiny_run import compose_train
from visgen.training.online_fid import OnlineFID
from visgen.training.train import train


class RecordingOnlineFID(OnlineFID):
    """Records the global RNG state around each measurement and the numbers it returned."""

    calls: list = []

    def measure(self, trainer, pl_module):  # noqa: ANN001, ANN201 - test double
        before = torch.get_rng_state()
        metrics = super().measure(trainer, pl_module)
        RecordingOnlineFID.calls.append((trainer.global_step, torch.equal(before, torch.get_rng_state()), metrics))
        return metrics


def test_online_fid_is_logged_from_the_ema_every_n_steps(tmp_path: Path, digits_dir: Path) -> None:
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", mu=rng.normal(size=2048), sigma=np.eye(2048))
    run = tmp_path / "run"
    cfg = compose_train(run, digits_dir, "trainer.max_steps=8", "callbacks=online_fid",
                        "callbacks.online_fid._target_=tests.training.test_online_fid.RecordingOnlineFID",
                        "callbacks.online_fid.every_n_steps=8", "callbacks.online_fid.num_samples=4",
                        "callbacks.online_fid.batch_size=4", "callbacks.online_fid.is_splits=2",
                        f"callbacks.online_fid.reference={tmp_path / 'ref.npz'}",
                        f"callbacks.online_fid.inception_weights={weights}",
                        "callbacks.online_fid.inception_sha256=null")
    RecordingOnlineFID.calls = []
    train(cfg)
    assert [(step, rng_untouched) for step, rng_untouched, _ in RecordingOnlineFID.calls] == [(8, True)]
    rows = list(csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv")))))
    logged = [r for r in rows if r.get("online/fid4")]
    assert len(logged) == 1 and logged[0]["step"] == "8"
    fid, is_mean = float(logged[0]["online/fid4"]), float(logged[0]["online/is4"])
    assert fid == pytest.approx(RecordingOnlineFID.calls[0][2]["online/fid4"]) and fid > 0
    assert 1.0 <= is_mean <= 2.0  # between 1 and the 2 samples of each split


def test_online_fid_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match="need more samples"):
        OnlineFID(reference="r.npz", inception_weights="w.pth", num_samples=5)
