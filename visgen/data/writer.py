"""`python -m visgen.data.writer`: ImageNet on disk (folders or tars) -> shuffled WebDataset shards.

Every image becomes one sample `<key>.{jpg|png}`, `<key>.cls` (class index from the sorted class names) and
`<key>.json` (source name, label, class, original size and format). Samples are shuffled across shards with
`--seed` and cut into shards of exactly `--samples-per-shard` (the last one holds the rest). RGB JPEGs are
stored byte for byte; CMYK and greyscale JPEGs and PNGs disguised as JPEG are decoded and stored as RGB PNG
(lossless). `--resize R` applies ADM's center crop to R x R once, stored as PNG (or JPEG with
`--format jpg --jpeg-quality Q`, recorded). Workers write whole shards; each shard depends only on the
plan, so an interrupted run resumes (`rerun the same command`) with finished shards kept, the partial one
rewritten and every byte equal to an uninterrupted run. `manifest.json` (written last) records per-shard
counts and SHA-256, the class histogram, the preprocessing and the tool version.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visgen.data.shards import write_tar_atomic
from visgen.data.sources import EntryReader, SourceError, SourceIndex, read_class_list, scan_source
from visgen.data.stream import center_crop_arr

__all__ = ["MANIFEST_NAME", "TOOL_VERSION", "WriteOptions", "add_arguments", "main", "prepare_image", "run",
           "write_dataset"]

TOOL_VERSION = "visgen.data.writer 1"
MANIFEST_NAME = "manifest.json"
_STATE_NAME = ".write-state.json"
_PROGRESS_NAME = ".write-progress.jsonl"
_FORMATS = ("original", "png", "jpg")


@dataclass(frozen=True)
class WriteOptions:
    """Everything that decides the bytes of the shards (recorded in the manifest; a resume must match it)."""

    samples_per_shard: int
    seed: int = 0
    resize: int | None = None  # ADM center crop to resize x resize, or None to keep the original image
    image_format: str = "original"  # original (RGB JPEG/PNG bytes kept) | png | jpg (re-encoded)
    jpeg_quality: int = 95  # only for image_format == "jpg"
    skip_unreadable: bool = False  # False: an unreadable source image stops the run, naming it

    def check(self) -> None:
        if self.samples_per_shard <= 0:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard} must be positive")
        if self.image_format not in _FORMATS:
            raise ValueError(f"--format {self.image_format!r} is not one of {_FORMATS}")
        if self.resize is not None and self.resize <= 0:
            raise ValueError(f"--resize {self.resize} must be a positive size in pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality {self.jpeg_quality} must be in [1, 100]")

    def describe(self) -> str:
        """The preprocessing in words, e.g. 'ADM center crop to 256x256, PNG (lossless)'."""
        crop = f"ADM center crop to {self.resize}x{self.resize}" if self.resize else "original size"
        if self.image_format == "jpg":
            encoding = f"JPEG quality {self.jpeg_quality} (lossy re-encode)"
        elif self.image_format == "png" or self.resize:
            encoding = "PNG (lossless)"
        else:
            encoding = "RGB JPEG/PNG bytes as given; other modes converted to RGB PNG (lossless)"
        return f"{crop}, {encoding}"


class SourceImageError(RuntimeError):
    """A source image that cannot be decoded (names the file)."""


def prepare_image(data: bytes, options: WriteOptions) -> tuple[str, bytes, dict[str, Any]]:
    """Source bytes -> (member extension, stored bytes, json info); every stored image decodes to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: a corrupt file fails here, not in training
        info: dict[str, Any] = {"original_size": list(image.size), "original_format": image.format,
                                "original_mode": image.mode}
        if (options.resize is None and options.image_format == "original" and image.mode == "RGB"
                and image.format in ("JPEG", "PNG")):
            return ("jpg" if image.format == "JPEG" else "png"), data, info
        rgb = image.convert("RGB")
    if image.mode != "RGB":
        info["converted"] = f"{image.mode}->RGB"
    if options.resize:
        rgb = Image.fromarray(center_crop_arr(rgb, options.resize))  # (resize, resize, 3)
    buffer = io.BytesIO()
    if options.image_format == "jpg":
        rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
        return "jpg", buffer.getvalue(), info
    rgb.save(buffer, format="PNG")
    return "png", buffer.getvalue(), info


def sample_keys(index: SourceIndex) -> list[str]:
    """Tar keys: the file name without extension, made dot-free; prefixed by its folder when names repeat."""
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", text)

    keys = [clean(Path(name).name.split(".")[0]) for name in index.names]
    if len(set(keys)) != len(keys):
        keys = [clean(str(Path(name).with_suffix(""))) for name in index.names]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise SourceError(f"two source images map to the same key {dup!r}; rename one of them")
    return keys


def source_fingerprint(index: SourceIndex) -> str:
    """SHA-256 of the names, labels, sizes and classes of a source: what a resumed write must see again."""
    digest = hashlib.sha256()
    digest.update("\n".join(index.classes).encode())
    digest.update("\n".join(index.names).encode())
    digest.update(index.labels.astype("<i4").tobytes())
    digest.update(index.sizes.astype("<i8").tobytes())
    return digest.hexdigest()


def _write_shard_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: read, convert and write one shard; returns its manifest record."""
    options = WriteOptions(**job["options"])
    reader = EntryReader()
    skipped: list[dict[str, str]] = []
    converted: Counter[str] = Counter()
    histogram: Counter[int] = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for key, name, label, class_name, container, offset, size in job["items"]:
            try:
                ext, payload, info = prepare_image(reader.read(container, offset, size), options)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types; the message names the file
                if not options.skip_unreadable:
                    raise SourceImageError(f"cannot read source image {name} ({container}): {type(exc).__name__}: "
                                           f"{exc}. Fix or remove the file, or pass --skip-unreadable to leave it "
                                           "out (recorded in manifest.json)") from exc
                skipped.append({"source": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if "converted" in info:
                converted[info["converted"]] += 1
            histogram[label] += 1
            meta = {"source": name, "label": label, "class": class_name, **info}
            yield {"__key__": key, ext: payload, "cls": str(label).encode(),
                   "json": json.dumps(meta, sort_keys=True).encode()}

    try:
        count, num_bytes, sha256 = write_tar_atomic(samples(), job["path"])
    finally:
        reader.close()
    return {"index": job["index"], "name": Path(job["path"]).name, "count": count, "bytes": num_bytes,
            "sha256": sha256, "histogram": {str(k): v for k, v in sorted(histogram.items())},
            "skipped": skipped, "converted": dict(converted)}


def _jobs(index: SourceIndex, keys: list[str], order: np.ndarray, todo: list[int], pattern: str,
          options: WriteOptions) -> Iterator[dict[str, Any]]:
    """One job per shard still to write: its items in plan order."""
    per_shard = options.samples_per_shard
    for shard in todo:
        items = []
        for i in order[shard * per_shard : (shard + 1) * per_shard].tolist():
            container, offset, size = index.locator(i)
            label = int(index.labels[i])
            items.append((keys[i], index.names[i], label, index.classes[label], container, offset, size))
        yield {"index": shard, "path": pattern % shard, "items": items, "options": asdict(options)}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _load_progress(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Records of finished shards from an interrupted run whose files are still there, whole."""
    done: dict[int, dict[str, Any]] = {}
    progress = out_dir / _PROGRESS_NAME
    if not progress.exists():
        return done
    for line in progress.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the interruption: that shard is rewritten
        path = out_dir / str(record.get("name", ""))
        if path.is_file() and path.stat().st_size == record.get("bytes"):
            done[int(record["index"])] = record
    return done


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _prepare_out_dir(out_dir: Path, prefix: str, state: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Check the output folder against an earlier run; returns an equal finished manifest, if any."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out_dir.iterdir() if re.fullmatch(rf"{re.escape(prefix)}-\d+\.tar(\.tmp)?", p.name)]
    manifest_path, state_path = out_dir / MANIFEST_NAME, out_dir / _STATE_NAME
    if overwrite:
        for path in [*ours, manifest_path, state_path, out_dir / _PROGRESS_NAME]:
            path.unlink(missing_ok=True)
        return None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        old = {"options": manifest.get("options"), "source_fingerprint": manifest.get("source", {}).get("fingerprint"),
               "pattern": manifest.get("pattern")}
        new = {k: state[k] for k in old}
        if old == new:
            return manifest
        raise FileExistsError(f"{out_dir} already holds finished shards of another write ({_differences(old, new)}); "
                              "pass --overwrite to replace them or choose another --out")
    if state_path.exists():
        old_state = json.loads(state_path.read_text())
        if old_state != state:
            raise FileExistsError(f"{out_dir} holds an interrupted write with other settings or another source "
                                  f"({_differences(old_state, state)}); rerun it with its settings to finish it, "
                                  "or pass --overwrite to start over")
    elif any(p.suffix == ".tar" for p in ours):
        raise FileExistsError(f"{out_dir} already holds {prefix}-*.tar shards that no visgen write is resuming; "
                              "pass --overwrite to replace them or choose another --out")
    for path in ours:
        if path.name.endswith(".tmp"):
            path.unlink()  # the shard being written when the run stopped: rewritten below
    _atomic_json(state_path, state)
    return None


def write_dataset(src: str | Path, out_dir: str | Path, options: WriteOptions, labels_file: str | Path | None = None,
                  classes: list[str] | None = None, prefix: str | None = None, workers: int = 0,
                  overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write `src` as shards `<out_dir>/<prefix>-%06d.tar` plus `manifest.json`; returns the manifest."""
    options.check()
    out_dir = Path(out_dir)
    prefix = prefix or out_dir.resolve().name
    index = scan_source(src, labels_file, classes)
    keys = sample_keys(index)
    num_shards = -(-len(index) // options.samples_per_shard)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    state = {"tool": TOOL_VERSION, "options": asdict(options), "source_fingerprint": source_fingerprint(index),
             "pattern": Path(pattern).name, "num_shards": num_shards}
    finished = _prepare_out_dir(out_dir, prefix, state, overwrite)
    if finished is not None:
        if progress:
            print(f"{out_dir}: all {num_shards} shards of this write are already there (manifest.json); nothing to do")
        return finished

    order = np.random.default_rng(options.seed).permutation(len(index))  # the shuffle across shards
    done = _load_progress(out_dir)
    todo = [s for s in range(num_shards) if s not in done]
    records = dict(done)
    with open(out_dir / _PROGRESS_NAME, "a") as log, _ProgressBar(progress, len(index)) as bar:
        bar.advance(sum(r["count"] + len(r["skipped"]) for r in done.values()))

        def finish(record: dict[str, Any]) -> None:
            records[record["index"]] = record
            log.write(json.dumps(record, sort_keys=True) + "\n")
            log.flush()
            os.fsync(log.fileno())
            bar.advance(record["count"] + len(record["skipped"]))

        jobs = _jobs(index, keys, order, todo, pattern, options)
        if workers <= 0:
            for job in jobs:
                finish(_write_shard_job(job))
        else:
            _run_pool(jobs, workers, finish)

    manifest = _manifest(index, options, state, records, labels_file)
    _atomic_json(out_dir / MANIFEST_NAME, manifest)
    (out_dir / _STATE_NAME).unlink(missing_ok=True)
    (out_dir / _PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def _run_pool(jobs: Iterator[dict[str, Any]], workers: int, finish: Any) -> None:
    """Run shard jobs in worker processes, at most 2 per worker queued (bounded memory), in any order."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: set[Future[dict[str, Any]]] = set()
        try:
            for job in jobs:
                pending.add(pool.submit(_write_shard_job, job))
                while len(pending) >= 2 * workers:
                    completed, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in completed:
                        finish(future.result())
            for future in wait(pending).done:
                finish(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


class _ProgressBar:
    """A rich progress bar over images (or nothing when quiet)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.progress, self.task = enabled, total, None, None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.progress = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                     "images", TimeRemainingColumn())
            self.progress.__enter__()
            self.task = self.progress.add_task("writing shards", total=self.total)
        return self

    def advance(self, count: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, count)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _manifest(index: SourceIndex, options: WriteOptions, state: dict[str, Any], records: dict[int, dict[str, Any]],
              labels_file: str | Path | None) -> dict[str, Any]:
    shards = [records[s] for s in sorted(records)]
    histogram = np.zeros(len(index.classes), np.int64)
    converted: Counter[str] = Counter()
    for record in shards:
        for label, count in record["histogram"].items():
            histogram[int(label)] += count
        converted.update(record["converted"])
    num_shards = state["num_shards"]
    pattern = state["pattern"]
    return {
        "format": "visgen-shards", "version": 1, "tool": TOOL_VERSION,
        "source": {"path": str(Path(index.root).resolve()), "kind": index.kind, "num_images": len(index),
                   "labels_file": str(labels_file) if labels_file else None, "fingerprint": state["source_fingerprint"],
                   "ignored_files": index.num_ignored, "ignored_examples": index.ignored},
        "classes": index.classes, "num_classes": len(index.classes),
        "options": state["options"], "preprocessing": options.describe(),
        "pattern": pattern,
        "shard_spec": pattern.replace("%06d", f"{{{0:06d}..{num_shards - 1:06d}}}"),
        "num_samples": int(histogram.sum()), "class_histogram": histogram.tolist(),
        "converted_to_rgb": dict(sorted(converted.items())),
        "skipped": [item for record in shards for item in record["skipped"]],
        "shards": [{k: record[k] for k in ("name", "count", "bytes", "sha256")} for record in shards],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line options of the writer."""
    parser.add_argument("--src", required=True, help="ImageNet train folder (synset folders), a folder of per-class "
                        "tars, ILSVRC2012_img_train.tar, or a flat folder/tar of images with --labels")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (one per split), e.g. data/imagenet/train")
    parser.add_argument("--labels", help="for flat images (val): '<image file> <synset or index>' lines, "
                        "e.g. LOC_val_solution.csv")
    parser.add_argument("--classes", help="fix the class list: train's manifest.json or a file with one class per "
                        "line (use it for val, so both splits share the index)")
    parser.add_argument("--prefix", help="shard name prefix (default: the --out folder's name)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="images per shard (default 1250)")
    size.add_argument("--num-shards", type=int, help="number of shards (sets --samples-per-shard to fit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    parser.add_argument("--resize", type=int, help="ADM center crop to RxR, stored losslessly (PNG) by default")
    parser.add_argument("--format", default="original", choices=_FORMATS, dest="image_format",
                        help="original: keep RGB JPEG/PNG bytes (others -> RGB PNG); png; jpg (re-encode, lossy)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality with --format jpg (recorded)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (0: in-process)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out undecodable images (listed in manifest.json) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="delete this folder's shards and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the writer from parsed arguments; returns the exit code."""
    classes = read_class_list(Path(args.classes)) if args.classes else None
    samples_per_shard = args.samples_per_shard or 1250
    if args.num_shards:
        num_images = len(scan_source(args.src, args.labels, classes))
        samples_per_shard = -(-num_images // args.num_shards)
    options = WriteOptions(samples_per_shard=samples_per_shard, seed=args.seed, resize=args.resize,
                           image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                           skip_unreadable=args.skip_unreadable)
    try:
        manifest = write_dataset(args.src, args.out, options, args.labels, classes, args.prefix, args.workers,
                                 args.overwrite, progress=not args.quiet)
    except (SourceError, SourceImageError, FileExistsError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    print(f"{manifest['num_samples']:,} images of {manifest['num_classes']} classes in {len(manifest['shards'])} "
          f"shards ({total_bytes / 1e9:.2f} GB): {Path(args.out) / manifest['shard_spec']}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable images (listed in manifest.json)")
    if manifest["converted_to_rgb"]:
        print(f"converted to RGB: {manifest['converted_to_rgb']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m visgen.data.writer ...`: parse the command line and run; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m visgen.data.writer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
