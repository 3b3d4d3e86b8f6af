"""Reconstruction metrics of a tokenizer: PSNR/SSIM against direct values, codebook usage and perplexity."""

import math

import pytest
import torch

from visgen.tokenizers import PixelTokenizer
from visgen.tokenizers.reconstruction import reconstruct, reconstruction_metrics


def test_metrics_of_a_perfect_and_a_noisy_reconstruction():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    recon, codes = reconstruct(PixelTokenizer(), images)
    assert codes is None and torch.equal(recon, images)  # the identity tokenizer reconstructs exactly
    assert reconstruction_metrics(images, recon)["ssim"] == pytest.approx(1.0)
    noisy = (images.int() + 8).clamp(0, 255).to(torch.uint8)
    mse = ((noisy.float() - images.float()) / 255).pow(2).mean().item()
    assert reconstruction_metrics(images, noisy)["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)


def test_codebook_usage_and_perplexity():
    codes = torch.tensor([[0, 1], [2, 3]])  # 4 of 8 codes, each once: perplexity 4
    blank = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    metrics = reconstruction_metrics(blank, blank, codes, vocab_size=8)
    assert metrics["codebook_usage_percent"] == 50.0 and metrics["codebook_perplexity"] == pytest.approx(4.0)
