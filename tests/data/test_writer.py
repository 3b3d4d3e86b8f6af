"""The shard writer: ImageNet layouts in, shuffled exact shards out, odd JPEGs made RGB, resumable byte for byte;
and verify, which must name every truncated member and cut tar."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.imagefolder import (
    SYNSETS,
    decoded_rgb,
    image_files,
    write_flat_val,
    write_folder,
    write_nested_tar,
)
from visgen.data import shards, writer
from visgen.data import verify as verify_cli
from visgen.data.shards import iter_tar_samples
from visgen.data.sources import SourceError, scan_source
from visgen.data.verify import verify
from visgen.data.writer import WriteOptions, write_dataset


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return image_files(per_class=5)


@pytest.fixture(scope="module")
def folder(files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("src") / "train", files)


def _read_back(out_dir: Path) -> list[dict]:
    """Every sample of every shard of a write, in shard order."""
    samples = []
    for path in sorted(out_dir.glob("*.tar")):
        with open(path, "rb") as stream:
            samples.extend(iter_tar_samples(stream, str(path)))
    return samples


def test_folder_to_shards_exact_labels_and_rgb_pixels(folder: Path, files: dict[str, bytes], tmp_path: Path) -> None:
    manifest = write_dataset(folder, tmp_path / "train", WriteOptions(samples_per_shard=4), progress=False)
    samples = _read_back(tmp_path / "train")
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 4, 3]  # fixed size, the rest in the last one
    assert manifest["classes"] == SYNSETS and manifest["class_histogram"] == [5, 5, 5]
    assert manifest["converted_to_rgb"] == {"CMYK->RGB": 1, "L->RGB": 1}
    assert manifest["shard_spec"] == "train-{000000..000003}.tar"
    assert len(samples) == 15 and len({s["__key__"] for s in samples}) == 15
    for sample in samples:
        meta = json.loads(sample["json"])
        source = files[meta["source"]]
        assert int(sample["cls"]) == SYNSETS.index(meta["source"].split("/")[0]) == meta["label"]
        ext = "png" if "png" in sample else "jpg"
        with Image.open(io.BytesIO(sample[ext])) as stored:
            assert stored.mode == "RGB" and list(stored.size) == meta["original_size"]
        assert np.array_equal(decoded_rgb(sample[ext]), decoded_rgb(source))  # pixels equal after decode
        if meta["original_mode"] == "RGB" and meta["original_format"] == "JPEG":
            assert sample["jpg"] == source  # RGB JPEGs are stored byte for byte
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert "png" in by_source["n01443537/n01443537_3.JPEG"]  # the PNG named .JPEG keeps PNG bytes, as png
    assert "png" in by_source["n01440764/n01440764_1.JPEG"]  # CMYK -> RGB, stored losslessly
    # Shuffled across shards: the first shard is not just class 0.
    assert len({int(s["cls"]) for s in samples[:4]}) > 1


def test_interrupted_write_resumes_to_identical_bytes(folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    options = WriteOptions(samples_per_shard=4, seed=3, resize=24)
    reference = write_dataset(folder, tmp_path / "ref", options, workers=2, progress=False)

    calls = {"n": 0}
    real_prepare = writer.prepare_image

    def interrupted(data: bytes, opts: WriteOptions):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the third shard
            raise KeyboardInterrupt
        return real_prepare(data, opts)

    monkeypatch.setattr(writer, "prepare_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(folder, tmp_path / "resumed", options, progress=False)
    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.glob("*.tar")) == ["resumed-000000.tar", "resumed-000001.tar"]
    (out / "resumed-000002.tar.tmp").write_bytes(b"half a shard")  # what a kill -9 leaves behind
    with pytest.raises(FileExistsError, match=r"other settings.*seed"):
        write_dataset(folder, out, WriteOptions(samples_per_shard=4, seed=4, resize=24), progress=False)

    monkeypatch.setattr(writer, "prepare_image", real_prepare)
    resumed = write_dataset(folder, out, options, progress=False)
    assert not list(out.glob("*.tmp")) and not (out / ".write-state.json").exists()
    for ref_shard, new_shard in zip(reference["shards"], resumed["shards"], strict=True):
        assert ref_shard["sha256"] == new_shard["sha256"]
        assert (tmp_path / "ref" / ref_shard["name"].replace("resumed", "ref")).read_bytes() == \
            (out / new_shard["name"]).read_bytes()
    assert write_dataset(folder, out, options, progress=False) == resumed  # finished: nothing to do
    with pytest.raises(FileExistsError, match="another write"):
        write_dataset(folder, out, WriteOptions(samples_per_shard=5, resize=24), progress=False)


def test_nested_train_tar_and_flat_val_with_labels(files: dict[str, bytes], tmp_path: Path) -> None:
    nested = scan_source(write_nested_tar(tmp_path / "ILSVRC2012_img_train.tar", files))
    folder = scan_source(write_folder(tmp_path / "train", files))
    assert nested.kind == "nested_tar" and nested.classes == folder.classes == SYNSETS
    assert nested.names == folder.names and nested.labels.tolist() == folder.labels.tolist()
    val_dir, labels = write_flat_val(tmp_path / "val", files)
    manifest = write_dataset(val_dir, tmp_path / "val_shards", WriteOptions(samples_per_shard=8), labels_file=labels,
                             classes=SYNSETS, progress=False)
    assert manifest["class_histogram"] == [5, 5, 5] and manifest["source"]["kind"] == "flat"
    with pytest.raises(SourceError, match="--labels"):
        scan_source(val_dir)
    (tmp_path / "truth.txt").write_text("65\n970\n")
    with pytest.raises(SourceError, match="ILSVRC2012_validation_ground_truth"):
        scan_source(val_dir, tmp_path / "truth.txt")
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(SourceError, match=r"n09999999 holds no images"):
        scan_source(tmp_path / "train")
    with pytest.raises(SourceError, match="not in the given class list"):
        scan_source(write_folder(tmp_path / "other", {"n00000001/a.JPEG": files["n01440764/n01440764_0.JPEG"]}),
                    classes=SYNSETS)


def test_unreadable_source_image_is_named_or_skipped(folder: Path, tmp_path: Path) -> None:
    broken = write_folder(tmp_path / "broken", {"n01440764/ok.JPEG": (folder / "n01440764/n01440764_0.JPEG")
                                                .read_bytes(), "n01440764/bad.JPEG": b"\xff\xd8 not a jpeg"})
    with pytest.raises(writer.SourceImageError, match=r"n01440764/bad\.JPEG.*--skip-unreadable"):
        write_dataset(broken, tmp_path / "out", WriteOptions(samples_per_shard=4), progress=False)
    manifest = write_dataset(broken, tmp_path / "out", WriteOptions(samples_per_shard=4, skip_unreadable=True),
                             overwrite=True, progress=False)
    assert manifest["num_samples"] == 1 and manifest["skipped"][0]["source"] == "n01440764/bad.JPEG"


def _rewrite_member(src: Path, dst: Path, key: str, ext: str, data: bytes) -> None:
    """Copy a shard, replacing one member's bytes (a valid tar with a damaged member)."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w") as tar_out:
        for member in tar_in:
            payload = tar_in.extractfile(member).read()
            if member.name == f"{key}.{ext}":
                payload, member.size = data, len(data)
            tar_out.addfile(member, io.BytesIO(payload))


def test_verify_names_truncated_members_and_cut_tars(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    write_dataset(folder, out, WriteOptions(samples_per_shard=4), progress=False)
    good = verify(str(out / "train-{000000..000003}.tar"), preview=str(tmp_path / "grid.png"), per_class=2,
                  preview_classes=(0, 2))
    assert good["ok"] and good["num_samples"] == 15 and good["checked_against_manifest"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 66, 2 * 66)  # 2 classes x 2 images of 64 px with 2 px gaps

    first = sorted(out.glob("*.tar"))[0]
    victim = next(iter_tar_samples(open(first, "rb"), str(first)))
    ext = "jpg" if "jpg" in victim else "png"
    _rewrite_member(first, out / "train-000000.tar.bad", victim["__key__"], ext, victim[ext][: len(victim[ext]) // 2])
    (out / "train-000000.tar.bad").replace(first)
    raw = (out / "train-000002.tar").read_bytes()
    (out / "train-000002.tar").write_bytes(raw[: len(raw) // 2])
    bad = verify(str(out / "train-{000000..000003}.tar"))
    text = "\n".join(bad["problems"])
    assert not bad["ok"]
    assert f"train-000000.tar: key {victim['__key__']}: {ext} does not decode" in text
    assert "train-000002.tar: tar is cut or corrupt after" in text
    assert "train-000002.tar: count" in text and "differs from manifest.json" in text
    assert verify_cli.main([str(out / "train-{000000..000003}.tar"), "--workers", "0"]) == 1


def test_imagenet_1k_wds_shards_read_as_they_are(files: dict[str, bytes], tmp_path: Path) -> None:
    """timm's imagenet-1k-wds layout: webdataset-written jpg/cls/json members and an _info.json of shard lengths."""
    import webdataset as wds

    from visgen.data.stream import ShardStream

    names = [f"imagenet1k-train-{i:04d}.tar" for i in range(3)]
    items = sorted(files.items())
    for shard, name in enumerate(names):
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for path, data in items[shard * 5 : (shard + 1) * 5]:
                stem = Path(path).stem
                sink.write({"__key__": stem, "jpg": data, "cls": SYNSETS.index(path.split("/")[0]),
                            "json": {"filename": Path(path).name, "label": SYNSETS.index(path.split("/")[0])}})
    info = {"name": "imagenet-1k", "splits": {"train": {"name": "train", "num_samples": 15, "filenames": names,
                                                         "shard_lengths": [5, 5, 5]}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    spec = str(tmp_path / "imagenet1k-train-{0000..0002}.tar")
    read = list(ShardStream(spec, 24, resampled=False, num_classes=3, resize=True))
    assert len(read) == 15 and read[0]["image"].shape == (3, 24, 24)
    assert sorted(int(item["label"]) for item in read) == [0] * 5 + [1] * 5 + [2] * 5
    raw = (tmp_path / names[1]).read_bytes()
    (tmp_path / names[1]).write_bytes(raw[: len(raw) // 3])
    stream = ShardStream(spec, 24, resampled=False, num_classes=3, resize=True)
    kept = len(list(stream))
    assert stream.loss.totals() == (0, 15 - kept, 1)  # exact, from _info.json's shard_lengths
    info["splits"]["train"]["shard_lengths"] = [5, 5]  # a cut _info.json: which count is whose is unknown
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="3 filenames but 2 shard_lengths"):
        list(ShardStream(spec, 24, resampled=False, num_classes=3, resize=True))


def test_a_full_disk_names_the_shard_and_keeps_what_was_written(folder: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_write = shards._HashingWriter.write
    written = {"bytes": 0}

    def fill_up(self, data):  # the disk is full after ~2.5 shards
        written["bytes"] += len(memoryview(data))
        if written["bytes"] > 60_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards._HashingWriter, "write", fill_up)
    with pytest.raises(OSError, match=r"writing shard .*full-00000\d\.tar failed: No space left on device; nothing "
                                      r"was written under that name \(free disk space"):
        write_dataset(folder, tmp_path / "full", WriteOptions(samples_per_shard=4, resize=32, image_format="png"),
                      progress=False)
    kept = sorted(p.name for p in (tmp_path / "full").glob("*.tar"))
    assert kept and not list((tmp_path / "full").glob("*.tmp"))
    monkeypatch.setattr(shards._HashingWriter, "write", real_write)
    manifest = write_dataset(folder, tmp_path / "full", WriteOptions(samples_per_shard=4, resize=32,
                                                                     image_format="png"), progress=False)
    assert manifest["num_samples"] == 15 and set(kept) <= {s["name"] for s in manifest["shards"]}
