"""Tokenizer training: VQ and KL autoencoders with perceptual and adversarial losses (VQGAN, LlamaGen, LDM).

VQGAN (Esser et al. 2021, eq. 5-7) trains an autoencoder E, G with a quantiser q against a PatchGAN D:

    L_G = w_rec · ||x − x̂||_{1|2} + w_p · LPIPS(x, x̂) + L_VQ + λ · w_d · L_adv(D(x̂)),   x̂ = G(q(E(x)))
    L_D = w_d · ½ (L_real(D(x)) + L_fake(D(sg x̂)))

with L_VQ = ||sg z − e||² + β ||z − sg e||² (+ LlamaGen's entropy term), λ VQGAN's adaptive weight
(‖∇ rec‖ / ‖∇ adv‖ at the decoder's last layer) or 1 (LlamaGen), and the adversarial terms switched
on at `disc_start` generator steps. A KL autoencoder (LDM) replaces L_VQ by kl_weight · KL(q(z|x) || N(0, I)).

Two optimizers (generator: the autoencoder; discriminator: D) in Lightning's manual optimisation, as
LlamaGen's loop does it: the generator steps first, then D on the same reconstruction. Manual
optimisation leaves to the module what the Trainer does otherwise, so it is done here: gradient
accumulation over `accumulate_grad_batches` micro-batches (train.py sets it from data.batch_global),
gradient-norm clipping per optimizer through `clip_gradients` in `on_before_optimizer_step` (after
Lightning unscales fp16's gradients), the lr schedule, and a global step that counts generator steps
(Lightning counts every optimizer.step(), which would double it; `_uncounted` keeps D's step out of the count).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visgen.nn import discriminator as gan
from visgen.nn.quantize import code_usage
from visgen.sampling import from_uint8, save_grid, to_uint8
from visgen.tokenizers.autoencoders import KLAutoencoder, VQAutoencoder, kl_divergence
from visgen.tokenizers.base import PixelTokenizer
from visgen.training.module import GenerativeModule, lr_multiplier, param_groups

log = logging.getLogger(__name__)

__all__ = ["AutoencoderTraining", "LOSS_DEFAULTS"]

#: Loss weights and switches (model.loss); values are LlamaGen's vq_train.py defaults unless a preset says otherwise.
LOSS_DEFAULTS: dict[str, Any] = {
    "reconstruction": "l2",  # l1 | l2
    "reconstruction_weight": 1.0,
    "perceptual_weight": 1.0,  # needs model.perceptual (LPIPS); 0 without it
    "codebook_weight": 1.0,  # VQ: weight of codebook + commitment (+ entropy) terms
    "kl_weight": 1.0e-6,  # KL: LDM's weight (per pixel value: see `_regulariser`)
    "disc_weight": 0.5,
    "disc_loss_weight": None,  # D's loss factor; None: disc_weight (LlamaGen vq_loss.py); taming / LDM: 1.0
    "disc_start": 20000,  # generator steps before the adversarial terms switch on
    "disc_loss": "hinge",  # hinge | non_saturating
    "gen_adv_loss": "hinge",
    "adaptive_weight": False,  # VQGAN: true; LlamaGen: false
}


def _uncounted(optimizer: Any) -> Any:
    """Keep a LightningOptimizer's step out of trainer.global_step (re-applied every batch: the manual loop
    re-installs its counting hooks in on_run_start)."""
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    return optimizer


class AutoencoderTraining(GenerativeModule):
    """Trains a `VQAutoencoder` or `KLAutoencoder` (`net`) against an optional PatchGAN with optional LPIPS."""

    def __init__(
        self,
        net: VQAutoencoder | KLAutoencoder,
        optimizer: Mapping[str, Any],
        image_size: int,
        batch_global: int,
        loss: Mapping[str, Any] | None = None,
        discriminator: nn.Module | None = None,
        perceptual: nn.Module | None = None,
        disc_optimizer: Mapping[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.0,
        compile: bool = False,
        val_seed: int = 0,
        init_from: str | None = None,
        usage_every_n_steps: int = 100,
        restart_dead_codes_every: int = 0,
        export_name: str | None = None,
        val_digit_metrics: bool = False,
        cache_dir: str | None = None,
        rfid_inception_weights: str | None = None,
        rfid_inception_sha256: str | None = "official",
    ):
        """`ema_decay` 0 keeps no average (LlamaGen's default: `ema.` then holds the trained weights);
        `disc_optimizer` null uses `optimizer`'s settings for D (LlamaGen and taming do)."""
        super().__init__(net, PixelTokenizer(), sampler=None, optimizer=optimizer, image_size=image_size,
                         batch_global=batch_global, ema_decay=ema_decay, compile=compile, val_seed=val_seed,
                         init_from=init_from)
        self.automatic_optimization = False
        unknown = set(loss or {}) - set(LOSS_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown model.loss keys {sorted(unknown)}; known: {sorted(LOSS_DEFAULTS)}")
        self.loss_cfg = {**LOSS_DEFAULTS, **(loss or {})}
        if self.loss_cfg["reconstruction"] not in ("l1", "l2"):
            raise ValueError(f"model.loss.reconstruction={self.loss_cfg['reconstruction']!r}: use l1 or l2")
        if self.loss_cfg["perceptual_weight"] > 0 and perceptual is None:
            raise ValueError("model.loss.perceptual_weight > 0 needs model.perceptual (an LPIPS with local weights); "
                             "set model.loss.perceptual_weight=0 to train without it")
        self.discriminator = discriminator
        self.perceptual = perceptual.requires_grad_(False).eval() if perceptual is not None else None
        self.disc_optimizer_cfg = dict(disc_optimizer) if disc_optimizer else None
        self.grad_clip = grad_clip
        self.usage_every_n_steps = usage_every_n_steps
        #: VQ: restart codes unused over this many generator steps (0: never, LlamaGen and taming).
        self.restart_dead_codes_every = restart_dead_codes_every
        self._restart_counts: Tensor | None = None
        self._restarted_at = -1
        self.export_name = export_name
        self.val_digit_metrics = val_digit_metrics
        self.cache_dir = cache_dir
        #: torch-fidelity's Inception weights file: validation then logs val/rfid (reconstructions vs the
        #: validation images through visgen.eval's Inception and Fréchet distance).
        self.rfid_inception_weights = rfid_inception_weights
        self.rfid_inception_sha256 = rfid_inception_sha256  # "official": torch-fidelity's file; null: any weights
        self._rfid_sums: dict[str, list[Tensor]] = {}
        #: Micro-batches per optimizer step; train.py sets it (manual optimisation: the Trainer must keep 1).
        self.accumulate_grad_batches = 1
        self.is_vq = isinstance(net, VQAutoencoder)
        self._train_counts: Tensor | None = None  # code counts since the last usage log
        self._val_counts: Tensor | None = None
        self._val_recon: list[tuple[Tensor, Tensor]] = []  # (reconstructions uint8, labels) per val batch
        self._grid_images: Tensor | None = None  # fixed images whose reconstructions `sample` shows
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        # torchmetrics keeps their states out of state_dict and reduces them over ranks at epoch end
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ----- losses --------------------------------------------------------------------------
    def _reconstruct(self, net: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]:
        """images -> (reconstruction, regulariser loss, its logged parts, codes or None)."""
        if self.is_vq:
            recon, quantized = net(images)
            reg = self.loss_cfg["codebook_weight"] * quantized.loss
            parts = {"codebook_loss": quantized.codebook_loss, "commitment_loss": quantized.commitment_loss,
                     "entropy_loss": quantized.entropy_loss, "latents": quantized.latents}
            return recon, reg, parts, quantized.codes
        recon, mean, logvar = net(images)
        # LDM sums the reconstruction over pixel values and weights the KL (summed over latent dims) by 1e-6;
        # here the reconstruction is a mean, so the KL is divided by the values per image to keep LDM's balance.
        kl = kl_divergence(mean, logvar).mean() / images[0].numel()
        return recon, self.loss_cfg["kl_weight"] * kl, {"kl": kl}, None

    def reconstruction_loss(self, recon: Tensor, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """w_rec · L1/L2 + w_p · LPIPS, and its parts for logging."""
        cfg = self.loss_cfg
        recon = recon.float()
        pixel = F.mse_loss(recon, images) if cfg["reconstruction"] == "l2" else F.l1_loss(recon, images)
        total = cfg["reconstruction_weight"] * pixel
        parts = {"rec_loss": pixel}
        if self.perceptual is not None and cfg["perceptual_weight"] > 0:
            perceptual = self.perceptual(recon, images).mean()
            total = total + cfg["perceptual_weight"] * perceptual
            parts["perceptual_loss"] = perceptual
        return total, parts

    def gan_active(self, step: int | None = None) -> bool:
        """True once `disc_start` generator steps are done (and a discriminator exists)."""
        step = self.global_step if step is None else step
        return self.discriminator is not None and step >= self.loss_cfg["disc_start"]

    def generator_loss(self, images: Tensor, step: int | None = None
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]:
        """L_G on one batch in [-1, 1]: (total, reconstruction x̂, logged parts, codes or None).

        D is run on x̂ once the GAN is active (`step`, default the global step); training_step freezes its
        parameters for this backward. `parts["latents"]` (VQ) holds the searched vectors for restarts."""
        cfg = self.loss_cfg
        recon, reg, parts, codes = self._reconstruct(self.net, images)
        rec, rec_parts = self.reconstruction_loss(recon, images)
        parts.update(rec_parts)
        total = rec + reg
        if self.gan_active(step):
            adv = gan.generator_adversarial_loss(self.discriminator(recon), cfg["gen_adv_loss"])
            weight = adv.new_ones(())
            if cfg["adaptive_weight"]:
                # A KL autoencoder follows LDM, whose nll is a sum over the C·H·W values of an image (here a
                # mean: see `_reconstruct`); LDM's clamp λ <= 1e4 on that scale is 1e4 / (C·H·W) on this one.
                # (measured against LDM's LPIPSWithDiscriminator: equal losses, clamp included; notes in tok.md)
                limit = 1e4 if self.is_vq else 1e4 / images[0].numel()
                weight = gan.adaptive_weight(rec, adv, self.net.last_layer, max_weight=limit)
            total = total + cfg["disc_weight"] * weight * adv
            parts.update(gen_adv_loss=adv, adaptive_weight=weight)
        return total, recon, parts, codes

    def discriminator_loss(self, images: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_D on real images and (detached) reconstructions: (loss, logged parts). D's loss is scaled by
        `disc_loss_weight`, or by `disc_weight` when that is null (LlamaGen; taming and LDM use 1)."""
        cfg = self.loss_cfg
        logits_real, logits_fake = self.discriminator(images), self.discriminator(recon.detach())
        weight = cfg["disc_weight"] if cfg["disc_loss_weight"] is None else cfg["disc_loss_weight"]
        d_loss = weight * gan.discriminator_loss(logits_real, logits_fake, cfg["disc_loss"])
        return d_loss, {"disc_loss": d_loss, "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}

    @torch.no_grad()
    def _restart_dead_codes(self, optimizer: Any, latents: Tensor, everything: bool = False) -> None:
        """Move the codes no position chose since the last restart (or all of them: the data-dependent init at
        step 0) onto encoder outputs of this batch and clear their Adam moments. Rank 0 picks and broadcasts,
        so every rank keeps the same codebook."""
        counts = self._restart_counts if self._restart_counts is not None else torch.zeros(self.net.num_codes)
        counts = self.trainer.strategy.reduce(counts.float().to(self.device), reduce_op="sum")
        dead = torch.ones_like(counts, dtype=torch.bool) if everything else counts == 0
        weight = self.net.quantize.embedding.weight
        before = weight.detach().clone()
        moved = self.net.quantize.restart_codes(dead, latents)
        weight.copy_(self.trainer.strategy.broadcast(weight.detach(), src=0))
        changed = (weight != before).any(dim=1)  # (K,)
        for value in getattr(optimizer, "optimizer", optimizer).state.get(weight, {}).values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                value[changed] = 0.0  # Adam moments of the moved codes
        self._restart_counts = None
        self._restarted_at = self.global_step
        self.log("train/codes_restarted", float(moved))

    # ----- training ------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """One micro-batch: generator backward, discriminator backward; both step at the accumulation boundary."""
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers[0], _uncounted(optimizers[1])) if isinstance(optimizers, list) \
            else (optimizers, None)
        accumulate = self.accumulate_grad_batches
        images = from_uint8(batch["image"])  # (B, 3, H, W) in [-1, 1]
        if self._grid_images is None:
            self._grid_images = images[:32].detach().clone()
        gan = self.gan_active()  # fixed for the whole micro-batch: opt_g.step() below advances global_step

        if self.is_vq and self.restart_dead_codes_every and self.global_step == 0 and self._restarted_at < 0:
            with torch.no_grad():  # data-dependent codebook init: every code starts on an encoder output
                self._restart_dead_codes(opt_g, self.net.quantize.flatten(self.net.encode(images)), everything=True)

        # generator: D's parameters are frozen for this pass (toggle), gradients flow through D to x̂
        self.toggle_optimizer(opt_g)
        total, recon, parts, codes = self.generator_loss(images, self.global_step)
        self._check_finite(total)
        self.manual_backward(total / accumulate)
        self.untoggle_optimizer(opt_g)

        # discriminator on the same reconstruction (LlamaGen's order: D sees the generator's pre-step output)
        if gan:
            self.toggle_optimizer(opt_d)
            d_loss, d_parts = self.discriminator_loss(images, recon)
            self.manual_backward(d_loss / accumulate)
            self.untoggle_optimizer(opt_d)
            parts.update(d_parts)

        if (batch_idx + 1) % accumulate == 0:
            self._step(opt_g, self.net, "grad_norm")
            if opt_d is not None:
                if gan:
                    self._step(opt_d, self.discriminator, "disc_grad_norm")
                else:
                    opt_d.zero_grad(set_to_none=True)
            self._step_schedulers()
        if codes is not None:
            counts = code_usage(codes.detach(), self.net.num_codes)  # (K,)
            self._log_usage(counts)
            self._restart_counts = counts if self._restart_counts is None else self._restart_counts + counts
            every, step = self.restart_dead_codes_every, self.global_step
            if (batch_idx + 1) % accumulate == 0 and every and step % every == 0 and step != self._restarted_at:
                self._restart_dead_codes(opt_g, parts["latents"])
        parts.pop("latents", None)
        self.log("train/loss", total.detach(), prog_bar=True)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in parts.items()})
        return total.detach()

    def _check_finite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite tokenizer loss {loss.item()} at step {self.global_step}; the run stopped and the last "
                "good checkpoint is untouched. Lower model.optimizer.lr or resume with ckpt_path=last."
            )

    def _step(self, optimizer: Any, module: nn.Module, name: str) -> None:
        """Step and zero one optimizer; `on_before_optimizer_step` logs its gradient norm and clips in between."""
        self._stepping = (module, name)
        try:
            optimizer.step()
        finally:
            self._stepping = None
        optimizer.zero_grad(set_to_none=True)

    def _step_schedulers(self) -> None:
        """Advance both lr schedules after the optimizer steps: both are functions of the generator step count.

        D's schedule also advances before disc_start, while D has not stepped yet, so that D starts at
        lr(disc_start); torch's first-call check reads that as a misordered loop and warns, so that one
        warning is silenced for D's scheduler only."""
        for index, scheduler in enumerate(self._schedulers()):
            with warnings.catch_warnings():
                if index:
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        return [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm (before clipping) and clip to `grad_clip`, for the optimizer `_step` is stepping.

        Here, not in training_step: under fp16 Lightning unscales the GradScaler's gradients only inside
        optimizer.step(), just before this hook, so clipping earlier would clip scaled gradients (measured:
        norms of grad_clip / 2**16 instead of grad_clip; tested under 16-mixed)."""
        stepping = getattr(self, "_stepping", None)
        if stepping is None:
            return
        module, name = stepping
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads:
            self.log(f"train/{name}", torch.nn.utils.get_total_norm(grads, norm_type=2.0))
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def _log_usage(self, counts: Tensor) -> None:
        """Codebook usage (% of codes hit) and perplexity over the last `usage_every_n_steps` steps."""
        self._train_counts = counts if self._train_counts is None else self._train_counts + counts
        step = self.global_step
        if self.usage_every_n_steps and step % self.usage_every_n_steps == 0 and step != getattr(self, "_usage_at", -1):
            self._usage_at = step
            self.log_dict(self._usage_metrics(self._train_counts, "train"))
            self._train_counts = None

    @staticmethod
    def _usage_metrics(counts: Tensor, split: str) -> dict[str, float]:
        """usage (% of codes used at least once) and perplexity exp(H) of the code histogram."""
        probs = counts.double() / counts.sum().clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        return {f"{split}/codebook_usage": float((counts > 0).double().mean() * 100),
                f"{split}/codebook_perplexity": float(entropy.exp())}

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """AdamW for the autoencoder (and for D), each with the shared warmup/decay schedule."""
        optimizers = [self._adamw(self.net, self.optimizer_cfg)]
        if self.discriminator is not None:
            optimizers.append(self._adamw(self.discriminator, self.disc_optimizer_cfg or self.optimizer_cfg))
        total = 1
        if self._trainer is not None:  # in generator steps: the Trainer counts micro-batches (it does not accumulate)
            trainer = self.trainer
            total = trainer.max_steps if trainer.max_steps > 0 else int(
                trainer.estimated_stepping_batches) // max(1, self.accumulate_grad_batches)
        cfg = self.optimizer_cfg
        args = (cfg.get("warmup_steps", 0), total, cfg.get("schedule", "constant"), cfg.get("min_lr_ratio", 0.0),
                cfg.get("cooldown_fraction", 0.0))
        lr_multiplier(args[0], *args)  # a bad schedule fails here, not at step N
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, *args))
                      for opt in optimizers]
        return optimizers, schedulers

    def _adamw(self, module: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
        lr = cfg["lr"] * (self.batch_global / cfg["lr_batch_base"] if cfg.get("lr_batch_base") else 1.0)
        groups = param_groups(module, cfg.get("weight_decay", 0.0), cfg.get("decay_min_ndim", 2))
        # Lightning refuses to clip the gradients of a fused optimizer (it would unscale them itself): foreach then
        fused = self.device.type in ("cuda", "cpu") and not self.grad_clip
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8),
                                 fused=fused)

    # ----- validation ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_counts, self._val_recon, self._rfid_sums = None, [], {}

    def _inception(self) -> nn.Module:
        """visgen.eval's Inception, built on first use and kept out of the module tree (and of checkpoints)."""
        if getattr(self, "_inception_net", None) is None:
            from visgen.eval.inception import INCEPTION_SHA256, InceptionFeatures

            sha = INCEPTION_SHA256 if self.rfid_inception_sha256 == "official" else self.rfid_inception_sha256
            net = InceptionFeatures(self.rfid_inception_weights, expected_sha256=sha, spatial=False)
            object.__setattr__(self, "_inception_net", net)
        return self._inception_net.to(self.device)

    def _accumulate_rfid(self, name: str, images_uint8: Tensor) -> None:
        """Add Inception pool features to float64 (count, Σx, Σxxᵀ): reducible over ranks whatever their counts."""
        feats = self._inception()(images_uint8)["pool"].double()  # (B, 2048)
        sums = [feats.new_tensor(float(len(feats))), feats.sum(0), feats.T @ feats]
        previous = self._rfid_sums.get(name)
        self._rfid_sums[name] = sums if previous is None else [a + b for a, b in zip(previous, sums, strict=True)]

    def _rfid(self) -> float:
        """Fréchet distance between reconstructions and originals, from the rank-summed statistics."""
        from visgen.eval.metrics import GaussianStats, frechet_distance_from_stats

        stats = []
        for name in ("recon", "real"):
            count, total, outer = (self.trainer.strategy.reduce(t, reduce_op="sum") for t in self._rfid_sums[name])
            mu = total / count
            sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)  # unbiased, as np.cov
            stats.append(GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy(), int(count)))
        return frechet_distance_from_stats(*stats)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """EMA reconstructions of held-out images: loss, PSNR, SSIM, code usage; the first batch as a grid."""
        images = from_uint8(batch["image"])
        recon, _, _, codes = self._reconstruct(self.ema, images)
        rec, _ = self.reconstruction_loss(recon, images)
        recon01, images01 = (recon.float().clamp(-1, 1) + 1) / 2, (images + 1) / 2  # [0, 1] for the metrics
        self.val_psnr(recon01, images01)
        self.val_ssim(recon01, images01)
        size = len(images)
        self.log("val/loss", rec, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=size)
        self.log("val/ssim", self.val_ssim, batch_size=size)
        if codes is not None:
            counts = code_usage(codes, self.net.num_codes)
            self._val_counts = counts if self._val_counts is None else self._val_counts + counts
        if self.rfid_inception_weights:
            self._accumulate_rfid("recon", to_uint8(recon))
            self._accumulate_rfid("real", to_uint8(images))
        if self.val_digit_metrics:  # with the labels of this batch: the stream's order is not load_all's
            self._val_recon.append((to_uint8(recon).cpu(), batch["label"].cpu()))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._grid_images = images[:32].detach().clone()
            pairs = torch.stack([to_uint8(images[:32]), to_uint8(recon[:32])], dim=1).flatten(0, 1)  # orig, recon
            path = Path(self.trainer.default_root_dir) / "samples" / f"recon_{self.global_step:07d}.png"
            save_grid(pairs.cpu(), path, nrow=16)

    def on_validation_epoch_end(self) -> None:
        if self._rfid_sums:
            self.log("val/rfid", self._rfid(), rank_zero_only=True)
        if self._val_counts is not None:
            counts = self.trainer.strategy.reduce(self._val_counts.float(), reduce_op="sum")
            self.log_dict(self._usage_metrics(counts, "val"), rank_zero_only=True)
        if self.val_digit_metrics and self._val_recon and self.trainer.is_global_zero:
            recon, labels = (torch.cat(parts) for parts in zip(*self._val_recon, strict=True))
            self.log_dict(self._digit_metrics(recon, labels), rank_zero_only=True)
        self._val_recon = []

    def _digit_metrics(self, recon_uint8: Tensor, labels: Tensor) -> dict[str, float]:
        """The digit classifier's accuracy and FID on reconstructions of the validation digits (rank 0's share)."""
        from visgen.data.stream import load_all
        from visgen.eval.classifier import load_or_train_digit_classifier
        from visgen.eval.metrics import classifier_metrics

        data = self.trainer.datamodule
        val_images, _ = load_all(data.val_shards, data.image_size)
        cache = Path(self.cache_dir or ".cache")
        classifier = load_or_train_digit_classifier(data.train_shards, data.val_shards, cache)
        metrics = classifier_metrics(classifier, recon_uint8, labels, val_images)
        return {f"val/recon_{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def sample(self, labels: Tensor, sampler: Any = None, generator: torch.Generator | None = None,
               use_ema: bool = True) -> Tensor:
        """What the sample-grid callback shows for a tokenizer: originals and reconstructions, interleaved (uint8)."""
        if self._grid_images is None:
            raise RuntimeError("no images seen yet: run a training or validation step before asking for a grid")
        images = self._grid_images[: max(1, len(labels) // 2)]
        net = self.ema if use_ema else self.net
        recon = self._reconstruct(net, images)[0]
        return torch.stack([to_uint8(images), to_uint8(recon)], dim=1).flatten(0, 1)  # (2N, 3, H, W)

    # ----- checkpoints and export ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also record the autoencoder's layout, so a `.ckpt` alone rebuilds the tokenizer."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["visgen"]["autoencoder_config"] = dict(self.net.config)
        checkpoint["visgen"]["autoencoder_kind"] = "vq" if self.is_vq else "kl"

    def on_train_end(self) -> None:
        """Export the EMA autoencoder next to the checkpoints (rank 0): what generator presets point at."""
        if self.export_name and self.trainer.is_global_zero:
            log.info("exported tokenizer: %s", self.export(Path(self.trainer.default_root_dir)))

    def export(self, run_dir: Path) -> Path:
        """VQ: `<run_dir>/tokenizer.safetensors` (weights + layout); KL: `<run_dir>/tokenizer/`, a diffusers
        AutoencoderKL directory (what model/tokenizer=sd_vae_ema loads with pretrained=<dir>)."""
        if self.is_vq:
            from visgen.tokenizers.vq import save_vq_tokenizer

            return save_vq_tokenizer(self.ema, run_dir / "tokenizer.safetensors", self.export_name or "vq")
        out = run_dir / "tokenizer"
        self.ema.to_diffusers().save_pretrained(out)
        return out
