"""Sample a checkpoint and score it at the papers' protocol: the body of `evaluate.py`. Imports no training code.

One command on one process or many (torchrun, srun; `visgen.eval.distributed`): the sampling job
(`visgen.eval.sample_job`) writes fixed chunks as they finish and continues after a kill; rank 0 then writes into
the output dir `samples.npz` (ADM layout: `arr_0` uint8 NHWC RGB, `arr_1` labels; byte-identical for any number
of ranks), `grid.png` (the first samples) and `metrics.json`: the numbers (digit metrics on the built-in digits;
FID, sFID, IS, precision/recall, FD-DINOv2 with `metrics=adm`, `visgen.eval.scoring`), the sampler settings as
flat `sampling.*` keys, and the protocol card (`visgen.eval.protocol`) under "protocol".
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from visgen.diffusion.guidance import Autoguided
from visgen.dirnames import safe_dir_name
from visgen.errors import ConfigValueError, MissingInputError, OutputExistsError
from visgen.eval.checkpoint import (
    checkpoint_config,
    checkpoint_sha256,
    load_checkpoint,
    load_net,
    load_tokenizer,
)
from visgen.eval.distributed import Ranks, setup_ranks
from visgen.eval.protocol import print_card, sampler_summary, software_versions
from visgen.eval.sample_job import LABEL_PROTOCOLS, QUANTIZATIONS, ChunkPlan, SampleJob, postprocess
from visgen.eval.scoring import build_extractors, metric_names, score
from visgen.hardware import slow_cpu_bf16_note
from visgen.sampling import generate, save_grid
from visgen.untrusted import check_targets, instantiate_untrusted

log = logging.getLogger(__name__)

__all__ = ["evaluate", "sampling_config", "default_out_dir", "load_model", "LoadedModel"]


# Sampler keys that describe the trained model, not the sampler: never replaced by a chosen sampling group.
MODEL_BOUND_SAMPLING_KEYS = ("interpolant", "diffusion")
# evaluate.py options that do not change the samples, left out of the default output folder's name.
NAME_EXCLUDED_KEYS = ("ckpt", "num_samples", "out_dir", "overwrite", "rescore", "device", "progress",
                      "tokenizer_pretrained", "metrics")


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


def default_out_dir(ckpt: str | Path, num_samples: int, overrides: list[str], base: Path | None = None) -> Path:
    """`<run dir>/eval/<ckpt name>_<sha8>_<N>[_<overrides>]`: the first 8 hex digits of the checkpoint's sha256
    (`checkpoint_sha256`) keep evaluations of different weights apart, even under one file name (`last.ckpt`
    after more training); every override that changes the samples (sampler keys or group, seed, precision,
    guidance, ...) is named as Hydra names multirun jobs (`key=value,...`), so evaluations with other settings
    never collide. Metric settings are not named: they do not change the samples (rescore=true scores a folder
    again). `base` replaces `<run dir>/eval` (official files have no run dir). A name over 255 bytes keeps its
    start and ends in a hash of the whole (`visgen.dirnames.safe_dir_name`)."""
    named = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in NAME_EXCLUDED_KEYS or key.startswith(("paths.", "hydra.", "metrics.")):
            continue
        if key == "guide_ckpt" and value:  # <guide run>/checkpoints/<name>.ckpt -> <guide run>.<name>.<sha8>
            value = (f"{Path(value).resolve().parent.parent.name}.{Path(value).stem}."
                     f"{checkpoint_sha256(value, 'guide_ckpt=')[:8]}")
        named.append(f"{key}={value.replace('/', '_')}")
    ckpt = Path(ckpt)
    name = f"{ckpt.stem}_{checkpoint_sha256(ckpt)[:8]}_{num_samples}" + ("_" + ",".join(sorted(named)) if named
                                                                          else "")
    return (base or ckpt.resolve().parent.parent / "eval") / safe_dir_name(name)  # <= 255 bytes, hashed if cut


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


@dataclass
class LoadedModel:
    """What evaluation samples with, and what the protocol card says about it."""

    net: nn.Module
    tokenizer: Any
    train_cfg: DictConfig
    card: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # what the samples depend on (job.json)
    checkpoint: dict[str, Any] | None = None  # a visgen checkpoint's contents (None for official files)
    source: str = ""  # names the file in errors: "ckpt=<path>" or "experiment=<preset>"


def _patch_tokenizer(train_cfg: DictConfig, pretrained: str | None) -> None:
    """Point the tokenizer at local weights (`tokenizer_pretrained=`): recorded paths are the training machine's."""
    if not pretrained:
        return
    if "pretrained" not in train_cfg.model.tokenizer:
        raise ConfigValueError(f"tokenizer_pretrained={pretrained}: the model's tokenizer "
                               f"({train_cfg.model.tokenizer.get('_target_')}) loads no weights")
    with open_dict(train_cfg):
        train_cfg.model.tokenizer.pretrained = str(pretrained)


def load_model(cfg: DictConfig, device: torch.device) -> LoadedModel:
    """The net (EMA), tokenizer and training config of `ckpt=`: a visgen checkpoint (its config built only through
    `visgen.untrusted`), or with `experiment=` an official file or `.safetensors` loaded strictly into that
    installed preset (`visgen.load_official`)."""
    path = Path(cfg.ckpt)
    if cfg.get("preset"):
        from visgen.official import compose_experiment, load_official

        if not path.is_file():
            raise MissingInputError(f"ckpt={path}: no such file; give the official weights file of "
                                    f"experiment={cfg.preset}")

        source = f"experiment={cfg.preset}"
        # the preset's data and cache paths are this evaluation's (the built-in digits' metrics read them)
        paths = [f"paths.{key}={cfg.paths[key]}" for key in ("root_dir", "data_dir", "log_dir", "cache_dir")]
        composed = compose_experiment(cfg.preset, paths)
        # resolved as a checkpoint stores it (run dirs and names need a running Hydra app: not kept)
        train_cfg = OmegaConf.create({key: OmegaConf.to_container(composed[key], resolve=True)
                                      for key in ("model", "sampling", "data")} | {"run_name": cfg.preset})
        _patch_tokenizer(train_cfg, cfg.get("tokenizer_pretrained"))
        net = load_official(cfg.preset, path)
        tokenizer = instantiate_untrusted(train_cfg.model.tokenizer, "tokenizer", source, "model.tokenizer")
        weights = "the file's EMA entry when it has one (training-script checkpoints), else its weights"
        step, checkpoint = None, None
    else:
        checkpoint = load_checkpoint(path, "ckpt=")
        source = checkpoint["visgen"]["source"]
        train_cfg = checkpoint_config(checkpoint)
        _patch_tokenizer(train_cfg, cfg.get("tokenizer_pretrained"))
        checkpoint["visgen"]["config"] = OmegaConf.to_container(train_cfg)
        net = load_net(checkpoint, use_ema=cfg.use_ema)
        tokenizer = load_tokenizer(checkpoint)
        weights = "EMA" if cfg.use_ema else "raw (not EMA)"
        step = int(checkpoint.get("global_step", -1))
    # The model's own sampler is checked before anything of it is merged into the one evaluation builds.
    check_targets(train_cfg.sampling, "sampler", source, "sampling")
    sha256 = checkpoint_sha256(path)  # remembered: the folder name hashed it already
    tokenizer = tokenizer.to(device).eval()
    net = net.to(device).eval()
    card = {"experiment": cfg.get("preset") or train_cfg.get("run_name"), "net": type(net).__name__,
            "parameters": sum(p.numel() for p in net.parameters()), "checkpoint": str(path.resolve()),
            "checkpoint_sha256": sha256, "checkpoint_step": step, "weights": weights, "tokenizer": tokenizer.id}
    identity = {"checkpoint_sha256": sha256, "experiment": cfg.get("preset"), "use_ema": bool(cfg.use_ema),
                "tokenizer": tokenizer.id}
    return LoadedModel(net, tokenizer, train_cfg, card, identity, checkpoint, source)


def _add_guide(model: LoadedModel, cfg: DictConfig, sampling: DictConfig, device: torch.device) -> None:
    """Autoguidance (`guide_ckpt=`): wrap the net and record the guide on the card and in the job identity."""
    if model.checkpoint is None:
        raise ConfigValueError("guide_ckpt= needs ckpt= to be a visgen checkpoint (its task is checked against the "
                               "guide's)")
    model.net, guide_step = _autoguided(model.net, model.checkpoint, cfg, sampling, device)
    model.card["autoguidance"] = {"guide_ckpt": str(cfg.guide_ckpt),
                                  "guide_sha256": checkpoint_sha256(cfg.guide_ckpt, "guide_ckpt="),
                                  "guide_scale": float(cfg.guide_scale), "guide_step": guide_step}
    model.identity["autoguidance"] = {k: v for k, v in model.card["autoguidance"].items() if k != "guide_ckpt"}


@contextmanager
def _sampling_math(device: torch.device, precision: str, tf32: bool) -> Any:
    """bf16 autocast or fp32, with TF32 matmuls and convolutions only when asked (as DiT's `--tf32`)."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


def _check_options(cfg: DictConfig) -> None:
    """Refuse bad options before loading anything."""
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigValueError(f"precision={cfg.precision!r} is not one of fp32, bf16")
    if cfg.labels not in LABEL_PROTOCOLS:
        raise ConfigValueError(f"labels={cfg.labels!r} is not one of {', '.join(LABEL_PROTOCOLS)}")
    if cfg.quantize not in QUANTIZATIONS:
        raise ConfigValueError(f"quantize={cfg.quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    for key in ("num_samples", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigValueError(f"{key}={cfg[key]!r}: evaluate needs a positive whole number")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Sample `cfg.num_samples` images from `cfg.ckpt` over all ranks, write them, their metrics and protocol."""
    _check_options(cfg)
    names = metric_names(cfg.metrics)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    # official files have no run dir: their evaluations go to <log dir>/eval/
    base = Path(cfg.paths.log_dir) / "eval" if cfg.get("preset") else None
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.ckpt, cfg.num_samples, overrides, base)
    if (out_dir / "metrics.json").exists() and not (cfg.overwrite or cfg.rescore):
        raise OutputExistsError(f"{out_dir} already holds an evaluation (metrics.json); pass overwrite=true (sample "
                                "again), rescore=true (score its samples again), another out_dir=<dir>, or other "
                                "settings")

    ranks = setup_ranks(cfg.device)
    try:
        return _evaluate(cfg, names, overrides, out_dir, ranks)
    finally:
        ranks.close()


def _evaluate(cfg: DictConfig, names: list[str], overrides: list[str], out_dir: Path, ranks: Ranks
              ) -> dict[str, Any]:
    device = ranks.device
    model = load_model(cfg, device)
    train_cfg = model.train_cfg
    sampling = sampling_config(train_cfg.sampling, cfg, overrides)
    sampling = OmegaConf.create(OmegaConf.to_container(sampling, resolve=True))  # a chosen group's ${...} resolved
    sampling_dict = OmegaConf.to_container(sampling)
    sampler = instantiate_untrusted(sampling, "sampler", model.source, "sampling")
    if cfg.guide_ckpt:
        _add_guide(model, cfg, sampling, device)
    num_classes, image_size = int(train_cfg.data.num_classes), int(train_cfg.data.image_size)
    resize = {"to": cfg.resize_to, "mode": cfg.resize_mode, "antialias": bool(cfg.resize_antialias)} if (
        cfg.resize_to) else None
    to_uint8 = partial(postprocess, quantize_mode=cfg.quantize, resize_to=cfg.resize_to,
                       resize_mode=cfg.resize_mode, resize_antialias=bool(cfg.resize_antialias))

    def sample_fn(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with _sampling_math(device, cfg.precision, bool(cfg.tf32)):
            return generate(model.net, model.tokenizer, sampler, labels, image_size, generator, postprocess=to_uint8)

    bf16_note = slow_cpu_bf16_note(device.type, cfg.precision == "bf16")
    if bf16_note:
        log.warning(bf16_note)
    plan = ChunkPlan(cfg.num_samples, cfg.batch_size, cfg.seed, num_classes, cfg.labels)
    identity = {**model.identity, "sampling": sampling_dict, "image_size": image_size, "quantize": cfg.quantize,
                "resize": resize, "precision": cfg.precision, "tf32": bool(cfg.tf32), "device_type": device.type}
    if cfg.overwrite and ranks.is_main:
        for name in ("chunks", "features", "job.json", "samples.npz", "metrics.json", "grid.png"):
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    ranks.barrier()
    job = SampleJob(out_dir, plan, identity)
    already = job.prepare(ranks)
    if already and ranks.is_main:
        log.info("%s: %d of %d chunks already done; continuing", out_dir, already, plan.num_chunks)
    extractors = build_extractors(cfg.metrics, names, device) if names else {}
    timings = job.run(ranks, sample_fn, extractors, progress=cfg.progress)
    speed = ranks.sum(torch.tensor([timings["sampled_images"], timings["sampling_seconds"]], dtype=torch.float64))
    if not ranks.is_main:
        return {}

    job.write_samples_npz(out_dir / "samples.npz")
    nrow = num_classes if 0 < num_classes <= 16 else None
    save_grid(job.images(10 * (nrow or 10)), out_dir / "grid.png", nrow=nrow)
    metrics: dict[str, Any] = {"num_samples": cfg.num_samples, "seed": cfg.seed, "precision": cfg.precision}
    if timings["sampled_images"]:
        # images per second per rank, over this run's sampling calls (not features, not loading)
        metrics["images_per_second_per_rank"] = float(speed[0] / speed[1])
        metrics["sampling_seconds"] = float(speed[1] / ranks.world_size)
    if _is_builtin_digits(train_cfg):
        images = job.images()  # (N, 3, H, W) uint8
        labels = torch.from_numpy(np.concatenate([lab for _, lab in job.iter_images()]))
        metrics.update(_digit_metrics(train_cfg, cfg, images, labels, device))
    protocol_metrics: dict[str, Any] = {}
    if names:
        numbers, protocol_metrics = score(job, cfg.metrics, names, extractors, device, cfg.paths.cache_dir)
        metrics.update(numbers)
    metrics.update(_flat("sampling", sampling))
    metrics["checkpoint_step"] = model.card.get("checkpoint_step")
    if cfg.guide_ckpt:
        metrics.update({"guide_ckpt": str(cfg.guide_ckpt), "guide_scale": float(cfg.guide_scale),
                        "guide_checkpoint_step": model.card["autoguidance"]["guide_step"]})
    metrics["out_dir"] = str(out_dir)
    metrics["protocol"] = {
        "model": model.card,
        "sampler": sampler_summary(sampling_dict),
        "samples": {"num_samples": cfg.num_samples, "labels": cfg.labels, "num_classes": num_classes,
                    "quantize": cfg.quantize, "resize": resize, "image_size": image_size, "seed": cfg.seed,
                    "batch_size_per_rank": cfg.batch_size, "world_size": ranks.world_size,
                    "launcher": ranks.launcher,
                    "dtype": cfg.precision, "tf32": bool(cfg.tf32)},
        **protocol_metrics,
        "software": software_versions(device),
        "command": overrides,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print_card(metrics["protocol"], metrics, out_dir)
    print(f"grid: {out_dir / 'grid.png'}\nsamples: {out_dir / 'samples.npz'}\nmetrics: {out_dir / 'metrics.json'}")
    return metrics
