"""Resume from a step checkpoint in the middle of an epoch is bitwise exact, EMA included, and checkpoints are
written beside their final name (never staged in `$TMPDIR`)."""

import tempfile

import pytest
import torch

from tests.tiny_run import compose_train, metric_rows
from visgen.training.callbacks import AtomicCheckpointIO
from visgen.training.train import train

# every_n_train_steps alone (no every_n_epochs=null needed): 8 steps per epoch, so step 4 is mid-epoch
EVERY_2_STEPS = ["trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
                 "callbacks.sample_grid.every_n_steps=0", "trainer.limit_val_batches=0"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_mid_epoch_resume_from_a_step_checkpoint_is_bitwise_for_net_ema_and_optimizer(tmp_path, digits_dir):
    straight = tmp_path / "straight"
    train(compose_train(straight, digits_dir, *EVERY_2_STEPS))
    step_4 = load(straight / "checkpoints" / "step_0000004.ckpt")
    assert step_4["global_step"] == 4 and step_4["visgen"]["ema_step"] == 4  # this step's EMA, not step 3's

    resumed = tmp_path / "resumed"
    train(compose_train(resumed, digits_dir, *EVERY_2_STEPS, f"ckpt_path={straight / 'checkpoints'}/step_0000004.ckpt"))
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert metric_rows(resumed) == metric_rows(straight, min_step=4)  # logged under the same steps
    # the EMA moved in the last 2 steps (so the comparison above could see one update missing)
    assert not torch.equal(step_4["state_dict"]["ema.final_layer.linear.weight"],
                           a["state_dict"]["ema.final_layer.linear.weight"])


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
