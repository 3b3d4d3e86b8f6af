"""`python -m visgen.data.cache experiment=<preset> cache.out_dir=<dir> [key=value ...]`: encode once, train many.

Runs the preset's tokenizer (`model.tokenizer`, built alone) over image shards (`cache.src`, by default the
preset's `data.train_shards`) and writes `cache-%06d.tar`, one per source shard with the same keys in the
same order, plus the sidecar `cache.json` (visgen.data.cached). KL tokenizers store the posterior moments of
the crop and of its mirror image (MAR's cache); VQ tokenizers store codes, of the crop and its mirror or of
LlamaGen's ten crops (`cache.views=ten_crop`, crop range `cache.crop_range`). `cache.keep_image=true` also
stores the crop as PNG (REPA). `cache.dtype=bfloat16` halves the disk of KL moments.

Distributed and resumable: rank r of W (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS)
encodes source shards r, r + W, ... ; each output shard is written via a temporary file and recorded when
whole, so a rerun of the same command skips finished shards and a changed setting is refused. Whichever rank
finishes last writes `cache.json`. Decoding runs in `cache.num_workers` processes per rank (each shard's
samples stay in order); memory holds `num_workers` shards' current batches, never the data set.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from visgen.data.cached import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CROPS,
    SHARD_PATTERN,
    SIDECAR_NAME,
    file_sha256,
    tokenizer_fingerprint,
    view_count,
)
from visgen.data.shards import IMAGE_EXTENSIONS, AtomicTarWriter, ShardTailError, encode_png, iter_tar_samples
from visgen.data.stream import center_crop_arr, expand_shard_spec, parse_label

log = logging.getLogger(__name__)

__all__ = ["build_cache", "crops_of", "main", "CacheSettings"]

TOOL_VERSION = "visgen.data.cache 1"
_STATE_NAME = ".cache-state.json"
_PROGRESS_DIR = ".progress"


class CacheSettings(dict):
    """What decides the bytes of a cache (a resume must match it): a plain dict, written to .cache-state.json."""


def crops_of(image: Image.Image, image_size: int, crop: str, crop_range: float = 1.1) -> np.ndarray:
    """The views a cache encodes, as pixels: (2 or 10, S, S, 3) uint8, ordered [crops, their mirror images].

    adm_center: ADM's center crop to S (DiT, SiT, MAR) and its mirror image (MAR's `x.flip(dims=[3])`).
    ten_crop: LlamaGen's ten crops: ADM's center crop to int(S x crop_range), its four corners and center of size
    S (torchvision's five_crop), then the same five of the mirrored image, reordered so that view 5 + k mirrors
    view k (for the center only up to a 1 px shift when the margin is odd, exactly as torchvision's ten_crop).
    """
    rgb = image.convert("RGB")
    if crop == "adm_center":
        arr = center_crop_arr(rgb, image_size)  # (S, S, 3)
        return np.stack([arr, arr[:, ::-1]])
    big = center_crop_arr(rgb, int(image_size * crop_range))  # (L, L, 3)
    side, size = big.shape[0], image_size
    center = int(round((side - size) / 2.0))  # torchvision's center_crop rounding
    corners = [(0, 0), (0, side - size), (side - size, 0), (side - size, side - size), (center, center)]
    mirrored = big[:, ::-1]
    plain = [big[t : t + size, x : x + size] for t, x in corners]  # tl, tr, bl, br, center
    flips = [mirrored[t : t + size, x : x + size] for t, x in corners]  # tl, tr, bl, br, center of the mirror
    return np.stack(plain + [flips[1], flips[0], flips[3], flips[2], flips[4]])  # flip(tl) is the mirror's tr


def _source_fingerprint(urls: list[str]) -> dict[str, Any]:
    """The source's manifest.json SHA-256 when it has one, else a hash of its shard names and sizes."""
    folder = os.path.dirname(urls[0])
    manifest = Path(folder) / "manifest.json"
    listing = "\n".join(f"{os.path.basename(u)} {os.path.getsize(u) if os.path.isfile(u) else -1}" for u in urls)
    import hashlib

    return {"spec_first": urls[0], "num_shards": len(urls),
            "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}


class _SourceBatches(IterableDataset):
    """Decoded, cropped batches of this rank's source shards, each shard's samples in order.

    Worker w of N takes shards w, w + N, ... of the list and yields dicts {"shard", "keys", "labels", "crops"
    (B, views, S, S, 3) uint8, "pngs", "skipped", "end"}; the last batch of a shard has "end" set.
    """

    def __init__(self, urls: list[tuple[int, str]], image_size: int, crop: str, crop_range: float, batch_size: int,
                 keep_image: bool, skip_unreadable: bool, num_classes: int | None):
        super().__init__()
        self.urls, self.image_size, self.crop, self.crop_range = urls, image_size, crop, crop_range
        self.batch_size, self.keep_image, self.skip_unreadable = batch_size, keep_image, skip_unreadable
        self.num_classes = num_classes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for shard, url in self.urls[worker::workers]:
            yield from self._shard_batches(shard, url)

    def _shard_batches(self, shard: int, url: str) -> Iterator[dict[str, Any]]:
        batch: dict[str, Any] = self._empty(shard)
        try:
            with wds.gopen(url, "rb") as stream:
                for raw in iter_tar_samples(stream, url):
                    try:
                        crops = self._decode(raw)
                        label = parse_label(raw, self.num_classes)
                    except Exception as exc:  # noqa: BLE001 - PIL raises many types
                        self._unreadable(f"sample {raw['__key__']!r} of {url}: {type(exc).__name__}: {exc}", batch)
                        continue
                    batch["keys"].append(raw["__key__"])
                    batch["labels"].append(label)
                    batch["crops"].append(crops)
                    if self.keep_image:
                        batch["pngs"].append(encode_png(crops[0]))
                    if len(batch["keys"]) == self.batch_size:
                        yield self._finish(batch)
                        batch = self._empty(shard)
        except ShardTailError as exc:
            self._unreadable(f"{exc}", batch)
        batch["end"] = True
        yield self._finish(batch)

    def _decode(self, raw: dict[str, Any]) -> np.ndarray:
        image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_key is None:
            raise ValueError(f"no image member; has {sorted(raw)}")
        with Image.open(io.BytesIO(raw[image_key])) as image:
            image.load()
            return crops_of(image, self.image_size, self.crop, self.crop_range)

    def _unreadable(self, what: str, batch: dict[str, Any]) -> None:
        if not self.skip_unreadable:
            raise RuntimeError(f"cannot read {what}. Fix the source shard (python -m visgen.data.verify names every "
                               "problem) or set cache.skip_unreadable=true to leave it out (recorded in cache.json)")
        batch["skipped"].append(what)

    @staticmethod
    def _empty(shard: int) -> dict[str, Any]:
        return {"shard": shard, "keys": [], "labels": [], "crops": [], "pngs": [], "skipped": [], "end": False}

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        size = self.image_size
        crops = np.stack(batch["crops"]) if batch["crops"] else np.zeros((0, 2, size, size, 3), np.uint8)
        return {**batch, "crops": torch.from_numpy(crops), "labels": torch.tensor(batch["labels"], dtype=torch.int64)}


@torch.no_grad()
def encode_views(tokenizer: torch.nn.Module, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 views (B, V, S, S, 3) -> the tokenizer's encode of each: (B, V, *encode shape)."""
    batch, num_views = views.shape[:2]
    # visgen.sampling.from_uint8's arithmetic (not imported: it would pull in torchvision for nothing)
    images = views.to(device).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B V, 3, S, S) in [-1, 1]
    return tokenizer.encode(images).unflatten(0, (batch, num_views))  # (B, V, ...)


def _to_bytes(views: torch.Tensor, storage_dtype: str) -> list[bytes]:
    """(B, views, ...) encode output -> per-sample little-endian bytes in the storage dtype."""
    if storage_dtype == "bfloat16":
        array = views.to(torch.bfloat16).view(torch.int16).cpu().numpy().astype("<i2")
    elif storage_dtype in ("uint16", "int32"):
        array = views.cpu().numpy().astype("<u2" if storage_dtype == "uint16" else "<i4")
    else:
        array = views.float().cpu().numpy().astype("<f4")
    return [sample.tobytes() for sample in array]


def build_cache(tokenizer: torch.nn.Module, src: str, out_dir: str | Path, image_size: int, crop: str = "adm_center",
                crop_range: float = 1.1, dtype: str = "float32", keep_image: bool = False, batch_size: int = 64,
                num_workers: int = 0, num_classes: int | None = None, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu", skip_unreadable: bool = False) -> dict[str, Any] | None:
    """Encode this rank's share of `src` into `out_dir`; returns the sidecar once every shard is done, else None."""
    if crop not in CROPS:
        raise ValueError(f"cache.views: crop {crop!r} is not one of {CROPS} (flip -> adm_center)")
    if keep_image and crop == "ten_crop":
        raise ValueError("cache.keep_image=true stores one image per sample; it needs cache.views=flip, not ten_crop")
    out_dir = Path(out_dir)
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    kind = "codes" if getattr(tokenizer, "vocab_size", None) else "moments"
    if kind == "codes":
        dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32"
    elif dtype not in ("float32", "bfloat16"):
        raise ValueError(f"cache.dtype={dtype!r}: moments are stored as float32 or bfloat16")
    urls = expand_shard_spec(src, hint="set cache.src to the image shards to encode")
    with torch.no_grad():
        encode_shape = tuple(tokenizer.encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])
    identity = {"id": tokenizer.id, "weights_sha256": tokenizer_fingerprint(tokenizer),
                "class": type(tokenizer).__name__}  # the class name is informational: nothing is built from it
    settings = CacheSettings(
        tool=TOOL_VERSION, kind=kind, image_size=image_size, crop=crop,
        crop_size=int(image_size * crop_range) if crop == "ten_crop" else image_size, storage_dtype=dtype,
        sample_shape=[view_count(crop), *encode_shape], keep_image=keep_image, tokenizer=identity,
        source=_source_fingerprint(urls), skip_unreadable=skip_unreadable)
    _claim_settings(out_dir, settings)
    todo = [(i, url) for i, url in enumerate(urls) if i % world_size == rank and not _done(out_dir, i)]
    log.info("rank %d/%d: %d of its %d source shards to encode", rank, world_size, len(todo),
             len(range(rank, len(urls), world_size)))
    if todo:
        dataset = _SourceBatches(todo, image_size, crop, crop_range, batch_size, keep_image, skip_unreadable,
                                 num_classes)
        loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(todo)))
        open_shards: dict[int, _OpenShard] = {}
        start_s = time.perf_counter()
        try:
            for batch in loader:
                index = batch["shard"]
                if index not in open_shards:
                    open_shards[index] = _OpenShard(out_dir, index, urls[index])
                shard = open_shards[index]
                if len(batch["keys"]):
                    views = encode_views(tokenizer, batch["crops"], device)  # (B, views, ...)
                    for i, payload in enumerate(_to_bytes(views, dtype)):
                        sample = {"__key__": batch["keys"][i], "cls": str(int(batch["labels"][i])).encode(),
                                  kind: payload}
                        if keep_image:
                            sample["png"] = batch["pngs"][i]
                        shard.write(sample)
                shard.skipped.extend(batch["skipped"])
                if batch["end"]:
                    open_shards.pop(index).close()
                    log.info("rank %d: wrote %s (%.1f s so far)", rank, SHARD_PATTERN % index,
                             time.perf_counter() - start_s)
        finally:
            for shard in open_shards.values():
                shard.writer.abort()
    if not all(_done(out_dir, i) for i in range(len(urls))):
        return None
    sidecar = _sidecar(out_dir, settings, len(urls), urls, num_classes)
    tmp = out_dir / f"{SIDECAR_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / SIDECAR_NAME)
    return sidecar


def _claim_settings(out_dir: Path, settings: CacheSettings) -> None:
    """Record the settings on first start (atomically, whichever rank is first); refuse a later mismatch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _PROGRESS_DIR).mkdir(exist_ok=True)
    state = out_dir / _STATE_NAME
    tmp = out_dir / f"{_STATE_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    try:
        os.link(tmp, state)  # fails if another start already recorded its settings
    except FileExistsError:
        old = json.loads(state.read_text())
        if old != json.loads(tmp.read_text()):
            diff = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now"
                             for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise FileExistsError(f"{out_dir} holds a cache made with other settings ({diff}); use another "
                                  "cache.out_dir or delete it") from None
    finally:
        tmp.unlink(missing_ok=True)


def _done(out_dir: Path, index: int) -> bool:
    """A shard is done when its record exists and its file has the recorded size."""
    record_path = out_dir / _PROGRESS_DIR / f"{SHARD_PATTERN % index}.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    shard = out_dir / (SHARD_PATTERN % index)
    return shard.is_file() and shard.stat().st_size == record.get("bytes")


class _OpenShard:
    """An output shard being written (samples arrive batch by batch); `close` records it as done."""

    def __init__(self, out_dir: Path, index: int, url: str):
        self.out_dir, self.name, self.source = out_dir, SHARD_PATTERN % index, os.path.basename(url)
        self.writer = AtomicTarWriter(out_dir / self.name)
        self.labels: Counter[int] = Counter()
        self.skipped: list[str] = []

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.labels[int(sample["cls"])] += 1

    def close(self) -> None:
        """Rename the shard into place, then write its record (the record is what marks it done)."""
        count, num_bytes, sha256 = self.writer.close()
        record = {"name": self.name, "count": count, "bytes": num_bytes, "sha256": sha256, "source": self.source,
                  "histogram": {str(k): v for k, v in sorted(self.labels.items())}, "skipped": self.skipped}
        tmp = self.out_dir / _PROGRESS_DIR / f"{self.name}.json.tmp"
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, self.out_dir / _PROGRESS_DIR / f"{self.name}.json")


def _sidecar(out_dir: Path, settings: CacheSettings, num_shards: int, urls: list[str],
             num_classes: int | None) -> dict[str, Any]:
    records = [json.loads((out_dir / _PROGRESS_DIR / f"{SHARD_PATTERN % i}.json").read_text())
               for i in range(num_shards)]
    histogram: Counter[int] = Counter()
    for record in records:
        histogram.update({int(k): v for k, v in record["histogram"].items()})
    num_classes = num_classes or (max(histogram) + 1 if histogram else 0)
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "tool": settings["tool"], "kind": settings["kind"],
        "tokenizer": settings["tokenizer"], "image_size": settings["image_size"], "crop": settings["crop"],
        "crop_size": settings["crop_size"], "views": view_count(settings["crop"]),
        "storage_dtype": settings["storage_dtype"], "sample_shape": settings["sample_shape"],
        "keep_image": settings["keep_image"], "num_classes": num_classes,
        "count": sum(r["count"] for r in records), "class_histogram": [histogram[c] for c in range(num_classes)],
        "skipped": [item for r in records for item in r["skipped"]],
        "source": {**settings["source"], "spec": [os.path.basename(u) for u in urls[:1]] + ["..."]},
        "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256", "source")} for r in records],
    }


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; (0, 1, 0) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def main(argv: list[str] | None = None) -> int:
    """Compose conf/cache.yaml with the given Hydra overrides, build the tokenizer and encode this rank's share."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        print("Options (conf/cache.yaml): cache.src, cache.out_dir, cache.views, cache.crop_range, cache.dtype, "
              "cache.keep_image, cache.batch_size, cache.num_workers, cache.device, cache.skip_unreadable")
        return 0
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("cache", overrides=list(argv))
    options = cfg.cache
    if options.views not in ("flip", "ten_crop"):
        print(f"error: cache.views={options.views!r} must be 'flip' or 'ten_crop'", file=sys.stderr)
        return 1
    rank, world_size, local_rank = _dist_env()
    device = options.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    tokenizer = instantiate(cfg.model.tokenizer)
    start_s = time.perf_counter()
    try:
        sidecar = build_cache(tokenizer, options.src, options.out_dir, int(cfg.data.image_size),
                              crop="ten_crop" if options.views == "ten_crop" else "adm_center",
                              crop_range=float(options.crop_range), dtype=options.dtype,
                              keep_image=bool(options.keep_image), batch_size=int(options.batch_size),
                              num_workers=int(options.num_workers), num_classes=int(cfg.data.num_classes),
                              rank=rank, world_size=world_size, device=device,
                              skip_unreadable=bool(options.skip_unreadable))
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed_s = time.perf_counter() - start_s
    if sidecar is None:
        print(f"rank {rank}/{world_size}: its shards are done in {elapsed_s:.1f} s; the last rank to finish writes "
              f"{Path(options.out_dir) / SIDECAR_NAME}")
    else:
        total = sum(s["bytes"] for s in sidecar["shards"])
        print(f"cache complete: {sidecar['count']:,} samples in {len(sidecar['shards'])} shards ({total / 1e9:.2f} GB) "
              f"in {options.out_dir}; train with data=imagenet_cached data.cache_dir={options.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
