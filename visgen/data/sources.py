"""Where the images to shard come from: ImageFolder trees, tars of images, and label files for flat folders.

Accepted sources (`scan_source`), all giving the class index from the sorted class names (synsets):
  - a directory of class folders (ImageNet's train layout, or val sorted into synset folders);
  - a directory of per-class tars (`n01440764.tar`, ...: ILSVRC2012_img_train.tar unpacked once);
  - a tar of per-class tars (ILSVRC2012_img_train.tar itself) or a tar of class folders;
  - a flat directory or tar of images (ILSVRC2012_img_val.tar) with a labels file: lines `<file> <label>`
    (space or comma separated, `<label>` a synset or a class index; Kaggle's LOC_val_solution.csv works).
Only names, labels and byte offsets are held (no pixels): ~100 bytes per image.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["SourceError", "SourceIndex", "EntryReader", "scan_source", "read_class_list"]

#: File suffixes read as images (case-insensitive); everything else in a source is ignored and counted.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_LABEL_SPLIT = re.compile(r"[,\s]+")


class SourceError(ValueError):
    """A source that cannot be sharded as asked (missing folder, empty class, unlabelled image, ...)."""


@dataclass
class SourceIndex:
    """Every image of a source: relative name, class index and where its bytes are (file or tar + offset)."""

    root: str
    kind: str
    classes: list[str]
    names: list[str] = field(default_factory=list)  # relative names, e.g. 'n01440764/n01440764_10026.JPEG'
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (N,) class index
    containers: list[str] = field(default_factory=list)  # tars the bytes live in
    container_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (N,) into it; -1: root/name
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,) byte offset, -1: whole file
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,) bytes
    ignored: list[str] = field(default_factory=list)  # non-image members (first 20) ...
    num_ignored: int = 0  # ... and how many there were

    def __len__(self) -> int:
        return len(self.names)

    def locator(self, index: int) -> tuple[str, int, int]:
        """(file path, byte offset or -1 for the whole file, size) of image `index`."""
        container = int(self.container_ids[index])
        path = os.path.join(self.root, self.names[index]) if container < 0 else self.containers[container]
        return path, int(self.offsets[index]), int(self.sizes[index])


class _Builder:
    """Collects entries while scanning, then sorts them by (class, name) into a SourceIndex."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int, int, int]] = []  # (class name, rel name, container id, offset, size)
        self.containers: list[str] = []
        self.ignored: list[str] = []
        self.num_ignored = 0

    def container(self, path: str) -> int:
        self.containers.append(path)
        return len(self.containers) - 1

    def add(self, class_name: str, name: str, container: int, offset: int, size: int) -> None:
        if name.lower().endswith(IMAGE_SUFFIXES):
            self.rows.append((class_name, name, container, offset, size))
        else:
            self.num_ignored += 1
            if len(self.ignored) < 20:
                self.ignored.append(name)

    def build(self, root: str, kind: str, classes: list[str]) -> SourceIndex:
        index = {name: i for i, name in enumerate(classes)}
        self.rows.sort(key=lambda row: (index[row[0]], row[1]))
        return SourceIndex(
            root=root, kind=kind, classes=classes,
            names=[row[1] for row in self.rows],
            labels=np.array([index[row[0]] for row in self.rows], np.int32),
            containers=self.containers,
            container_ids=np.array([row[2] for row in self.rows], np.int32),
            offsets=np.array([row[3] for row in self.rows], np.int64),
            sizes=np.array([row[4] for row in self.rows], np.int64),
            ignored=self.ignored, num_ignored=self.num_ignored,
        )


class _Window:
    """A read-only, seekable view of bytes [start, start + size) of an open file (a tar inside a tar)."""

    def __init__(self, fileobj: IO[bytes], start: int, size: int):
        self.fileobj, self.start, self.size, self.pos = fileobj, start, size, 0

    def read(self, size: int = -1) -> bytes:
        size = self.size - self.pos if size < 0 else min(size, self.size - self.pos)
        self.fileobj.seek(self.start + self.pos)
        data = self.fileobj.read(size)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def read_class_list(path: Path) -> list[str]:
    """Class names from a text file (one per line) or a shard manifest.json (its "classes")."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        classes = json.loads(text).get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise SourceError(f"{path} has no 'classes' list of strings; pass a manifest.json written by "
                              "python -m visgen.data.shards write, or a text file with one class name per line")
    else:
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(classes)) != len(classes) or not classes:
        raise SourceError(f"{path}: the class list is empty or has duplicates")
    return classes


def _read_labels(path: Path) -> dict[str, str]:
    """Image name (basename without extension) -> label text, from `<file> <label> ...` lines."""
    labels: dict[str, str] = {}
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        parts = [p for p in _LABEL_SPLIT.split(line.strip()) if p]
        if not parts:
            continue
        if len(parts) == 1:
            if parts[0].isdigit():
                raise SourceError(
                    f"labels file {path} line {number} holds only a number: this looks like the devkit's "
                    "ILSVRC2012_validation_ground_truth.txt, whose IDs are not sorted-synset class indices. Use "
                    "a file of '<image file> <synset>' lines (e.g. Kaggle's LOC_val_solution.csv)")
            raise SourceError(f"labels file {path} line {number}: expected '<image file> <label>', got {line!r}")
        if number == 1 and not (parts[1].isdigit() or re.fullmatch(r"n\d{8}", parts[1])):
            continue  # a CSV header such as 'ImageId,PredictionString'
        stem = Path(parts[0]).name.split(".")[0]
        if stem in labels and labels[stem] != parts[1]:
            raise SourceError(f"labels file {path}: {parts[0]!r} has two labels ({labels[stem]!r}, {parts[1]!r})")
        labels[stem] = parts[1]
    if not labels:
        raise SourceError(f"labels file {path} holds no '<image file> <label>' lines")
    return labels


def _scan_tar(path: Path, builder: _Builder) -> tuple[str, set[str]]:
    """Add the images of one tar; returns its layout ('nested', 'folders' or 'flat') and class names."""
    classes: set[str] = set()
    layouts: set[str] = set()
    container = builder.container(str(path))
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as outer:
        for member in outer:
            if not member.isfile():
                continue
            if member.name.lower().endswith(".tar"):
                layouts.add("nested")
                class_name = Path(member.name).name[: -len(".tar")]
                classes.add(class_name)
                window = _Window(raw, member.offset_data, member.size)
                with tarfile.open(fileobj=window, mode="r:") as inner:  # type: ignore[call-overload]
                    for item in inner:
                        if item.isfile():
                            builder.add(class_name, f"{class_name}/{item.name}", container,
                                        member.offset_data + item.offset_data, item.size)
                raw.seek(member.offset_data + member.size)
            elif "/" in member.name.strip("/"):
                layouts.add("folders")
                class_name = member.name.strip("/").split("/")[-2]
                classes.add(class_name)
                builder.add(class_name, member.name, container, member.offset_data, member.size)
            else:
                layouts.add("flat")
                builder.add("", member.name, container, member.offset_data, member.size)
    if len(layouts) > 1:
        raise SourceError(f"tar {path} mixes {sorted(layouts)} members; give it one layout (per-class tars, "
                          "class folders, or flat images with --labels)")
    return (layouts.pop() if layouts else "flat"), classes


def _scan_directory(root: Path, builder: _Builder) -> tuple[str, set[str]]:
    """Add the images of a directory: class folders, per-class tars, or flat images."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    tars = [p for p in entries if p.is_file() and p.name.lower().endswith(".tar")]
    if folders:
        for folder in folders:
            before = len(builder.rows)
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(f for f in filenames if not f.startswith(".")):
                    path = os.path.join(dirpath, filename)
                    builder.add(folder.name, os.path.relpath(path, root), -1, -1, os.path.getsize(path))
            if len(builder.rows) == before:
                raise SourceError(f"class folder {folder} holds no images ({'/'.join(IMAGE_SUFFIXES)}); an "
                                  "empty class would get an index but no samples. Remove it or fill it")
        return "imagefolder", {f.name for f in folders}
    if tars:
        classes: set[str] = set()
        for tar_path in tars:
            before = len(builder.rows)
            layout, _ = _scan_tar(tar_path, builder)
            if layout != "flat":
                raise SourceError(f"{tar_path}: a directory of tars must hold one flat tar per class")
            class_name = tar_path.name[: -len(".tar")]
            builder.rows[before:] = [(class_name, f"{class_name}/{r[1]}", *r[2:]) for r in builder.rows[before:]]
            if len(builder.rows) == before:
                raise SourceError(f"class tar {tar_path} holds no images")
            classes.add(class_name)
        return "class_tars", classes
    for path in entries:
        if path.is_file():
            builder.add("", path.name, -1, -1, path.stat().st_size)
    return "flat", set()


def scan_source(src: str | Path, labels_file: str | Path | None = None,
                classes: list[str] | None = None) -> SourceIndex:
    """Index every image of `src` (see the module docstring) with its class index, sorted by (class, name).

    `classes` fixes the class list (e.g. train's, when writing val); otherwise it is the sorted class folders,
    tars or synsets of the labels file.
    """
    src = Path(src)
    if not src.exists():
        raise SourceError(f"source {src} does not exist; pass an ImageNet train folder, a tar of images, or a "
                          "folder/tar of flat images with --labels")
    builder = _Builder()
    if src.is_dir():
        kind, found = _scan_directory(src, builder)
    else:
        kind, found = _scan_tar(src, builder)
        kind = {"nested": "nested_tar", "folders": "tar_folders"}.get(kind, "flat")
    if kind == "flat":
        return _label_flat(src, builder, labels_file, classes)
    if labels_file is not None:
        raise SourceError(f"--labels is only for flat folders or tars of images; {src} is a {kind} source whose "
                          "class comes from its folder or tar names")
    if classes is None:
        classes = sorted(found)
    unknown = sorted(found - set(classes))
    if unknown:
        raise SourceError(f"{src}: class folders/tars {unknown[:5]} are not in the given class list "
                          f"({len(classes)} classes); pass the matching --classes")
    if not builder.rows:
        raise SourceError(f"source {src} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
    return builder.build(str(src), kind, classes)


def _label_flat(src: Path, builder: _Builder, labels_file: str | Path | None,
                classes: list[str] | None) -> SourceIndex:
    """Give each image of a flat source its class from the labels file."""
    if labels_file is None:
        raise SourceError(f"{src} holds flat images without class folders; pass --labels <file> with "
                          "'<image file> <synset or class index>' lines (e.g. LOC_val_solution.csv)")
    labels = _read_labels(Path(labels_file))
    values = set(labels.values())
    numeric = all(v.isdigit() for v in values)
    if classes is None:
        classes = [str(i) for i in range(max(int(v) for v in values) + 1)] if numeric else sorted(values)
    missing: list[str] = []
    rows = []
    for _, name, container, offset, size in builder.rows:
        label = labels.get(Path(name).name.split(".")[0])
        if label is None:
            missing.append(name)
            continue
        if numeric:
            if int(label) >= len(classes):
                raise SourceError(f"labels file {labels_file}: {name} has class index {label}, outside "
                                  f"[0, {len(classes)}); pass the full class list with --classes")
            label = classes[int(label)]
        elif label not in classes:
            raise SourceError(f"labels file {labels_file}: {name} has class {label!r}, which is not in the class "
                              f"list ({len(classes)} classes, e.g. {classes[:3]}); pass the matching --classes")
        rows.append((label, name, container, offset, size))
    if missing:
        raise SourceError(f"{len(missing)} images of {src} have no line in {labels_file} (first: {missing[0]})")
    builder.rows = rows
    if not rows:
        raise SourceError(f"source {src} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
    return builder.build(str(src), "flat", classes)


class EntryReader:
    """Reads the bytes of source images, keeping a few tar files open (images of a shuffled plan jump around)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self.open_files: dict[str, IO[bytes]] = {}

    def read(self, container: str, offset: int, size: int) -> bytes:
        """The bytes of one image; a short read (a truncated source tar) raises OSError naming the file."""
        if offset < 0:
            with open(container, "rb") as stream:
                return stream.read()
        stream = self.open_files.get(container)
        if stream is None:
            if len(self.open_files) >= self.max_open:
                self.open_files.pop(next(iter(self.open_files))).close()
            stream = self.open_files[container] = open(container, "rb")  # noqa: SIM115 - closed in close()
        stream.seek(offset)
        data = stream.read(size)
        if len(data) != size:
            raise OSError(f"{container}: expected {size} bytes at offset {offset}, got {len(data)} (truncated tar?)")
        return data

    def close(self) -> None:
        for stream in self.open_files.values():
            stream.close()
        self.open_files.clear()
