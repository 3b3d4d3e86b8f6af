"""The distributed, resumable sampling job behind `evaluate.py`: N samples in fixed chunks, then `samples.npz`.

Sample i belongs to chunk i // chunk_size, and chunk c draws its labels and noise only from generators seeded by
(seed, c): whichever rank computes a chunk, and however many ranks there are, its images are the same (for the
same per-device batch, device type and software). Rank r computes the chunks c ≡ r (mod world size) that are not
on disk yet, writes each as soon as it is done (to a temporary name, then renamed: a killed job never leaves a
partial chunk), and its feature-extractor outputs beside it. A rerun of the same command continues where a killed
one stopped, with any number of ranks; `job.json` records what determines the samples, and a rerun that would
produce other samples is refused. At the end rank 0 streams the chunks, in index order, into `samples.npz` (ADM
layout: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels), written with fixed zip timestamps so that the same
samples always give the same bytes.

    out_dir/job.json                    what the samples depend on
    out_dir/chunks/000123.npz           images (n, H, W, 3) uint8, labels (n,) int64 of chunk 123
    out_dir/features/<extractor>/000123.npz   that chunk's features (float32), one folder per feature extractor
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visgen.eval.distributed import Ranks

log = logging.getLogger(__name__)

__all__ = ["ChunkPlan", "SampleJob", "LABEL_PROTOCOLS", "QUANTIZATIONS", "quantize", "postprocess", "write_npz"]

#: balanced: i % K (50 per class for 50k; MAR, VAR). uniform: uniformly random per sample (DiT, SiT, REPA, LlamaGen
#: draw torch.randint per batch), here drawn from the chunk's own generator.
LABEL_PROTOCOLS = ("balanced", "uniform")
#: float images in [-1, 1] -> uint8, each exactly as its anchor computes it:
#:   round_half_up    clamp(127.5 x + 128, 0, 255), truncated (DiT, SiT, LlamaGen sample_ddp.py)
#:   floor            clamp(255 (x + 1) / 2, 0, 255), truncated (REPA generate.py; ADM's ((x + 1) 127.5) too)
#:   round_half_even  round(clip(255 (x + 1) / 2, 0, 255)) with np.round's ties to even (MAR main_mar.py)
QUANTIZATIONS = ("round_half_up", "floor", "round_half_even")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip can store: fixed, so equal samples give equal bytes


def quantize(images: Tensor, mode: str) -> Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 with one of `QUANTIZATIONS`."""
    x = images.float()
    if mode == "round_half_up":
        return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)
    if mode == "floor":
        return (255.0 * ((x + 1) / 2)).clamp(0, 255).to(torch.uint8)
    if mode == "round_half_even":
        return (255.0 * ((x + 1) / 2)).clamp(0, 255).round().to(torch.uint8)
    raise ValueError(f"quantize={mode!r} is not one of {', '.join(QUANTIZATIONS)}")


def postprocess(images: Tensor, quantize_mode: str, resize_to: int | None = None, resize_mode: str = "bicubic",
                resize_antialias: bool = False) -> Tensor:
    """Decoded images in [-1, 1] -> (optional float resize, as LlamaGen's 384 -> 256 bicubic) -> uint8."""
    if resize_to and images.shape[-1] != resize_to:
        images = F.interpolate(images.float(), size=(resize_to, resize_to), mode=resize_mode,
                               antialias=resize_antialias)  # (B, 3, resize_to, resize_to)
    return quantize(images, quantize_mode)


def _derived_seed(tag: bytes, *values: int) -> int:
    """A 63-bit seed from (tag, values) via SHA-256: independent streams for labels and noise."""
    payload = tag + struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class ChunkPlan:
    """Which indices, labels and noise seeds make up each chunk."""

    num_samples: int
    chunk_size: int
    seed: int
    num_classes: int
    labels: str = "balanced"

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.chunk_size < 1:
            raise ValueError(f"num_samples={self.num_samples} and batch_size={self.chunk_size} must be positive")
        if self.labels not in LABEL_PROTOCOLS:
            raise ValueError(f"labels={self.labels!r} is not one of {', '.join(LABEL_PROTOCOLS)}")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        """[start, stop) sample indices of `chunk`."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def labels_of(self, chunk: int) -> Tensor:
        """int64 labels (n,) of the chunk's samples, on the CPU."""
        start, stop = self.bounds(chunk)
        classes = max(self.num_classes, 1)  # an unconditional model gets label 0 (as balanced_labels)
        if self.labels == "balanced":
            return torch.arange(start, stop) % classes  # (n,)
        generator = torch.Generator().manual_seed(_derived_seed(b"visgen.labels", self.seed, chunk))
        return torch.randint(classes, (stop - start,), generator=generator)  # (n,)

    def generator(self, chunk: int, device: torch.device | str) -> torch.Generator:
        """The chunk's noise generator (the seeds evaluate.py always used: seed * 1_000_003 + chunk)."""
        return torch.Generator(device).manual_seed(self.seed * 1_000_003 + chunk)

    def size(self, chunk: int) -> int:
        start, stop = self.bounds(chunk)
        return stop - start

    def chunks_of(self, rank: int, world_size: int) -> range:
        return range(rank, self.num_chunks, world_size)


def write_npz(path: Path, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]) -> Path:
    """Write an uncompressed .npz (as np.savez) from streamed parts, with fixed zip metadata: same data, same bytes.

    `arrays` maps a name to (shape, dtype, parts); the parts are concatenated along axis 0 and must fill `shape`.
    """
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (shape, dtype, parts) in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.external_attr = 0o600 << 16  # what ZipFile.open(name, "w") gives, fixed here
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": tuple(int(s) for s in shape)}
            written, row_bytes = 0, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            with archive.open(info, "w", force_zip64=True) as stream:
                np.lib.format.write_array_header_1_0(stream, header)  # as np.save
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    if part.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"write_npz: part of shape {part.shape} does not fit {name} {shape}")
                    stream.write(memoryview(part).cast("B"))
                    written += len(part)
            if written != shape[0]:
                raise ValueError(f"write_npz: {name} got {written} rows, expected {shape[0]} ({written * row_bytes}"
                                 " bytes)")
    os.replace(tmp, path)
    return path


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to a temporary name in the same folder, then rename: readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class _Progress:
    """A rich bar on a terminal; a log line every `every_s` seconds otherwise (SLURM logs, pipes)."""

    def __init__(self, total_images: int, done_images: int, world_size: int, enabled: bool,
                 every_s: float = 60.0) -> None:
        self.total, self.done, self.world_size, self.enabled = total_images, done_images, world_size, enabled
        self.start, self.started_from, self.every_s, self.last_log = time.perf_counter(), done_images, every_s, 0.0
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("sampling (rank 0 of {task.fields[world]})"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("sampling", total=total_images, completed=done_images,
                                          world=world_size, rate="")
            self.bar.start()

    def rate(self) -> float:
        """This rank's images per second since the start of this run."""
        return (self.done - self.started_from) / max(time.perf_counter() - self.start, 1e-9)

    def update(self, images: int) -> None:
        self.done += images
        if not self.enabled:
            return
        rate = self.rate()
        text = f"{rate:.2f} img/s (all ranks ~{rate * self.world_size:.2f})"
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=text)
        elif time.perf_counter() - self.last_log >= self.every_s or self.done >= self.total:
            self.last_log = time.perf_counter()
            eta_s = (self.total - self.done) / max(rate, 1e-9)
            log.info("sampling rank 0: %d/%d images, %s, ETA %s", self.done, self.total, text,
                     time.strftime("%H:%M:%S", time.gmtime(eta_s)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


SampleFn = Callable[[Tensor, torch.Generator], Tensor]  # (labels (n,), generator) -> uint8 (n, 3, H, W)
Extractor = Callable[[Tensor], Mapping[str, Tensor]]  # uint8 (n, 3, H, W) -> {name: (n, D)}


class SampleJob:
    """One output folder's chunks, their features and `samples.npz`."""

    def __init__(self, out_dir: str | Path, plan: ChunkPlan, identity: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.identity = {"plan": {"num_samples": plan.num_samples, "batch_size": plan.chunk_size, "seed": plan.seed,
                                  "num_classes": plan.num_classes, "labels": plan.labels},
                         **json.loads(json.dumps(dict(identity), default=str))}
        self.chunk_dir = self.out_dir / "chunks"

    # ----- files --------------------------------------------------------------------------------
    def chunk_path(self, chunk: int) -> Path:
        return self.chunk_dir / f"{chunk:06d}.npz"

    def features_path(self, key: str, chunk: int) -> Path:
        return self.out_dir / "features" / key / f"{chunk:06d}.npz"

    def is_done(self, chunk: int) -> bool:
        return self.chunk_path(chunk).is_file()

    def num_done(self) -> int:
        return sum(self.is_done(c) for c in range(self.plan.num_chunks))

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, H, W, 3) uint8, labels (n,) int64) of a finished chunk."""
        with np.load(self.chunk_path(chunk)) as data:
            return data["images"], data["labels"]

    # ----- the job ------------------------------------------------------------------------------
    def prepare(self, ranks: Ranks) -> int:
        """Rank 0 writes job.json, or checks that an existing one describes the same samples; returns chunks done."""
        job_file = self.out_dir / "job.json"
        if ranks.is_main:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
            if job_file.exists():
                recorded = json.loads(job_file.read_text())
                if recorded != self.identity:
                    diff = _differences(recorded, self.identity)
                    raise ValueError(
                        f"{self.out_dir} holds chunks of another sampling job ({'; '.join(diff[:5])}); resuming would "
                        "mix samples. Use another out_dir, or overwrite=true to start over")
            else:
                tmp = job_file.with_name("job.json.tmp")
                tmp.write_text(json.dumps(self.identity, indent=2))
                os.replace(tmp, job_file)
        ranks.barrier()
        if not ranks.is_main and json.loads(job_file.read_text()) != self.identity:
            raise ValueError(f"rank {ranks.rank}: {job_file} differs from this rank's job; every rank must run the "
                             "same command")
        return self.num_done()

    def run(self, ranks: Ranks, sample_fn: SampleFn, extractors: Mapping[str, Extractor] | None = None,
            progress: bool = True) -> dict[str, float]:
        """Compute this rank's missing chunks (and features), then wait for every rank. Returns speed numbers."""
        extractors = dict(extractors or {})
        mine = list(self.plan.chunks_of(ranks.rank, ranks.world_size))
        todo = [c for c in mine if not self.is_done(c)]
        bar = _Progress(sum(map(self.plan.size, mine)), sum(self.plan.size(c) for c in mine if c not in todo),
                        ranks.world_size, progress and ranks.is_main)
        timings = {"sampling_seconds": 0.0, "feature_seconds": 0.0, "sampled_images": 0}
        try:
            for chunk in todo:
                labels = self.plan.labels_of(chunk).to(ranks.device)  # (n,)
                start = time.perf_counter()
                images = sample_fn(labels, self.plan.generator(chunk, ranks.device))  # (n, 3, H, W) uint8
                _sync(ranks.device)
                timings["sampling_seconds"] += time.perf_counter() - start
                timings["sampled_images"] += len(labels)
                self._extract(chunk, images, extractors, timings)
                _atomic_savez(self.chunk_path(chunk), images=images.permute(0, 2, 3, 1).cpu().numpy(),
                              labels=labels.cpu().numpy())
                bar.update(len(labels))
        finally:
            bar.close()
        for chunk in mine:  # chunks sampled by an earlier run before these extractors were asked for
            missing = {k: e for k, e in extractors.items() if not self.features_path(k, chunk).is_file()}
            if missing:
                images, _ = self.read_chunk(chunk)
                self._extract(chunk, torch.from_numpy(images).permute(0, 3, 1, 2).to(ranks.device), missing, timings)
        ranks.barrier()
        return timings

    def _extract(self, chunk: int, images: Tensor, extractors: Mapping[str, Extractor],
                 timings: dict[str, float]) -> None:
        for key, extractor in extractors.items():
            start = time.perf_counter()
            feats = {name: value.cpu().numpy() for name, value in extractor(images).items()}
            timings["feature_seconds"] += time.perf_counter() - start
            path = self.features_path(key, chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_savez(path, **feats)

    # ----- results (rank 0, after run) ----------------------------------------------------------
    def features(self, key: str) -> dict[str, Tensor]:
        """Every chunk's features of extractor `key`, concatenated in sample order: {name: (N, D) float32}."""
        parts: dict[str, list[np.ndarray]] = {}
        for chunk in range(self.plan.num_chunks):
            with np.load(self.features_path(key, chunk)) as data:
                for name in data.files:
                    parts.setdefault(name, []).append(data[name])
        return {name: torch.from_numpy(np.concatenate(values)) for name, values in parts.items()}

    def iter_images(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in range(self.plan.num_chunks):
            yield self.read_chunk(chunk)

    def write_samples_npz(self, path: Path | None = None) -> Path:
        """Stream the chunks into `samples.npz` (arr_0 uint8 NHWC, arr_1 int64 labels), byte-reproducibly."""
        path = path or self.out_dir / "samples.npz"
        missing = [c for c in range(self.plan.num_chunks) if not self.is_done(c)]
        if missing:
            raise RuntimeError(f"{len(missing)} chunks of {self.out_dir} are missing (first {missing[0]}); run the "
                               "job to completion first")
        first_images, _ = self.read_chunk(0)
        n = self.plan.num_samples
        write_npz(path, {
            "arr_0": ((n, *first_images.shape[1:]), np.uint8, (images for images, _ in self.iter_images())),
            "arr_1": ((n,), np.int64, (labels for _, labels in self.iter_images())),
        })
        return path

    def images(self, limit: int | None = None) -> Tensor:
        """The first `limit` (default all) samples as uint8 (n, 3, H, W), from the chunks."""
        parts, count = [], 0
        for images, _ in self.iter_images():
            parts.append(torch.from_numpy(images))
            count += len(images)
            if limit is not None and count >= limit:
                break
        return torch.cat(parts)[:limit].permute(0, 3, 1, 2).contiguous()


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable 'key: recorded -> current' lines between two JSON trees."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current)):
            out += _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if recorded == current else [f"{prefix.rstrip('.')}: {recorded!r} -> {current!r}"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
