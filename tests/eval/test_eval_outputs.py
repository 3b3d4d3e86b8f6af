"""evaluate.py's output folders and errors as users meet them: settings named in the folder, one-line errors."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visgen.eval.checkpoint import checkpoint_sha256
from visgen.eval.evaluate import default_out_dir

ROOT = Path(__file__).resolve().parents[2]


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_the_default_folder_names_the_checkpoints_hash_and_every_override_that_changes_the_samples(tmp_path):
    ckpt = _file(tmp_path / "run" / "checkpoints" / "last.ckpt", b"weights after 1000 steps")
    sha8 = hashlib.sha256(b"weights after 1000 steps").hexdigest()[:8]
    assert default_out_dir(ckpt, 1000, [f"ckpt={ckpt}", "num_samples=1000"]) == (
        tmp_path / "run" / "eval" / f"last_{sha8}_1000")
    guide = _file(tmp_path / "guide" / "checkpoints" / "step_0000700.ckpt", b"guide")
    overrides = [f"ckpt={ckpt}", "++sampling.num_steps=20", "++sampling.cfg_scale=1.5", "seed=1", "overwrite=true",
                 f"guide_ckpt={guide}", "paths.cache_dir=/c", "device=cpu"]
    assert default_out_dir(ckpt, 500, overrides).name == (
        f"last_{sha8}_500_guide_ckpt=guide.step_0000700.{hashlib.sha256(b'guide').hexdigest()[:8]},"
        "sampling.cfg_scale=1.5,sampling.num_steps=20,seed=1")
    assert default_out_dir(ckpt, 500, ["sampling=ddim"]).name == f"last_{sha8}_500_sampling=ddim"
    # more training under the same name: another folder (results of different weights never mix)
    time.sleep(0.01)
    ckpt.write_bytes(b"weights after 2000 steps")
    assert default_out_dir(ckpt, 1000, []).name == f"last_{hashlib.sha256(ckpt.read_bytes()).hexdigest()[:8]}_1000"
    # a long sweep of sampler settings stays one valid folder name (<= 255 bytes), distinct per setting
    long = [f"++sampling.k{i}={'x' * 20}" for i in range(12)]
    a, b = default_out_dir(ckpt, 50, long).name, default_out_dir(ckpt, 50, [*long[:-1], "++sampling.k11=y"]).name
    assert len(a.encode()) <= 255 and len(b.encode()) <= 255 and a != b and a.startswith("last_")


def test_a_sharded_checkpoints_hash_covers_every_file_and_name(tmp_path):
    folder = tmp_path / "step_0000100.ckpt"
    files = {".metadata": b"index", "meta.pt": b"meta", "__0_0.distcp": b"rank0", "__1_0.distcp": b"r1"}
    for name, data in files.items():
        _file(folder / name, data)
    lines = "".join(f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    first = checkpoint_sha256(folder)
    assert first == hashlib.sha256(lines.encode()).hexdigest()
    (folder / "__1_0.distcp").rename(folder / "__2_0.distcp")  # same bytes, other name: another checkpoint
    assert checkpoint_sha256(folder) != first
    with pytest.raises(FileNotFoundError, match="guide_ckpt=.*no such file"):
        checkpoint_sha256(tmp_path / "missing.ckpt", "guide_ckpt=")


def test_an_occupied_output_folder_is_a_one_line_error(tmp_path):
    ckpt = _file(tmp_path / "run" / "checkpoints" / "last.ckpt", b"not even a checkpoint")
    sha8 = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:8]
    occupied = tmp_path / "run" / "eval" / f"last_{sha8}_8_sampling.cfg_scale=1.5"
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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP written by one process, on purpose
def test_a_sharded_checkpoint_folder_evaluates_like_its_single_file(tmp_path, tiny_checkpoint, digits_dir):
    """The tiny run's checkpoint rewritten as trainer=fsdp stores it (DCP shards + meta.pt, here by one process):
    `ckpt=<folder>` samples the same bytes as the file, into a folder named by the folder's own hash."""
    import torch
    import torch.distributed.checkpoint as dcp
    from hydra import compose, initialize_config_dir

    from visgen.eval.evaluate import evaluate

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    folder = tmp_path / "run" / "checkpoints" / "step_0000008.ckpt"
    dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    results = {}
    for name, ckpt in (("file", tiny_checkpoint), ("folder", folder)):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            where = [f"out_dir={tmp_path / 'file'}"] if name == "file" else []  # the folder: its default name
            cfg = compose("evaluate", overrides=[f"ckpt={ckpt}", "num_samples=2", "batch_size=2", "progress=false",
                                                 f"paths.cache_dir={digits_dir / 'cache'}", *where])
        results[name] = evaluate(cfg)
    out = Path(results["folder"]["out_dir"])
    assert out == tmp_path / "run" / "eval" / f"step_0000008_{checkpoint_sha256(folder)[:8]}_2"
    assert results["folder"]["protocol"]["model"]["checkpoint_sha256"] == checkpoint_sha256(folder)
    assert (out / "samples.npz").read_bytes() == (Path(results["file"]["out_dir"]) / "samples.npz").read_bytes()
