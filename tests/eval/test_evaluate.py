"""evaluate.py on a tiny checkpoint: files, shapes, metrics, sampler overrides, no overwrite."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.tiny_run import CONF_DIR
from visgen.eval.evaluate import evaluate, sampling_config


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_evaluate_writes_grid_npz_and_metrics(tmp_path, tiny_checkpoint, digits_dir):
    out = tmp_path / "eval"
    cfg = compose_eval(f"ckpt={tiny_checkpoint}", "num_samples=20", "batch_size=8", f"out_dir={out}",
                       f"paths.cache_dir={digits_dir / 'cache'}")
    metrics = evaluate(cfg)
    assert (out / "grid.png").exists()
    samples = np.load(out / "samples.npz")
    assert samples["arr_0"].shape == (20, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert list(samples["arr_1"][:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) == set(metrics)
    for key in ("classifier_accuracy", "fid_classifier", "fid_classifier_floor"):
        assert isinstance(written[key], float)
    assert 0.0 <= written["classifier_accuracy"] <= 1.0
    assert written["fid_classifier"] > written["fid_classifier_floor"] > 0  # 8 steps of training: far from data
    assert written["sampling.num_steps"] == 4 and written["checkpoint_step"] == 8

    # the same seed gives the same samples; an existing output is not overwritten without overwrite=true
    with pytest.raises(FileExistsError, match="overwrite=true"):
        evaluate(cfg)
    again = compose_eval(f"ckpt={tiny_checkpoint}", "num_samples=20", "batch_size=8", f"out_dir={out}",
                         f"paths.cache_dir={digits_dir / 'cache'}", "overwrite=true")
    evaluate(again)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], samples["arr_0"])


def test_sampling_overrides_patch_the_checkpoint_sampler_or_replace_it():
    from omegaconf import OmegaConf

    trained = OmegaConf.create({"_target_": "x.ODESampler", "method": "heun", "num_steps": 20, "cfg_scale": 2.0})
    eval_cfg = compose_eval("ckpt=x", "sampling=ode", "sampling.method=euler")
    patched = sampling_config(trained, compose_eval("ckpt=x"), ["ckpt=x", "sampling.cfg_scale=1.5"])
    assert (patched.method, patched.num_steps, patched.cfg_scale) == ("heun", 20, 1.5)
    replaced = sampling_config(trained, eval_cfg, ["ckpt=x", "sampling=ode", "sampling.method=euler"])
    assert (replaced.method, replaced.num_steps) == ("euler", 50)


def test_evaluation_imports_no_training_code():
    import subprocess

    code = ("import sys, visgen.eval.evaluate, visgen.eval.checkpoint, visgen.eval.metrics, visgen.eval.classifier;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('lightning','pytorch_lightning')"
            " or m.startswith(('visgen.training','visgen.paradigms'))];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("group", [[], ["sampling=ode"]])
def test_evaluate_command_line_accepts_sampling_patches(group):
    """`python evaluate.py ckpt=... sampling.cfg_scale=1.5` composes, with or without a sampler group."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "evaluate.py"
    result = subprocess.run([sys.executable, str(script), "ckpt=x", *group, "sampling.cfg_scale=1.5", "--cfg", "job"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cfg_scale: 1.5" in result.stdout


def test_bf16_sampling_is_recorded_and_unknown_precisions_are_refused(tmp_path, tiny_checkpoint, digits_dir):
    common = [f"ckpt={tiny_checkpoint}", "num_samples=10", "batch_size=10", f"paths.cache_dir={digits_dir / 'cache'}"]
    metrics = evaluate(compose_eval(*common, f"out_dir={tmp_path / 'bf16'}", "precision=bf16"))
    assert metrics["precision"] == "bf16"
    with pytest.raises(ValueError, match="fp32, bf16"):
        evaluate(compose_eval(*common, f"out_dir={tmp_path / 'fp16'}", "precision=fp16"))


def test_a_chosen_sampler_group_keeps_the_models_diffusion():
    from omegaconf import OmegaConf

    diffusion = {"_target_": "visgen.diffusion.gaussian.GaussianDiffusion", "beta_schedule": "cosine"}
    trained = OmegaConf.create({"_target_": "x.DDPMSampler", "num_steps": 50, "diffusion": diffusion})
    eval_cfg = compose_eval("ckpt=x", "sampling=ddim")
    replaced = sampling_config(trained, eval_cfg, ["ckpt=x", "sampling=ddim"])
    assert replaced._target_.endswith("DDIMSampler")
    assert replaced.diffusion.beta_schedule == "cosine"  # not the ddim group's linear fallback


def test_autoguidance_by_the_same_checkpoint_changes_nothing(tmp_path, tiny_checkpoint, digits_dir):
    # guide == net gives guide + w (net - guide) = net exactly: the samples equal the unguided ones.
    common = [f"ckpt={tiny_checkpoint}", "num_samples=10", "batch_size=10", f"paths.cache_dir={digits_dir / 'cache'}"]
    evaluate(compose_eval(*common, f"out_dir={tmp_path / 'plain'}"))
    metrics = evaluate(compose_eval(*common, f"out_dir={tmp_path / 'auto'}", f"guide_ckpt={tiny_checkpoint}",
                                    "guide_scale=3.0"))
    assert (metrics["guide_scale"], metrics["guide_checkpoint_step"]) == (3.0, 8)
    plain, auto = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("plain", "auto"))
    assert np.array_equal(plain, auto)

