"""Reference statistics for FID-type metrics: ADM reference batches, or the same format computed from shards.

    python -m visgen.eval.reference --shards 'data/imagenet/train-{000000..001023}.tar' --image-size 256 \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth --out refs/in256_train.npz
    torchrun --nproc-per-node 8 -m visgen.eval.reference ...            # the same, over 8 ranks

The file is an .npz with the keys of the ADM evaluator's reference batches (`VIRTUAL_imagenet256_labeled.npz`),
so either kind works as `metrics.reference=`:

    mu, sigma                 (2048,), (2048, 2048)  Inception pool_3 statistics (FID)
    mu_s, sigma_s             (2023,), (2023, 2023)  Inception mixed_6/conv statistics (sFID)
    arr_0, arr_1              (M, H, W, 3) uint8, (M,) labels: images for precision/recall (ADM keeps 10,000)
    mu_dinov2, sigma_dinov2   DINOv2 statistics (FD-DINOv2; visgen's files only, with --dinov2-weights)
    visgen_meta               JSON (as uint8 bytes): shards, image count, crop, extractors and their hashes

Images are read with visgen's data stream (`ShardStream`: ADM center crop to --image-size, no flips), every sample
of the shard set exactly once over ranks x workers; statistics are float64 sums reduced over ranks. arr_0 holds
the first --keep-images images rank 0 reads (shards are written shuffled, so a random subset).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from visgen.data.cached import file_sha256
from visgen.eval.distributed import Ranks, setup_ranks
from visgen.eval.inception import INCEPTION_SHA256, InceptionFeatures
from visgen.eval.metrics import GaussianStats
from visgen.eval.sample_job import write_npz

log = logging.getLogger(__name__)

__all__ = ["Reference", "load_reference", "compute_reference", "reference_features", "iter_npz_rows", "main"]

#: metric -> (mean key, covariance key, feature dims or None for any)
STAT_KEYS = {"fid": ("mu", "sigma", 2048), "sfid": ("mu_s", "sigma_s", 2023),
             "fd_dinov2": ("mu_dinov2", "sigma_dinov2", None)}
FIX = ("use an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or one written by "
       "`python -m visgen.eval.reference`")


@dataclass
class Reference:
    """A validated reference file: its statistics per metric, its images' location, its hash and metadata."""

    path: Path
    sha256: str
    stats: dict[str, GaussianStats]
    num_images: int = 0
    image_shape: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)


def _read_header(stream: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an .npy stream positioned at its start; C order only."""
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{where}: .npy format version {version} is not supported (1.0 or 2.0)")
    shape, fortran, dtype = readers[version](stream)
    if fortran or dtype.hasobject:
        raise ValueError(f"{where} is stored in Fortran order or holds Python objects; save it with np.savez")
    return shape, dtype


def _member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(f"{key}.npy") as stream:
        return _read_header(stream, key)


def iter_npz_rows(path: str | Path, key: str, batch_rows: int) -> Iterator[np.ndarray]:
    """Rows of array `key` of an uncompressed .npz, `batch_rows` at a time, without loading the whole array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        shape, dtype = _read_header(stream, f"{path}: {key}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_rows):
            rows = min(batch_rows, shape[0] - start)
            data = stream.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise ValueError(f"{path}: {key} ends after {start} of {shape[0]} rows (truncated file)")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(rows, *shape[1:])  # writable: torch takes it


def load_reference(path: str | Path, metrics: Sequence[str]) -> Reference:
    """Open and check a reference .npz for `metrics` (fid, sfid, fd_dinov2, precision_recall); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} does not exist; {FIX}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"reference {path} is not an .npz file ({err}); {FIX}") from err
    with archive:
        keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
        headers = {key: _member_header(archive, key) for key in keys}
    stats: dict[str, GaussianStats] = {}
    with np.load(path, allow_pickle=False) as data:
        for metric in metrics:
            if metric not in STAT_KEYS:
                continue
            mean_key, cov_key, dims = STAT_KEYS[metric]
            if mean_key not in keys or cov_key not in keys:
                raise ValueError(f"reference {path} has no '{mean_key}'/'{cov_key}' (it holds {sorted(keys)}), which "
                                 f"{metric} needs; {FIX}" + (" with --dinov2-weights" if metric == "fd_dinov2" else ""))
            (mean_shape, mean_dtype), (cov_shape, cov_dtype) = headers[mean_key], headers[cov_key]
            want = dims or (mean_shape[0] if len(mean_shape) == 1 else -1)
            if mean_shape != (want,) or cov_shape != (want, want) or mean_dtype.kind != "f" or cov_dtype.kind != "f":
                raise ValueError(
                    f"reference {path}: '{mean_key}' is {mean_dtype} {mean_shape} and '{cov_key}' {cov_dtype} "
                    f"{cov_shape}; {metric} needs float ({want},) and ({want}, {want}); {FIX}")
            stats[metric] = GaussianStats(data[mean_key].astype(np.float64), data[cov_key].astype(np.float64))
        meta = json.loads(bytes(data["visgen_meta"]).decode()) if "visgen_meta" in keys else {}
    num_images, image_shape = 0, ()
    if "arr_0" in keys:
        shape, dtype = headers["arr_0"]
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"reference {path}: arr_0 is {dtype} {shape}; images must be uint8 (M, H, W, 3)")
        num_images, image_shape = shape[0], shape[1:]
    if "precision_recall" in metrics and num_images < 4:
        raise ValueError(f"reference {path} has {num_images} images in arr_0; precision/recall (k = 3) needs them "
                         f"(the ADM batches hold 10,000); {FIX}")
    return Reference(path, file_sha256(path), stats, num_images, tuple(image_shape), meta)


@torch.no_grad()
def reference_features(reference: Reference, inception: InceptionFeatures, cache_dir: str | Path | None,
                       batch_size: int = 250) -> Tensor:
    """Inception pool features (M, 2048) of the reference's arr_0 images, cached per (file, weights) hash."""
    cache = Path(cache_dir) / "reference_features" / f"{reference.sha256[:16]}_{inception.sha256[:16]}.npy" if (
        cache_dir) else None
    if cache is not None and cache.is_file():
        return torch.from_numpy(np.load(cache))
    parts = [inception(torch.from_numpy(rows).permute(0, 3, 1, 2))["pool"].cpu()
             for rows in iter_npz_rows(reference.path, "arr_0", batch_size)]
    feats = torch.cat(parts)  # (M, 2048)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, feats.numpy())
        tmp.replace(cache)
    return feats


class _Moments:
    """Float64 running Σx and Σxxᵀ of one feature, on the device; reduced over ranks at the end."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.outer: Tensor | None = None
        self.count = 0

    def add(self, feats: Tensor) -> None:
        x = feats.double()  # (B, D)
        if self.total is None:
            self.total, self.outer = x.sum(0), x.T @ x
        else:
            self.total += x.sum(0)
            self.outer += x.T @ x  # (D, D)
        self.count += len(x)

    def stats(self, ranks: Ranks) -> tuple[np.ndarray, np.ndarray, int]:
        count = int(ranks.sum(torch.tensor([self.count], dtype=torch.float64))[0])
        total, outer = ranks.sum(self.total), ranks.sum(self.outer)
        mu = total / count
        sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)  # unbiased, as np.cov
        return mu.cpu().numpy(), sigma.cpu().numpy(), count


def compute_reference(shards: str, image_size: int, out: str | Path, inception_weights: str | Path,
                      dinov2_weights: str | Path | None = None, keep_images: int = 10_000, batch_size: int = 250,
                      num_workers: int = 4, inception_sha256: str | None = INCEPTION_SHA256,
                      ranks: Ranks | None = None, overwrite: bool = False) -> Path | None:
    """Read every image of `shards` once, accumulate feature statistics, write the reference (rank 0)."""
    from torch.utils.data import DataLoader

    from visgen.data.stream import ShardStream

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ranks = ranks or setup_ranks()
    extractors = {"inception": InceptionFeatures(inception_weights, inception_sha256).to(ranks.device)}
    if dinov2_weights:
        from visgen.eval.dinov2 import DINOv2Features

        extractors["dinov2"] = DINOv2Features(dinov2_weights).to(ranks.device)
    stream = ShardStream(shards, image_size, resampled=False, rank=ranks.rank, world_size=ranks.world_size)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers)
    moments = {name: _Moments() for name in ("mu", "mu_s", "mu_dinov2")}
    kept_images, kept_labels, kept = [], [], 0
    for batch in loader:
        images = batch["image"]  # (B, 3, H, W) uint8
        feats = extractors["inception"](images)
        moments["mu"].add(feats["pool"])
        moments["mu_s"].add(feats["spatial"])
        if "dinov2" in extractors:
            moments["mu_dinov2"].add(extractors["dinov2"](images)["dinov2"])
        if ranks.is_main and kept < keep_images:
            kept_images.append(images[: keep_images - kept].permute(0, 2, 3, 1).numpy())
            kept_labels.append(batch["label"][: keep_images - kept].numpy())
            kept += len(kept_images[-1])
    results = {key: m.stats(ranks) for key, m in moments.items() if m.count or key != "mu_dinov2"}
    ranks.barrier()
    if not ranks.is_main:
        return None
    count = results["mu"][2]
    if kept < keep_images:
        log.warning("reference: rank 0 read %d images, fewer than --keep-images %d; arr_0 holds %d", kept,
                    keep_images, kept)
    meta = {"shards": shards, "num_images": count, "image_size": image_size, "crop": "ADM center crop",
            "arr_0": f"the first {kept} images rank 0 read ({ranks.world_size} ranks x {num_workers} workers)",
            "extractors": {name: e.id for name, e in extractors.items()}, "format": "visgen reference v1"}
    arrays: dict[str, tuple] = {}
    for mean_key, (mu, sigma, _) in results.items():
        cov_key = {"mu": "sigma", "mu_s": "sigma_s", "mu_dinov2": "sigma_dinov2"}[mean_key]
        arrays[mean_key] = (mu.shape, np.float64, [mu])
        arrays[cov_key] = (sigma.shape, np.float64, [sigma])
    if kept:
        arrays["arr_0"] = ((kept, *kept_images[0].shape[1:]), np.uint8, kept_images)
        arrays["arr_1"] = ((kept,), np.int64, kept_labels)
    meta_bytes = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["visgen_meta"] = (meta_bytes.shape, np.uint8, [meta_bytes])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, arrays)
    log.info("wrote %s: statistics of %d images, %d kept for precision/recall", out, count, kept)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m visgen.eval.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard spec, e.g. 'data/in1k/train-{0000..1023}.tar'")
    parser.add_argument("--image-size", type=int, required=True, help="ADM center crop to this size (256, 512)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--inception-weights", required=True, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--inception-sha256", default=INCEPTION_SHA256, help="'' accepts any weights (not comparable)")
    parser.add_argument("--dinov2-weights", default=None, help="dinov2_vitl14_pretrain.pth: adds FD-DINOv2 statistics")
    parser.add_argument("--keep-images", type=int, default=10_000, help="images kept as arr_0 for precision/recall")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        compute_reference(args.shards, args.image_size, args.out, args.inception_weights, args.dinov2_weights,
                          args.keep_images, args.batch_size, args.num_workers, args.inception_sha256 or None,
                          overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
