"""The sampling job: 1 vs 2 processes give the same bytes, a killed job resumes exactly, protocol options."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval import sample_job_worker
from visgen.eval.sample_job import ChunkPlan, SampleJob, postprocess, quantize, write_npz

WORKER = Path(sample_job_worker.__file__)
ROOT = WORKER.parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The job run in this process (one rank, one thread, as the workers)."""
    out = tmp_path_factory.mktemp("one") / "job"
    threads = torch.get_num_threads()
    try:
        sample_job_worker.main(str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def test_one_and_two_processes_write_byte_identical_samples(one_rank: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert (out / "samples.npz").read_bytes() == (one_rank / "samples.npz").read_bytes()
    samples = np.load(one_rank / "samples.npz")
    assert samples["arr_0"].shape == (40, 8, 8, 3) and samples["arr_0"].dtype == np.uint8
    assert samples["arr_0"].std() > 10  # real images, not a constant
    # uniform labels drawn per chunk: the same in both runs, spread over the classes
    assert samples["arr_1"].dtype == np.int64 and len(set(samples["arr_1"].tolist())) >= 8
    job = SampleJob(one_rank, ChunkPlan(40, 3, 7, 10, "uniform"), {"net": "TinyNet, seed 0"})
    assert torch.equal(job.features("stand_in")["mean"], torch.from_numpy(samples["arr_0"]).float().mean((1, 2)))


def test_a_killed_job_resumes_with_no_index_missing_or_duplicated(one_rank: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), "0.4"], cwd=ROOT, env=_env(),
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list((out / "chunks").glob("0*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("0*.npz")}
    assert 3 <= len(done_before) < 14, "the job must be stopped in the middle"
    assert not (out / "samples.npz").exists()

    job = SampleJob(out, ChunkPlan(40, 3, 7, 10, "uniform"), {"net": "TinyNet, seed 0"})
    threads = torch.get_num_threads()
    try:
        sample_job_worker.main(str(out))  # the same command again: continues
    finally:
        torch.set_num_threads(threads)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("0*.npz") if p.name in done_before} == (
        done_before)  # finished chunks were kept, not recomputed
    assert job.num_done() == 14 and len(list((out / "chunks").glob("*.npz"))) == 14
    assert (out / "samples.npz").read_bytes() == (one_rank / "samples.npz").read_bytes()


def test_a_job_with_other_settings_in_the_same_folder_is_refused(one_rank: Path) -> None:
    from visgen.eval.distributed import Ranks

    other = SampleJob(one_rank, ChunkPlan(40, 3, 8, 10, "uniform"), {"net": "TinyNet, seed 0"})
    with pytest.raises(ValueError, match=r"plan\.seed: 7 -> 8"):
        other.prepare(Ranks(0, 1, 0, torch.device("cpu")))


def test_chunks_labels_and_noise_depend_only_on_seed_and_chunk() -> None:
    balanced = ChunkPlan(num_samples=25, chunk_size=4, seed=0, num_classes=10)
    assert balanced.num_chunks == 7 and balanced.bounds(6) == (24, 25)
    assert torch.cat([balanced.labels_of(c) for c in range(7)]).tolist() == [i % 10 for i in range(25)]
    uniform = ChunkPlan(num_samples=25, chunk_size=4, seed=0, num_classes=10, labels="uniform")
    longer = ChunkPlan(num_samples=1000, chunk_size=4, seed=0, num_classes=10, labels="uniform")
    assert torch.equal(uniform.labels_of(3), longer.labels_of(3))
    assert not torch.equal(uniform.labels_of(3), ChunkPlan(25, 4, 1, 10, "uniform").labels_of(3))
    draws = torch.cat([longer.labels_of(c) for c in range(longer.num_chunks)])
    assert torch.bincount(draws, minlength=10).min() > 60  # ~100 per class
    assert torch.equal(torch.randn(3, generator=balanced.generator(2, "cpu")),
                       torch.randn(3, generator=torch.Generator().manual_seed(2)))  # seed 0: 0 * 1_000_003 + 2
    assert list(balanced.chunks_of(1, 3)) == [1, 4]
    with pytest.raises(ValueError, match="labels='random'"):
        ChunkPlan(10, 2, 0, 10, "random")


def test_quantizations_follow_each_anchor() -> None:
    """Each mode equals its anchor's line, transcribed, on values in and out of [-1, 1]."""
    x = torch.cat([torch.linspace(-1.2, 1.2, 4001), torch.randn(4000, generator=torch.Generator().manual_seed(0))])
    x = x.view(1, 1, 1, -1)
    dit = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # DiT/SiT/LlamaGen sample_ddp.py
    repa = torch.clamp(255.0 * ((x + 1) / 2.0), 0, 255).to(torch.uint8)  # REPA generate.py
    mar = np.round(np.clip(((x + 1) / 2).numpy() * 255, 0, 255)).astype(np.uint8)  # MAR main_mar.py
    assert torch.equal(quantize(x, "round_half_up"), dit)
    assert torch.equal(quantize(x, "floor"), repa)
    assert np.array_equal(quantize(x, "round_half_even").numpy(), mar)
    zero = torch.zeros(1, 1, 1, 1)  # 127.5: the three rules give 128, 127, 128
    assert [int(quantize(zero, m)) for m in ("round_half_up", "floor", "round_half_even")] == [128, 127, 128]
    assert (quantize(x, "round_half_up") != quantize(x, "floor")).float().mean() > 0.3
    with pytest.raises(ValueError, match="round_half_up, floor, round_half_even"):
        quantize(x, "round")


def test_post_resize_is_a_float_bicubic_resize_before_quantization() -> None:
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    resized = postprocess(images, "round_half_up", resize_to=8)
    expected = quantize(torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic"), "round_half_up")
    assert resized.shape == (2, 3, 8, 8) and torch.equal(resized, expected)
    assert torch.equal(postprocess(images, "floor"), quantize(images, "floor"))


def test_write_npz_is_byte_reproducible_and_loads_like_np_savez(tmp_path: Path) -> None:
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    parts = {"arr_0": ((2, 4, 4, 3), np.uint8, [images[:1], images[1:]]), "arr_1": ((2,), np.int64, [np.arange(2)])}
    first = write_npz(tmp_path / "a.npz", parts).read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:  # no clock in the file: a fixed date on every entry
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    parts = {"arr_0": ((2, 4, 4, 3), np.uint8, [images]), "arr_1": ((2,), np.int64, [np.arange(2)])}
    assert write_npz(tmp_path / "b.npz", parts).read_bytes() == first
    loaded = np.load(tmp_path / "a.npz")
    assert np.array_equal(loaded["arr_0"], images) and loaded["arr_1"].tolist() == [0, 1]
    np.savez(tmp_path / "c.npz", arr_0=images, arr_1=np.arange(2))
    assert len((tmp_path / "c.npz").read_bytes()) == len(first)  # same layout as np.savez, fixed metadata
    with pytest.raises(ValueError, match="got 1 rows"):
        write_npz(tmp_path / "d.npz", {"arr_1": ((2,), np.int64, [np.arange(1)])})
