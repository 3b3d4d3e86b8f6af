"""How well a tokenizer reconstructs: PSNR, SSIM, codebook usage, and on the built-in digits the classifier's
accuracy and FID of the reconstructions (the ceiling for any generator working on its codes).

    python -m visgen.tokenizers.reconstruction --tokenizer logs/demo_vq/tokenizer.safetensors \
        --data-dir data/digits --out logs/demo_vq/reconstruction.json

On the digits it reconstructs `--num-images` class-balanced training digits (1,000: what evaluate.py scores a
generator's samples on) and compares them with the 500 validation digits, as evaluate.py compares samples, next
to the same training digits unreconstructed: a generator on these codes cannot beat the reconstructions, and
the reconstructions cannot beat the real digits.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from visgen.sampling import from_uint8, to_uint8
from visgen.tokenizers.base import Tokenizer

__all__ = ["reconstruct", "reconstruction_metrics", "digits_report", "main"]


@torch.no_grad()
def reconstruct(tokenizer: Tokenizer, images_uint8: Tensor, batch_size: int = 250) -> tuple[Tensor, Tensor | None]:
    """uint8 images (N, 3, H, W) -> (reconstructions uint8 (N, 3, H, W), codes (N, h, w) for a VQ else None)."""
    recons, codes = [], []
    for batch in images_uint8.split(batch_size):
        latents = tokenizer.encode(from_uint8(batch))
        if tokenizer.vocab_size is not None:
            codes.append(latents)
        recons.append(to_uint8(tokenizer.decode(tokenizer.sample(latents))))
    return torch.cat(recons), (torch.cat(codes) if codes else None)


def reconstruction_metrics(images_uint8: Tensor, recon_uint8: Tensor, codes: Tensor | None = None,
                           vocab_size: int | None = None) -> dict[str, float]:
    """PSNR (dB, on [0, 1]), SSIM (torchmetrics) and, for codes, the % of the codebook used and its perplexity."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    real, fake = images_uint8.float() / 255, recon_uint8.float() / 255
    mse = F.mse_loss(fake, real).item()
    metrics = {"psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
               "ssim": float(structural_similarity_index_measure(fake, real, data_range=1.0))}
    if codes is not None and vocab_size:
        from visgen.nn.quantize import code_usage

        counts = code_usage(codes, vocab_size).double()
        probs = counts / counts.sum()
        metrics["codebook_usage_percent"] = float((counts > 0).double().mean() * 100)
        metrics["codebook_perplexity"] = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
    return metrics


def digits_report(tokenizer: Tokenizer, data_dir: Path, cache_dir: Path, num_images: int = 1000) -> dict[str, float]:
    """Reconstruction metrics on class-balanced training digits, with the classifier's view of them."""
    from visgen.data.builtin import IMAGE_SIZE, TRAIN_SHARDS, VAL_SHARDS
    from visgen.data.stream import load_all
    from visgen.eval.classifier import load_or_train_digit_classifier
    from visgen.eval.metrics import classifier_metrics, fid_floor

    train, val = str(data_dir / TRAIN_SHARDS), str(data_dir / VAL_SHARDS)
    train_images, train_labels = load_all(train, IMAGE_SIZE)
    val_images, _ = load_all(val, IMAGE_SIZE)
    per_class = num_images // 10
    pick = torch.cat([torch.nonzero(train_labels == c)[:per_class, 0] for c in range(10)])
    images, labels = train_images[pick], train_labels[pick]
    started = time.perf_counter()
    recon, codes = reconstruct(tokenizer, images)
    seconds = time.perf_counter() - started
    classifier = load_or_train_digit_classifier(train, val, cache_dir)
    report = {"tokenizer_id": tokenizer.id, "num_images": len(images), "reconstruct_seconds": round(seconds, 2)}
    report.update(reconstruction_metrics(images, recon, codes, tokenizer.vocab_size))
    if codes is not None:
        report["codes_per_image"] = int(codes[0].numel())
    fake = classifier_metrics(classifier, recon, labels, val_images)
    real = classifier_metrics(classifier, images, labels, val_images)
    report.update({"classifier_accuracy": fake["classifier_accuracy"], "fid_classifier": fake["fid_classifier"],
                   "real_classifier_accuracy": real["classifier_accuracy"],
                   "real_fid_classifier": real["fid_classifier"],
                   "fid_classifier_floor": fid_floor(classifier, val_images, train_images)})
    return report


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: load a VQ tokenizer file (or a Hydra tokenizer config) and report its reconstructions of the digits."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="an exported VQ tokenizer file (tokenizer.safetensors)")
    parser.add_argument("--data-dir", default="data/digits", help="where the built-in digit shards are")
    parser.add_argument("--cache-dir", default=".cache", help="the digit classifier's cache")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    from visgen.tokenizers.vq import VQTokenizer

    tokenizer = VQTokenizer(args.tokenizer)
    report = digits_report(tokenizer, Path(args.data_dir), Path(args.cache_dir), args.num_images)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
