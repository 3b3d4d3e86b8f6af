"""train.py as users type it: a local multirun sweep lands in `<log_dir>/<run_name>/`, one subfolder per job named
by its overrides (made a safe folder name), and each job's progress is readable in its train.log and on stdout."""

import os
import subprocess
import sys
from pathlib import Path

from visgen.dirnames import safe_dir_name, sweep_dir

ROOT = Path(__file__).resolve().parents[2]


def test_multirun_sweep_writes_one_run_dir_per_job_under_its_run_name(tmp_path, digits_dir):
    note = "n" * 250  # a long override value: the job's folder name would pass the 255-byte limit
    cmd = [sys.executable, "train.py", "-m", "experiment=demo_sit", "run_name=lr_sweep", "data.num_train_samples=256",
           "model.net.depth=1", "trainer.max_steps=2", "trainer.limit_val_batches=0",
           "callbacks.sample_grid.every_n_steps=0", f"+note={note}", f"paths.data_dir={digits_dir}",
           f"paths.log_dir={tmp_path}", "model.optimizer.lr=1e-4,3e-4"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "demo_sit").exists()  # not inside the preset's own run dir
    jobs = sorted(p.parent.parent for p in tmp_path.glob("lr_sweep/*/checkpoints/last.ckpt"))
    names = [job.name for job in jobs]
    # each job's override string names its folder (paths.* and the experiment left out), cut to 255 bytes + a hash
    for name, lr in zip(names, ("0.0001", "0.0003"), strict=True):
        full = (f"+note={note},callbacks.sample_grid.every_n_steps=0,data.num_train_samples=256,model.net.depth=1,"
                f"model.optimizer.lr={lr},trainer.limit_val_batches=0,trainer.max_steps=2")
        assert name == safe_dir_name(full) and len(name.encode()) == 255 and name.startswith("+note=nnn"), name
    # progress of a run whose stdout is a pipe: plain lines, in stdout and in the job's train.log
    assert "step 2/2 (epoch " in result.stdout
    assert all("step 2/2 (epoch " in (job / "train.log").read_text() for job in jobs)
    output = result.stdout + result.stderr
    assert output.count("Seed set to 0") == 2  # once per job, not twice (Lightning's own stderr handler and Hydra's)
    for noise in ("LeafSpec", "module(s) in eval mode", "has `__len__` defined", "litlogger", "FLOPs", "v_num"):
        assert noise not in output, noise  # warnings that do not apply to a visgen run


def test_dir_names_stay_within_255_bytes_and_distinct():
    assert safe_dir_name("model.optimizer.lr=0.0001") == "model.optimizer.lr=0.0001"  # short names unchanged
    long_a, long_b = "a=" + "é" * 200 + "1", "a=" + "é" * 200 + "2"  # 2-byte characters: never cut in half
    short_a, short_b = safe_dir_name(long_a), safe_dir_name(long_b)
    assert len(short_a.encode()) <= 255 and short_a != short_b and short_a.startswith("a=éé")
    short_a.encode().decode()
    assert "/" not in safe_dir_name("model.init_from=/runs/a/last.ckpt")
    assert sweep_dir("logs", "demo_sit", ["experiment=demo_sit", "model.optimizer.lr=1e-4,3e-4"]) == \
        "logs/demo_sit_sweep"
    assert sweep_dir("logs", "demo_sit", ["run_name=again"]) == "logs/again"


def test_a_slurm_sweep_job_has_the_folder_resolvers_before_train_py_runs(tmp_path):
    """submitit pickles train.py's task function in the launcher and resolves the job's folder in the job process
    before calling it: unpickling alone must register `${visgen.sweep_dir:...}` and `${visgen.dir_name:...}`."""
    pickled = tmp_path / "task.pkl"
    launcher = ("import cloudpickle\nfrom visgen.errors import report_user_errors\n"
                "@report_user_errors\ndef main(cfg):\n    return cfg\n"
                f"open({str(pickled)!r}, 'wb').write(cloudpickle.dumps(main))\n")
    job = ("import pickle\nfrom omegaconf import OmegaConf\n"
           f"task = pickle.load(open({str(pickled)!r}, 'rb'))\n"
           "assert OmegaConf.has_resolver('visgen.sweep_dir') and OmegaConf.has_resolver('visgen.dir_name')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for script in (launcher, job):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
