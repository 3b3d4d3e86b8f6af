"""The one LightningModule every paradigm extends: optimisation, EMA, precision, checkpoints, sampling.

A paradigm subclass supplies only its method: `loss(net, batch, generator)` (per-sample, shape (B,)) on
the batch that `make_batch` builds from the loader's output (README convention 7), and a sampler (built
from the `sampling` config). Everything else a month-long run needs lives
here once: AdamW with a warmup schedule and a weight-decay rule, gradient-norm logging (clipping
is the Trainer's `gradient_clip_val`), an EMA copy of the net, optional torch.compile, a hard stop
on a non-finite loss, and run metadata plus per-rank RNG states in every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from visgen.errors import ConfigValueError
from visgen.sampling import from_uint8, generate
from visgen.tokenizers.base import Tokenizer
from visgen.training.ema import ema_update, make_ema
from visgen.training.rng import capture_rng_states, restore_rng_state

__all__ = ["GenerativeModule", "EMA_PREFIX", "Batch", "param_groups", "lr_multiplier", "check_optimizer_config"]

#: What `loss` receives (README convention 7): "latents" (normalised latents (B, C, h, w) or codes (B, h, w)),
#: "labels" (B,) int64, and "images" (B, 3, H, W) float in [-1, 1] whenever the loader delivered pixels
#: (always for image shards; for cached latents only when the cache keeps the image, as REPA needs).
Batch = dict[str, Tensor]

#: Documented checkpoint key: the EMA weights are `checkpoint["state_dict"]["ema." + <net key>]`.
EMA_PREFIX = "ema."


def param_groups(net: nn.Module, weight_decay: float, decay_min_ndim: int) -> list[dict[str, Any]]:
    """Split trainable parameters: weights with ndim >= decay_min_ndim decay, the rest (biases,
    norms, 1-D embeddings) do not (nanoGPT's rule with decay_min_ndim=2). A net may exempt more by name
    with timm's `no_weight_decay()` method (a set of parameter names; MAR: its whole DiffLoss)."""
    exempt = set(net.no_weight_decay()) if callable(getattr(net, "no_weight_decay", None)) else set()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= decay_min_ndim and n not in exempt]
    no_decay = [p for n, p in trainable if p.ndim < decay_min_ndim or n in exempt]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(
    step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0,
    cooldown_fraction: float = 0.0,
) -> float:
    """Linear warmup from 0, then `constant`; `cosine` decay to `min_ratio` of the peak at total_steps; or `wsd`
    (warmup-stable-decay, Hägele et al. 2024): constant, then linear to `min_ratio` over the last
    `cooldown_fraction` of total_steps (a fraction, so a shortened run keeps its cooldown's shape)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        if not 0.0 < cooldown_fraction <= 1.0:
            raise ValueError(f"schedule 'wsd' needs 0 < model.optimizer.cooldown_fraction <= 1 (the share of "
                             f"total steps spent decaying), got {cooldown_fraction}")
        cooldown_steps = cooldown_fraction * total_steps
        progress = min(1.0, max(0.0, (step - (total_steps - cooldown_steps)) / cooldown_steps))
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(
        f"unknown lr schedule {schedule!r}; use 'constant', 'cosine' or 'wsd' (model.optimizer.schedule)"
    )


def check_optimizer_config(cfg: Mapping[str, Any], prefix: str = "model.optimizer") -> None:
    """Refuse optimizer settings that cannot work, naming the key (torch's own errors, e.g. "Invalid learning
    rate: -1", say neither where the value came from nor how to fix it)."""

    def number(key: str) -> float | None:
        value = cfg.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigValueError(f"{prefix}.{key}={value!r} must be a number")
        return float(value)

    rules = {"lr": (lambda v: v >= 0, ">= 0 (1e-4 for DiT/SiT)"), "eps": (lambda v: v >= 0, ">= 0"),
             "weight_decay": (lambda v: v >= 0, ">= 0"), "warmup_steps": (lambda v: v >= 0, ">= 0 steps"),
             "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             "cooldown_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             "lr_batch_base": (lambda v: v > 0, "> 0 or null (MAR's 256)")}
    for key, (ok, expected) in rules.items():
        value = number(key)
        if value is not None and (not math.isfinite(value) or not ok(value)):
            raise ConfigValueError(f"{prefix}.{key}={cfg[key]!r} must be {expected}")
    betas = cfg.get("betas")
    if betas is not None and (len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigValueError(f"{prefix}.betas={list(betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")


class GenerativeModule(L.LightningModule):
    """Base class: owns `net`, its EMA, the tokenizer and the sampler; subclasses define `loss`."""

    def __init__(
        self,
        net: nn.Module,
        tokenizer: Tokenizer,
        sampler: Callable[..., Tensor],
        optimizer: Mapping[str, Any],
        image_size: int,
        batch_global: int,
        ema_decay: float = 0.9999,
        compile: bool = False,
        val_seed: int = 0,
        init_from: str | None = None,
    ):
        super().__init__()
        self.net = net
        self.ema = make_ema(net)
        self.tokenizer = tokenizer.requires_grad_(False)
        self.sampler = sampler
        check_optimizer_config(optimizer)
        self.optimizer_cfg = dict(optimizer)
        self.image_size = image_size
        self.batch_global = batch_global
        self.ema_decay = ema_decay
        self.compile_net = compile
        self.val_seed = val_seed  # validation noise comes from generators seeded by val_seed + batch index
        #: Official weights or a visgen checkpoint to start from (train.py loads it on a fresh start).
        self.init_from = init_from
        #: Set by train.py: config, seed, git state, versions; copied into every checkpoint.
        self.run_info: dict[str, Any] = {}
        self._ema_step = 0
        self._log_step_to_restore: int | None = None
        self._rng_to_restore: list[dict[str, Any]] | None = None

    # ----- the paradigm's part -------------------------------------------------------------
    def loss(self, net: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample training loss (B,) of `net` on `batch` (see `Batch`); paradigms override this."""
        raise NotImplementedError

    # ----- data -> latents -----------------------------------------------------------------
    @torch.no_grad()
    def make_batch(self, loader_batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Batch:
        """The loader's dict ({"image": uint8 (B, 3, H, W), "label": (B,)}) -> the `Batch` that `loss` reads.

        Every paradigm goes through here, so how latents are made (encode on the fly now; cached latents
        later) is decided once, and a paradigm that needs pixels (REPA) finds them under "images".
        """
        batch: Batch = {"labels": loader_batch["label"]}
        if "image" in loader_batch:
            batch["images"] = from_uint8(loader_batch["image"])  # (B, 3, H, W) in [-1, 1]
        if "moments" in loader_batch:  # cached (visgen.data.cached): encoded once, the view picked by the worker
            batch["latents"] = self.tokenizer.sample(loader_batch["moments"], generator)
        elif "images" in batch:
            batch["latents"] = self.tokenizer.sample(self.tokenizer.encode(batch["images"]), generator)
        else:
            raise KeyError(f"the loader's batch has keys {sorted(loader_batch)}; it needs 'label' and 'image' "
                           "or cached 'moments'")
        return batch

    # ----- training ------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Shard the net and its EMA block by block under `trainer=fsdp` (same mesh, same policy, so EMA
        updates stay shard-local), then compile the net in place when `model.compile=true` (state-dict keys
        unchanged). Lightning calls this once per fit, after the processes exist."""
        from visgen.training.fsdp import FSDP2Strategy, shard_net

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not getattr(self, "_sharded", False):
            shard_net(self.net, strategy.data_parallel_mesh, **strategy.shard_kwargs)
            # The EMA computes in fp32 (it never trains; sampling grids then match evaluate.py's default fp32).
            shard_net(self.ema, strategy.data_parallel_mesh, **{**strategy.shard_kwargs, "param_dtype": None,
                                                                "activation_checkpointing": False})
            self._sharded = True
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self.net, self.make_batch(batch)).mean()
        if not torch.isfinite(loss):
            # Raising here stops fit before the optimizer step: weights, EMA and the last
            # checkpoint on disk stay as they were after the last good step.
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "the run stopped and the last good checkpoint is untouched. Lower model.optimizer.lr, enable "
                "trainer.gradient_clip_val, or resume from that checkpoint with ckpt_path=last."
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm before clipping (a cheap early warning of divergence)."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding this rank's partial norm
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm)

    def update_ema(self) -> None:
        """Bring the EMA up to the current optimizer step: one update per step, not per micro-batch under
        accumulation, and a no-op when already done. `ModuleBookkeeping` calls it before any other callback's batch-end
        hook, so step checkpoints, sample grids and online FID see this step's EMA (the EMA in
        a checkpoint is the one an uninterrupted run has at that step)."""
        if self.global_step > self._ema_step:
            ema_update(self.ema, self.net, self.ema_decay)
            self._ema_step = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA (for Trainers built without `ModuleBookkeeping`; a no-op after it)."""
        self.update_ema()

    def on_train_epoch_start(self) -> None:
        """Tell the data stream which epoch starts, before its iterator (and workers) are made."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optimizer_cfg
        lr = cfg["lr"]
        if cfg.get("lr_batch_base"):  # MAR's rule: lr = base_lr * batch / 256
            lr = lr * self.batch_global / cfg["lr_batch_base"]
        groups = param_groups(self.net, cfg.get("weight_decay", 0.0), cfg.get("decay_min_ndim", 2))
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it would unscale them
        # itself): foreach AdamW when trainer.gradient_clip_val is set (MAR, LlamaGen, MaskGIT), as autoencoder.py.
        clipping = self._trainer is not None and bool(self.trainer.gradient_clip_val)
        fused = self.device.type in ("cuda", "cpu") and not clipping
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8),
                                fused=fused)
        total_steps = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup, schedule, min_ratio = cfg.get("warmup_steps", 0), cfg.get("schedule", "constant"), cfg.get(
            "min_lr_ratio", 0.0)
        cooldown = cfg.get("cooldown_fraction", 0.0)
        lr_multiplier(warmup, warmup, total_steps, schedule, min_ratio, cooldown)  # a bad schedule fails here
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_multiplier(step, warmup, total_steps, schedule, min_ratio, cooldown)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- validation and sampling ---------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """EMA loss on held-out images with fixed noise (its own generator: no global RNG drawn)."""
        generator = torch.Generator(self.device).manual_seed(self.val_seed + batch_idx)
        inputs = self.make_batch(batch, generator)
        loss = self.loss(self.ema, inputs, generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(inputs["labels"]))

    @torch.no_grad()
    def sample(self, labels: Tensor, sampler: Callable[..., Tensor] | None = None,
               generator: torch.Generator | None = None, use_ema: bool = True) -> Tensor:
        """Generate uint8 (B, 3, H, W) images for `labels` with the EMA net (or the raw net)."""
        net = self.ema if use_ema else self.net
        return generate(net, self.tokenizer, sampler or self.sampler, labels.to(self.device), self.image_size,
                        generator)

    # ----- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add run metadata, every rank's RNG state (bitwise resume) and the step the next batch logs under."""
        checkpoint["visgen"] = {**self.run_info, "ema_prefix": EMA_PREFIX, "tokenizer_id": self.tokenizer.id,
                                "ema_step": self._ema_step, "log_step": self._next_log_step()}
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._ema_step = checkpoint.get("visgen", {}).get("ema_step", 0)
        self._log_step_to_restore = checkpoint.get("visgen", {}).get("log_step")
        self._rng_to_restore = checkpoint.get("rng_states")

    def _next_log_step(self) -> int | None:
        """The step the next training batch logs its metrics under (Lightning's `_batches_that_stepped` then).

        Lightning restores that counter assuming every checkpoint was written inside a batch-end hook, before the
        counter advances; from a checkpoint written at an epoch end it comes back one too high, so every metric of
        a resumed run landed one step late. Recording the right value here and restoring it makes a resumed run's
        logs equal an uninterrupted run's."""
        if self._trainer is None:
            return None
        loop = self.trainer.fit_loop.epoch_loop
        batches = loop.batch_progress.total
        # inside on_train_batch_end a batch is processed but not yet completed, and the counter not yet advanced
        pending = batches.processed > batches.completed and not loop._should_accumulate()
        return loop._batches_that_stepped + int(pending)

    def restore_log_step(self) -> None:
        """Once, at the first batch after a resume: put the logging step where the interrupted run had it.
        `ModuleBookkeeping` calls this before any other callback's batch-start hook (the lr monitor logs there)."""
        if getattr(self, "_log_step_to_restore", None) is not None and self._trainer is not None:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self._log_step_to_restore
        self._log_step_to_restore = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore the logging step (for Trainers built without `ModuleBookkeeping`; a no-op after it)."""
        self.restore_log_step()

    def on_train_start(self) -> None:
        """Restore RNG states last, after Lightning's setup, so nothing draws from them before step 1; and keep a
        resume from an epoch-end checkpoint from logging that epoch's end metrics a second time."""
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore, self.global_rank)
            self._rng_to_restore = None
        if getattr(self.trainer.fit_loop, "restarted_on_epoch_end", False):
            # Lightning replays the saved epoch's end hooks (they ran after the save); the interrupted run already
            # logged their metrics, so this once the collected epoch-end metrics are dropped, not logged again.
            connector = self.trainer._logger_connector

            def drop_replayed_epoch_metrics() -> None:
                del connector.update_train_epoch_metrics  # back to Lightning's method for every later epoch
                connector.reset_results()

            connector.update_train_epoch_metrics = drop_replayed_epoch_metrics
