"""Resume from a step checkpoint in the middle of an epoch is bitwise exact: net, EMA, optimizer and logged steps."""

import torch

from tests.tiny_run import compose_train, metric_rows
from visgen.training.train import train

# every_n_train_steps alone (no every_n_epochs=null needed): 8 steps per epoch, so step 4 is mid-epoch
EVERY_2_STEPS = ["trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=2",
                 "callbacks.model_checkpoint.save_top_k=-1", "callbacks.sample_grid.every_n_steps=0",
                 "trainer.limit_val_batches=0"]


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
    assert a["global_step"] == b["global_step"] == 10  # through the end of the resumed epoch (8) into the next
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert metric_rows(resumed) == metric_rows(straight, min_step=4)  # logged under the same steps
    # the EMA moved since step 4 (so the comparison above could see one update missing)
    assert not torch.equal(step_4["state_dict"]["ema.final_layer.linear.weight"],
                           a["state_dict"]["ema.final_layer.linear.weight"])
