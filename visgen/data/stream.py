"""Deterministic streaming of {"image": uint8, "label": int64} samples from WebDataset tar shards (no Lightning).

The DataLoader's default collate turns them into the dict batches `GenerativeModule.make_batch` reads.
Nothing is lost silently: corrupt samples and unreadable shard tails are counted per shard and worker
(`visgen.data.loss`), labels outside [0, num_classes) and images of another size than `image_size` (unless
`resize`) stop the run with `ShardDataError` naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from visgen.data.loss import CORRUPT, REPEATS, TAIL_SAMPLES, TAILS, LossCounter, shard_counts
from visgen.data.shards import IMAGE_EXTENSIONS, ShardTailError, iter_tar_samples

log = logging.getLogger(__name__)

MAX_SKIP_WARNINGS = 5  # per-sample warnings per worker pass; the rest only show in the end-of-stream summary
MAX_CONSECUTIVE_FAILURES = 1000  # resampled streams give up when this many reads in a row yield nothing
DEFAULT_SHARD_HINT = (
    "set data.train_shards / data.val_shards, or write the built-in shards with "
    "python -m visgen.data.builtin --out-dir <paths.data_dir>/digits"
)
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two or more letters, so 'C:\...' stays a local path

#: One sample: {"image": (3, H, W) uint8, "label": () int64}; collated into (B, ...) batches.
ImageLabel = dict[str, Tensor]


def expand_shard_spec(spec: str | list[str], hint: str = DEFAULT_SHARD_HINT) -> list[str]:
    """Brace-expand a shard spec ('::'-separated allowed) into URLs, checking that local files exist."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        for sub_spec in str(part).split("::"):
            if sub_spec.strip():
                urls.extend(braceexpand.braceexpand(sub_spec.strip()))
    if not urls:
        raise ValueError(f"shard spec {spec!r} is empty; {hint}")
    local = [url for url in urls if not _URL_SCHEME.match(url) or url.startswith("file:")]
    missing = [url for url in local if not os.path.isfile(url.removeprefix("file:"))]
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"shard spec {spec!r} matched no files (first missing: {missing[0]}); {hint}")
    if missing:
        raise FileNotFoundError(f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards are missing "
                                f"(first missing: {missing[0]}); rewrite the missing shards or fix the spec")
    return urls


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: halve with BOX while large, BICUBIC-resize the short side to size, crop the center."""
    if image_size <= 0:
        raise ValueError(f"center_crop_arr: image_size={image_size} must be positive")
    # Repeated exact 2x box downsampling first keeps the final bicubic step small (less aliasing, as in ADM).
    while min(pil_image.size) >= 2 * image_size:
        half_size = (pil_image.size[0] // 2, pil_image.size[1] // 2)
        pil_image = pil_image.resize(half_size, resample=Image.Resampling.BOX)
    scale = image_size / min(pil_image.size)
    new_size = (round(pil_image.size[0] * scale), round(pil_image.size[1] * scale))
    if new_size != pil_image.size:
        pil_image = pil_image.resize(new_size, resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)  # (H', W', C) with min(H', W') == image_size
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]  # (image_size, image_size, C)


def worker_seed(seed: int, epoch: int, rank: int, worker_id: int) -> int:
    """A 64-bit seed from (seed, epoch, rank, worker) via SHA-256, identical across processes and runs."""
    payload = b"visgen.ShardStream" + struct.pack("<4q", seed, epoch, rank, worker_id)
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def worker_share(total: int, worker_id: int, num_workers: int) -> int:
    """Worker `worker_id`'s share of `total` items split as evenly as possible (earlier workers get extra)."""
    return total // num_workers + (1 if worker_id < total % num_workers else 0)


def exact_epoch_counts(spec: str, urls: list[str], counts: dict[str, int], counts_file: str | None) -> list[int]:
    """Every shard's sample count in `urls` order; an error naming the fix when one is not known."""
    unknown = [url for url in urls if url not in counts]
    if unknown:
        raise ValueError(
            f"data.train_stream=exact needs the sample count of every shard, but {len(unknown)} of {len(urls)} "
            f"shards of {spec!r} (first: {unknown[0]}) are listed in no manifest.json, cache.json or _info.json "
            f"beside them{f' nor in {counts_file}' if counts_file else ''}; write the shards with python -m "
            "visgen.data.writer (it writes manifest.json), set data.counts_file to such a file, or use "
            "data.train_stream=resampled")
    return [counts[url] for url in urls]


def epoch_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an exact epoch: one permutation per (seed, epoch) that every rank and worker shares."""
    order = list(range(num_shards))
    random.Random(worker_seed(seed, epoch, -1, -1)).shuffle(order)  # rank = worker = -1: not any worker's rng
    return order


def plan_range(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard, skip, take) pieces covering positions [start, stop) of an epoch that reads the shards in `order`
    (each shard's samples in file order); `counts[shard]` is the shard's sample count."""
    pieces: list[tuple[int, int, int]] = []
    offset = 0
    for shard in order:
        low, high = max(start, offset), min(stop, offset + counts[shard])
        if low < high:
            pieces.append((shard, low - offset, high - low))
        offset += counts[shard]
        if offset >= stop:
            break
    return pieces


def buffer_shuffle(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a fixed-size buffer driven only by `rng`, so the order is reproducible."""
    # webdataset's own shuffle stage seeds itself from time/pid, which would break exact resume; this one
    # consumes nothing but the rng it is given.
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class CorruptSampleError(ValueError):
    """A sample whose members are missing or cannot be decoded (skipped and counted)."""


class ShardDataError(ValueError):
    """Shards that cannot train this run as configured: a label outside [0, num_classes), or an image of another
    size than data.image_size without data.resize. Stops the run (skipping would train on the wrong data)."""


def parse_label(raw: dict[str, Any], num_classes: int | None) -> int:
    """The `cls` member as an int in [0, num_classes); CorruptSampleError if unreadable, ShardDataError if outside."""
    if "cls" not in raw:
        raise CorruptSampleError(f"no cls member; has {sorted(k for k in raw if not k.startswith('__'))}")
    text = raw["cls"].decode("ascii", errors="replace").strip()
    try:
        label = int(text)
    except ValueError as exc:
        raise CorruptSampleError(f"cls member {text[:20]!r} is not an integer") from exc
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ShardDataError(f"shard {raw.get('__url__')} key {raw.get('__key__')!r}: label {label} is outside "
                             f"[0, data.num_classes={num_classes}); set data.num_classes to the shards' class "
                             "count, or point data.train_shards/val_shards at shards of this task")
    return label


class ShardStream(IterableDataset):
    """Class-conditional images from tar shards, split exactly over ranks and DataLoader workers."""

    def __init__(
        self,
        shards: str,
        image_size: int,
        resampled: bool,
        random_flip: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        samples_per_rank: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        num_classes: int | None = None,
        resize: bool = False,
        exact: bool = False,
        counts_file: str | None = None,
    ) -> None:
        """Check the arguments and expand the shard spec (a missing shard fails here, not in a worker).

        `resize=False` requires every image to be image_size x image_size (an error otherwise); True applies
        ADM's center crop (what ImageNet training does to images of any size).
        `exact=True` (train streams, not resampled): every epoch reads each sample at most once, in a shard order
        permuted per (seed, epoch); rank r takes positions [r x samples_per_rank, (r + 1) x samples_per_rank) of
        that order and its workers contiguous whole-batch parts of it, so every rank gets the same number of
        batches; the last `dropped_per_epoch` positions (fewer than world_size x batch_size unless
        samples_per_rank asks for fewer) are not read that epoch. Needs per-shard counts: manifest.json,
        cache.json or _info.json beside the shards, or `counts_file` (one of those, matched by file name).
        """
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank={rank} must be in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"ShardStream: batch_size={batch_size} must be positive")
        if exact and resampled:
            raise ValueError("ShardStream: exact=True reads each sample once per epoch; it cannot also be "
                             "resampled (data.train_stream is either exact or resampled)")
        if resampled or exact:
            if samples_per_rank is None or samples_per_rank <= 0:
                raise ValueError(f"ShardStream(resampled/exact=True) needs samples_per_rank > 0, got "
                                 f"{samples_per_rank}; pass the exact number of samples each rank yields "
                                 "per epoch")
            if samples_per_rank % batch_size != 0:
                raise ValueError(f"ShardStream: samples_per_rank={samples_per_rank} is not a multiple of "
                                 f"batch_size={batch_size}; workers hand out whole batches, so round it to a "
                                 "multiple of the per-device batch")
        self.spec = shards
        self.urls = expand_shard_spec(shards)
        self.image_size = image_size
        self.resampled = resampled
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.samples_per_rank = samples_per_rank
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.resize = resize
        self.epoch = 0
        self.skip_batches = 0
        self.exact = exact
        self.url_index = {url: index for index, url in enumerate(self.urls)}
        self.expected_counts = shard_counts(self.urls, counts_file)  # samples per shard, where the folder says
        if exact:
            self._check_exact(counts_file)
        #: What could not be read, per worker and shard; `loss.share(num_workers)` before handing it to workers.
        self.loss = LossCounter(self.urls)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far (by every worker, once `loss` is shared)."""
        return self.loss.totals()[CORRUPT]

    @property
    def num_shard_errors(self) -> int:
        """Shard reads that ended in an unreadable tail so far."""
        return self.loss.totals()[TAILS]

    @property
    def num_repeated(self) -> int:
        """Samples an exact epoch yielded twice to fill a quota that lost samples left short."""
        return self.loss.repeated()

    @property
    def num_samples_total(self) -> int:
        """Samples in all shards, from the per-shard counts (exact streams)."""
        return sum(self.expected_counts[url] for url in self.urls)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples an exact epoch does not read: the tail of its order beyond world_size x samples_per_rank."""
        return self.num_samples_total - self.world_size * (self.samples_per_rank or 0)

    def _check_exact(self, counts_file: str | None) -> None:
        """Exact epochs need every shard's count, and enough samples for every rank's quota."""
        exact_epoch_counts(self.spec, self.urls, self.expected_counts, counts_file)
        assert self.samples_per_rank is not None
        if self.dropped_per_epoch < 0:
            raise ValueError(
                f"ShardStream: {self.world_size} ranks x samples_per_rank={self.samples_per_rank} need "
                f"{self.world_size * self.samples_per_rank} samples per exact epoch but the shards of "
                f"{self.spec!r} hold {self.num_samples_total}; set data.num_train_samples to at most that")

    def worker_range(self, logical_id: int, num_workers: int) -> tuple[int, int]:
        """Positions [start, stop) of the exact epoch's order that logical worker `logical_id` reads."""
        num_batches = (self.samples_per_rank or 0) // self.batch_size
        before = sum(worker_share(num_batches, j, num_workers) for j in range(logical_id)) * self.batch_size
        start = self.rank * (self.samples_per_rank or 0) + before
        return start, start + self.worker_num_samples(logical_id, num_workers)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (reseeds every worker) and how many of this rank's batches were already used."""
        if skip_batches < 0:
            raise ValueError(f"ShardStream.set_epoch: skip_batches={skip_batches} must be >= 0")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        """Samples this rank yields per epoch (resampled and exact streams; others have no known length)."""
        if not (self.resampled or self.exact) or self.samples_per_rank is None:
            raise TypeError("a non-resampled ShardStream has no length until it has been read")
        return self.samples_per_rank

    def __iter__(self) -> Iterator[ImageLabel]:
        """Iterate this process's share: the DataLoader worker's, or everything for this rank in-process."""
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.iter_worker(worker_id, num_workers)

    def iter_worker(self, worker_id: int, num_workers: int) -> Iterator[ImageLabel]:
        """Yield what worker `worker_id` of `num_workers` on this rank yields (explicit for tests)."""
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"ShardStream: worker_id={worker_id} must be in [0, num_workers={num_workers})")
        if self.resampled or self.exact:
            return self._iter_quota(worker_id, num_workers)
        return self._iter_sequential(worker_id, num_workers)

    def worker_num_samples(self, worker_id: int, num_workers: int) -> int:
        """Samples a resampled worker yields per epoch: its share of whole batches times the batch size."""
        if self.samples_per_rank is None:
            raise ValueError(f"ShardStream({self.spec!r}).worker_num_samples needs samples_per_rank; it is "
                             "only defined for resampled and exact streams")
        num_batches = self.samples_per_rank // self.batch_size
        return worker_share(num_batches, worker_id, num_workers) * self.batch_size

    def worker_shards(self, worker_id: int, num_workers: int) -> list[str]:
        """Shards a non-resampled worker reads: shard i goes to global worker i % (world_size x workers)."""
        num_global_workers = self.world_size * num_workers
        if len(self.urls) < num_global_workers:
            # With fewer shards than ranks no worker setting helps: say so instead of pointing at num_workers.
            fix = ("lower data.num_workers" if len(self.urls) >= self.world_size else
                   f"write at least {self.world_size} shards (one per rank) for this split, or run it on fewer ranks")
            raise ValueError(f"{len(self.urls)} shards ({self.spec!r}) cannot feed {self.world_size} ranks x "
                             f"{num_workers} workers; {fix}")
        global_worker = self.rank * num_workers + worker_id
        return self.urls[global_worker::num_global_workers]

    def _iter_quota(self, worker_id: int, num_workers: int) -> Iterator[ImageLabel]:
        """A worker's exact quota of whole batches: resampled shards, or its part of the exact epoch's order;
        buffer-shuffled and flipped from one (seed, epoch, rank, worker) rng."""
        # The DataLoader takes batches round-robin from workers 0, 1, ...; logical worker r holds the rank's
        # batches r, r + W, ... (earlier workers get the extra one). A new iterator always starts at worker 0,
        # so after `skip_batches` = k used batches, physical worker w plays logical worker (w + k) % W and
        # drops that logical worker's share of the first k batches: the rest arrive in the original order.
        logical_id = (worker_id + self.skip_batches) % num_workers
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, logical_id))
        quota = self.worker_num_samples(logical_id, num_workers)
        num_to_skip = worker_share(self.skip_batches, logical_id, num_workers) * self.batch_size
        state = _PassState(worker_id)
        if self.exact:
            pieces = plan_range([self.expected_counts[url] for url in self.urls],
                                epoch_permutation(len(self.urls), self.seed, self.epoch),
                                *self.worker_range(logical_id, num_workers))
            source = self._exact_raw(pieces, state)
        else:
            source = self._resampled_raw(rng, state)
        raw_samples = buffer_shuffle(source, self.shuffle_buffer, rng)
        produced = 0
        failures_in_row = 0
        try:
            while produced < quota:
                raw = next(raw_samples, None)
                if raw is None:
                    # Exact epochs only: lost samples left the quota short; repeat the part read (counted) so
                    # this rank still yields as many batches as every other rank.
                    if state.repeat_passes >= 1 and state.yielded_in_pass == 0:
                        raise RuntimeError(f"rank {self.rank} worker {worker_id} epoch {self.epoch}: no readable "
                                           f"sample in its part of {self.spec!r}; check the shards (warnings above)")
                    state.repeat_passes += 1
                    state.yielded_in_pass = 0
                    raw_samples.close()
                    raw_samples = self._exact_raw(pieces, state, repeat=True)
                    continue
                item = self._item(raw, rng, state)
                if item is None:
                    failures_in_row += 1
                    if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                        raise RuntimeError(f"{failures_in_row} samples in a row from {self.spec!r} were "
                                           "corrupt; check the shards (see the warnings above)")
                    continue
                failures_in_row = 0
                state.yielded_in_pass += 1
                if state.repeat_passes:
                    self.loss.add(state.slot, self.url_index.get(raw.get("__url__"), 0), REPEATS)
                    state.repeated += 1
                # Skipped samples are still decoded and flipped so the rng advances exactly as before.
                if produced >= num_to_skip:
                    yield item
                produced += 1
        finally:
            raw_samples.close()
            self._report(state)

    def _exact_raw(self, pieces: list[tuple[int, int, int]], state: _PassState,
                   repeat: bool = False) -> Iterator[dict[str, Any]]:
        """Raw samples of (shard, skip, take) pieces: `take` samples after the first `skip` of each shard."""
        for shard, skip, take in pieces:
            yield from self._read_shard(self.urls[shard], state, window=(skip, take), count_loss=not repeat)

    def _resampled_raw(self, rng: random.Random, state: _PassState) -> Iterator[dict[str, Any]]:
        """Endless raw samples from shards drawn uniformly with replacement."""
        empty_in_row = 0
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            got_any = False
            for raw in self._read_shard(url, state):
                got_any = True
                yield raw
            empty_in_row = 0 if got_any else empty_in_row + 1
            if empty_in_row >= max(MAX_CONSECUTIVE_FAILURES // 10, len(self.urls)):
                raise RuntimeError(f"{empty_in_row} shard reads in a row from {self.spec!r} gave no samples; "
                                   "check the shards (see the warnings above)")

    def _iter_sequential(self, worker_id: int, num_workers: int) -> Iterator[ImageLabel]:
        """Read this worker's shards once, in order (flips, if enabled, are still seeded per worker)."""
        urls = self.worker_shards(worker_id, num_workers)
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, worker_id))
        state = _PassState(worker_id)
        try:
            for url in urls:
                for raw in self._read_shard(url, state):
                    item = self._item(raw, rng, state)
                    if item is not None:
                        yield item
        finally:
            self._report(state)

    def _read_shard(self, url: str, state: _PassState, window: tuple[int, int] | None = None,
                    count_loss: bool = True) -> Iterator[dict[str, Any]]:
        """Raw samples (member name -> bytes) of one shard, or of its samples [skip, skip + take) for
        `window=(skip, take)`; an unreadable tail is counted and logged, not raised."""
        skip, take = window if window is not None else (0, None)
        try:
            stream = wds.gopen(url, "rb")
        except Exception as exc:  # noqa: BLE001 - any open failure (missing file, failing pipe) loses the shard
            if count_loss:
                self._lost_tail(url, 0, f"cannot open it: {exc!r}", state, window)
            return
        num_read = 0
        try:
            for raw in iter_tar_samples(stream, url):
                num_read += 1
                if num_read > skip:  # the members before the window are read past, not decoded
                    yield raw
                if take is not None and num_read >= skip + take:
                    break
            else:
                if take is not None and count_loss:  # a shard shorter than its count says (a stale manifest)
                    self._lost_tail(url, num_read, "it ends early: fewer samples than its count", state, window)
            state.largest_shard = max(state.largest_shard, num_read)
        except ShardTailError as exc:
            if count_loss:
                self._lost_tail(url, exc.num_read, exc.reason, state, window)
        finally:
            try:
                stream.close()
            except Exception as exc:  # noqa: BLE001 - a pipe closed early may report SIGPIPE; nothing to do
                log.debug("closing shard %s: %r", url, exc)

    def _lost_tail(self, url: str, num_read: int, reason: str, state: _PassState,
                   window: tuple[int, int] | None = None) -> None:
        """Count the samples after a cut (exact with per-shard counts beside the shards, else estimated); with a
        `window` (exact epochs) only this worker's samples [skip, skip + take) of the shard."""
        expected = self.expected_counts.get(url)
        if window is not None:
            skip, take = window
            lost, how = take - min(max(num_read - skip, 0), take), f"of the {take} this worker reads from it"
        elif expected is not None:
            lost, how = max(expected - num_read, 0), f"of its {expected}"
        else:
            lost, how = max(state.largest_shard - num_read, 0), "estimated: no manifest.json/cache.json/_info.json " \
                "with per-shard counts beside the shards"
        shard = self.url_index[url]
        self.loss.add(state.slot, shard, TAIL_SAMPLES, lost)
        self.loss.add(state.slot, shard, TAILS)
        state.tails += 1
        state.tail_samples += lost
        if url not in state.warned:
            state.warned.add(url)
            log.warning("shard %s is unreadable after %d samples (%s): %d samples lost (%s)", url, num_read, reason,
                        lost, how)

    def _item(self, raw: dict[str, Any], rng: random.Random, state: _PassState) -> dict[str, Tensor] | None:
        """`decode_sample`, with corrupt samples counted and warned about (naming shard and key), not raised."""
        try:
            return self.decode_sample(raw, rng)
        except ShardDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types; one bad sample must never stop training
            if state.repeat_passes:
                return None  # counted on the first pass already
            self.loss.add(state.slot, self.url_index.get(raw.get("__url__"), 0), CORRUPT)
            state.corrupt += 1
            if state.corrupt <= MAX_SKIP_WARNINGS:
                log.warning("skipping corrupt sample %r in shard %s: %s: %s", raw.get("__key__"), raw.get("__url__"),
                            type(exc).__name__, exc)
            return None

    def decode_sample(self, raw: dict[str, Any], rng: random.Random) -> ImageLabel:
        """One raw sample -> {"image": (3, H, W) uint8, "label": int64}; raises for a corrupt sample."""
        image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_key is None:
            raise CorruptSampleError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); has {sorted(raw)}")
        label = parse_label(raw, self.num_classes)
        with Image.open(io.BytesIO(raw[image_key])) as pil_image:
            pil_image.load()
            rgb = pil_image.convert("RGB")
        if self.resize:
            arr = center_crop_arr(rgb, self.image_size)  # (H, W, 3) uint8
        elif rgb.size != (self.image_size, self.image_size):
            raise ShardDataError(f"shard {raw.get('__url__')} key {raw.get('__key__')!r}: image is "
                                 f"{rgb.size[0]}x{rgb.size[1]} but data.image_size={self.image_size}; set "
                                 "data.resize=true to ADM-center-crop every image to data.image_size, or write the "
                                 f"shards at this size (python -m visgen.data.writer --resize {self.image_size})")
        else:
            arr = np.array(rgb)  # (H, W, 3) uint8
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]  # (H, W, 3) mirrored left-right
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}

    def _report(self, state: _PassState) -> None:
        """End-of-pass summary of what this worker could not read."""
        if state.corrupt or state.tails:
            log.warning("ShardStream(%r) rank %d worker %d epoch %d: skipped %d corrupt samples; %d unreadable shard "
                        "tails lost %d samples", self.spec, self.rank, state.slot, self.epoch, state.corrupt,
                        state.tails, state.tail_samples)
        if state.repeated:
            log.warning("ShardStream(%r) rank %d worker %d epoch %d: repeated %d samples to keep whole batches after "
                        "losses", self.spec, self.rank, state.slot, self.epoch, state.repeated)


class _PassState:
    """Per worker pass: its slot in the loss counter and what it met (for warnings and estimates)."""

    def __init__(self, slot: int):
        self.slot = slot
        self.corrupt = 0
        self.tails = 0
        self.tail_samples = 0
        self.largest_shard = 0  # most samples read from one complete shard: estimates a cut shard's loss
        self.repeat_passes = 0  # exact epochs: passes over the worker's part again to fill a short quota
        self.yielded_in_pass = 0
        self.repeated = 0
        self.warned: set[str] = set()


def load_all(shards: str, image_size: int, num_classes: int | None = None,
             resize: bool = False) -> tuple[Tensor, Tensor]:
    """Read every sample of `shards` once, in shard order: uint8 images (N, 3, H, W) and int64 labels (N,)."""
    stream = ShardStream(shards, image_size, resampled=False, num_classes=num_classes, resize=resize)
    items = list(stream.iter_worker(0, 1))
    if not items:
        raise ValueError(f"load_all: shards {shards!r} yielded no readable samples "
                         f"({stream.num_skipped} corrupt, {stream.num_shard_errors} unreadable shard tails)")
    images = torch.stack([item["image"] for item in items])  # (N, 3, H, W) uint8
    labels = torch.stack([item["label"] for item in items])  # (N,) int64
    return images, labels
