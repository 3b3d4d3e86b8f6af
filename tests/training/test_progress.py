"""Progress in batch jobs: with stdout not a terminal (pytest captures it, as a file or SLURM would), a run logs
plain lines every N steps instead of drawing a bar; and the last step's metrics reach the CSV log."""

import logging
import re

from tests.tiny_run import compose_train, metric_rows
from visgen.training.train import train


def test_progress_is_logged_as_lines_when_stdout_is_not_a_terminal(tmp_path, digits_dir, caplog):
    caplog.set_level(logging.INFO, logger="visgen.training.callbacks")
    train(compose_train(tmp_path / "run", digits_dir, "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=0",
                        "+callbacks.progress_bar._target_=visgen.training.callbacks.progress_bar",
                        "+callbacks.progress_bar.every_n_steps=2", "trainer.log_every_n_steps=50"))
    lines = [r.getMessage() for r in caplog.records if r.name == "visgen.training.callbacks"]
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split(" ")[1] for line in step_lines] == ["2/3", "3/3"], lines  # every 2 steps and the end
    pattern = (r"step 2/3 \(epoch 0\) \| loss \d\.\d+ \| grad_norm \d+\.?\d* \| lr 0\.0012 \| [\d,]+ img/s \| "
               r"elapsed 0:00:\d\d \| ETA 0:00:\d\d")
    assert re.fullmatch(pattern, step_lines[0]), step_lines[0]
    assert "ETA" not in step_lines[-1]
    # a run shorter than trainer.log_every_n_steps still logs its last step's metrics
    assert [row["step"] for row in metric_rows(tmp_path / "run") if "train/loss" in row] == ["2"]
