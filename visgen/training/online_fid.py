"""Online FID during training: every N steps, M samples from the EMA net on all ranks, FID and IS logged.

    python train.py experiment=dit_xl_2 callbacks=online_fid \\
        callbacks.online_fid.reference=refs/VIRTUAL_imagenet256_labeled.npz \\
        callbacks.online_fid.inception_weights=weights/weights-inception-2015-12-05-6726825d.pth

Off in every recipe (it costs sampling time); `callbacks=online_fid` adds it to the default callbacks. Each rank
samples its share of the chunks of `visgen.eval.sample_job.ChunkPlan` (sample i depends only on (seed, i), so
successive measurements see the same noise and labels and only the weights change), extracts Inception features
on its device, and the pool statistics (float64 sums) and logits are reduced to every rank. Logged as
`online/fid10k` and `online/is10k` (for M = 10,000) at the step: a training-time signal with M samples (10k by
default), not the 50k protocol number `evaluate.py` computes. The global RNG is never touched (exact resume).
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from visgen.eval.inception import INCEPTION_SHA256, InceptionFeatures
from visgen.eval.metrics import GaussianStats, frechet_distance_from_stats, inception_score
from visgen.eval.reference import load_reference
from visgen.eval.sample_job import ChunkPlan, postprocess
from visgen.training.callbacks import EveryNSteps

log = logging.getLogger(__name__)

__all__ = ["OnlineFID"]


class OnlineFID(EveryNSteps):
    """FID (and Inception Score) of `num_samples` EMA samples against a reference, every `every_n_steps` steps."""

    def __init__(self, reference: str, inception_weights: str, every_n_steps: int = 10_000,
                 num_samples: int = 10_000, batch_size: int = 64, seed: int = 0, labels: str = "balanced",
                 quantize: str = "round_half_up", precision: str = "bf16",
                 inception_sha256: str | None = INCEPTION_SHA256, is_splits: int = 10) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"callbacks.online_fid.precision={precision!r} is not one of fp32, bf16")
        if num_samples < max(is_splits, 2):
            raise ValueError(f"callbacks.online_fid.num_samples={num_samples}: the Inception Score's {is_splits} "
                             "splits and a covariance need more samples (10,000 is the default)")
        self.reference_path, self.inception_weights, self.inception_sha256 = reference, inception_weights, (
            inception_sha256)
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.seed, self.labels, self.quantize, self.precision = seed, labels, quantize, precision
        self.is_splits = is_splits
        self.reference: GaussianStats | None = None
        self.inception: InceptionFeatures | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the reference and weights before the first step, not after hours of training."""
        if stage == "fit" and self.every_n_steps > 0:
            self.reference = load_reference(self.reference_path, ["fid"]).stats["fid"]
            self.inception = InceptionFeatures(self.inception_weights, self.inception_sha256, spatial=False)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        metrics = self.measure(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample this rank's chunks, extract features, reduce over ranks; the same numbers on every rank."""
        start = time.perf_counter()
        device = pl_module.device
        inception = self.inception.to(device)
        net = pl_module.ema
        plan = ChunkPlan(self.num_samples, self.batch_size, self.seed, int(getattr(net, "num_classes", 0)),
                         self.labels)
        rank, world = trainer.global_rank, trainer.world_size
        total = torch.zeros(2048, dtype=torch.float64, device=device)
        outer = torch.zeros(2048, 2048, dtype=torch.float64, device=device)
        logits = torch.zeros(self.num_samples, 1008, dtype=torch.float64, device=device)  # rows of other ranks: 0
        latent_shape = pl_module.tokenizer.latent_shape(pl_module.image_size)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        for chunk in plan.chunks_of(rank, world):
            labels = plan.labels_of(chunk).to(device)
            with autocast:
                latents = pl_module.sampler(net, labels, latent_shape, generator=plan.generator(chunk, device))
                decoded = pl_module.tokenizer.decode(latents)
            feats = inception(postprocess(decoded, self.quantize))
            pool = feats["pool"].double()  # (n, 2048)
            total += pool.sum(0)
            outer += pool.T @ pool
            first, last = plan.bounds(chunk)
            logits[first:last] = feats["logits"].double()
        total, outer, logits = (trainer.strategy.reduce(t, reduce_op="sum") for t in (total, outer, logits))
        mu = total / self.num_samples
        sigma = (outer - self.num_samples * torch.outer(mu, mu)) / (self.num_samples - 1)
        fid = frechet_distance_from_stats(GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy()), self.reference)
        is_mean, _ = inception_score(logits.cpu(), splits=self.is_splits)
        count = f"{self.num_samples // 1000}k" if self.num_samples % 1000 == 0 else str(self.num_samples)
        log.debug("online FID took %.1f s", time.perf_counter() - start)
        return {f"online/fid{count}": fid, f"online/is{count}": is_mean}
