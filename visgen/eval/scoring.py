"""The papers' metrics of a finished sampling job: FID, sFID, IS, precision/recall and FD-DINOv2 (`metrics=adm`).

Features are computed per chunk by the sampling job (on every rank, on the device); here rank 0 reads them back,
in sample order, and compares them with the reference file (`visgen.eval.reference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from visgen.eval.metrics import (
    PR_DISTANCES,
    feature_statistics,
    frechet_distance_from_stats,
    inception_score,
    precision_recall,
)
from visgen.eval.reference import load_reference, reference_features
from visgen.eval.sample_job import SampleJob

__all__ = ["METRICS", "metric_names", "build_extractors", "score"]

#: Metrics `metrics.names` may list (fd_dinov2 joins automatically when `metrics.dinov2_weights` is set).
METRICS = ("fid", "sfid", "inception_score", "precision_recall", "fd_dinov2")
INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision_recall")


def metric_names(cfg: DictConfig) -> list[str]:
    """The metrics to compute, checked: names from `metrics.names`, plus fd_dinov2 with DINOv2 weights."""
    names = list(cfg.get("names") or [])
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics.names has {unknown}; known: {', '.join(METRICS)}")
    if cfg.get("dinov2_weights") and "fd_dinov2" not in names:
        names.append("fd_dinov2")
    if "fd_dinov2" in names and not cfg.get("dinov2_weights"):
        raise ValueError("metrics.names has fd_dinov2 but metrics.dinov2_weights is not set; point it at "
                         "dinov2_vitl14_pretrain.pth (or timm's vit_large_patch14_dinov2 model.safetensors)")
    if names:
        if cfg.get("pr_distance", "adm_fp16") not in PR_DISTANCES:
            raise ValueError(f"metrics.pr_distance={cfg.pr_distance!r} is not one of {', '.join(PR_DISTANCES)}")
        if not cfg.get("reference"):
            raise ValueError("metrics.reference is not set; give an ADM reference batch (VIRTUAL_imagenet256_labeled"
                             ".npz) or one from `python -m visgen.eval.reference`")
    return names


def build_extractors(cfg: DictConfig, names: list[str], device: torch.device) -> dict[str, Any]:
    """{"inception-<sha>": InceptionFeatures, "dinov2-<sha>": DINOv2Features} for the requested metrics."""
    extractors: dict[str, Any] = {}
    if any(n in INCEPTION_METRICS for n in names):
        from visgen.eval.inception import InceptionFeatures

        inception = InceptionFeatures(cfg.inception_weights, cfg.get("inception_sha256"), spatial="sfid" in names)
        extractors[f"inception-{inception.sha256[:16]}{'' if inception.spatial else '-nospatial'}"] = (
            inception.to(device))
    if "fd_dinov2" in names:
        from visgen.eval.dinov2 import DINOv2Features

        dinov2 = DINOv2Features(cfg.dinov2_weights, cfg.get("dinov2_model", "vit_large_patch14_dinov2"))
        extractors[f"dinov2-{dinov2.sha256[:16]}"] = dinov2.to(device)
    return extractors


def score(job: SampleJob, cfg: DictConfig, names: list[str], extractors: dict[str, Any], device: torch.device,
          cache_dir: str | Path | None) -> tuple[dict[str, float], dict[str, Any]]:
    """(numbers, protocol entries) of the requested metrics, from the job's features and the reference."""
    reference = load_reference(cfg.reference, names)
    numbers: dict[str, float] = {}
    protocol: dict[str, Any] = {
        "reference": {"path": str(reference.path), "sha256": reference.sha256, "images": reference.num_images,
                      **({"made_by": reference.meta} if reference.meta else {})},
        "feature_extractors": {key.split("-")[0]: e.id for key, e in extractors.items()},
    }
    inception_key = next((k for k in extractors if k.startswith("inception-")), None)
    if inception_key:
        feats = job.features(inception_key)
        if "fid" in names:
            numbers["fid"] = frechet_distance_from_stats(feature_statistics(feats["pool"]), reference.stats["fid"])
        if "sfid" in names:
            numbers["sfid"] = frechet_distance_from_stats(feature_statistics(feats["spatial"]),
                                                          reference.stats["sfid"])
        if "inception_score" in names:
            numbers["inception_score"], numbers["inception_score_std"] = inception_score(
                feats["logits"], cfg.is_splits, cfg.get("is_shuffle_seed"))
        if "precision_recall" in names:
            ref_pool = reference_features(reference, extractors[inception_key], cache_dir)
            numbers["precision"], numbers["recall"] = precision_recall(
                ref_pool.to(device), feats["pool"].to(device), k=cfg.pr_k, distance=cfg.pr_distance)
    if "fd_dinov2" in names:
        dinov2 = job.features(next(k for k in extractors if k.startswith("dinov2-")))["dinov2"]
        numbers["fd_dinov2"] = frechet_distance_from_stats(feature_statistics(dinov2), reference.stats["fd_dinov2"])
    order = "in sample order (ADM)" if cfg.get("is_shuffle_seed") is None else (
        f"after RandomState({cfg.is_shuffle_seed}) shuffling (torch-fidelity)")
    settings = {
        "fid": "Fréchet distance of Inception pool_3 (2048-d) Gaussians, float64, vs the reference's mu/sigma",
        "sfid": "Inception mixed_6/conv (Mixed_6d.branch1x1) first 7 channels x 17 x 17, NHWC, vs mu_s/sigma_s",
        "inception_score": f"{cfg.is_splits} splits of the unbiased logits, {order}",
        "precision_recall": f"k={cfg.pr_k}, squared L2 on pool_3, distances {cfg.pr_distance}, vs the reference's "
                            f"{reference.num_images} arr_0 images",
        "fd_dinov2": "edm2 protocol: bicubic antialiased 224 px, CLS token, vs mu_dinov2/sigma_dinov2",
    }
    protocol["settings"] = {name: text for name, text in settings.items() if name in names}
    return numbers, protocol
