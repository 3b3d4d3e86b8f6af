"""Exact epochs (data.train_stream=exact): every sample at most once per epoch over ranks x workers, equal
batches per rank, a counted dropped tail, a shard order that changes every epoch, exact resume."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from visgen.data.datamodule import ShardDataModule
from visgen.data.shards import encode_png
from visgen.data.stream import ShardStream, epoch_permutation, plan_range

SIZE = 4
BATCH = 4


def _pixels(index: int) -> np.ndarray:
    """A SIZE x SIZE RGB image whose red/green channels hold the sample id."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)  # (H, W, 3)
    pixels[..., 0], pixels[..., 1] = index % 256, index // 256
    return pixels


def _write(folder: Path, counts: list[int], corrupt: set[int] = frozenset()) -> str:
    """Shards of `counts` samples (ids 0, 1, ... in order; ids in `corrupt` get undecodable image bytes) and a
    writer-style manifest.json with the per-shard counts; returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    entries = []
    for shard, count in enumerate(counts):
        name = f"train-{shard:04d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as writer:
            for _ in range(count):
                image = b"\x89PNG broken" if index in corrupt else encode_png(_pixels(index))
                writer.write({"__key__": f"s{index:06d}", "png": image, "cls": str(index % 10).encode()})
                index += 1
        entries.append({"name": name, "count": count})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return str(folder / f"train-{{0000..{len(counts) - 1:04d}}}.tar")


def _ids(images: torch.Tensor) -> list[int]:
    """Sample ids from a (B, 3, H, W) or (3, H, W) uint8 batch."""
    images = images.reshape(-1, 3, SIZE, SIZE)
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()


def _stream(spec: str, rank: int, world_size: int, samples_per_rank: int, **overrides: object) -> ShardStream:
    kwargs: dict = dict(resampled=False, exact=True, random_flip=True, shuffle_buffer=5, seed=7,
                        samples_per_rank=samples_per_rank, rank=rank, world_size=world_size, batch_size=BATCH,
                        num_classes=10)
    kwargs.update(overrides)
    return ShardStream(spec, SIZE, **kwargs)


def _rank_batches(stream: ShardStream, num_workers: int) -> list[list[int]]:
    """The rank's batches in DataLoader order (workers in turn), computed in-process."""
    per_worker = []
    for worker_id in range(num_workers):
        ids = [_ids(item["image"])[0] for item in stream.iter_worker(worker_id, num_workers)]
        per_worker.append([ids[i : i + BATCH] for i in range(0, len(ids), BATCH)])
    return [batches[step] for step in range(max(map(len, per_worker))) for batches in per_worker
            if step < len(batches)]


def test_plan_range_cuts_the_permuted_order_into_shard_pieces() -> None:
    counts = [3, 5, 2]
    assert plan_range(counts, [2, 0, 1], 0, 10) == [(2, 0, 2), (0, 0, 3), (1, 0, 5)]
    assert plan_range(counts, [2, 0, 1], 1, 6) == [(2, 1, 1), (0, 0, 3), (1, 0, 1)]
    assert plan_range(counts, [1, 2, 0], 5, 7) == [(2, 0, 2)]
    orders = {tuple(epoch_permutation(10, seed=0, epoch=epoch)) for epoch in range(5)}
    assert len(orders) == 5 and all(sorted(order) == list(range(10)) for order in orders)
    assert epoch_permutation(10, 0, 3) == epoch_permutation(10, 0, 3) != epoch_permutation(10, 1, 3)


def test_two_ranks_two_workers_read_every_sample_exactly_once_per_epoch(tmp_path: Path) -> None:
    spec = _write(tmp_path / "even", [6, 6, 6, 6, 6, 6, 4])  # 40 samples = 2 ranks x 5 batches of 4
    epochs = []
    for epoch in range(3):
        per_rank = []
        for rank in range(2):
            stream = _stream(spec, rank, 2, samples_per_rank=20)
            stream.set_epoch(epoch)
            assert stream.dropped_per_epoch == 0
            per_rank.append(_rank_batches(stream, num_workers=2))
        assert [len(batches) for batches in per_rank] == [5, 5]  # equal batches on every rank
        assert all(len(batch) == BATCH for batches in per_rank for batch in batches)
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == list(range(40))  # each sample exactly once
        epochs.append(per_rank)
    assert epochs[0] != epochs[1] != epochs[2]  # another order (and other shards per rank) every epoch
    rank0_samples = [{i for batch in per_rank[0] for i in batch} for per_rank in epochs]
    assert rank0_samples[0] != rank0_samples[1] != rank0_samples[2]  # the shards move between ranks too

    # The same through real DataLoader workers, and resampling as the broken variant: it repeats samples.
    stream = _stream(spec, 1, 2, samples_per_rank=20)
    stream.set_epoch(2)
    loader = DataLoader(stream, batch_size=BATCH, num_workers=2, generator=torch.Generator())
    assert [_ids(batch["image"]) for batch in loader] == epochs[2][1]
    resampled = _stream(spec, 0, 2, samples_per_rank=20, resampled=True, exact=False)
    drawn = [i for worker in range(2) for item in resampled.iter_worker(worker, 2) for i in _ids(item["image"])]
    assert max(Counter(drawn).values()) > 1


def test_an_uneven_tail_is_dropped_counted_and_differs_per_epoch(tmp_path: Path, caplog) -> None:
    spec = _write(tmp_path / "uneven", [6, 6, 6, 6, 6, 6, 3])  # 39 samples: 2 ranks x 16 used, 7 dropped
    module = ShardDataModule(spec, None, SIZE, num_classes=10, num_train_samples=None, batch_global=8,
                             batch_per_device=BATCH, num_workers=0, shuffle_buffer=5, train_stream="exact")
    assert module.num_train_samples == 39 and module.steps_per_epoch == 4
    dropped_sets = []
    for epoch in range(3):
        seen = []
        for rank in range(2):
            stream = _stream(spec, rank, 2, samples_per_rank=module.samples_per_rank(2))
            stream.set_epoch(epoch)
            batches = _rank_batches(stream, num_workers=2)
            assert len(batches) == 4
            seen += [i for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == 32 and stream.dropped_per_epoch == 7
        dropped_sets.append(frozenset(range(39)) - set(seen))
    assert len(set(dropped_sets)) == 3  # the dropped tail is other samples every epoch
    with caplog.at_level(logging.INFO, logger="visgen.data.datamodule"):
        assert len(list(module.train_dataloader())) == 8  # one rank: 4 steps x 2 micro-batches
    assert "39 samples in 7 shards, 4 steps x 8 samples = 32 read" in caplog.text and "the 7 after them" in caplog.text


def test_losses_are_counted_and_repeated_so_ranks_keep_equal_batches(tmp_path: Path) -> None:
    spec = _write(tmp_path / "lossy", [6, 6, 6, 6], corrupt={0, 1, 13})
    per_rank = []
    for rank in range(2):
        stream = _stream(spec, rank, 2, samples_per_rank=12)
        batches = _rank_batches(stream, num_workers=2)
        assert len(batches) == 3 and all(len(batch) == BATCH for batch in batches)
        assert stream.num_skipped == stream.num_repeated  # every lost sample replaced by one repeat
        per_rank.append((batches, stream.num_skipped))
    seen = [i for batches, _ in per_rank for batch in batches for i in batch]
    repeats = sum(count - 1 for count in Counter(seen).values())
    assert sum(skipped for _, skipped in per_rank) == 3 == repeats
    assert set(seen) == set(range(24)) - {0, 1, 13}


def test_exact_resume_skips_the_used_batches(tmp_path: Path) -> None:
    spec = _write(tmp_path / "resume", [5, 5, 5, 5, 4])
    stream = _stream(spec, 0, 1, samples_per_rank=24)
    stream.set_epoch(1)
    full = _rank_batches(stream, num_workers=3)
    for skip in (1, 4, 6):
        stream.set_epoch(1, skip_batches=skip)
        assert _rank_batches(stream, num_workers=3) == full[skip:]


def test_exact_epochs_need_counts_and_a_matching_num_train_samples(tmp_path: Path) -> None:
    spec = _write(tmp_path / "counted", [4, 4])
    (tmp_path / "bare").mkdir()
    for name in ("train-0000.tar", "train-0001.tar"):
        (tmp_path / "bare" / name).write_bytes((tmp_path / "counted" / name).read_bytes())
    bare = str(tmp_path / "bare" / "train-{0000..0001}.tar")
    with pytest.raises(ValueError, match=r"needs the sample count of every shard.*2 of 2 shards.*"
                                         r"data\.train_stream=resampled"):
        _stream(bare, 0, 1, samples_per_rank=8)
    assert _stream(bare, 0, 1, samples_per_rank=8, counts_file=str(tmp_path / "counted" / "manifest.json"))
    with pytest.raises(ValueError, match=r"need 12 samples per exact epoch but the shards .* hold 8"):
        _stream(spec, 0, 3, samples_per_rank=4)
    wrong = ShardDataModule(spec, None, SIZE, 10, num_train_samples=9, batch_global=4, batch_per_device=4,
                            train_stream="exact")
    with pytest.raises(ValueError, match=r"num_train_samples=9 but the shards .* hold 8 samples"):
        _ = wrong.steps_per_epoch
    with pytest.raises(ValueError, match=r"num_train_samples=null .* only data\.train_stream=exact"):
        ShardDataModule(spec, None, SIZE, 10, num_train_samples=None, batch_global=4, batch_per_device=4)
