"""evaluate.py's output folders and errors as users meet them: settings named in the folder, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from visgen.eval.evaluate import default_out_dir

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_folder_names_every_override_that_changes_the_samples(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert default_out_dir(ckpt, 1000, [f"ckpt={ckpt}", "num_samples=1000"]) == tmp_path / "run" / "eval" / "last_1000"
    overrides = [f"ckpt={ckpt}", "++sampling.num_steps=20", "++sampling.cfg_scale=1.5", "seed=1", "overwrite=true",
                 "guide_ckpt=logs/guide/checkpoints/step_0000700.ckpt", "paths.cache_dir=/c", "device=cpu"]
    assert default_out_dir(ckpt, 500, overrides).name == (
        "last_500_guide_ckpt=guide.step_0000700,sampling.cfg_scale=1.5,sampling.num_steps=20,seed=1")
    assert default_out_dir(ckpt, 500, ["sampling=ddim"]).name == "last_500_sampling=ddim"


def test_an_occupied_output_folder_is_a_one_line_error(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    occupied = tmp_path / "run" / "eval" / "last_8_sampling.cfg_scale=1.5"
    occupied.mkdir(parents=True)
    (occupied / "metrics.json").write_text("{}")
    result = subprocess.run([sys.executable, "evaluate.py", f"ckpt={ckpt}", "num_samples=8", "sampling.cfg_scale=1.5"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {occupied} already holds an evaluation (metrics.json); pass overwrite=true (sample again), "
        "rescore=true (score its samples again), another out_dir=<dir>, or other settings"]


def test_other_expected_mistakes_are_one_line_errors_too(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from visgen.errors import report_user_errors
    from visgen.eval.evaluate import evaluate

    garbage = tmp_path / "run" / "checkpoints" / "last.ckpt"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(os.urandom(2048))
    cases = {
        "is not a readable checkpoint": [f"ckpt={garbage}"],
        "no such file": [f"ckpt={tmp_path / 'missing.ckpt'}"],
        "num_samples=0: evaluate needs a positive whole number": [f"ckpt={garbage}", "num_samples=0"],
        "num_samples=-5": [f"ckpt={garbage}", "num_samples=-5"],
    }
    for expected, overrides in cases.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=overrides)
        with pytest.raises(SystemExit) as exited:
            report_user_errors(evaluate)(cfg)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 1 and len(lines) == 1 and expected in lines[0], (expected, lines)
        assert "weights_only=False" not in lines[0]
