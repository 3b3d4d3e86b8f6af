"""No silent data loss: what a shard stream could not read, counted per shard, epoch and rank.

Two kinds of loss: corrupt samples (a member missing or not decodable) and unreadable shard tails (a cut or
corrupt tar: everything after the cut is gone). A tail's size is exact when the folder says how many samples
each shard holds (the writer's `manifest.json`, a cache's `cache.json`, or timm's `_info.json` of the public
imagenet-1k-wds shards) and estimated otherwise (from the largest complete shard read so far).

DataLoader workers add to a shared int64 tensor (one row per worker, so no two processes write one cell);
the DataModule reads it between batches, stops the run when more than `data.max_lost_fraction` of an epoch
is lost (`DataLossError`), and logs a summary naming the shards; `DataLossMonitor` (a callback in
visgen.data.datamodule) logs the counts as metrics `data/<split>_lost_samples`, `data/<split>_lost_fraction`
and `data/<split>_lost_tails`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["DataLossError", "LossCounter", "shard_counts"]

CORRUPT, TAIL_SAMPLES, TAILS, REPEATS = 0, 1, 2, 3  # columns of the count tensor
_COLUMNS = 4
_COUNT_FILES = ("manifest.json", "cache.json", "_info.json")


class DataLossError(RuntimeError):
    """More of an epoch was unreadable than data.max_lost_fraction allows."""


def _json_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as stream:
            value = json.load(stream)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _counts_in(info: dict[str, Any], known: dict[str, int], path: str) -> None:
    """Add the per-shard counts a manifest.json / cache.json (`shards`) or timm _info.json (`splits`) lists."""
    for entry in info.get("shards", []) if isinstance(info.get("shards"), list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and type(entry.get("count")) is int:
            known.setdefault(entry["name"], entry["count"])
    splits = info.get("splits")
    for split in splits.values() if isinstance(splits, dict) else []:  # timm's _info.json
        if isinstance(split, dict):
            files, lengths = split.get("filenames", []), split.get("shard_lengths", [])
            if len(files) != len(lengths):  # which count belongs to which shard is then unknown: never guess
                raise ValueError(f"{path}: split {split.get('name', '?')!r} lists {len(files)} filenames but "
                                 f"{len(lengths)} shard_lengths; fix or remove the file (or set data.counts_file)")
            for file, count in zip(files, lengths, strict=True):
                if isinstance(file, str) and type(count) is int:
                    known.setdefault(os.path.basename(file), count)


def shard_counts(urls: Sequence[str], counts_file: str | None = None) -> dict[str, int]:
    """Samples per shard, by file name: from `counts_file` (a manifest.json, cache.json or _info.json; also for
    remote shards) and, for local shards, from those files in the shards' folder."""
    counts: dict[str, int] = {}
    from_file: dict[str, int] = {}
    if counts_file:
        info = _json_file(counts_file)
        if info is None:
            raise FileNotFoundError(f"data.counts_file={counts_file!r} is not a readable JSON object; point it at "
                                    "the shards' manifest.json, cache.json or _info.json")
        _counts_in(info, from_file, counts_file)
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        path = url.removeprefix("file:")
        if ":" not in path.split("/")[0]:  # local paths only ('pipe:', 's3:' ... are not looked up)
            by_folder.setdefault(os.path.dirname(path), []).append(url)
    for folder, folder_urls in by_folder.items():
        known: dict[str, int] = {}
        for name in _COUNT_FILES:
            path = os.path.join(folder or ".", name)
            info = _json_file(path)
            if info is not None:
                _counts_in(info, known, path)
        for url in folder_urls:
            if os.path.basename(url) in known:
                counts[url] = known[os.path.basename(url)]
    for url in urls:
        tars = [word for word in url.split() if ".tar" in word]  # 'pipe:aws s3 cp s3://b/train-000001.tar -'
        name = os.path.basename(tars[-1] if tars else url)
        if url not in counts and name in from_file:
            counts[url] = from_file[name]
    return counts


class LossCounter:
    """Counts per (worker slot, shard): corrupt samples, samples lost in unreadable tails, tail events, and
    samples an exact epoch repeated to fill a quota the losses left short."""

    def __init__(self, urls: Sequence[str], slots: int = 1):
        self.urls = list(urls)
        self.counts = torch.zeros(max(slots, 1), len(self.urls), _COLUMNS, dtype=torch.int64)  # (slots, shards, 4)

    def share(self, slots: int) -> None:
        """Reallocate with `slots` rows in shared memory, so DataLoader worker processes can add to it."""
        self.counts = torch.zeros(max(slots, 1), len(self.urls), _COLUMNS, dtype=torch.int64).share_memory_()

    def add(self, slot: int, shard: int, column: int, amount: int = 1) -> None:
        self.counts[min(slot, self.counts.shape[0] - 1), shard, column] += amount

    def reset(self) -> None:
        self.counts.zero_()

    def totals(self) -> tuple[int, int, int]:
        """(corrupt samples, samples lost in tails, tail events) over all workers and shards."""
        corrupt, tail_samples, tails, _ = self.counts.sum(dim=(0, 1)).tolist()
        return int(corrupt), int(tail_samples), int(tails)

    def repeated(self) -> int:
        """Samples yielded a second time in an exact epoch (to keep every rank's batch count)."""
        return int(self.counts[..., REPEATS].sum())

    def lost(self) -> int:
        corrupt, tail_samples, _ = self.totals()
        return corrupt + tail_samples

    def describe(self, limit: int = 10) -> str:
        """'train-000003.tar: 224 samples (1 cut tail); ...' for the shards with losses, worst first."""
        per_shard = self.counts.sum(dim=0)  # (shards, 4)
        lost = per_shard[:, CORRUPT] + per_shard[:, TAIL_SAMPLES]
        order = torch.argsort(lost * 1_000_000 + per_shard[:, TAILS], descending=True).tolist()
        parts = []
        for index in order:
            corrupt, tail_samples, tails, _ = per_shard[index].tolist()
            if not (corrupt or tails):
                break
            what = [f"{corrupt} corrupt samples"] if corrupt else []
            if tails:
                what.append(f"{tail_samples} samples in {tails} unreadable tail{'s' if tails > 1 else ''}")
            parts.append(f"{os.path.basename(self.urls[index])}: {', '.join(what)}")
        more = sum(1 for i in order[len(parts):] if per_shard[i].any()) if len(parts) >= limit else 0
        return "; ".join(parts[:limit]) + (f"; ... {more} more shards" if more else "")
