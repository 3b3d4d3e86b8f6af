"""Tests for the Fréchet distance (against closed forms) and the classifier-based digit metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from visgen.data.builtin import TRAIN_SHARDS, VAL_SHARDS
from visgen.data.stream import load_all
from visgen.eval.classifier import DigitClassifier, load_or_train_digit_classifier
from visgen.eval.metrics import classifier_metrics, fid_floor, frechet_distance


def _gaussian(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples (n, D) of N(mean, cov), float64, from a seeded generator."""
    chol = torch.linalg.cholesky(cov)  # (D, D)
    noise = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + noise @ chol.T  # (n, D)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    """|μ1−μ2|² + Σ_i (σ1ᵢ + σ2ᵢ − 2√(σ1ᵢσ2ᵢ)) for diagonal covariances, from 200k samples each."""
    dim = 8
    mu1 = torch.zeros(dim, dtype=torch.float64)
    mu2 = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    var1 = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    var2 = torch.linspace(3.0, 0.25, dim, dtype=torch.float64)
    a = _gaussian(mu1, torch.diag(var1), 200_000, seed=0)  # (200000, 8)
    b = _gaussian(mu2, torch.diag(var2), 200_000, seed=1)  # (200000, 8)
    exact = float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum())
    assert exact > 1.0  # a non-trivial target: mean and covariance terms both contribute
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(b, a) == pytest.approx(exact, rel=0.02)  # symmetric
    assert frechet_distance(a.float(), b.float()) == pytest.approx(exact, rel=0.02)  # float32 input is fine


def test_frechet_distance_matches_closed_form_for_correlated_gaussians() -> None:
    """Non-commuting full covariances: tr((Σ1Σ2)^½) evaluated with scipy on the exact matrices."""
    dim = 5
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    cov1 = torch.from_numpy(m1 @ m1.T / dim + 0.2 * np.eye(dim))  # (5, 5) SPD
    cov2 = torch.from_numpy(m2 @ m2.T / dim + 0.2 * np.eye(dim))  # (5, 5) SPD
    mu1 = torch.from_numpy(rng.normal(size=dim))
    mu2 = torch.from_numpy(rng.normal(size=dim))
    covmean = linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
    exact = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1 + cov2)) - 2 * float(np.trace(covmean))
    a = _gaussian(mu1, cov1, 200_000, seed=2)
    b = _gaussian(mu2, cov2, 200_000, seed=3)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


def test_frechet_distance_of_identical_and_shifted_sets() -> None:
    """Same set -> 0; a pure translation by δ -> |δ|² (covariances equal exactly)."""
    a = _gaussian(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 5_000, seed=4)
    delta = torch.tensor([3.0, 0.0, -4.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + delta) == pytest.approx(25.0, rel=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(10, 4), torch.zeros(10, 5), "same feature extractor"),
        (torch.zeros(1, 4), torch.zeros(10, 4), "at least 2 samples"),
        (torch.zeros(10), torch.zeros(10, 4), r"\(N, D\)"),
        (torch.full((10, 4), math.nan), torch.zeros(10, 4), "NaN"),
    ],
)
def test_frechet_distance_rejects_bad_features(a: torch.Tensor, b: torch.Tensor, match: str) -> None:
    """Mismatched, too few, wrongly shaped or non-finite features fail with a named error."""
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


@pytest.fixture(scope="module")
def digits(digits_dir: Path) -> dict[str, torch.Tensor]:
    """Built-in train/val digits (uint8) and labels from the session's shards."""
    train_images, train_labels = load_all(str(digits_dir / "digits" / TRAIN_SHARDS), 32)
    val_images, val_labels = load_all(str(digits_dir / "digits" / VAL_SHARDS), 32)
    return {"train": train_images, "train_labels": train_labels, "val": val_images, "val_labels": val_labels}


@pytest.fixture(scope="module")
def classifier(digits_dir: Path) -> DigitClassifier:
    """The session's cached classifier (trained on first use; shared with test_classifier/test_evaluate)."""
    shards = digits_dir / "digits"
    return load_or_train_digit_classifier(
        str(shards / TRAIN_SHARDS), str(shards / VAL_SHARDS), digits_dir / "cache"
    )


@pytest.fixture(scope="module")
def floor(classifier: DigitClassifier, digits: dict[str, torch.Tensor]) -> float:
    """fid_classifier_floor: val vs train digits."""
    return fid_floor(classifier, digits["val"], digits["train"])


def test_floor_is_small_but_positive(floor: float) -> None:
    """Two samples of the same distribution are close, but finite samples never give exactly 0."""
    print(f"fid_classifier_floor = {floor:.3f}")
    assert 0.0 < floor < 10.0


def test_real_digits_score_like_a_perfect_generator(classifier, digits, floor: float) -> None:
    """Held-out digits with true labels: accuracy >= 0.97; 500 unseen-by-reference real digits: FID ~ floor."""
    on_val = classifier_metrics(classifier, digits["val"], digits["val_labels"], digits["train"])
    assert set(on_val) == {"classifier_accuracy", "fid_classifier"}
    assert on_val["classifier_accuracy"] >= 0.97
    assert on_val["fid_classifier"] == pytest.approx(floor, rel=1e-6)  # same two sets as the floor
    # A "perfect generator" drawing 500 real training digits, scored against the 500 val references as
    # evaluate.py does: only finite-sample bias separates it from the floor.
    pick = torch.randperm(len(digits["train"]), generator=torch.Generator().manual_seed(0))[:500]
    perfect = classifier_metrics(
        classifier, digits["train"][pick], digits["train_labels"][pick], digits["val"]
    )
    print(f"perfect-generator stand-in: {perfect}, floor {floor:.3f}")
    assert perfect["classifier_accuracy"] >= 0.97
    assert perfect["fid_classifier"] < 3.0 * floor


def test_shuffled_labels_give_chance_accuracy_but_same_fid(classifier, digits) -> None:
    """Accuracy checks the conditioning: wrong labels -> ~10 %; FID ignores labels entirely."""
    images, labels = digits["val"], digits["val_labels"]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert (shuffled != labels).float().mean() > 0.8
    reference = digits["train"][:1000]
    right = classifier_metrics(classifier, images, labels, reference)
    wrong = classifier_metrics(classifier, images, shuffled, reference)
    assert wrong["classifier_accuracy"] < 0.3
    assert wrong["fid_classifier"] == pytest.approx(right["fid_classifier"], rel=1e-9)


def test_collapsed_generator_has_much_larger_fid(classifier, digits, floor: float) -> None:
    """One image repeated 500 times (mode collapse) is classified correctly but has FID >> floor."""
    image, label = digits["val"][:1], digits["val_labels"][:1]
    collapsed = classifier_metrics(classifier, image.repeat(500, 1, 1, 1), label.repeat(500), digits["val"])
    print(f"collapsed: {collapsed}, floor {floor:.3f}")
    assert collapsed["fid_classifier"] > 20.0 * floor
    one_class = digits["val_labels"] == 3
    single = classifier_metrics(
        classifier, digits["val"][one_class], digits["val_labels"][one_class], digits["val"]
    )
    assert single["classifier_accuracy"] >= 0.9
    assert single["fid_classifier"] > 20.0 * floor  # class collapse is caught by FID, not by accuracy


def test_metrics_validate_inputs(classifier, digits) -> None:
    """Float images or a label count mismatch raise errors naming the argument."""
    val = digits["val"][:10]
    with pytest.raises(ValueError, match="images_uint8.*uint8"):
        classifier_metrics(classifier, val.float(), digits["val_labels"][:10], val)
    with pytest.raises(ValueError, match="labels has shape"):
        classifier_metrics(classifier, val, digits["val_labels"][:9], val)
