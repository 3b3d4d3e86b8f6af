"""Tests for the digit classifier: accuracy on the built-in split, feature size, caching, determinism."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from visgen.data.builtin import TRAIN_SHARDS, VAL_SHARDS
from visgen.data.stream import load_all
from visgen.eval import classifier as clf


@pytest.fixture(scope="module")
def shards(digits_dir: Path) -> tuple[str, str]:
    """Train and val shard patterns of the built-in digits (written once per session by tests/conftest.py)."""
    return str(digits_dir / "digits" / TRAIN_SHARDS), str(digits_dir / "digits" / VAL_SHARDS)


@pytest.fixture(scope="module")
def cache_dir(digits_dir: Path) -> Path:
    """The session's classifier cache (also used by test_metrics / test_evaluate), so it is trained once."""
    return digits_dir / "cache"


@pytest.fixture(scope="module")
def val_data(shards: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 validation digits, uint8 (500, 3, 32, 32), and labels (500,)."""
    return load_all(shards[1], 32)


@pytest.fixture(scope="module")
def trained(shards: tuple[str, str], cache_dir: Path) -> tuple[clf.DigitClassifier, float]:
    """The cached classifier (trained here on first use) and the seconds the call took."""
    started = time.perf_counter()
    model = clf.load_or_train_digit_classifier(*shards, cache_dir)
    return model, time.perf_counter() - started


def test_classifier_reaches_required_val_accuracy(trained, val_data, cache_dir: Path) -> None:
    """The cached classifier scores >= 0.97 on the held-out digits, and its metadata says the same."""
    model, seconds = trained
    images, labels = val_data
    accuracy = clf.evaluate_accuracy(model, images, labels)
    meta_files = list(cache_dir.glob("digit_classifier-*.json"))
    assert len(meta_files) == 1
    meta = json.loads(meta_files[0].read_text())
    print(f"classifier: val accuracy {accuracy:.3f}, load_or_train {seconds:.1f} s, meta {meta}")
    assert accuracy >= 0.97
    assert meta["val_accuracy"] == pytest.approx(accuracy)
    assert meta["num_train"] == 4500 and meta["num_val"] == 500
    assert not model.training


def test_features_and_logits_shapes(trained, val_data) -> None:
    """features() is (N, <=64) and consistent with forward(); logits are (N, 10)."""
    model, _ = trained
    images = val_data[0][:7]
    with torch.no_grad():
        feats = model.features(images)
        logits = model(images)
        feats2, logits2 = model.features_and_logits(images)
    assert feats.shape == (7, model.num_features) and model.num_features <= 64
    assert feats.dtype == torch.float32 and (feats >= 0).all()
    assert logits.shape == (7, 10)
    torch.testing.assert_close(feats2, feats)
    torch.testing.assert_close(logits2, logits)


def test_cache_is_reused_without_retraining(trained, shards, cache_dir: Path, monkeypatch) -> None:
    """A second call loads identical weights from the cache and never calls the trainer."""
    model, _ = trained
    weights = next(cache_dir.glob("digit_classifier-*.safetensors"))
    mtime = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("train_digit_classifier was called although a cache entry exists")

    monkeypatch.setattr(clf, "train_digit_classifier", fail)
    again = clf.load_or_train_digit_classifier(*shards, cache_dir)
    assert weights.stat().st_mtime_ns == mtime
    assert not again.training
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b), name
    assert not list(cache_dir.glob(".*.tmp")), "temporary cache files were left behind"


def test_dataset_key_changes_with_shard_content(shards, digits_dir: Path, tmp_path: Path) -> None:
    """Changing one shard's bytes, or swapping splits, gives a different cache key (so it retrains)."""
    train, val = shards
    base = clf.dataset_key(train, val)
    assert clf.dataset_key(train, val) == base
    assert clf.dataset_key(val, train) != base
    copy = tmp_path / "copy"
    shutil.copytree(digits_dir / "digits", copy)
    assert clf.dataset_key(str(copy / TRAIN_SHARDS), str(copy / VAL_SHARDS)) == base  # same names and bytes
    with (copy / "digits-val-000003.tar").open("ab") as fh:
        fh.write(b"\0" * 512)  # trailing zero block: still a valid tar, but different bytes and size
    assert clf.dataset_key(str(copy / TRAIN_SHARDS), str(copy / VAL_SHARDS)) != base


def test_missing_shards_raise_with_fix(tmp_path: Path) -> None:
    """A wrong shard path fails before any training, naming the missing file."""
    with pytest.raises(FileNotFoundError, match="digits-train-000000.tar"):
        clf.load_or_train_digit_classifier(
            str(tmp_path / TRAIN_SHARDS), str(tmp_path / VAL_SHARDS), tmp_path / "cache"
        )


def test_low_accuracy_raises_and_caches_nothing(shards, tmp_path: Path, monkeypatch) -> None:
    """A classifier below 0.97 is refused with a clear error and never written to the cache."""
    monkeypatch.setattr(clf, "train_digit_classifier", lambda *a, **k: (clf.DigitClassifier().eval(), 0.5))
    with pytest.raises(RuntimeError, match=r"0\.5000 < 0\.97"):
        clf.load_or_train_digit_classifier(*shards, tmp_path / "cache")
    assert not (tmp_path / "cache").exists(), "a refused classifier must not be cached"


def test_training_is_deterministic_and_leaves_global_rng(val_data) -> None:
    """Same seed -> identical weights; training leaves the caller's global RNG and thread count alone."""
    images, labels = val_data[0][:256], val_data[1][:256]
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = clf.train_digit_classifier(images, labels, images, labels, seed=5, epochs=1, batch_size=64)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.get_num_threads() == threads
    b, _ = clf.train_digit_classifier(images, labels, images, labels, seed=5, epochs=1, batch_size=64)
    c, _ = clf.train_digit_classifier(images, labels, images, labels, seed=6, epochs=1, batch_size=64)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.state_dict()["head.1.weight"], c.state_dict()["head.1.weight"])


def test_random_shift_moves_digits_without_cropping(val_data) -> None:
    """±2 px shifts keep every pixel of a 2 px-padded digit and actually move most images."""
    images = val_data[0][:64]
    shifted = clf._random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))  # no ink lost
    moved = (shifted != images).flatten(1).any(1).float().mean()
    assert moved > 0.8  # 24 of 25 offsets move the image
    assert torch.equal(clf._random_shift(images, 0, torch.Generator()), images)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(2, 3, 32, 32), "uint8"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), r"\(N, 3, 32, 32\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), r"\(N, 3, 32, 32\)"),
    ],
)
def test_bad_inputs_are_rejected(bad: torch.Tensor, match: str) -> None:
    """Float or wrongly shaped images fail loudly instead of being silently misscaled."""
    with pytest.raises(ValueError, match=match):
        clf.DigitClassifier()(bad)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_classifier_trains_inside_validation_contexts(context) -> None:
    """A tokenizer's first validation trains the classifier inside Lightning's inference mode; backward() failed
    there ("element 0 of tensors does not require grad") and crashed `make demo-vq`."""
    generator = torch.Generator().manual_seed(0)
    with context():
        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.arange(64) % 10
        model, _ = clf.train_digit_classifier(images, labels, images[:16], labels[:16], epochs=1, batch_size=32)
    assert all(p.grad is not None for p in model.parameters())
