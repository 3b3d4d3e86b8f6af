"""Fréchet distance, Inception Score and precision/recall against direct computations and known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from visgen.eval.metrics import (
    GaussianStats,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    precision_recall,
)


def _scipy_frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The textbook route (TTUR / ADM evaluator): scipy's sqrtm of Σ1Σ2, real part."""
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_a_direct_scipy_computation() -> None:
    """On correlated 64-d features: statistics equal np.mean/np.cov, the distance equals scipy's sqrtm route."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64))
    a = rng.normal(size=(3000, 64)) @ mix  # (3000, 64) correlated
    b = rng.normal(size=(2000, 64)) @ (mix + 0.3 * rng.normal(size=(64, 64))) + 0.5  # (2000, 64)
    stats_a = feature_statistics(torch.from_numpy(a))
    np.testing.assert_allclose(stats_a.mu, a.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats_a.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-10)
    direct = _scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) - direct) < 1e-6 * direct
    # identical sets: < 1e-6 (exactly 0 in exact arithmetic), also from float32 features
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) < 1e-6
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) < 1e-6


def test_frechet_distance_is_within_one_percent_of_the_closed_form_for_known_gaussians() -> None:
    """200k samples each of two 6-d Gaussians with non-commuting covariances, against the exact distance."""
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = m1 @ m1.T / 6 + 0.3 * np.eye(6), m2 @ m2.T / 6 + 0.3 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    exact = _scipy_frechet(mu1, cov1, mu2, cov2)
    assert frechet_distance_from_stats(GaussianStats(mu1, cov1), GaussianStats(mu2, cov2)) == pytest.approx(
        exact, rel=1e-9)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 6, generator=gen, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(cov1)).T
    b = torch.randn(200_000, 6, generator=gen, dtype=torch.float64) @ torch.from_numpy(np.linalg.cholesky(cov2)).T
    measured = frechet_distance(a + torch.from_numpy(mu1), b + torch.from_numpy(mu2))
    assert measured == pytest.approx(exact, rel=0.01)


def test_frechet_distance_with_fewer_samples_than_dims_equals_the_small_side_computation() -> None:
    """Both covariances singular (20 and 30 samples of 64 dims: no Cholesky factor, the eigendecomposition route):
    the nonzero eigenvalues of Σa Σb are those of the 20 x 20 matrix Xa Σb Xaᵀ / 19 (Xa centered), so
    tr (Σa Σb)^½ has an independent closed form; the Cholesky route (one set full rank) matches scipy too."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) @ rng.normal(size=(64, 64)) + 0.2
    centered = a - a.mean(0)
    sigma_b = np.cov(b, rowvar=False)
    small = np.linalg.eigvals(centered @ sigma_b @ centered.T / 19).real.clip(0)  # (20,)
    direct = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False)) + np.trace(sigma_b)
                   - 2 * np.sqrt(small).sum())
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(direct, rel=1e-8)
    full = rng.normal(size=(500, 64))  # Σ positive definite: the Cholesky route, from either side
    expected = _scipy_frechet(a.mean(0), np.cov(a, rowvar=False), full.mean(0), np.cov(full, rowvar=False))
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(full)) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(torch.from_numpy(full), torch.from_numpy(a)) == pytest.approx(expected, rel=1e-8)


def test_statistics_of_other_dims_or_non_finite_values_are_refused() -> None:
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance_from_stats(GaussianStats(np.zeros(3), np.eye(3)), GaussianStats(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match=r"\(D,\) and \(D, D\)"):
        GaussianStats(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        GaussianStats(np.full(3, np.nan), np.eye(3))


def test_inception_score_on_logits_with_a_known_answer() -> None:
    """p(y|x) = softmax(c·e_y) on K equally used classes: IS = exp(H(marginal) − H(p(y|x))), known in closed form."""
    num_classes, per_class, c = 8, 50, 4.0
    labels = torch.arange(num_classes).repeat(per_class)  # every split sees all classes equally (400 = 10 × 40)
    logits = torch.nn.functional.one_hot(labels, 20).double() * c  # (400, 20): 8 used classes of 20
    p_top = np.exp(c) / (np.exp(c) + 19)
    p_rest = 1 / (np.exp(c) + 19)
    entropy = -(p_top * np.log(p_top) + 19 * p_rest * np.log(p_rest))
    marginal = np.array([(p_top + 7 * p_rest) / 8] * 8 + [p_rest] * 12)  # mean of p over the 8 used classes
    exact = np.exp(-(marginal * np.log(marginal)).sum() - entropy)
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(exact, rel=1e-12) and std < 1e-12
    assert inception_score(torch.zeros(100, 10), splits=10) == pytest.approx((1.0, 0.0))  # no information: 1
    # a collapsed generator (one class) scores 1 even with confident logits
    assert inception_score(torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 10) * 9.0)[0] == (
        pytest.approx(1.0))


def test_inception_score_equals_torch_fidelity_with_and_without_shuffling() -> None:
    """Splits in sample order (ADM) or after RandomState(2020) (torch-fidelity's default): equal to 1e-12."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(1000, 1008, generator=torch.Generator().manual_seed(0)) * 3
    ours = inception_score(logits, splits=10)
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert ours == pytest.approx((theirs["inception_score_mean"], theirs["inception_score_std"]), rel=1e-12)
    shuffled = isc_features_to_metric(logits, splits=10)  # torch-fidelity's default: RandomState(2020) permutation
    assert inception_score(logits, 10, shuffle_seed=2020) == pytest.approx(
        (shuffled["inception_score_mean"], shuffled["inception_score_std"]), rel=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:5], splits=10)


def _line(xs: list[float], y: float = 0.0) -> torch.Tensor:
    return torch.tensor([[x, y] for x in xs])  # (n, 2)


def test_precision_recall_on_point_sets_with_a_known_answer() -> None:
    """k = 3 balls by hand, squared distances, the point itself excluded from its neighbours.

    Reference: x = 0..9 on a line. Radii (3rd neighbour): x=0 and 9 reach 3, x=1 and 8 reach 2, the rest 2.
    Generated: 4.5 (inside), 11.5 (2.5 from 9: inside), 13 (4 from 9: outside), (5, 3) (3 from 5, √10 from 4 and
    6: outside) and 2.2 (inside). Precision = 3 / 5.
    Generated radii (3rd neighbour among the 5): 2.2 → 11.5 (9.3), 4.5 → 11.5 (7), 11.5 → (5, 3) (√51.25),
    13 → (5, 3) (√73), (5, 3) → 11.5 (√51.25). Every reference x in 0..9 lies within 9.3 of 2.2, so recall = 1.
    """
    ref = _line(list(range(10)))
    gen = torch.cat([_line([4.5, 11.5, 13.0]), torch.tensor([[5.0, 3.0]]), _line([2.2])])
    for distance in ("float32", "adm_fp16"):
        precision, recall = precision_recall(ref, gen, k=3, distance=distance)
        assert (precision, recall) == (0.6, 1.0), distance
    # a tighter generated set (its 3rd neighbour close) misses far reference points: recall drops
    gen_tight = _line([0.0, 0.1, 0.2, 0.3, 0.4])
    precision, recall = precision_recall(ref, gen_tight, k=3)
    # ref radii: x=0 → 3; every tight point is within 3 of 0: precision 1. Tight radii: 0.3 (0 → 0.3), 0.2, 0.2,
    # 0.2, 0.3 (0.4 → 0.1): only x = 0 lies within one of them: recall 1 / 10.
    assert (precision, recall) == (1.0, pytest.approx(0.1))


def test_precision_recall_counts_the_kth_neighbour_not_the_point_itself() -> None:
    """The broken variant (self counted as the 1st neighbour: k-th smallest incl. self) shrinks every ball."""
    ref = _line(list(range(10)))
    gen = _line([9.0 + 2.5])  # 2.5 from x = 9, whose 3rd neighbour (x = 6) is at 3: inside
    gen = torch.cat([gen, _line([-10.0, -20.0, -30.0])])
    precision, _ = precision_recall(ref, gen, k=3)
    assert precision == 0.25
    # with k = 2 (what "k-th smallest including self" means for k = 3) x = 9's ball reaches only 2: outside
    assert precision_recall(ref, gen, k=2)[0] == 0.0


def test_precision_recall_does_not_depend_on_the_block_size() -> None:
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    other = torch.randn(200, 16, generator=torch.Generator().manual_seed(1)) * 1.3 + 0.2
    results = {precision_recall(feats, other, block_rows=rows) for rows in (70, 300)}
    assert len(results) == 1
    precision, recall = results.pop()
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0
