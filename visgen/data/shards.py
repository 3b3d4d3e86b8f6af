"""WebDataset tar shards: writing them byte-for-byte reproducibly and reading them without silent loss.

A shard holds ImageNet-style samples: members `<key>.<ext>` grouped by key (`jpg`/`png`/... image, `cls`
label, `json` metadata; cached latents add `moments` or `codes`). Writers go through a temporary file and a
rename, so a crash never leaves a half shard under its final name. `iter_tar_samples` reads a shard in order
and raises `ShardTailError` (after every complete sample) when its end is missing or unreadable, including
the cuts that Python's tarfile treats as a normal end (inside or right before a header).

The command lines are `python -m visgen.data.writer` (ImageNet on disk -> shards) and
`python -m visgen.data.verify` (decode every sample, report problems); see their `--help`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "AtomicTarWriter", "ShardTailError", "encode_png", "encode_sample", "iter_tar_samples",
           "write_shards", "write_tar_atomic"]

#: Image members a sample may carry (the first one present is used).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Fixed member mtime so that the same samples always give byte-identical shards (reproducible hashes).
_SHARD_MTIME = 0  # an int: a float mtime would make tarfile add a PAX header to every member
_BLOCK = tarfile.BLOCKSIZE  # 512
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's split: key up to the first dot of the basename


class ShardTailError(OSError):
    """A shard whose end could not be read: cut, corrupt header or unreadable. Samples before it are valid."""

    def __init__(self, url: str, num_read: int, reason: str):
        super().__init__(f"shard {url}: unreadable after {num_read} samples: {reason}")
        self.url = url
        self.num_read = num_read
        self.reason = reason


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


def check_key(key: str) -> str:
    """A sample key webdataset groups correctly: no dot in its last path component."""
    if not key or "." in Path(key).name:
        raise ValueError(f"sample key {key!r} is empty or contains a '.'; webdataset would split the sample; "
                         "use keys without dots, e.g. 'train-000123'")
    return key


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a sample dict (`__key__`, one image member, `cls`, optional `json`) into the byte members of a shard.

    `png` may be a PIL image, a uint8 (H, W, 3) array or PNG bytes; other image members (`jpg`, ...) are bytes.
    """
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    for name, present in (("__key__", "__key__" in sample), ("an image member", image_ext), ("cls", "cls" in sample)):
        if not present:
            raise KeyError(f"sample {sample.get('__key__', '?')!r} has no {name}; every sample needs '__key__', "
                           f"one of {'/'.join(IMAGE_EXTENSIONS)} and 'cls' (and optionally 'json')")
    key = check_key(str(sample["__key__"]))
    label = sample["cls"]
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"sample {key!r}: cls must be an int, got {label!r}")
    image = encode_png(sample["png"]) if image_ext == "png" else sample[image_ext]
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(f"sample {key!r}: the {image_ext!r} member must be encoded bytes, got {type(image).__name__}")
    members: dict[str, Any] = {"__key__": key, image_ext: bytes(image), "cls": str(int(label)).encode("ascii")}
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
        write_tar_atomic(batch, path)
        paths.append(path)
    return paths


def _refuse_existing(path: str) -> None:
    """Raise when a shard would overwrite an existing file."""
    if os.path.exists(path):
        raise FileExistsError(f"shard {path} already exists; delete it or pass overwrite=True to replace it")


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that counts and SHA-256-hashes every byte on its way to disk."""

    def __init__(self, stream: IO[bytes]):
        super().__init__()
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.num_bytes

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.stream.write(view)
        self.sha256.update(view)
        self.num_bytes += view.nbytes
        return view.nbytes


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed owner, mode and mtime, so equal content gives equal bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _SHARD_MTIME
    info.mode = 0o444
    info.uname = info.gname = "bigdata"  # what webdataset's TarWriter writes
    return info


class AtomicTarWriter:
    """Writes samples ({"__key__", ext: bytes}) one by one to `<path>.tmp`; `close` renames it to `path`.

    Members are written in sorted extension order with fixed headers, so equal samples give equal bytes.
    `abort` (or an error while writing) removes the temporary file: nothing ever appears half written under
    `path`. A full disk raises OSError ENOSPC naming the shard.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        try:
            self._raw = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in close()/abort()
            self._writer = _HashingWriter(self._raw)
            self._tar = tarfile.open(fileobj=self._writer, mode="w", format=tarfile.USTAR_FORMAT)
        except OSError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> OSError:
        self.abort()
        return OSError(exc.errno, f"writing shard {self.path} failed: {exc.strerror or exc}; nothing was written "
                       "under that name (free disk space or fix the path, then run the same command again)")

    def write(self, sample: dict[str, Any]) -> None:
        key = check_key(str(sample["__key__"]))
        try:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = sample[ext]
                self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        except OSError as exc:
            raise self._error(exc) from exc
        self.count += 1

    def close(self) -> tuple[int, int, str]:
        """Finish the tar, fsync and rename; returns (samples, bytes, SHA-256 hex)."""
        try:
            self._tar.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            raise self._error(exc) from exc
        return self.count, self._writer.num_bytes, self._writer.sha256.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file."""
        raw = getattr(self, "_raw", None)
        if raw is not None and not raw.closed:
            raw.close()
        self.tmp_path.unlink(missing_ok=True)


def write_tar_atomic(samples: Iterable[dict[str, Any]], path: str | Path) -> tuple[int, int, str]:
    """Write encoded samples ({"__key__", ext: bytes}) to `path` via a temporary file (see AtomicTarWriter).

    Returns (samples written, bytes, SHA-256 hex); on any error nothing appears under `path`.
    """
    writer = AtomicTarWriter(path)
    try:
        for sample in samples:
            writer.write(sample)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


class _TailReader(io.RawIOBase):
    """A read-only wrapper that keeps the last bytes read, to tell a tar's end-of-archive marker from a cut."""

    WINDOW = 1 << 16  # > tarfile's read-ahead (one 10 KiB record) plus a header

    def __init__(self, stream: IO[bytes]):
        super().__init__()
        self.stream = stream
        self.window = b""
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.window = (self.window + data)[-self.WINDOW :]
            self.position += len(data)
        return data

    def clean_end(self, stop: int) -> bool:
        """True when every byte from offset `stop` (where tarfile stopped) to the end of the stream is zero and
        there is at least one zero block: the end-of-archive marker plus padding, not a cut or a bad header."""
        before_drain = self.position
        window = self.window
        drained_zero = True
        while chunk := self.stream.read(1 << 16):
            drained_zero = drained_zero and not any(chunk)
            self.position += len(chunk)
        seen = before_drain - stop  # bytes from `stop` that were already read ahead
        if seen < 0 or seen > len(window):
            return False
        return drained_zero and not any(window[len(window) - seen :]) and self.position - stop >= _BLOCK


def split_member_name(name: str) -> tuple[str, str] | None:
    """('dir/key', 'ext') for a member 'dir/key.ext' (the key ends at the basename's first dot), else None."""
    match = _KEY_AND_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def iter_tar_samples(fileobj: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """Samples {"__key__", "__url__", ext: bytes} of a tar stream, in order.

    Raises ShardTailError after the last complete sample when the tar is cut or corrupt; the sample being read
    at that point is not yielded (it may be incomplete). Members without an extension are ignored.
    """
    reader = _TailReader(fileobj)
    current: dict[str, Any] | None = None
    num_read = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                parts = split_member_name(info.name)
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    yield current
                    num_read += 1
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            stop = tar.offset
        clean = reader.clean_end(stop)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ShardTailError(url, num_read, f"{type(exc).__name__}: {exc}") from exc
    if not clean:
        # tarfile ends silently at a cut inside or right before a header, and at a corrupt header.
        raise ShardTailError(url, num_read, f"no end-of-archive marker after byte {stop} (cut or corrupt header)")
    if current is not None:
        yield current

