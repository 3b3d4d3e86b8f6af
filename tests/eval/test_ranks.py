"""Ranks from the launcher: torchrun's and srun's variables, a batch script's lone process, `evaluate.py` on 2 ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.tiny_run import LAUNCHER_VARS
from visgen.eval.distributed import _from_env

ROOT = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    """This process's environment without any launcher's variables (the tests may run inside a SLURM job)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}


@pytest.fixture
def env(monkeypatch) -> pytest.MonkeyPatch:
    """No launcher variables; those `_from_env` sets (MASTER_ADDR/PORT) are removed again afterwards. (A leaked
    MASTER_PORT made every later multi-process job of the session share one port: EADDRINUSE.)"""
    for key in LAUNCHER_VARS:
        monkeypatch.setenv(key, "")  # records "absent" (or the old value) for teardown
        monkeypatch.delenv(key)
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_torchrun_variables_give_the_rank(env) -> None:
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                       "SLURM_STEP_NUM_TASKS": "2"}.items():
        env.setenv(key, value)
    assert _from_env() == (3, 8, 1, "torchrun")  # torchrun inside an srun step: torchrun's ranks


def test_srun_variables_give_the_rank_and_the_rendezvous(env) -> None:
    # what `srun -n 16` on 2 nodes gives the task with rank 9 (slurm-wlm 22.05, checked with a local cluster)
    for key, value in {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                       "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[012-013]",
                       "PATH": ""}.items():  # no scontrol: visgen's own node-list parser runs
        env.setenv(key, value)
    assert _from_env() == (9, 16, 1, "srun")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu012", str(20000 + 123456 % 20000))


def test_a_batch_scripts_own_process_is_one_rank(env) -> None:
    # the sbatch script itself (what runs `python evaluate.py` without srun): PROCID 0 and the allocation's
    # NTASKS, but no job step; taking NTASKS would leave this process waiting for 7 ranks nobody started
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}.items():
        env.setenv(key, value)
    assert _from_env() == (0, 1, 0, "single")
    assert "MASTER_PORT" not in os.environ


@pytest.mark.parametrize("variables, match", [
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
    ({"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}, "SLURM_PROCID='x'"),
])
def test_inconsistent_launcher_variables_are_refused(env, variables, match) -> None:
    for key, value in variables.items():
        env.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        _from_env()


def test_evaluate_on_two_srun_ranks_writes_the_bytes_of_one_process(tmp_path, tiny_checkpoint, digits_dir) -> None:
    """`srun -n 2 python evaluate.py ...` as SLURM starts it (its variables, gloo on CPU): the ranks split the
    chunks and rank 0 writes the samples.npz that one process writes."""
    from visgen.eval.evaluate import evaluate

    common = [f"ckpt={tiny_checkpoint}", "num_samples=6", "batch_size=2", "device=cpu", "progress=false",
              f"paths.cache_dir={digits_dir / 'cache'}", "labels=uniform"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(2):
        step = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "localhost",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, "evaluate.py", *common, f"out_dir={tmp_path / 'two'}"],
                                      cwd=ROOT, env={**_clean_env(), **step}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "evaluation rank 1 of 2 (srun, local rank 1)" in outputs[1], outputs[1][-3000:]
    card = json.loads((tmp_path / "two" / "metrics.json").read_text())["protocol"]["samples"]
    assert (card["world_size"], card["launcher"]) == (2, "srun")

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        one = compose("evaluate", overrides=[*common, f"out_dir={tmp_path / 'one'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' math (OMP_NUM_THREADS=1)
    try:
        assert evaluate(one)["protocol"]["samples"]["world_size"] == 1
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()
