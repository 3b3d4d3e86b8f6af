"""`python -m visgen.data.verify <shards>`: decode every sample once and report every problem.

Checks each shard (in worker processes, streaming: memory holds one shard's current sample and 8 bytes per
key): the tar is complete (a cut or corrupt header is named with the samples before it), every sample has a
decodable image and an integer `cls` in [0, num_classes), images have the expected size (`--image-size`, or
the manifest's `--resize`), keys are unique across all shards, and, when the folder holds the writer's
`manifest.json`, each shard's count, size and SHA-256 match it. Prints counts and the class histogram,
optionally writes a preview grid (`--preview grid.png`: a few images of chosen classes, one row per class)
and a JSON report, and exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import webdataset as wds
from PIL import Image

from visgen.data.shards import IMAGE_EXTENSIONS, ShardTailError, iter_tar_samples
from visgen.data.stream import center_crop_arr, expand_shard_spec

__all__ = ["main", "verify", "verify_shard", "add_arguments", "run"]

_MAX_PROBLEMS_PER_SHARD = 50  # named in full; the rest are counted
_THUMB_PX = 64


class _HashingReader(io.RawIOBase):
    """A read-only wrapper hashing every byte read (the shard's SHA-256 in the same pass as decoding)."""

    def __init__(self, stream: IO[bytes]):
        super().__init__()
        self.stream, self.sha256, self.num_bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data


def _key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def verify_shard(url: str, num_classes: int | None = None, image_size: int | None = None,
                 preview_classes: tuple[int, ...] = (), per_class: int = 0) -> dict[str, Any]:
    """Decode every sample of one shard; returns counts, histogram, problems, key digests and preview thumbnails."""
    problems: list[str] = []
    num_problems = 0
    histogram: Counter[int] = Counter()
    digests: list[int] = []
    previews: dict[int, list[np.ndarray]] = {c: [] for c in preview_classes}
    name = os.path.basename(url)

    def problem(text: str) -> None:
        nonlocal num_problems
        num_problems += 1
        if len(problems) < _MAX_PROBLEMS_PER_SHARD:
            problems.append(f"{name}: {text}")

    reader = None
    try:
        reader = _HashingReader(wds.gopen(url, "rb"))
        for raw in iter_tar_samples(reader, url):
            key = raw["__key__"]
            digests.append(_key_digest(key))
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if image_ext is None or "cls" not in raw:
                problem(f"key {key}: missing {'an image member' if image_ext is None else 'cls'} (has {sorted(raw)})")
                continue
            try:
                label = int(raw["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                problem(f"key {key}: cls {raw['cls'][:20]!r} is not an integer")
                continue
            if label < 0 or (num_classes is not None and label >= num_classes):
                problem(f"key {key}: cls {label} is outside [0, {num_classes})")
                continue
            try:
                with Image.open(io.BytesIO(raw[image_ext])) as image:
                    image.load()
                    rgb = image.convert("RGB")
            except Exception as exc:  # noqa: BLE001 - PIL raises many types
                problem(f"key {key}: {image_ext} does not decode ({type(exc).__name__}: {exc})")
                continue
            if image_size is not None and rgb.size != (image_size, image_size):
                problem(f"key {key}: image is {rgb.size[0]}x{rgb.size[1]}, expected {image_size}x{image_size}")
            if "json" in raw:
                try:
                    json.loads(raw["json"])
                except ValueError:
                    problem(f"key {key}: json member is not valid JSON")
            histogram[label] += 1
            if label in previews and len(previews[label]) < per_class:
                previews[label].append(center_crop_arr(rgb, _THUMB_PX))
    except ShardTailError as exc:
        problem(f"tar is cut or corrupt after {exc.num_read} samples ({exc.reason}); the samples after that are lost")
    except OSError as exc:
        problem(f"cannot open: {exc}")
    finally:
        if reader is not None:
            reader.stream.close()
    return {"url": url, "name": name, "count": sum(histogram.values()), "histogram": dict(histogram),
            "problems": problems, "num_problems": num_problems,
            "digests": np.array(digests, dtype=np.uint64), "previews": previews,
            "bytes": reader.num_bytes if reader else 0, "sha256": reader.sha256.hexdigest() if reader else None}


def _load_manifest(urls: list[str]) -> dict[str, Any] | None:
    """The writer's manifest.json beside local shards, if there is one."""
    folders = {os.path.dirname(url.removeprefix("file:")) for url in urls}
    if len(folders) != 1:
        return None
    path = Path(folders.pop() or ".") / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list) else None


def _duplicate_keys(results: list[dict[str, Any]]) -> list[str]:
    """Keys found more than once (within or across shards), each with the shards holding it."""
    digests = np.concatenate([r["digests"] for r in results]) if results else np.zeros(0, np.uint64)
    values, counts = np.unique(digests, return_counts=True)
    duplicated = set(values[counts > 1].tolist())
    if not duplicated:
        return []
    where: dict[int, list[str]] = {}
    for result in results:
        for digest in set(result["digests"].tolist()) & duplicated:
            where.setdefault(digest, []).extend([result["name"]] * int((result["digests"] == digest).sum()))
    found: dict[int, str] = {}
    for result in results:  # name the keys: re-read only the shards that hold one
        if not set(where) & set(result["digests"].tolist()):
            continue
        try:
            with wds.gopen(result["url"], "rb") as stream:
                for raw in iter_tar_samples(stream, result["url"]):
                    found.setdefault(_key_digest(raw["__key__"]), raw["__key__"])
        except (ShardTailError, OSError):
            pass
    return [f"duplicate key {found.get(d, hex(d))!r} ({len(shards)} times: {', '.join(sorted(set(shards)))})"
            for d, shards in sorted(where.items())]


def _save_grid(previews: dict[int, list[np.ndarray]], per_class: int, path: Path) -> None:
    """One row per class, `per_class` thumbnails each (missing ones black), 2 px gaps."""
    rows = sorted(previews)
    step = _THUMB_PX + 2
    grid = np.zeros((max(len(rows), 1) * step, max(per_class, 1) * step, 3), np.uint8)  # (H, W, 3)
    for row, label in enumerate(rows):
        for col, thumb in enumerate(previews[label][:per_class]):
            grid[row * step : row * step + _THUMB_PX, col * step : col * step + _THUMB_PX] = thumb
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def verify(spec: str, num_classes: int | None = None, image_size: int | None = None, preview: str | None = None,
           preview_classes: tuple[int, ...] = tuple(range(8)), per_class: int = 8, workers: int = 0,
           report: str | None = None) -> dict[str, Any]:
    """Verify every shard of `spec`; returns {"ok", "problems", "num_samples", "class_histogram", ...}."""
    urls = expand_shard_spec(spec, hint="check the path of the shards to verify")
    manifest = _load_manifest(urls)
    if manifest is not None:
        num_classes = num_classes if num_classes is not None else manifest.get("num_classes")
        image_size = image_size if image_size is not None else (manifest.get("options") or {}).get("resize")
    args = [(url, num_classes, image_size, tuple(preview_classes) if preview else (), per_class) for url in urls]
    if workers > 0:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(verify_shard, *zip(*args, strict=True)))
    else:
        results = [verify_shard(*a) for a in args]

    problems = [p for r in results for p in r["problems"]]
    num_problems = sum(r["num_problems"] for r in results)
    duplicates = _duplicate_keys(results)
    problems += duplicates
    num_problems += len(duplicates)
    if manifest is not None:
        listed = {s.get("name"): s for s in manifest["shards"] if isinstance(s, dict)}
        for result in results:
            entry = listed.get(result["name"])
            if entry is None:
                continue
            for field in ("count", "bytes", "sha256"):
                if entry.get(field) != result[field]:
                    problems.append(f"{result['name']}: {field} {result[field]!r} differs from manifest.json's "
                                    f"{entry.get(field)!r}")
                    num_problems += 1
    histogram: Counter[int] = Counter()
    for result in results:
        histogram.update(result["histogram"])
    total = sum(histogram.values())
    if total == 0:
        problems.append(f"no readable samples in {spec}")
        num_problems += 1
    summary = {
        "ok": num_problems == 0, "spec": spec, "num_shards": len(urls), "num_samples": total,
        "num_problems": num_problems, "problems": problems,
        "class_histogram": {str(k): v for k, v in sorted(histogram.items())},
        "per_shard": {r["name"]: r["count"] for r in results},
        "checked_against_manifest": manifest is not None, "num_classes": num_classes, "image_size": image_size,
    }
    if preview:
        previews: dict[int, list[np.ndarray]] = {c: [] for c in preview_classes}
        for result in results:
            for label, thumbs in result["previews"].items():
                previews[label].extend(thumbs[: per_class - len(previews[label])])
        _save_grid(previews, per_class, Path(preview))
    if report:
        Path(report).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line options of verify."""
    parser.add_argument("shards", help="shard spec, e.g. 'data/imagenet/train/train-{000000..001023}.tar'")
    parser.add_argument("--num-classes", type=int, help="labels must lie in [0, N) (default: manifest.json's)")
    parser.add_argument("--image-size", type=int, help="every image must be SxS (default: manifest.json's --resize)")
    parser.add_argument("--preview", help="write a grid of a few images per class here (PNG)")
    parser.add_argument("--preview-classes", default="0-7", help="classes in the grid: '0-7' or '1,5,9'")
    parser.add_argument("--per-class", type=int, default=8, help="images per class in the grid")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (0: in-process)")
    parser.add_argument("--report", help="also write the summary as JSON here")


def _parse_classes(text: str) -> tuple[int, ...]:
    if "-" in text and "," not in text:
        low, high = (int(x) for x in text.split("-"))
        return tuple(range(low, high + 1))
    return tuple(int(x) for x in text.split(",") if x.strip())


def run(args: argparse.Namespace) -> int:
    """Run verify: print the summary; exit code 1 on any problem."""
    try:
        summary = verify(args.shards, args.num_classes, args.image_size, args.preview,
                         _parse_classes(args.preview_classes), args.per_class, args.workers, args.report)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = list(summary["class_histogram"].values())
    print(f"{summary['num_samples']:,} samples in {summary['num_shards']} shards; {len(counts)} classes present"
          + (f" ({min(counts)} to {max(counts)} samples per class)" if counts else ""))
    if summary["checked_against_manifest"]:
        print("counts, sizes and SHA-256 checked against manifest.json")
    if summary["ok"]:
        print("no problems found")
        return 0
    print(f"{summary['num_problems']} problems:", file=sys.stderr)
    for line in summary["problems"]:
        print(f"  {line}", file=sys.stderr)
    if summary["num_problems"] > len(summary["problems"]):
        print(f"  ... and {summary['num_problems'] - len(summary['problems'])} more", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m visgen.data.verify ...`: parse the command line and run; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m visgen.data.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
