"""Digit-generator metrics in a small classifier's feature space: accuracy and a Fréchet distance (FID)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from visgen.eval.classifier import DigitClassifier, check_digit_images


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor' so torchmetrics' FID accumulates features we already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        # torchmetrics reads `num_features` to size its state; without it, it would run a dummy image through.
        self.num_features = num_features

    def forward(self, feats: Tensor) -> Tensor:
        """Return the features unchanged (already (N, D))."""
        return feats


def _check_features(feats: Tensor, name: str) -> None:
    """Fail clearly unless `feats` is a finite (N >= 2, D) matrix: a covariance needs two or more rows."""
    if not isinstance(feats, Tensor) or feats.dim() != 2:
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"frechet_distance: {name} has shape {shape}; expected a (N, D) feature matrix.")
    if feats.shape[0] < 2:
        raise ValueError(
            f"frechet_distance: {name} has {feats.shape[0]} row(s); need at least 2 samples to estimate a "
            "covariance (use hundreds for a stable estimate)."
        )
    if not torch.isfinite(feats).all():
        raise ValueError(f"frechet_distance: {name} contains NaN/inf; check the images or feature extractor.")


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, via torchmetrics' FID in float64."""
    _check_features(feats_a, "feats_a")
    _check_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"frechet_distance: feats_a has {feats_a.shape[1]} dims but feats_b has {feats_b.shape[1]}; "
            "both sets must come from the same feature extractor."
        )
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(feats_a.shape[1]))
    # States are float64 already; passing float64 features keeps compute() (which casts to the input dtype)
    # from rounding the result to float32.
    metric.update(feats_a.detach().to("cpu", torch.float64), real=True)  # (N, D)
    metric.update(feats_b.detach().to("cpu", torch.float64), real=False)  # (M, D)
    # Tiny negative eigenvalues of Σ1Σ2 from round-off can push an exact-zero distance below zero.
    return max(float(metric.compute()), 0.0)


@torch.no_grad()
def _embed(classifier: DigitClassifier, images_uint8: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Features (N, D) and logits (N, 10) for uint8 images, batched on the classifier's device, on CPU."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    for batch in images_uint8.split(batch_size):
        f, lg = classifier.features_and_logits(batch.to(device))  # (B, D), (B, 10)
        feats.append(f.cpu())
        logits.append(lg.cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)  # (N, D), (N, 10)


def classifier_metrics(
    classifier: DigitClassifier,
    images_uint8: Tensor,
    labels: Tensor,
    reference_images_uint8: Tensor,
    batch_size: int = 500,
) -> dict[str, float]:
    """Accuracy of generated digits w.r.t. their conditioning labels, and their FID to reference digits."""
    check_digit_images(images_uint8, "classifier_metrics(images_uint8)")
    check_digit_images(reference_images_uint8, "classifier_metrics(reference_images_uint8)")
    if labels.shape != (len(images_uint8),):
        raise ValueError(
            f"classifier_metrics: labels has shape {tuple(labels.shape)} but there are {len(images_uint8)} "
            "images; pass the conditioning label of every generated image."
        )
    feats, logits = _embed(classifier, images_uint8, batch_size)  # (N, D), (N, 10)
    ref_feats, _ = _embed(classifier, reference_images_uint8, batch_size)  # (M, D)
    accuracy = (logits.argmax(1) == labels.cpu().long()).double().mean()
    return {
        "classifier_accuracy": float(accuracy),
        "fid_classifier": frechet_distance(ref_feats, feats),
    }


def fid_floor(
    classifier: DigitClassifier, val_images: Tensor, train_images: Tensor, batch_size: int = 500
) -> float:
    """Classifier-feature FID between real val and train digits: what a perfect generator would score."""
    check_digit_images(val_images, "fid_floor(val_images)")
    check_digit_images(train_images, "fid_floor(train_images)")
    val_feats, _ = _embed(classifier, val_images, batch_size)  # (N_val, D)
    train_feats, _ = _embed(classifier, train_images, batch_size)  # (N_train, D)
    return frechet_distance(val_feats, train_feats)
