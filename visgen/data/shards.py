"""Writing ImageNet-style WebDataset tar shards (`<key>.png`, `<key>.cls`, `<key>.json` per sample)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

# Fixed member mtime so that the same samples always give byte-identical shards (reproducible hashes).
_SHARD_MTIME = 0  # an int: a float mtime would make tarfile add a PAX header to every member


def encode_png(image: Image.Image | np.ndarray | bytes) -> bytes:
    """Encode a PIL image or an (H, W, 3) uint8 array as PNG bytes; bytes pass through unchanged."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"encode_png got an array of dtype {image.dtype}; convert it to uint8 first")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"encode_png got {type(image).__name__}; pass PNG bytes, a PIL image or uint8 array")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a sample dict (`__key__`, `png`, `cls`, `json`) into the byte members a tar shard stores."""
    for name in ("__key__", "png", "cls"):
        if name not in sample:
            raise KeyError(f"sample {sample.get('__key__', '?')!r} has no {name!r}; every sample needs "
                           "'__key__', 'png' and 'cls' (and optionally 'json')")
    key = str(sample["__key__"])
    if "." in Path(key).name:
        # webdataset groups members by the text before the first dot: a dotted key would split the sample.
        raise ValueError(f"sample key {key!r} contains a '.'; webdataset would split the sample; "
                         "Use keys without dots, e.g. 'train-000123'")
    label = sample["cls"]
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"sample {key!r}: cls must be an int, got {label!r}")
    members: dict[str, Any] = {
        "__key__": key,
        "png": encode_png(sample["png"]),
        "cls": str(int(label)).encode("ascii"),
    }
    if "json" in sample:
        members["json"] = json.dumps(sample["json"], sort_keys=True).encode("utf-8")
    return members


def _shard_path(pattern: str, index: int) -> str:
    """Format shard number `index` into the printf-style `pattern` (e.g. 'out/train-%06d.tar')."""
    try:
        return pattern % index
    except TypeError as exc:
        raise ValueError(f"shard pattern {pattern!r} needs one printf field for the shard number, "
                         "e.g. 'out/train-%06d.tar'") from exc


def write_shards(
    samples: Iterable[dict[str, Any]],
    pattern: str,
    samples_per_shard: int,
    overwrite: bool = False,
) -> list[str]:
    """Write samples into consecutive tar shards of `samples_per_shard` each; returns the shard paths."""
    if samples_per_shard <= 0:
        raise ValueError(f"write_shards: samples_per_shard={samples_per_shard} must be positive")
    if _shard_path(pattern, 0) == _shard_path(pattern, 1):
        raise ValueError(f"shard pattern {pattern!r} has no printf field for the shard number; "
                         "use e.g. 'out/train-%06d.tar'")
    if isinstance(samples, Sized) and not overwrite:
        # Known length: refuse before writing anything rather than after a partial write.
        num_shards = -(-len(samples) // samples_per_shard)
        for index in range(num_shards):
            _refuse_existing(_shard_path(pattern, index))

    paths: list[str] = []
    iterator: Iterator[dict[str, Any]] = iter(samples)
    exhausted = False
    while not exhausted:
        batch: list[dict[str, Any]] = []
        for sample in iterator:
            batch.append(encode_sample(sample))
            if len(batch) == samples_per_shard:
                break
        else:
            exhausted = True
        if not batch:
            break
        path = _shard_path(pattern, len(paths))
        if not overwrite:
            _refuse_existing(path)
        _write_one_shard(batch, path)
        paths.append(path)
    return paths


def _refuse_existing(path: str) -> None:
    """Raise when a shard would overwrite an existing file."""
    if os.path.exists(path):
        raise FileExistsError(f"shard {path} already exists; delete it or pass overwrite=True to replace it")


def _write_one_shard(members: list[dict[str, Any]], path: str) -> None:
    """Write encoded samples to `path` via a temporary file, so a crash never leaves a half shard."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "wb") as stream:
        with wds.TarWriter(stream, encoder=False, mtime=_SHARD_MTIME) as writer:
            for member in members:
                writer.write(member)
    os.replace(tmp_path, path)
