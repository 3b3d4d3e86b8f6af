"""The run directory: the checkpoint `ckpt_path=last` resumes from, and records only for starts that trained."""

import time

import pytest
import torch

from tests.tiny_run import compose_train
from visgen.training.train import train


def test_newest_checkpoint_orders_by_step_and_reads_old_names(tmp_path):
    from visgen.training.run import newest_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    assert newest_checkpoint(tmp_path) is None
    for name in ["step_0000900.ckpt", "step=0001000.ckpt", "step_0000140.ckpt", "other.ckpt"]:
        (ckpt_dir / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step=0001000.ckpt"  # runs from before the rename still resume
    (ckpt_dir / "step_0001120.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step_0001120.ckpt"


def test_newest_checkpoint_takes_a_newer_preemption_checkpoint_and_prefers_the_regular_one_on_a_tie(tmp_path):
    from visgen.training.run import newest_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "last.ckpt"  # only when nothing names its step
    for name in ["step_0000200.ckpt", "preempted_step_0000250.ckpt"]:
        (ckpt_dir / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "preempted_step_0000250.ckpt"  # not last.ckpt -> step 200
    (ckpt_dir / "step_0000250.ckpt").write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "step_0000250.ckpt"


def _files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def test_a_failed_start_leaves_the_run_dir_free_for_the_corrected_command(tmp_path, digits_dir):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="matched no files"):
        train(compose_train(run, digits_dir, "trainer.max_steps=1", f"data.train_shards={tmp_path}/typo.tar"))
    assert not [name for name in _files(run) if name != "train.log"]  # no run.json, config.yaml, csv/version_0
    train(compose_train(run, digits_dir, "trainer.max_steps=1"))  # the corrected command, as typed
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert (run / "run.json").exists()


def test_resuming_a_finished_run_records_no_start(tmp_path, digits_dir):
    run = tmp_path / "run"
    train(compose_train(run, digits_dir, "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"))
    before = _files(run)
    train(compose_train(run, digits_dir, "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0",
                        "ckpt_path=last"))
    assert _files(run) == before  # no run.resume1.json, no empty csv/version_1


def test_every_missing_input_is_named_at_once_before_anything_is_built(tmp_path, digits_dir):
    from visgen.errors import MissingInputError

    run = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(MissingInputError) as caught:  # HF_HUB_OFFLINE=1 (conftest): the hub is never asked
        train(compose_train(run, digits_dir, f"data.train_shards={tmp_path}/train.tar", "model/tokenizer=sd_vae_ema",
                            f"model.init_from={tmp_path}/dit.pt"))
    message = str(caught.value)
    assert message.startswith("3 input(s) of this run are missing")
    assert f"data.train_shards: shard spec '{tmp_path}/train.tar' matched no files" in message
    assert f"model.init_from: no file {tmp_path}/dit.pt" in message
    assert "model.tokenizer.pretrained: stabilityai/sd-vae-ft-ema is not in the local Hugging Face cache" in message
    assert time.monotonic() - start < 10 and not run.exists()


def test_a_start_that_fails_in_its_first_step_leaves_the_run_dir_free(tmp_path, digits_dir, monkeypatch):
    from visgen.errors import ConfigValueError
    from visgen.paradigms.sit import SiT

    def bad_first_batch(self, net, batch, generator=None):  # as a label or size error found in the first batch
        raise ConfigValueError("label 12 outside [0, 10) in shard digits-train-000003.tar")

    monkeypatch.setattr(SiT, "loss", bad_first_batch)
    run = tmp_path / "run"
    with pytest.raises(ConfigValueError, match="label 12"):
        train(compose_train(run, digits_dir, "trainer.max_steps=1"))
    assert _files(run) == []  # no run.json, config.yaml, csv/version_0 (its lr row of a step that never ran)
