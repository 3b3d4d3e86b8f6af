"""The learning-rate multiplier: linear warmup, then constant, cosine or warmup-stable-decay (wsd)."""

from __future__ import annotations

import math

import pytest

from tests.tiny_run import compose_train
from visgen.training.module import lr_multiplier
from visgen.training.train import train


def test_warmup_is_linear_from_the_first_step() -> None:
    """Step k of a W-step warmup runs at (k + 1) / W of the peak, whatever the schedule after it."""
    for schedule in ("constant", "cosine", "wsd"):
        values = [lr_multiplier(k, 4, 100, schedule, 0.0, cooldown_fraction=0.1) for k in range(4)]
        assert values == [0.25, 0.5, 0.75, 1.0]


def test_cosine_reaches_min_ratio_at_total_steps() -> None:
    """Cosine: the peak right after warmup, the mean of peak and floor halfway, the floor at total_steps."""
    assert lr_multiplier(10, 10, 110, "cosine", 0.1) == 1.0
    assert math.isclose(lr_multiplier(60, 10, 110, "cosine", 0.1), 0.55)
    assert math.isclose(lr_multiplier(110, 10, 110, "cosine", 0.1), 0.1)


def test_wsd_is_constant_then_linear_over_the_cooldown() -> None:
    """wsd: the peak until the last cooldown_fraction of total_steps, then a straight line to min_ratio."""
    total, cooldown = 3000, 0.3  # the last 900 steps
    assert lr_multiplier(2100, 100, total, "wsd", 0.0, cooldown) == 1.0
    assert math.isclose(lr_multiplier(2550, 100, total, "wsd", 0.0, cooldown), 0.5)
    assert math.isclose(lr_multiplier(2325, 100, total, "wsd", 0.2, cooldown), 0.2 + 0.8 * 0.75)
    assert lr_multiplier(total, 100, total, "wsd", 0.0, cooldown) == 0.0


def test_bad_schedules_are_refused_with_the_config_key() -> None:
    """An unknown schedule, or wsd without a cooldown, names model.optimizer's key to set."""
    with pytest.raises(ValueError, match="model.optimizer.schedule"):
        lr_multiplier(0, 0, 10, "linear")
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="cooldown_fraction"):
            lr_multiplier(0, 0, 10, "wsd", cooldown_fraction=fraction)


@pytest.mark.parametrize(("override", "message"), [
    ("model.optimizer.lr=-1", "model.optimizer.lr=-1 must be >= 0"),
    ("model.optimizer.betas=[0.9,1.5]", r"model.optimizer.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("model.optimizer.warmup_steps=-5", "model.optimizer.warmup_steps=-5 must be >= 0"),
    ("callbacks.sample_grid.num_images=0", r"callbacks.sample_grid: every_n_steps=4 must be >= 0 .* num_images=0 >= 1"),
    ("+trainer.max_stepz=5", r"trainer.max_stepz is not a setting of Lightning's Trainer; did you mean trainer.max_st"),
])
def test_a_setting_that_cannot_work_is_named_before_training(tmp_path, digits_dir, override, message):
    from visgen.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match=message):
        train(compose_train(tmp_path / "run", digits_dir, override))
    assert not (tmp_path / "run" / "run.json").exists()
