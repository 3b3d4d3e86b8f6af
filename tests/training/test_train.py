"""Training end to end: exact resume, run-dir refusal, non-finite stop, checkpoint contents."""

import hashlib
import os

import pytest
import torch

from tests.tiny_run import STOP_AFTER_8_STEPS, compose_train, metric_rows
from visgen.paradigms.sit import SiT
from visgen.training.run import RunDirOccupiedError
from visgen.training.train import train


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, digits_dir):
    straight = tmp_path / "straight"
    train(compose_train(straight, digits_dir, "trainer.max_steps=16"))
    split = tmp_path / "split"
    # Stopped by a callback, not by max_steps=8: the lr schedule (wsd in demo_sit) depends on max_steps.
    train(compose_train(split, digits_dir, "trainer.max_steps=16", *STOP_AFTER_8_STEPS))
    assert load(split / "checkpoints" / "last.ckpt")["global_step"] == 8
    train(compose_train(split, digits_dir, "trainer.max_steps=16", "ckpt_path=last"))

    a, b = load(straight / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # training moved the weights, and the EMA differs from them
    assert not torch.equal(a["state_dict"]["net.final_layer.linear.weight"],
                           a["state_dict"]["ema.final_layer.linear.weight"])
    # the resumed start kept the first start's files and recorded itself
    assert (split / "run.resume1.json").exists() and (split / "config.yaml").exists()
    # its logs equal the uninterrupted run's row for row: no step late, no epoch-end row logged twice, one lr row
    # per step (not one per micro-batch)
    rows = metric_rows(straight)
    assert metric_rows(split) == rows
    assert [row["step"] for row in rows if "lr-AdamW/pg1" in row] == [str(step) for step in range(16)]


def test_checkpoint_carries_config_provenance_and_ema_under_documented_keys(tmp_path, digits_dir):
    run = tmp_path / "run"
    train(compose_train(run, digits_dir, "trainer.max_steps=8"))
    ckpt = load(run / "checkpoints" / "last.ckpt")
    meta = ckpt["visgen"]
    assert meta["config"]["model"]["net"]["hidden_size"] == 32
    assert meta["seed"] == 0 and meta["tokenizer_id"] == "pixel" and meta["ema_prefix"] == "ema."
    assert "torch" in meta["versions"] and "git_diff" in meta
    net_keys = {k[4:] for k in ckpt["state_dict"] if k.startswith("net.")}
    ema_keys = {k[4:] for k in ckpt["state_dict"] if k.startswith("ema.")}
    assert net_keys == ema_keys and "pos_embed" in ema_keys
    assert len(ckpt["rng_states"]) == 1
    assert (run / "samples" / "step_0000004.png").exists() and (run / "samples" / "step_0000008.png").exists()
    # Named without "=": `python evaluate.py ckpt=<run>/checkpoints/step_0000008.ckpt` must parse in Hydra.
    assert "step_0000008.ckpt" in os.listdir(run / "checkpoints")
    assert not [name for name in os.listdir(run / "checkpoints") if "=" in name]
    assert {"config.yaml", "run.json", "git.diff"} <= set(os.listdir(run))


def test_a_fresh_run_into_an_occupied_run_dir_is_refused(tmp_path, digits_dir):
    run = tmp_path / "run"
    train(compose_train(run, digits_dir, "trainer.max_steps=8"))
    before = (run / "config.yaml").read_text()
    with pytest.raises(RunDirOccupiedError, match="ckpt_path=last"):
        train(compose_train(run, digits_dir, "trainer.max_steps=8", "model.optimizer.lr=0.5"))
    assert (run / "config.yaml").read_text() == before


def test_resume_last_without_a_checkpoint_starts_fresh(tmp_path, digits_dir):
    run = tmp_path / "run"
    train(compose_train(run, digits_dir, "trainer.max_steps=2", "ckpt_path=last"))
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, digits_dir, monkeypatch):
    run = tmp_path / "run"
    train(compose_train(run, digits_dir, "trainer.max_steps=8"))
    last = run / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    original = SiT.loss

    def loss_turning_nan(self, net, batch, generator=None):
        value = original(self, net, batch, generator)
        return value * float("nan") if self.training and self.global_step >= 10 else value

    monkeypatch.setattr(SiT, "loss", loss_turning_nan)
    with pytest.raises(FloatingPointError, match="at step 10"):
        train(compose_train(run, digits_dir, "trainer.max_steps=24", "ckpt_path=last"))
    assert hashlib.sha256(last.resolve().read_bytes()).hexdigest() == digest
    assert load(last)["global_step"] == 8


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, digits_dir):
    source = tmp_path / "source"
    train(compose_train(source, digits_dir, "trainer.max_steps=8"))
    target = tmp_path / "target"
    # lr 0: one step leaves the weights exactly as loaded, so they must equal the source's
    train(compose_train(target, digits_dir, "trainer.max_steps=1", "model.optimizer.lr=0.0",
                        f"model.init_from={source / 'checkpoints' / 'last.ckpt'}"))
    a, b = load(source / "checkpoints" / "last.ckpt"), load(target / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 1  # a new run with a fresh optimizer, not a resume at step 8
    for key in (k for k in a["state_dict"] if k.startswith("net.")):
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
