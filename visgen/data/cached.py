"""Training from cached latents or codes (written by `python -m visgen.data.cache`): no encoder in the step.

The DataModule is `visgen.data.datamodule.CachedDataModule` (`data=imagenet_cached`); this module needs no
Lightning.

A cache folder holds `cache-%06d.tar` shards (one per source shard, same keys and order) and `cache.json`,
the sidecar. Each sample stores `cls`, the tokenizer's `encode` output for every view of the image
(`moments`: KL posterior mean and log-variance; `codes`: VQ indices) and, with `keep_image`, the crop as PNG.
Views are [crop 0 .. crop n-1, their horizontal flips]: n = 1 (the ADM center crop; MAR's cache) or 5
(LlamaGen's ten-crop: corners and center of a 1.1x larger center crop).

The loader yields {"moments": (*view shape) float or int64, "label": int64, "image": uint8 (3, H, W) if kept}:
each worker picks one view per sample with its (seed, epoch, rank, worker) generator (a random crop, flipped
with probability 1/2 when `random_flip`), so flips stay random per epoch and resume stays exact; the image,
if kept, is flipped with it. `GenerativeModule.make_batch` then draws the posterior sample with the
tokenizer's `sample` (VQ: the identity).

The sidecar is untrusted input: it is parsed as plain data (types and ranges checked, shard names must be
the expected plain file names) and nothing is ever imported or instantiated from it. A cache whose sidecar
disagrees with the run (tokenizer id or weights, image size, crop) is refused with both values named.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from visgen.data.stream import CorruptSampleError, ShardStream, parse_label

__all__ = ["CACHE_FORMAT", "SIDECAR_NAME", "CacheInfo", "CacheMismatchError", "CachedStream", "check_tokenizer",
           "read_cache_info", "tokenizer_fingerprint", "view_count", "STORAGE_DTYPES"]

CACHE_FORMAT = "visgen-latent-cache"
CACHE_VERSION = 1
SIDECAR_NAME = "cache.json"
SHARD_PATTERN = "cache-%06d.tar"
#: Storage dtypes: name -> numpy dtype of the stored bytes (bfloat16 is stored as its 16 raw bits).
STORAGE_DTYPES = {"float32": "<f4", "bfloat16": "<i2", "uint16": "<u2", "int32": "<i4"}
CROPS = ("adm_center", "ten_crop")


class CacheMismatchError(ValueError):
    """A cache made with another tokenizer, size or preprocessing than the run asks for."""


def view_count(crop: str) -> int:
    """Stored views per sample: (crops) x (unflipped, flipped)."""
    return 2 * (5 if crop == "ten_crop" else 1)


def tokenizer_fingerprint(tokenizer: nn.Module) -> str:
    """SHA-256 of every weight a tokenizer computes with, including frozen nets kept out of its state_dict."""
    from visgen.tokenizers.vq import weights_hash

    state = dict(tokenizer.state_dict())
    for name, value in sorted(vars(tokenizer).items()):
        if isinstance(value, nn.Module) and name not in tokenizer._modules:  # e.g. SD-VAE's hidden `_vae`
            state.update({f"{name}.{k}": v for k, v in value.state_dict().items()})
    return weights_hash(state, length=64)


@dataclass(frozen=True)
class CacheInfo:
    """The checked content of a cache's sidecar."""

    folder: str
    kind: str  # "moments" (KL) or "codes" (VQ)
    tokenizer_id: str
    tokenizer_sha256: str
    image_size: int
    crop: str
    crop_size: int
    storage_dtype: str
    sample_shape: tuple[int, ...]  # (views, *encode output of one image)
    keep_image: bool
    count: int
    num_classes: int
    shard_names: tuple[str, ...]
    shard_counts: tuple[int, ...]
    source: dict[str, Any]

    @property
    def spec(self) -> str:
        """The brace spec of the cache shards."""
        last = len(self.shard_names) - 1
        return os.path.join(self.folder, SHARD_PATTERN.replace("%06d", f"{{{0:06d}..{last:06d}}}"))

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(STORAGE_DTYPES[self.storage_dtype]).itemsize


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{path}: field {name!r} is missing or not a {getattr(kind, '__name__', kind)} "
                         f"(got {type(value).__name__}); the sidecar is damaged: rebuild the cache")
    return value


def read_cache_info(folder: str | Path) -> CacheInfo:
    """Parse and check `<folder>/cache.json` as plain data (never instantiating anything named in it)."""
    folder = Path(folder)
    path = folder / SIDECAR_NAME
    if not path.is_file():
        partial = (folder / ".progress").is_dir()
        raise FileNotFoundError(
            f"no {SIDECAR_NAME} in {folder}: " + ("the cache is not finished (some ranks' shards are missing); rerun "
                                                  "the same python -m visgen.data.cache command to complete it"
                                                  if partial else "build the cache with python -m visgen.data.cache "
                                                  "experiment=<preset> cache.out_dir=<folder>, or fix data.cache_dir"))
    if path.stat().st_size > 64 << 20:
        raise ValueError(f"{path} is larger than 64 MiB; not a visgen cache sidecar")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} is not a version-{CACHE_VERSION} {CACHE_FORMAT} sidecar")
    tokenizer = _field(data, "tokenizer", dict, path)
    kind = _field(data, "kind", str, path)
    crop = _field(data, "crop", str, path)
    storage_dtype = _field(data, "storage_dtype", str, path)
    if kind not in ("moments", "codes") or crop not in CROPS or storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"{path}: kind {kind!r}, crop {crop!r} or storage_dtype {storage_dtype!r} is unknown")
    shape = tuple(_field(data, "sample_shape", list, path))
    if not shape or not all(type(d) is int and 0 < d <= 1 << 16 for d in shape) or shape[0] != view_count(crop):
        raise ValueError(f"{path}: sample_shape {list(shape)} is not (views={view_count(crop)}, ...) of positive sizes")
    shards = _field(data, "shards", list, path)
    names, counts = [], []
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict) or entry.get("name") != SHARD_PATTERN % index or type(entry.get("count")) \
                is not int or entry["count"] < 0:
            raise ValueError(f"{path}: shard entry {index} must be {{'name': {SHARD_PATTERN % index!r}, 'count': n}}")
        names.append(entry["name"])
        counts.append(entry["count"])
    count = _field(data, "count", int, path)
    if count != sum(counts) or not names:
        raise ValueError(f"{path}: count {count} is not the sum of its {len(names)} shard counts ({sum(counts)})")
    return CacheInfo(
        folder=str(folder), kind=kind, tokenizer_id=_field(tokenizer, "id", str, path),
        tokenizer_sha256=_field(tokenizer, "weights_sha256", str, path),
        image_size=_field(data, "image_size", int, path), crop=crop, crop_size=_field(data, "crop_size", int, path),
        storage_dtype=storage_dtype, sample_shape=shape, keep_image=_field(data, "keep_image", bool, path),
        count=count, num_classes=_field(data, "num_classes", int, path), shard_names=tuple(names),
        shard_counts=tuple(counts), source=_field(data, "source", dict, path))


def decode_views(data: bytes, info: CacheInfo) -> np.ndarray:
    """Stored bytes -> (views, ...) array in the storage dtype; CorruptSampleError if the size is wrong."""
    if len(data) != info.sample_bytes:
        raise CorruptSampleError(f"{info.kind} member has {len(data)} bytes, expected {info.sample_bytes} "
                                 f"({list(info.sample_shape)} {info.storage_dtype})")
    return np.frombuffer(data, dtype=STORAGE_DTYPES[info.storage_dtype]).reshape(info.sample_shape)


def view_tensor(array: np.ndarray, info: CacheInfo) -> Tensor:
    """One stored view as the tensor make_batch expects: float32/bfloat16 moments or int64 codes."""
    if info.kind == "codes":
        return torch.from_numpy(array.astype(np.int64))
    tensor = torch.from_numpy(np.array(array))  # a writable copy
    return tensor.view(torch.bfloat16) if info.storage_dtype == "bfloat16" else tensor


class CachedStream(ShardStream):
    """A ShardStream over cache shards: {"moments", "label"(, "image")} with one view picked per sample."""

    def __init__(self, info: CacheInfo, keep_image: bool = False, **kwargs: Any) -> None:
        super().__init__(info.spec, image_size=info.image_size, resize=False, **kwargs)
        if keep_image and not info.keep_image:
            raise CacheMismatchError(f"data.keep_image=true but the cache {info.folder} holds no images; rebuild it "
                                     "with cache.keep_image=true")
        self.info = info
        self.keep_image = keep_image

    def decode_sample(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Tensor]:
        """One cached sample -> its label and one view (random crop, random flip), with its image if kept."""
        if self.info.kind not in raw:
            raise CorruptSampleError(f"no {self.info.kind} member; has {sorted(k for k in raw if k[0] != '_')}")
        label = parse_label(raw, self.num_classes)
        views = decode_views(raw[self.info.kind], self.info)  # (views, ...)
        num_crops = views.shape[0] // 2
        crop = rng.randrange(num_crops) if num_crops > 1 else 0
        flip = self.random_flip and rng.random() < 0.5
        item = {"moments": view_tensor(views[crop + num_crops * flip], self.info),
                "label": torch.tensor(label, dtype=torch.int64)}
        if self.keep_image:
            if "png" not in raw:
                raise CorruptSampleError("no png member although the cache keeps images")
            with Image.open(io.BytesIO(raw["png"])) as image:
                arr = np.array(image.convert("RGB"))  # (H, W, 3) uint8
            if flip:
                arr = arr[:, ::-1]  # the flip picked for the latent applies to the image too
            item["image"] = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()  # (3, H, W)
        return item


def check_tokenizer(info: CacheInfo, tokenizer: nn.Module) -> None:
    """Raise CacheMismatchError unless `tokenizer` is the one the cache was made with (id and weights)."""
    run_id = getattr(tokenizer, "id", None)
    if run_id != info.tokenizer_id:
        raise CacheMismatchError(f"the cache {info.folder} was made with tokenizer {info.tokenizer_id!r} but this run "
                                 f"uses {run_id!r}; set model.tokenizer to the cache's tokenizer or build a cache "
                                 "with this one (python -m visgen.data.cache)")
    run_sha = tokenizer_fingerprint(tokenizer)
    if run_sha != info.tokenizer_sha256:
        raise CacheMismatchError(f"the cache {info.folder} was made with tokenizer {info.tokenizer_id!r} of weights "
                                 f"sha256 {info.tokenizer_sha256[:16]}... but this run's {run_id!r} has weights "
                                 f"{run_sha[:16]}... (other files under the same name, or another dtype); point "
                                 "model.tokenizer.pretrained at the cache's weights or rebuild the cache")
    kind = "codes" if getattr(tokenizer, "vocab_size", None) else "moments"
    if kind != info.kind:
        raise CacheMismatchError(f"the cache {info.folder} holds {info.kind} but the run's tokenizer makes {kind}")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
