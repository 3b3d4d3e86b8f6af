"""train.py as users type it: a local multirun sweep lands in one run dir per job, named by its overrides."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_multirun_sweep_writes_one_run_dir_per_job(tmp_path, digits_dir):
    cmd = [sys.executable, "train.py", "-m", "experiment=demo_sit", "data.num_train_samples=256", "model.net.depth=1",
           "trainer.max_steps=2", "trainer.limit_val_batches=0", "callbacks.sample_grid.every_n_steps=0",
           f"paths.data_dir={digits_dir}", f"paths.log_dir={tmp_path}", "model.optimizer.lr=1e-4,3e-4"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.parent.name for p in tmp_path.glob("demo_sit/*/checkpoints/last.ckpt"))
    # the job's override string names its run dir (paths.* and the experiment are left out of it)
    prefix = "callbacks.sample_grid.every_n_steps=0,data.num_train_samples=256,model.net.depth=1,model.optimizer.lr="
    suffix = ",trainer.limit_val_batches=0,trainer.max_steps=2"
    assert runs == [f"{prefix}0.0001{suffix}", f"{prefix}0.0003{suffix}"], runs
