"""evaluate.py at the papers' protocol: metrics=adm end to end, the protocol card, rescoring, official files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.tiny_run import CONF_DIR
from visgen.eval.evaluate import evaluate
from visgen.eval.metrics import GaussianStats, feature_statistics, frechet_distance_from_stats
from visgen.eval.sample_job import ChunkPlan


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An ADM-format reference (random statistics, 4 images for precision/recall)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    a, b = rng.normal(size=(2048, 64)), rng.normal(size=(2023, 64))
    # full rank, as real reference statistics (50k images): the Fréchet distances take the Cholesky route
    np.savez(path, mu=rng.normal(size=2048), sigma=a @ a.T / 64 + np.eye(2048), mu_s=rng.normal(size=2023),
             sigma_s=b @ b.T / 64 + np.eye(2023),
             arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    return path


def test_metrics_adm_scores_the_samples_and_writes_the_protocol_card(tmp_path, tiny_checkpoint, digits_dir,
                                                                     inception_weights, reference) -> None:
    out = tmp_path / "eval"
    common = [f"ckpt={tiny_checkpoint}", "num_samples=4", "batch_size=4", f"out_dir={out}",
              f"paths.cache_dir={digits_dir / 'cache'}", "metrics=adm", f"metrics.reference={reference}",
              f"metrics.inception_weights={inception_weights}", "metrics.inception_sha256=null", "labels=uniform",
              "quantize=floor", "seed=3", "metrics.is_splits=2"]
    metrics = evaluate(compose_eval(*common))
    written = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "classifier_accuracy"):
        assert isinstance(written[key], float) and np.isfinite(written[key]), key
    # FID from the job's Inception features against the reference statistics
    pool = torch.from_numpy(np.concatenate([np.load(p)["pool"] for p in sorted((out / "features").glob("*/*.npz"))]))
    with np.load(reference) as ref:
        expected = frechet_distance_from_stats(feature_statistics(pool), GaussianStats(ref["mu"], ref["sigma"]))
    assert metrics["fid"] == pytest.approx(expected, rel=1e-9)
    # samples: ADM layout, uniform labels from the chunks' generators
    samples = np.load(out / "samples.npz")
    assert samples["arr_1"].tolist() == ChunkPlan(4, 4, 3, 10, "uniform").labels_of(0).tolist()
    card = written["protocol"]
    assert card["model"]["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert (card["model"]["weights"], card["model"]["tokenizer"]) == ("EMA", "pixel")
    assert card["samples"] | {"resize": None} == {
        "num_samples": 4, "labels": "uniform", "num_classes": 10, "quantize": "floor", "resize": None,
        "image_size": 32, "seed": 3, "batch_size_per_rank": 4, "world_size": 1, "launcher": "single", "dtype": "fp32",
        "tf32": False}
    assert card["sampler"]["class"] == "ODESampler" and card["sampler"]["num_steps"] == 4
    assert card["reference"]["sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert "inception-v3-compat" in card["feature_extractors"]["inception"]
    assert card["settings"]["precision_recall"].startswith("k=3") and card["software"]["torch"] == torch.__version__

    # a finished folder: refused without overwrite/rescore; rescore keeps the samples and changes only the scoring
    with pytest.raises(FileExistsError, match="rescore=true"):
        evaluate(compose_eval(*common))
    before = (out / "samples.npz").read_bytes()
    chunk_times = {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.npz")}
    again = evaluate(compose_eval(*common, "rescore=true", "metrics.is_shuffle_seed=2020",
                                  "metrics.pr_distance=float32"))
    assert (out / "samples.npz").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.npz")} == chunk_times
    assert again["fid"] == metrics["fid"] and "RandomState(2020)" in again["protocol"]["settings"]["inception_score"]
    # other sampling settings in the same folder are refused, naming what differs
    with pytest.raises(ValueError, match=r"seed: 3 -> 4"):
        evaluate(compose_eval(*[c for c in common if c != "seed=3"], "seed=4", "rescore=true"))


def test_an_official_file_evaluates_with_its_preset(tmp_path, digits_dir) -> None:
    """experiment=demo_sit ckpt=<safetensors of the preset's net>: loaded strictly, sampled with its sampler."""
    from hydra.utils import instantiate
    from safetensors.torch import save_file

    from visgen.official import compose_experiment

    torch.manual_seed(0)
    net = instantiate(compose_experiment("demo_sit").model.net)
    path = tmp_path / "demo_sit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    out = tmp_path / "official"
    metrics = evaluate(compose_eval(f"ckpt={path}", "preset=demo_sit", "num_samples=2", "batch_size=2",
                                    f"out_dir={out}", f"paths.data_dir={digits_dir}",
                                    f"paths.cache_dir={digits_dir / 'cache'}"))
    card = metrics["protocol"]["model"]
    assert card["experiment"] == "demo_sit" and card["checkpoint_step"] is None
    assert card["parameters"] == sum(p.numel() for p in net.parameters())
    assert metrics["sampling.num_steps"] == 10 and "classifier_accuracy" in metrics  # the preset's Heun-10
    with pytest.raises(ValueError, match="does not fit"):
        evaluate(compose_eval(f"ckpt={path}", "preset=dit_s_2", "num_samples=10", f"out_dir={tmp_path / 'x'}"))


def test_a_command_line_sweep_collects_one_table(tmp_path, tiny_checkpoint, digits_dir) -> None:
    """`evaluate.py -m ... sampling.cfg_scale=1.0,2.0`: two jobs, one sweep.csv/sweep.md/sweep.png."""
    import csv
    import subprocess
    import sys

    root = CONF_DIR.parent
    sweep = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "evaluate.py", "-m", f"ckpt={tiny_checkpoint}", "num_samples=4",
                             "batch_size=4", "sampling.cfg_scale=1.0,2.0", f"paths.cache_dir={digits_dir / 'cache'}",
                             "progress=false", f"hydra.sweep.dir={sweep}"], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["sampling.cfg_scale"] for r in rows] == ["1.0", "2.0"] and all(r["fid_classifier"] for r in rows)
    assert (sweep / "sweep.png").exists() and "sampling.cfg_scale=2.0" in rows[1]["out_dir"]


def test_experiment_on_the_command_line_names_the_preset() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "evaluate.py", "experiment=dit_xl_2", "ckpt=DiT-XL-2-256x256.pt",
                             "--cfg", "job"], cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "preset: dit_xl_2" in result.stdout
