"""A checkpoint of another run does not resume: experiment, paradigm, net, tokenizer and data shape must match,
and the error names both sides. Nothing of the refused start is written."""

import pytest

from tests.reliability.crafted import payload, write_checkpoint
from tests.tiny_run import compose_train
from visgen.training.run import ResumeMismatchError
from visgen.training.train import train


def _as_dit(config: dict) -> None:
    config["model"]["_target_"] = "visgen.paradigms.dit.DiTDiffusion"  # same net shapes, another paradigm


def test_a_checkpoint_of_another_paradigm_is_refused_naming_both(tmp_path, digits_dir):
    ckpt = write_checkpoint(tmp_path / "dit.ckpt", digits_dir, _as_dit, experiment="demo_dit")
    run = tmp_path / "run"
    with pytest.raises(ResumeMismatchError) as caught:
        train(compose_train(run, digits_dir, f"ckpt_path={ckpt}"))
    message = str(caught.value)
    # (under train.py, where Hydra knows the experiment, it also says "experiment: checkpoint demo_dit, this run
    # demo_sit"; composed configs in tests carry no experiment name)
    assert "model._target_: checkpoint 'visgen.paradigms.dit.DiTDiffusion', this run 'visgen.paradigms.sit.SiT'" \
        in message
    assert "resume_from_other_run=true" in message and "model.init_from" in message
    assert not (run / "run.json").exists() and not (run / "checkpoints").exists()


def test_another_net_shape_is_named_key_by_key_and_a_crafted_net_never_builds(tmp_path, digits_dir):
    wide = write_checkpoint(tmp_path / "wide.ckpt", digits_dir, None, "model.net.hidden_size=64")
    with pytest.raises(ResumeMismatchError, match="model.net.hidden_size: checkpoint 64, this run 32"):
        train(compose_train(tmp_path / "run", digits_dir, f"ckpt_path={wide}"))
    pwned = tmp_path / "evil.pth"
    crafted = write_checkpoint(tmp_path / "crafted.ckpt", digits_dir,
                               lambda c: c["model"].__setitem__("net", payload(pwned)))
    with pytest.raises(ResumeMismatchError, match="model.net._target_: checkpoint 'numpy.savetxt'"):
        train(compose_train(tmp_path / "run", digits_dir, f"ckpt_path={crafted}"))
    assert not pwned.exists()
