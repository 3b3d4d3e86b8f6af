"""Sample a trained checkpoint and score it: the body of `evaluate.py`. Imports no training code.

Writes into the output dir: `grid.png` (the first samples), `samples.npz` (ADM layout: `arr_0`
uint8 NHWC RGB, `arr_1` labels), and `metrics.json` (flat name -> number, plus the sampling settings).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from visgen.diffusion.guidance import Autoguided
from visgen.errors import ConfigValueError, OutputExistsError
from visgen.eval.checkpoint import checkpoint_config, load_checkpoint, load_net, load_tokenizer
from visgen.sampling import balanced_labels, generate, save_grid
from visgen.untrusted import check_targets, instantiate_untrusted

log = logging.getLogger(__name__)

__all__ = ["evaluate", "sampling_config", "sample_images", "default_out_dir"]


# Sampler keys that describe the trained model, not the sampler: never replaced by a chosen sampling group.
MODEL_BOUND_SAMPLING_KEYS = ("interpolant", "diffusion")
# evaluate.py options that do not change the samples, left out of the default output folder's name.
NAME_EXCLUDED_KEYS = ("ckpt", "num_samples", "out_dir", "overwrite", "device")


def sampling_config(train_sampling: DictConfig, eval_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's sampler, replaced by a chosen `sampling=<group>` or patched by `sampling.k=v`."""
    if any(o.split("=", 1)[0].lstrip("+~") == "sampling" for o in overrides):
        # A whole group was chosen (its keys already applied by Hydra). Samplers must still read the model's
        # own process (a flow's path and prediction type, a diffusion's schedule): take it from the checkpoint.
        chosen = OmegaConf.create(OmegaConf.to_container(eval_cfg.sampling, resolve=False))
        for key in MODEL_BOUND_SAMPLING_KEYS:
            if key in chosen and key in train_sampling:
                chosen[key] = train_sampling[key]
        return chosen
    patch = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("sampling.")]
    merged = OmegaConf.merge(OmegaConf.create({"sampling": train_sampling}), OmegaConf.from_dotlist(patch))
    return merged.sampling


def default_out_dir(ckpt: str | Path, num_samples: int, overrides: list[str]) -> Path:
    """`<run dir>/eval/<ckpt name>_<N>[_<overrides>]`: every override that changes the samples (sampler keys or
    group, seed, precision, guidance, ...) is named in it as Hydra names multirun jobs (`key=value,...`), so
    evaluations with other settings never collide."""
    named = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in NAME_EXCLUDED_KEYS or key.startswith(("paths.", "hydra.")):
            continue
        if key == "guide_ckpt" and value:  # <guide run>/checkpoints/<name>.ckpt -> <guide run>.<name>
            value = f"{Path(value).resolve().parent.parent.name}.{Path(value).stem}"
        named.append(f"{key}={value.replace('/', '_')}")
    ckpt = Path(ckpt)
    name = f"{ckpt.stem}_{num_samples}" + ("_" + ",".join(sorted(named)) if named else "")
    return ckpt.resolve().parent.parent / "eval" / name


@torch.no_grad()
def sample_images(net: torch.nn.Module, tokenizer: Any, sampler: Any, labels: torch.Tensor, image_size: int,
                  batch_size: int, seed: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) samples; batch k draws its noise from a generator seeded (seed, k)."""
    chunks = []
    for k, batch_labels in enumerate(labels.split(batch_size)):
        generator = torch.Generator(labels.device).manual_seed(seed * 1_000_003 + k)
        chunks.append(generate(net, tokenizer, sampler, batch_labels, image_size, generator).cpu())
    return torch.cat(chunks)


def _autoguided(net: torch.nn.Module, checkpoint: dict[str, Any], cfg: DictConfig, sampling: DictConfig,
                device: torch.device) -> tuple[Autoguided, int]:
    """Wrap `net` with the guide model of `cfg.guide_ckpt` (autoguidance); refuse a guide of another task."""
    guide_checkpoint = load_checkpoint(cfg.guide_ckpt, "guide_ckpt=")
    train_data, guide_data = checkpoint_config(checkpoint).data, checkpoint_config(guide_checkpoint).data
    for key in ("image_size", "num_classes"):
        if train_data[key] != guide_data[key]:
            raise ConfigValueError(f"guide_ckpt={cfg.guide_ckpt} was trained with data.{key}={guide_data[key]} but "
                                   f"ckpt with {train_data[key]}; autoguidance needs a weaker model of the same task")
    tokenizers = (checkpoint["visgen"].get("tokenizer_id"), guide_checkpoint["visgen"].get("tokenizer_id"))
    if tokenizers[0] != tokenizers[1]:
        raise ConfigValueError(f"guide_ckpt uses tokenizer {tokenizers[1]!r} but ckpt {tokenizers[0]!r}; "
                               "they must match")
    guide = load_net(guide_checkpoint, use_ema=cfg.use_ema).to(device)
    wrapped = Autoguided(net, guide, cfg.guide_scale, sampling.get("guided_channels"))
    return wrapped, int(guide_checkpoint.get("global_step", -1))


def _digit_metrics(train_cfg: DictConfig, cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor,
                   device: torch.device) -> dict[str, float]:
    """Classifier accuracy and classifier-feature FID on the built-in digits."""
    from visgen.data.stream import load_all
    from visgen.eval.classifier import load_or_train_digit_classifier
    from visgen.eval.metrics import classifier_metrics, fid_floor

    data = train_cfg.data
    classifier = load_or_train_digit_classifier(data.train_shards, data.val_shards, Path(cfg.paths.cache_dir),
                                                device=device)
    val_images, _ = load_all(data.val_shards, data.image_size)
    train_images, _ = load_all(data.train_shards, data.image_size)
    metrics = classifier_metrics(classifier, images, labels, val_images)
    metrics["fid_classifier_floor"] = fid_floor(classifier, val_images, train_images)
    return metrics


def _is_builtin_digits(train_cfg: DictConfig) -> bool:
    from visgen.data.builtin import TRAIN_SHARDS

    return Path(str(train_cfg.data.get("train_shards", ""))).name == TRAIN_SHARDS


def _flat(prefix: str, node: Any) -> dict[str, Any]:
    """Nested config -> flat {"prefix.key.sub": value}, class paths (`_target_`) left out."""
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    flat: dict[str, Any] = {}
    for key, value in container.items():
        if key == "_target_":
            continue
        flat.update(_flat(f"{prefix}.{key}", value) if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return flat


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample `cfg.num_samples` class-balanced images from `cfg.ckpt`, write them and their metrics."""
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigValueError(f"precision={cfg.precision!r} is not one of fp32, bf16")
    for key in ("num_samples", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigValueError(f"{key}={cfg[key]!r}: evaluate needs a positive whole number")
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.ckpt, cfg.num_samples, overrides)
    if (out_dir / "metrics.json").exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out_dir} already holds an evaluation (metrics.json); pass overwrite=true, "
                                "another out_dir=<dir>, or other settings")
    checkpoint = load_checkpoint(cfg.ckpt, "ckpt=")
    source = checkpoint["visgen"]["source"]
    train_cfg = checkpoint_config(checkpoint)
    # The checkpoint's own sampler is checked before anything of it is merged into the one we build.
    check_targets(train_cfg.sampling, "sampler", source, "sampling")
    sampling = sampling_config(train_cfg.sampling, cfg, overrides)
    sampling = OmegaConf.create(OmegaConf.to_container(sampling, resolve=True))  # a chosen group's ${...} resolved

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    net = load_net(checkpoint, use_ema=cfg.use_ema).to(device)
    guide_step = None
    if cfg.guide_ckpt:
        net, guide_step = _autoguided(net, checkpoint, cfg, sampling, device)
    tokenizer = load_tokenizer(checkpoint).to(device).eval()
    sampler = instantiate_untrusted(sampling, "sampler", source, "sampling")
    num_classes = int(train_cfg.data.num_classes)
    labels = balanced_labels(cfg.num_samples, num_classes, device)

    # bf16 autocast (fp32 weights) roughly doubles CPU sampling speed; fp32 is what papers report.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    start = time.perf_counter()
    with autocast:
        images = sample_images(net, tokenizer, sampler, labels, int(train_cfg.data.image_size), cfg.batch_size,
                               cfg.seed)  # (N, 3, H, W) uint8
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"num_samples": cfg.num_samples, "seed": cfg.seed, "precision": cfg.precision,
                               "sampling_seconds": seconds, "images_per_second": cfg.num_samples / seconds}
    if _is_builtin_digits(train_cfg):
        metrics.update(_digit_metrics(train_cfg, cfg, images, labels.cpu(), device))
    metrics.update(_flat("sampling", sampling))
    if cfg.guide_ckpt:
        metrics.update({"guide_ckpt": str(cfg.guide_ckpt), "guide_scale": float(cfg.guide_scale),
                        "guide_checkpoint_step": guide_step})
    metrics["checkpoint_step"] = int(checkpoint.get("global_step", -1))

    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = num_classes if 0 < num_classes <= 16 else None
    save_grid(images[: 10 * (nrow or 10)], out_dir / "grid.png", nrow=nrow)
    np.savez(out_dir / "samples.npz", arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.cpu().numpy())
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _print_table(metrics, out_dir)
    return metrics


def _print_table(metrics: dict[str, Any], out_dir: Path) -> None:
    table = Table(title=f"visgen evaluate: {out_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    Console().print(f"grid: {out_dir / 'grid.png'}\nsamples: {out_dir / 'samples.npz'}\n"
                    f"metrics: {out_dir / 'metrics.json'}")
