"""Tests for shard streaming: spec expansion, exact splits, corrupt samples, determinism, the DataModule."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from visgen.data.datamodule import ShardDataModule
from visgen.data.shards import encode_png, write_shards
from visgen.data.stream import ShardStream, center_crop_arr, expand_shard_spec, load_all

SIZE = 8  # tiny images keep the tests fast


def _samples(num_samples: int) -> Iterator[dict]:
    """Images whose pixels encode their sample id (red = id % 256, green = id // 256), label id % 10."""
    for index in range(num_samples):
        pixels = np.zeros((SIZE, SIZE, 3), np.uint8)  # (H, W, 3)
        pixels[..., 0] = index % 256
        pixels[..., 1] = index // 256
        pixels[:, : SIZE // 2, 2] = 255  # left half marked, so a horizontal flip is visible
        yield {"__key__": f"s{index:06d}", "png": pixels, "cls": index % 10, "json": {"index": index}}


def _write(tmp_path: Path, num_shards: int, per_shard: int) -> str:
    """Write num_shards x per_shard id-coded samples; returns the brace spec."""
    write_shards(_samples(num_shards * per_shard), str(tmp_path / "part-%04d.tar"), per_shard)
    return str(tmp_path / f"part-{{0000..{num_shards - 1:04d}}}.tar")


def _unbatch(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A collated {"image", "label"} batch back into its samples."""
    return [{"image": image, "label": label} for image, label in zip(batch["image"], batch["label"], strict=True)]


def _ids(items: list[dict[str, torch.Tensor]]) -> list[int]:
    """Sample ids decoded from the pixels of {"image", "label"} items."""
    return [int(item["image"][0, 0, -1]) + 256 * int(item["image"][1, 0, -1]) for item in items]


def test_expand_spec_errors_and_forms(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=3, per_shard=2)
    names = [Path(url).name for url in expand_shard_spec(spec)]
    assert names == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    joined = expand_shard_spec(f"{tmp_path}/part-0000.tar::{tmp_path}/part-{{0001..0002}}.tar")
    assert joined == expand_shard_spec(spec)
    assert expand_shard_spec("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]

    missing = "nowhere/train-{0000..0009}.tar"
    with pytest.raises(FileNotFoundError) as info:
        expand_shard_spec(missing)
    message = str(info.value)
    assert missing in message and "matched no files" in message and "nowhere/train-0000.tar" in message
    assert "python -m visgen.data.builtin" in message
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards are missing.*part-0003\.tar"):
        expand_shard_spec(str(tmp_path / "part-{0000..0003}.tar"))
    for empty in ("", " :: ", []):
        with pytest.raises(ValueError, match="is empty"):
            expand_shard_spec(empty)


def test_exact_split_across_ranks_and_workers(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=12, per_shard=5)
    world_size, num_workers = 2, 3
    seen: list[int] = []
    for rank in range(world_size):
        stream = ShardStream(spec, SIZE, resampled=False, rank=rank, world_size=world_size)
        for worker_id in range(num_workers):
            shards = stream.worker_shards(worker_id, num_workers)
            global_worker = rank * num_workers + worker_id
            expected_names = [f"part-{i:04d}.tar" for i in (global_worker, global_worker + 6)]
            assert [Path(s).name for s in shards] == expected_names
            items = list(stream.iter_worker(worker_id, num_workers))
            assert len(items) == 10
            labels = [int(item["label"]) for item in items]
            assert labels == [sample_id % 10 for sample_id in _ids(items)]
            seen.extend(_ids(items))
    assert sorted(seen) == list(range(60))  # every sample exactly once


def test_too_few_shards_error(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=4, per_shard=1)
    stream = ShardStream(spec, SIZE, resampled=False, rank=1, world_size=2)
    expected = r"4 shards .* cannot feed 2 ranks x 3 workers.*lower data\.num_workers"
    with pytest.raises(ValueError, match=expected):
        list(stream.iter_worker(0, 3))
    assert len(list(stream.iter_worker(1, 2))) == 1
    # Fewer shards than ranks: fewer workers cannot help, so the hint says what can.
    one = ShardStream(_write(tmp_path / "one", num_shards=1, per_shard=1), SIZE, resampled=False, rank=1,
                      world_size=2)
    with pytest.raises(ValueError, match=r"1 shards .* 2 ranks x 1 workers; write at least 2 shards \(one per rank\)"):
        list(one.iter_worker(0, 1))


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = list(_samples(4))
    shard = tmp_path / "bad-0000.tar"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for sample in good[:2]:
            writer.write({"__key__": sample["__key__"], "png": encode_png(sample["png"]), "cls": b"1"})
        writer.write({"__key__": "garbage-png", "png": b"\x89PNG not really", "cls": b"3"})
        writer.write({"__key__": "float-cls", "png": encode_png(good[2]["png"]), "cls": b"2.5"})
        writer.write({"__key__": "no-cls", "png": encode_png(good[2]["png"])})
        writer.write({"__key__": good[3]["__key__"], "png": encode_png(good[3]["png"]), "cls": b"7"})
    stream = ShardStream(str(shard), SIZE, resampled=False, num_classes=10)
    with caplog.at_level(logging.WARNING, logger="visgen.data.stream"):
        items = list(stream)
    assert _ids(items) == [0, 1, 3]
    assert [int(item["label"]) for item in items] == [1, 1, 7]
    assert stream.num_skipped == 3
    text = caplog.text
    for key in ("garbage-png", "float-cls", "no-cls"):
        assert key in text
    assert str(shard) in text and "skipped 3 corrupt samples" in text

    # A resampled stream still yields exactly its quota around the corrupt samples.
    resampled = ShardStream(str(shard), SIZE, resampled=True, samples_per_rank=12, batch_size=4,
                            num_classes=10)
    assert set(_ids(list(resampled.iter_worker(0, 1)))) <= {0, 1, 3}
    assert len(list(resampled.iter_worker(0, 1))) == 12


def _resampled(spec: str, **overrides: object) -> ShardStream:
    """A resampled stream with shuffling and flips on (the settings that consume the rng)."""
    kwargs: dict = dict(resampled=True, random_flip=True, shuffle_buffer=7, seed=3, samples_per_rank=24,
                        batch_size=4, world_size=2)
    kwargs.update(overrides)
    return ShardStream(spec, SIZE, **kwargs)


def test_resampled_is_deterministic_and_exact(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=5, per_shard=6)
    stream = _resampled(spec)
    first = list(stream.iter_worker(1, 2))
    again = list(_resampled(spec).iter_worker(1, 2))
    assert len(first) == len(again) == 12
    assert all(torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
               for a, b in zip(first, again, strict=True))
    assert len({*_ids(first)}) > 6  # drawn across several shards, not just one

    other_epoch = _resampled(spec)
    other_epoch.set_epoch(1)
    other_rank = _resampled(spec, rank=1)
    other_seed = _resampled(spec, seed=4)
    for variant in (other_epoch, other_rank, other_seed):
        assert _ids(list(variant.iter_worker(1, 2))) != _ids(first)
    assert _ids(list(stream.iter_worker(0, 2))) != _ids(first)

    flips = [bool(item["image"][2, 0, 0] == 0) for item in first]  # left half unmarked = flipped
    assert any(flips) and not all(flips)

    # Exact counts: 7 batches of 4 per rank split 3/2/2 over 3 workers; every rank the same.
    for rank in (0, 1):
        stream_28 = _resampled(spec, rank=rank, samples_per_rank=28)
        counts = [len(list(stream_28.iter_worker(w, 3))) for w in range(3)]
        assert counts == [12, 8, 8]
    with pytest.raises(ValueError, match="samples_per_rank=30 is not a multiple of batch_size=4"):
        _resampled(spec, samples_per_rank=30)
    with pytest.raises(ValueError, match="needs samples_per_rank"):
        _resampled(spec, samples_per_rank=None)


def test_dataloader_workers_follow_epoch_and_resume(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=4, per_shard=6)
    stream = _resampled(spec, world_size=1, samples_per_rank=20)
    loader = DataLoader(stream, batch_size=4, num_workers=2, generator=torch.Generator())

    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    epoch0 = [_ids(_unbatch(batch)) for batch in loader]
    assert torch.equal(torch.rand(3), expected_draw)  # making the iterator left the global RNG alone
    assert [len(batch) for batch in epoch0] == [4] * 5

    # In-process reference: DataLoader batches come round-robin from workers 0, 1, 0, 1, 0.
    per_worker = [_ids(list(stream.iter_worker(w, 2))) for w in range(2)]
    round_robin = [per_worker[b % 2][4 * (b // 2) : 4 * (b // 2) + 4] for b in range(5)]
    assert epoch0 == round_robin

    stream.set_epoch(1)
    epoch1 = [_ids(_unbatch(batch)) for batch in loader]
    assert epoch1 != epoch0
    stream.set_epoch(1, skip_batches=3)
    assert [_ids(_unbatch(batch)) for batch in loader] == epoch1[3:]


def _round_robin(stream: ShardStream, num_workers: int) -> list[list[int]]:
    """Batches in the order a DataLoader delivers them: workers 0, 1, ... in turn, exhausted ones dropped."""
    per_worker = []
    for worker_id in range(num_workers):
        ids = _ids(list(stream.iter_worker(worker_id, num_workers)))
        per_worker.append([ids[i : i + stream.batch_size] for i in range(0, len(ids), stream.batch_size)])
    ordered = []
    for step in range(max(len(batches) for batches in per_worker)):
        ordered.extend(batches[step] for batches in per_worker if step < len(batches))
    return ordered


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
def test_skip_batches_resumes_the_exact_tail(tmp_path: Path, num_workers: int) -> None:
    spec = _write(tmp_path, num_shards=3, per_shard=4)
    stream = _resampled(spec, world_size=1, samples_per_rank=28)  # 7 batches of 4
    stream.set_epoch(2)
    full = _round_robin(stream, num_workers)
    assert len(full) == 7
    for skip_batches in range(8):
        stream.set_epoch(2, skip_batches=skip_batches)
        assert _round_robin(stream, num_workers) == full[skip_batches:]


def test_center_crop_takes_the_center() -> None:
    pixels = np.zeros((32, 64, 3), np.uint8)  # (H, W, 3): red | green | blue bands of 16 | 32 | 16 columns
    pixels[:, :16, 0] = 255
    pixels[:, 16:48, 1] = 255
    pixels[:, 48:, 2] = 255
    cropped = center_crop_arr(Image.fromarray(pixels), 32)
    assert cropped.shape == (32, 32, 3)
    assert np.array_equal(cropped, pixels[:, 16:48])  # exactly the green middle, no resampling
    tall = center_crop_arr(Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2))), 32)
    assert np.array_equal(tall, pixels[:, 16:48].transpose(1, 0, 2))

    big = np.zeros((300, 500, 3), np.uint8)  # box-halved to (150, 250), then bicubic to (64, 107)
    big[100:200, 200:300] = 200
    small = center_crop_arr(Image.fromarray(big), 64)
    assert small.shape == (64, 64, 3)
    assert small[32, 32, 0] == 200 and small[0, 0, 0] == 0
    assert center_crop_arr(Image.fromarray(big[..., 0]).convert("RGB"), 16).shape == (16, 16, 3)


def _datamodule(spec: str, **overrides: object) -> ShardDataModule:
    """A tiny DataModule over the test shards."""
    kwargs: dict = dict(train_shards=spec, val_shards=spec, image_size=SIZE, num_classes=10,
                        num_train_samples=30, batch_global=8, batch_per_device=4, num_workers=0,
                        random_flip=False, shuffle_buffer=5)
    kwargs.update(overrides)
    return ShardDataModule(**kwargs)


def test_datamodule_batches_and_accumulation(tmp_path: Path) -> None:
    spec = _write(tmp_path, num_shards=4, per_shard=8)
    module = _datamodule(spec)
    assert module.steps_per_epoch == 3 and module.accumulate_grad_batches(1) == 2
    assert module.accumulate_grad_batches(2) == 1
    with pytest.raises(ValueError, match=r"batch_global=8 is not divisible by data\.batch_per_device=4 x "
                                         r"world_size=3"):
        module.accumulate_grad_batches(3)
    with pytest.raises(ValueError, match=r"batch_global=128 is not a multiple of data\.batch_per_device=48"):
        _datamodule(spec, batch_global=128, batch_per_device=48)

    batches = list(module.train_dataloader())
    assert len(batches) == 6  # 3 steps x 2 micro-batches
    images, labels = batches[0]["image"], batches[0]["label"]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.shape == (4,) and labels.dtype == torch.int64
    module.set_epoch(1)
    assert [b["label"].tolist() for b in module.train_dataloader()] != [b["label"].tolist() for b in batches]

    val_batches = list(module.val_dataloader())
    val_ids = [i for batch in val_batches for i in _ids(_unbatch(batch))]
    assert sorted(val_ids) == list(range(32))
    assert load_all(spec, SIZE)[0].shape == (32, 3, SIZE, SIZE)


def _fake_trainer(processed: int, started: int, ready: int, world_size: int = 1, rank: int = 0) -> object:
    """Just the trainer fields the DataModule reads (world, rank, restored fit-loop progress)."""
    from types import SimpleNamespace

    epoch_progress = SimpleNamespace(current=SimpleNamespace(processed=processed, started=started))
    batch_progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    epoch_loop = SimpleNamespace(batch_progress=batch_progress)
    fit_loop = SimpleNamespace(epoch_progress=epoch_progress, epoch_loop=epoch_loop)
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=processed,
                           fit_loop=fit_loop, accumulate_grad_batches=2)


@pytest.mark.parametrize(
    ("processed", "started", "ready", "expected"),
    [
        (0, 0, 0, (0, 0)),  # fresh fit
        (1, 2, 3, (1, 3)),  # resumed mid-epoch 1 after 3 batches
        (1, 1, 6, (1, 0)),  # resumed at an epoch end: the batch counter is the finished epoch's
        (1, 2, 6, (2, 0)),  # resumed after the last batch of epoch 1: its first iterator serves epoch 2
    ],
)
def test_datamodule_resume_position(tmp_path: Path, processed: int, started: int, ready: int,
                                    expected: tuple[int, int]) -> None:
    spec = _write(tmp_path, num_shards=2, per_shard=4)
    module = _datamodule(spec)  # 3 steps x 2 micro-batches = 6 batches per epoch on one rank
    module.trainer = _fake_trainer(processed, started, ready)
    loader = module.train_dataloader()
    assert (loader.dataset.epoch, loader.dataset.skip_batches) == expected
    module.set_epoch(5)
    assert (loader.dataset.epoch, loader.dataset.skip_batches) == (5, 0)

    module.trainer = _fake_trainer(0, 0, 0, world_size=2, rank=1)
    assert module.train_dataloader().dataset.rank == 1
    assert len(module.train_dataloader().dataset) == 3 * 1 * 4  # steps x accumulation x batch_per_device
